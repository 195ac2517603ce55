"""Mechanistic probing (spec §7, paper Table 4) and the PRISM ablations (paper Table 3) on it.

    python benchmarks/probing.py [--steps 10000] [--seeds 3] [--tasks parity local_xor ...]
        [--models transformer la mom prism] [--ablations] [--write benchmarks/RESULTS.md]

Every (model, task, seed) is a fresh CausalLM with D = 16, 2 layers, two heads of 8, vocab 64,
trained on fresh batches of 64 sequences of 128 tokens from `prism_jax.data.synthetic` with
Adam (warmup then cosine decay), cross-entropy on the answer tokens only. Accuracy is the
argmax at the answer tokens on `--eval-batches` held-out batches (seeds disjoint from training).
The table gives mean ± std over seeds beside the paper's numbers; `--write` replaces this
script's section of RESULTS.md ("Probing", or "Ablations" with `--ablations`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import platform
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from prism_jax.data import synthetic
from prism_jax.models import CausalLM, ModelConfig

# Paper Table 4 (Transformer / LA / MoM / PRISM), restated in spec §7.
PAPER = {
    "mqar": (0.98, 0.98, 0.98, 0.98), "poly_recall": (1.00, 1.00, 1.00, 1.00),
    "var_tracking": (0.40, 0.34, 0.35, 0.37), "parity": (1.00, 0.49, 0.50, 1.00),
    "local_xor": (1.00, 0.50, 0.49, 1.00), "modulo_add": (0.23, 0.07, 0.06, 0.50),
    "palindrome": (0.49, 0.49, 0.50, 0.99), "mux": (0.98, 0.98, 0.97, 0.98),
    "silence_gate": (0.82, 0.51, 0.50, 0.66),
}
MODELS = {"transformer": "attention", "la": "la", "mom": "mom", "prism": "prism"}
# Paper Table 3's switches, applied to PRISM (L = 2).
ABLATIONS = {"full": {}, "L=1": {"solver_steps": 1}, "no_nonlinearity": {"use_nonlinearity": False},
             "no_shortconv": {"use_short_conv": False}, "no_gain": {"use_gain": False}}
VOCAB, SEQ_LEN, BATCH = 64, 128, 64
# `--small`: the CI-sized run. PRISM's parity loss sits at ln 2 for a while and then drops
# within ~100 steps; at this budget the drop came in 1 of 4 runs (RESULTS.md, Probing), and
# not reproducibly for a given seed (most likely multi-threaded CPU sums), so the
# CI test checks only that LA stays at chance. Short sequences keep the steps cheap; the
# pattern still sits at a random distance from the query, so the answer has to go through
# the recurrent state.
SMALL = dict(tasks=["parity", "local_xor"], models=["prism", "la"], steps=1000, seeds=1,
             seq_len=32, batch_size=32, lr=3e-3)


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
  """Training budget of one probing run."""
  steps: int = 10_000
  batch_size: int = BATCH
  seq_len: int = SEQ_LEN
  lr: float = 3e-3
  warmup_steps: int = 100
  eval_batches: int = 4


def probe_model_config(model: str, **overrides) -> ModelConfig:
  """The D = 16 probing model with the mixer of `model` (a key of MODELS) for every layer."""
  if model not in MODELS:
    raise ValueError(f"model: unknown probing model {model!r}; known: {sorted(MODELS)}")
  base = dict(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2, head_dim=8,
              mixer_pattern=(MODELS[model],), solver_steps=2, chunk_size=32,
              max_seq_len=SEQ_LEN)
  return ModelConfig(**{**base, **overrides})


def _batch(task: str, settings: ProbeSettings, seed: int) -> dict:
  b = synthetic.make_batch(task, settings.batch_size, settings.seq_len, VOCAB, seed)
  return {k: jnp.asarray(v) for k, v in b.items()}


def _answer_loss(model, batch):
  """Mean cross-entropy over the answer tokens and the number answered correctly."""
  logits = model(batch["tokens"])                      # [B, T, vocab]
  mask = batch["mask"].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  correct = (logits.argmax(-1) == batch["targets"]).astype(jnp.float32)
  return (ce * mask).sum() / mask.sum(), ((correct * mask).sum(), mask.sum())


@functools.lru_cache(maxsize=None)
def _programs(cfg: ModelConfig, settings: ProbeSettings):
  """Jitted (init, step, evaluate) for one model config and budget, shared by every task and
  seed that uses them so each is compiled once (compiling costs more than a short run)."""
  graphdef, _, rest = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  schedule = optax.warmup_cosine_decay_schedule(0.0, settings.lr, settings.warmup_steps,
                                                max(settings.steps, settings.warmup_steps + 1))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))

  def init(seed):
    params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)[1]
    return params, tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    objective = lambda p: _answer_loss(nnx.merge(graphdef, p, rest), batch)
    (loss, _), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def evaluate(params, batch):
    return _answer_loss(nnx.merge(graphdef, params, rest), batch)[1]

  return init, step, evaluate


def train_probe(task: str, cfg: ModelConfig, settings: ProbeSettings, seed: int,
                log_every: int = 0) -> float:
  """Train a fresh CausalLM(cfg) on `task` for settings.steps steps; held-out accuracy."""
  if task not in synthetic.TASKS:
    raise ValueError(f"task: unknown probing task {task!r}; known: {sorted(synthetic.TASKS)}")
  init, step, evaluate = _programs(cfg, settings)
  params, opt_state = init(seed)
  # Training batches are seeded from (seed, step), evaluation batches from a disjoint range.
  base = 1_000_003 * (seed + 1)
  for n in range(settings.steps):
    params, opt_state, loss = step(params, opt_state, _batch(task, settings, base + n))
    if log_every and (n + 1) % log_every == 0:
      print(f"  {task} step {n + 1} loss {float(loss):.4f}", flush=True)
  correct = total = 0.0
  for i in range(settings.eval_batches):
    c, t = evaluate(params, _batch(task, settings, 2**40 + base + i))
    correct, total = correct + float(c), total + float(t)
  return correct / total


def run_grid(tasks, variants: dict[str, ModelConfig], settings: ProbeSettings, seeds: int,
             log=print, on_task_done=None, first_seed: int = 0
             ) -> dict[tuple[str, str], list[float]]:
  """Accuracy per (task, variant) for seeds first_seed .. first_seed + seeds − 1.

  `on_task_done(results, tasks_done)` runs after each task, so a long run leaves its finished
  rows behind if it is stopped.
  """
  results = {}
  for i, task in enumerate(tasks):
    for name, cfg in variants.items():
      accs = []
      for seed in range(first_seed, first_seed + seeds):
        start = time.perf_counter()
        accs.append(train_probe(task, cfg, settings, seed))
        log(f"{task:13s} {name:16s} seed {seed}: {accs[-1]:.3f} "
            f"({time.perf_counter() - start:.0f} s)")
      results[task, name] = accs
    if on_task_done is not None:
      on_task_done(results, tasks[:i + 1])
  return results


def _cell(accs: list[float]) -> str:
  a = np.asarray(accs)
  return f"{a.mean():.2f} ± {a.std():.2f}" if len(a) > 1 else f"{a.mean():.2f}"


def markdown_table(results, tasks, names: list[str], paper: dict | None = None) -> str:
  """Rows = tasks; a column per variant (mean ± std over seeds), then the paper's numbers."""
  head = ["task", "chance", *names] + (["paper " + n for n in names] if paper else [])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for task in tasks:
    row = [task, f"{synthetic.CHANCE[task]:.2f}"]
    row += [_cell(results[task, n]) for n in names]
    if paper:
      row += [f"{p:.2f}" for p in paper[task]]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def provenance(argv: list[str], elapsed_s: float, script: str = "probing") -> str:
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "unknown"
  device = f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()}, " \
           f"{os.cpu_count()} cores)"
  return (f"Command: `python benchmarks/{script}.py {' '.join(argv)}`  \n"
          f"Commit {commit}, device {device}, date "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{elapsed_s / 60:.0f} min wall-clock.")


def replace_section(path: str, title: str, body: str) -> None:
  """Put `## title` + body into the markdown file at `path`, replacing that section only."""
  text = open(path).read() if os.path.exists(path) else "# prism_jax results\n"
  section = f"## {title}\n\n{body.strip()}\n"
  pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
  if pattern.search(text):
    text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
  else:
    text = text.rstrip() + "\n\n" + section
  with open(path, "w") as f:
    f.write(text)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10_000)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--first-seed", type=int, default=0)
  parser.add_argument("--tasks", nargs="+", default=list(synthetic.TASKS),
                      choices=list(synthetic.TASKS))
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  parser.add_argument("--ablations", action="store_true",
                      help="compare PRISM against its Table 3 ablations instead of the models")
  parser.add_argument("--lr", type=float, default=ProbeSettings.lr)
  parser.add_argument("--batch-size", type=int, default=BATCH)
  parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
  parser.add_argument("--small", action="store_true",
                      help=f"the CI budget: {SMALL} (overrides those flags)")
  parser.add_argument("--eval-batches", type=int, default=ProbeSettings.eval_batches)
  parser.add_argument("--write", default="", help="markdown file to put the table into")
  parser.add_argument("--note", default="", help="text put under the table")
  args = parser.parse_args(argv)
  if args.small:
    for key, value in SMALL.items():
      setattr(args, key, value)
  if args.steps < 1 or args.seeds < 1:
    raise ValueError(f"--steps and --seeds must be >= 1, got {args.steps} and {args.seeds}")
  settings = ProbeSettings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                           lr=args.lr, warmup_steps=min(ProbeSettings.warmup_steps,
                                                        args.steps // 10),
                           eval_batches=args.eval_batches)
  if args.ablations:
    variants = {n: probe_model_config("prism", **o) for n, o in ABLATIONS.items()}
    paper = None
  else:
    variants = {m: probe_model_config(m) for m in args.models}
    idx = [list(MODELS).index(m) for m in args.models]
    paper = {t: [PAPER[t][i] for i in idx] for t in args.tasks}
  start = time.perf_counter()

  def report(results, done):
    body = f"{provenance(argv, time.perf_counter() - start)}\n\n"
    body += markdown_table(results, done, list(variants), paper) + "\n"
    if len(done) < len(args.tasks):
      body += f"\nPartial: {len(done)} of {len(args.tasks)} tasks finished so far.\n"
    if args.note:
      body += f"\n{args.note}\n"
    if args.write:
      replace_section(args.write, "Ablations" if args.ablations else "Probing", body)
    return body

  results = run_grid(args.tasks, variants, settings, args.seeds, on_task_done=report,
                     first_seed=args.first_seed)
  print(report(results, args.tasks))
  return results


if __name__ == "__main__":
  main()
