"""prism_jax: PRISM (Parallel Residual Iterative Sequence Model) in JAX and Flax NNX."""

from prism_jax.ops import gated_delta_rule, prism_recurrence, prism_step

__version__ = "0.1.0"
__all__ = ["gated_delta_rule", "prism_recurrence", "prism_step"]
