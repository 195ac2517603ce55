"""What differs between language modelling, recommendation and probing: data, model, loss, eval.

A task gives the training loop
  - `model_config` and `build_model(rngs)`,
  - `loss_sum(model, batch) -> (Σ token losses, tokens)` (the step divides, so gradient
    accumulation is an exact mean),
  - `train_batch(n)`: this process's rows of global batch n (a dict of int32 arrays),
  - `eval_batches()`: fixed validation batches, and `eval_metrics(model, batch)`: sums of
    per-row metrics inside jit, turned into means by `finish_eval`.
"""

from __future__ import annotations

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prism_jax.data import rec as rec_data
from prism_jax.data import text as text_data
from prism_jax.train.config import model_config


def _rows(array: np.ndarray, batch_size: int, shard: int, num_shards: int,
          pad_with_zeros: bool = False) -> list[np.ndarray]:
  """Split [N, ...] into global batches of `batch_size` rows and keep this process's share.

  The last batch is padded with copies of row 0 (or zeros, for validity masks).
  """
  pad = (-len(array)) % batch_size
  filler = np.repeat(array[:1], pad, axis=0)
  array = np.concatenate([array, filler * 0 if pad_with_zeros else filler])
  per = batch_size // num_shards
  return [array[b + shard * per: b + (shard + 1) * per] for b in range(0, len(array), batch_size)]


