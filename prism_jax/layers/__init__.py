"""Flax NNX layers: the PRISM mixer, the baselines of spec §6 and the pieces of a block.

Every token mixer takes x [B, T, D] (and optional segment_ids [B, T] of packed sequences) and
returns [B, T, D]; `init_cache(batch_size, max_len)` and `step(x [B, D], cache)` decode one token
at a time, and `prefill(x, cache)` runs the parallel form from a cache and returns the new one.
"""

from prism_jax.layers.attention import CausalSelfAttention, rope
from prism_jax.layers.base import RecurrentMixer
from prism_jax.layers.common import LowRank, RMSNorm, SwiGLU, annotated, dense, l2norm
from prism_jax.layers.conv import ShortConv
from prism_jax.layers.diag_decay import chunk_diag_decay, diag_decay_step, naive_diag_decay
from prism_jax.layers.explicit import (ExplicitSolver, explicit_solver_scan,
                                       explicit_solver_step)
from prism_jax.layers.linear_attention import (GatedLinearAttention, LinearAttention,
                                               MixtureOfMemories)
from prism_jax.layers.prism import GatedDeltaNet, PrismMixer

__all__ = [
    "CausalSelfAttention", "ExplicitSolver", "GatedDeltaNet", "GatedLinearAttention",
    "LinearAttention", "LowRank", "MixtureOfMemories", "PrismMixer", "RMSNorm",
    "RecurrentMixer", "ShortConv", "SwiGLU", "annotated", "chunk_diag_decay", "dense",
    "diag_decay_step", "explicit_solver_scan", "explicit_solver_step", "l2norm",
    "naive_diag_decay", "rope",
]
