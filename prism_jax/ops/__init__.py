"""The PRISM recurrence: one contract, several implementations that agree."""

from prism_jax.ops.api import (IMPLS, check_inputs, gated_delta_rule, prism_recurrence,
                               resolve_impl)
from prism_jax.ops.assoc import assoc_prism
from prism_jax.ops.chunk import chunk_prism
from prism_jax.ops.naive import naive_prism
from prism_jax.ops.recurrent import prism_step

__all__ = [
    "IMPLS", "assoc_prism", "check_inputs", "chunk_prism", "gated_delta_rule", "naive_prism",
    "prism_recurrence", "prism_step", "resolve_impl",
]