def _cross_entropy(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def lm_loss_sum(model, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Σ next-token cross-entropies over tokens [B, T + 1] and their number."""
  logits = model(tokens[:, :-1])                         # [B, T, vocab]
  ce = _cross_entropy(logits, tokens[:, 1:])
  return ce.sum(), jnp.asarray(ce.size, jnp.float32)


class LMTask:
  """Next-token prediction on a text corpus; eval reports loss and bits per byte (or token)."""

  def __init__(self, cfg, shard: int = 0, num_shards: int = 1):
    d = cfg.data
    self.corpus = text_data.load_text_corpus(d.path, val_percent=d.val_percent,
                                             token_dtype=d.token_dtype,
                                             vocab_size=cfg.model.vocab_size)
    self.model_config = model_config(cfg)
    if self.corpus.byte_level and self.model_config.vocab_size < 256:
      raise ValueError(f"model.vocab_size: got {self.model_config.vocab_size}, a byte-level "
                       "corpus needs >= 256")
    self.seq_len, self.batch_size = d.seq_len, d.batch_size
    self.shard, self.num_shards = shard, num_shards
    self.sampler = text_data.WindowSampler(self.corpus.train, d.seq_len, d.batch_size, cfg.seed,
                                           shard, num_shards)
    self.eval_windows = text_data.eval_windows(self.corpus.val, d.seq_len,
                                               cfg.train.eval_batches * d.batch_size)
    self.unit = "bpb" if self.corpus.byte_level else "bits_per_token"

  def describe(self) -> dict:
    v = self.corpus.val
    sample = v if len(v) <= 10_000_000 else v[:10_000_000]
    train = self.corpus.train
    train = train if len(train) <= 50_000_000 else train[:50_000_000]
    return {"corpus": self.corpus.description, "fingerprint": self.corpus.fingerprint,
            "train_tokens": len(self.corpus.train), "val_tokens": len(self.corpus.val),
            f"unigram_{self.unit}": text_data.unigram_bits(train, sample,
                                                           self.model_config.vocab_size)}

  def build_model(self, rngs):
    from prism_jax.models import CausalLM
    return CausalLM(self.model_config, rngs=rngs)

  def loss_sum(self, model, batch):
    return lm_loss_sum(model, batch["tokens"])

  def train_batch(self, n: int) -> dict:
    return {"tokens": self.sampler.batch(n)}

  def eval_batches(self) -> list[dict]:
    return [{"tokens": r} for r in _rows(self.eval_windows, self.batch_size, self.shard,
                                         self.num_shards)]

  def eval_metrics(self, model, batch) -> dict:
    loss_sum, count = self.loss_sum(model, batch)
    return {"loss_sum": loss_sum, "count": count}

  def finish_eval(self, sums: dict) -> dict:
    loss = float(sums["loss_sum"] / sums["count"])
    return {"eval_loss": loss, f"eval_{self.unit}": loss / math.log(2)}


class RecTask:
  """Next-item prediction over full item softmax; eval ranks all items for each user's
  validation target (Hit@K, NDCG@K, AUC) against a most-popular baseline."""

  def __init__(self, cfg, shard: int = 0, num_shards: int = 1):
    d = cfg.data
    if d.path:
      log = rec_data.read_interactions(d.path, d.format, d.on_error)
    else:
      log = rec_data.synthetic_log(d.synthetic_users, d.synthetic_items, cfg.seed,
                                   d.synthetic_min_len, d.synthetic_max_len)
    self.split = rec_data.leave_one_out(log, d.min_user_interactions, d.min_item_interactions)
    self.skipped_lines = log.skipped
    self.model_config = model_config(cfg, num_items=self.split.num_items)
    self.seq_len, self.batch_size, self.k = d.seq_len, d.batch_size, cfg.train.metrics_k
    self.shard, self.num_shards = shard, num_shards
    self.sampler = rec_data.SequenceSampler(self.split.train, d.seq_len, d.batch_size, cfg.seed,
                                            shard, num_shards)

  def eval_arrays(self, which: str = "val") -> tuple[np.ndarray, np.ndarray]:
    """Histories [U, seq_len] and targets [U] for validation or test."""
    target = self.split.val_target if which == "val" else self.split.test_target
    return rec_data.left_pad(self.split.history(which), self.seq_len), target.astype(np.int32)

  def popularity_metrics(self, which: str = "val") -> dict:
    """The same metrics for ranking every user's items by training frequency."""
    from prism_jax import metrics
    _, target = self.eval_arrays(which)
    counts = self.split.item_counts()[1:].astype(np.float32)
    scores = jnp.broadcast_to(jnp.asarray(counts), (len(target), len(counts)))
    t = jnp.asarray(target - 1)
    return {f"hit@{self.k}": float(metrics.hit_at_k(scores, t, self.k).mean()),
            f"ndcg@{self.k}": float(metrics.ndcg_at_k(scores, t, self.k).mean()),
            "auc": float(metrics.auc(scores, t).mean())}

  def describe(self) -> dict:
    pop = self.popularity_metrics()
    return {"users": self.split.num_users, "items": self.split.num_items,
            "skipped_lines": self.skipped_lines,
            **{f"popular_{k}": v for k, v in pop.items()}}

  def build_model(self, rngs):
    from prism_jax.models import SequentialRecommender
    return SequentialRecommender(self.model_config, rngs=rngs)

  def loss_sum(self, model, batch):
    items = batch["items"]                                 # [B, T + 1], 0 = padding
    inputs, targets = items[:, :-1], items[:, 1:]
    scores = model.scores(model(inputs))                   # [B, T, num_items + 1]
    mask = ((inputs > 0) & (targets > 0)).astype(jnp.float32)
    ce = _cross_entropy(scores, targets)
    return (ce * mask).sum(), mask.sum()

  def train_batch(self, n: int) -> dict:
    return {"items": self.sampler.batch(n)}

  def eval_batches(self, which: str = "val") -> list[dict]:
    history, target = self.eval_arrays(which)
    valid = np.ones(len(target), np.int32)
    split = lambda a, zeros=False: _rows(a, self.batch_size, self.shard, self.num_shards, zeros)
    return [{"history": h, "target": t, "valid": v}
            for h, t, v in zip(split(history), split(target), split(valid, True))]

  def eval_metrics(self, model, batch) -> dict:
    from prism_jax import metrics
    scores = model.scores(model(batch["history"]))[:, -1, :]   # [B, num_items + 1]
    target, valid = batch["target"], batch["valid"].astype(jnp.float32)
    ce = _cross_entropy(scores, target)
    item_scores, item_target = scores[:, 1:], target - 1       # drop the padding column
    per_row = {"loss_sum": ce,
               f"hit@{self.k}": metrics.hit_at_k(item_scores, item_target, self.k),
               f"ndcg@{self.k}": metrics.ndcg_at_k(item_scores, item_target, self.k),
               "auc": metrics.auc(item_scores, item_target)}
    sums = {k: (v.astype(jnp.float32) * valid).sum() for k, v in per_row.items()}
    sums["count"] = valid.sum()
    return sums

  def finish_eval(self, sums: dict) -> dict:
    n = sums["count"]
    out = {"eval_loss": float(sums["loss_sum"] / n)}
    out.update({f"eval_{k}": float(v / n) for k, v in sums.items() if k not in ("loss_sum",
                                                                                   "count")})
    return out


class ProbeTask:
  """Synthetic probing tasks (spec §7): loss and accuracy on the answer tokens only.

  Needs `prism_jax.data.synthetic.make_batch(task, batch_size, seq_len, vocab_size, seed)`
  returning {"tokens" [B, T] int32, "targets" [B, T] int32, "mask" [B, T] bool}.
  """

  def __init__(self, cfg, shard: int = 0, num_shards: int = 1):
    try:
      self.synthetic = importlib.import_module("prism_jax.data.synthetic")
    except ModuleNotFoundError as e:
      raise ValueError("task=probe needs the probing task generators in "
                       "prism_jax.data.synthetic, which this checkout does not have yet") from e
    if cfg.data.probe_task not in self.synthetic.TASKS:
      raise ValueError(f"data.probe_task: got {cfg.data.probe_task!r}, need one of "
                       f"{sorted(self.synthetic.TASKS)}")
    self.model_config = model_config(cfg)
    self.task, self.seed = cfg.data.probe_task, cfg.seed
    self.seq_len, self.batch_size = cfg.data.seq_len, cfg.data.batch_size
    self.rows = slice(shard * self.batch_size // num_shards,
                      (shard + 1) * self.batch_size // num_shards)
    self.num_eval = cfg.train.eval_batches

  def describe(self) -> dict:
    return {"probe_task": self.task}

  def _batch(self, seed: int) -> dict:
    b = self.synthetic.make_batch(self.task, self.batch_size, self.seq_len,
                                  self.model_config.vocab_size, seed)
    return {"tokens": np.asarray(b["tokens"], np.int32)[self.rows],
            "targets": np.asarray(b["targets"], np.int32)[self.rows],
            "mask": np.asarray(b["mask"], np.int32)[self.rows]}

  def build_model(self, rngs):
    from prism_jax.models import CausalLM
    return CausalLM(self.model_config, rngs=rngs)

  def loss_sum(self, model, batch):
    logits = model(batch["tokens"])
    mask = batch["mask"].astype(jnp.float32)
    return (_cross_entropy(logits, batch["targets"]) * mask).sum(), mask.sum()

  def train_batch(self, n: int) -> dict:
    return self._batch(self.seed * 1_000_003 + n)

  def eval_batches(self) -> list[dict]:
    return [self._batch(-(self.seed * 1_000_003 + i + 1) % 2**63) for i in range(self.num_eval)]

  def eval_metrics(self, model, batch) -> dict:
    logits = model(batch["tokens"])
    mask = batch["mask"].astype(jnp.float32)
    correct = (logits.argmax(-1) == batch["targets"]).astype(jnp.float32)
    return {"loss_sum": (_cross_entropy(logits, batch["targets"]) * mask).sum(),
            "correct": (correct * mask).sum(), "count": mask.sum()}

  def finish_eval(self, sums: dict) -> dict:
    return {"eval_loss": float(sums["loss_sum"] / sums["count"]),
            "eval_accuracy": float(sums["correct"] / sums["count"])}


def make_task(cfg, shard: int = 0, num_shards: int = 1):
  return {"lm": LMTask, "rec": RecTask, "probe": ProbeTask}[cfg.task](cfg, shard, num_shards)
