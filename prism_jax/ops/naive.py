"""The sequential PRISM recurrence: a float32 `lax.scan` over time. The ground truth."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prism_jax.ops.recurrent import step_f32
from prism_jax.ops.utils import segment_starts


def naive_prism(q, k, v, beta, g, *, initial_state=None, output_final_state=False,
                segment_ids=None, scale=None):
  """Sequential form of the recurrence (spec §2); arguments as `prism_recurrence`.

  At a segment start the previous state is dropped before the update, so each packed
  sequence runs from a zero state.
  """
  B, T, H, K = q.shape
  V = v.shape[-1]
  scale = K**-0.5 if scale is None else scale
  state0 = (jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
            else initial_state.astype(jnp.float32))
  starts = segment_starts(segment_ids, B, T)

  def body(state, xs):
    q_t, k_t, v_t, b_t, g_t, start_t = xs
    state = jnp.where(start_t[:, None, None, None], 0.0, state)
    o_t, state = step_f32(q_t, k_t, v_t, b_t, g_t, state, scale)
    return state, o_t

  time_major = lambda x: jnp.moveaxis(x.astype(jnp.float32), 1, 0)
  xs = (time_major(q), time_major(k), time_major(v), time_major(beta), time_major(g),
        jnp.moveaxis(starts, 1, 0))
  final, o = jax.lax.scan(body, state0, xs)
  o = jnp.moveaxis(o, 0, 1).astype(q.dtype)  # [B, T, H, V]
  return o, (final if output_final_state else None)
