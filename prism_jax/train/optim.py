"""AdamW with linear warmup and cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import optax

_NO_DECAY_EMBED = ("embed", "embedding", "wte", "pos_emb")
_NO_DECAY_NORM = ("norm", "scale", "bias", "gain")


def lr_schedule(lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float):
  """lr(s) = lr * s / warmup for s < warmup, then cosine from lr to lr * min_lr_ratio at the end."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=lr * min_lr_ratio)


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))).lower() for k in path]


def decay_mask(params, decay_embeddings: bool = False, decay_norms_and_biases: bool = False):
  """True for leaves that get weight decay: matrices, except embeddings unless asked.

  Vectors (norm scales, biases, gates' offsets) are excluded unless `decay_norms_and_biases`.
  """
  def decide(path, leaf):
    names = _path_names(path)
    if any(n in _NO_DECAY_EMBED or n.endswith("embed") or n.endswith("embedding")
           for n in names):
      return decay_embeddings
    if getattr(leaf, "ndim", 0) < 2 or any(n in _NO_DECAY_NORM for n in names[-1:]):
      return decay_norms_and_biases
    return True
  return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(optim, total_steps: int, params) -> tuple[optax.GradientTransformation,
                                                               optax.Schedule]:
  """(transform, schedule) for the `optim` config section; `params` (or shapes) fix the mask.

  The transform is AdamW without its learning rate: clip(g) -> Adam direction m̂ / (√v̂ + ε)
  -> + weight_decay · p on masked leaves. The step multiplies by -lr(s), with lr(s) computed
  on the host from `schedule`, so the compiled step does not depend on the schedule's
  settings and skipped (non-finite) steps do not advance it.
  """
  schedule = lr_schedule(optim.lr, optim.warmup_steps, total_steps, optim.min_lr_ratio)
  mask = decay_mask(params, optim.decay_embeddings, optim.decay_norms_and_biases)
  parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
  parts += [optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
            optax.add_decayed_weights(optim.weight_decay, mask)]
  return optax.chain(*parts), schedule
