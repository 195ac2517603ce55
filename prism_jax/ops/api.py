"""Public entry points of the PRISM recurrence: input validation and dispatch.

Every implementation takes the same arrays and returns `(o, final_state)`:

    S_t = α_t (I − β¹_t k¹_t k¹_tᵀ) S_{t−1} + Σ_{l=1..L} k^l_t (β^l_t δ^l_t)ᵀ,  α_t = exp(g_t)
    o_t = scale · S_tᵀ q_t
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from prism_jax.ops.assoc import assoc_prism
from prism_jax.ops.chunk import chunk_prism
from prism_jax.ops.naive import naive_prism

IMPLS = ("auto", "naive", "assoc", "chunk", "pallas")


def _shapes(**arrays) -> str:
  return ", ".join(f"{name}={tuple(a.shape)}" for name, a in arrays.items() if a is not None)


def _check_float(**arrays) -> None:
  for name, a in arrays.items():
    if a is not None and not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"{name} must have a floating dtype, got {a.dtype}")


def _check_rank(name: str, a, rank: int, layout: str) -> None:
  if a.ndim != rank:
    raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(a.shape)}")


def check_inputs(q, k, v, beta, g, initial_state=None, segment_ids=None) -> None:
  """Raise ValueError naming the argument when shapes or dtypes break the contract.

  Static checks only (shapes and dtypes), so they cost nothing under jit.
  """
  _check_float(q=q, k=k, v=v, beta=beta, g=g, initial_state=initial_state)
  _check_rank("q", q, 4, "[B, T, H, K]")
  _check_rank("k", k, 5, "[B, T, H, L, K]")
  _check_rank("v", v, 5, "[B, T, H, L, V]")
  _check_rank("beta", beta, 4, "[B, T, H, L]")
  _check_rank("g", g, 3, "[B, T, H]")
  B, T, H, K = q.shape
  L, V = v.shape[3], v.shape[4]
  seen = _shapes(q=q, k=k, v=v, beta=beta, g=g)
  expected = {"k": (B, T, H, L, K), "v": (B, T, H, L, V), "beta": (B, T, H, L), "g": (B, T, H)}
  for name, arr in (("k", k), ("v", v), ("beta", beta), ("g", g)):
    if tuple(arr.shape) != expected[name]:
      raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected {expected[name]} "
                       f"from q [B,T,H,K] and v [B,T,H,L,V]; got {seen}")
  if T == 0 or K == 0 or V == 0 or L == 0:
    raise ValueError(f"empty dimension in inputs: {seen}")
  if initial_state is not None and tuple(initial_state.shape) != (B, H, K, V):
    raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}, expected "
                     f"[B, H, K, V] = {(B, H, K, V)} (K from q, V from v)")
  if segment_ids is not None:
    if tuple(segment_ids.shape) != (B, T):
      raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}, expected [B, T] = "
                       f"{(B, T)}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"segment_ids must have an integer dtype, got {segment_ids.dtype}")


def check_step_inputs(q, k, v, beta, g, state) -> None:
  """Validation for one decode step (arrays without the time axis)."""
  _check_float(q=q, k=k, v=v, beta=beta, g=g, state=state)
  _check_rank("q", q, 3, "[B, H, K]")
  _check_rank("k", k, 4, "[B, H, L, K]")
  _check_rank("v", v, 4, "[B, H, L, V]")
  _check_rank("beta", beta, 3, "[B, H, L]")
  _check_rank("g", g, 2, "[B, H]")
  _check_rank("state", state, 4, "[B, H, K, V]")
  B, H, K = q.shape
  L, V = v.shape[2], v.shape[3]
  expected = {"k": (B, H, L, K), "v": (B, H, L, V), "beta": (B, H, L), "g": (B, H),
              "state": (B, H, K, V)}
  for name, arr in (("k", k), ("v", v), ("beta", beta), ("g", g), ("state", state)):
    if tuple(arr.shape) != expected[name]:
      raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected {expected[name]}; got "
                       + _shapes(q=q, k=k, v=v, beta=beta, g=g, state=state))


def check_chunk_size(chunk_size) -> None:
  if (not isinstance(chunk_size, int) or chunk_size < 16
      or chunk_size & (chunk_size - 1)):
    raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size!r}")


def resolve_impl(impl: str, q=None, v=None, chunk_size: int = 64) -> str:
  """Map "auto" to the fastest implementation measured for these inputs on the default backend.

  "pallas" where it was measured faster: one GPU, bf16/float16 inputs the compiled kernels take
  (on the H200, B4 T4096 H16 K=V=128: 1.00 / 3.08 ms forward / forward+backward at L = 1 and
  1.29 / 5.34 at L = 2, against 4.72 / 10.26 and 5.68 / 12.57 for "chunk";
  benchmarks/RESULTS.md). "chunk" everywhere else: float32 inputs (the kernels' float32
  products were not timed), TPU (its kernels are verified in interpret mode only), and several
  devices, where the kernels' custom calls would not be partitioned along the batch.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  if (q is None or jax.default_backend() != "gpu" or jax.device_count() != 1
      or jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))):
    return "chunk"
  try:
    from pallas_kernels import unsupported_reason  # type: ignore[attr-defined]
  except ImportError:
    return "chunk"
  if unsupported_reason(q, v, chunk_size, backend="gpu", interpret=False) is None:
    return "pallas"
  return "chunk"


def _pallas_impl() -> Callable:
  try:
    from pallas_kernels import pallas_prism  # type: ignore[attr-defined]
  except ImportError as err:
    raise ValueError('impl="pallas" is not available in this installation') from err
  return pallas_prism


def prism_recurrence(q, k, v, beta, g, *, initial_state=None, output_final_state=False,
                     segment_ids=None, scale=None, chunk_size=64, impl="auto"):
  """The PRISM recurrence over a sequence.

  Args:
    q: [B, T, H, K] queries (the layer L2-normalises them; here they are only scaled).
    k: [B, T, H, L, K] write keys; k[..., 0, :] is also the erase key.
    v: [B, T, H, L, V] write values δ.
    beta: [B, T, H, L] write gates in [0, 1]; beta[..., 0] is also the erase strength.
    g: [B, T, H] log-decay ≤ 0 (α = exp(g)).
    initial_state: optional [B, H, K, V] state before the first token.
    output_final_state: return the state after the last token (else None).
    segment_ids: optional [B, T] integer ids of packed sequences: the state restarts from zero
      wherever the id changes (the first sequence continues from `initial_state`).
    scale: query scale, default K**-0.5.
    chunk_size: chunk length of the chunked and kernel forms (power of two ≥ 16). 64 suits
      GPUs; on a CPU, 32 is usually faster (forward+backward at T = 8192, H = 4, K = V = 64:
      less time than 64 in 5 of 7 runs, 37% less at best; benchmarks/RESULTS.md).
    impl: "auto", "naive", "assoc", "chunk" or "pallas".

  Returns:
    (o [B, T, H, V] in q's dtype, final_state [B, H, K, V] float32 or None).
  """
  check_inputs(q, k, v, beta, g, initial_state, segment_ids)
  check_chunk_size(chunk_size)
  impl = resolve_impl(impl, q, v, chunk_size)
  kwargs = dict(initial_state=initial_state, output_final_state=output_final_state,
                segment_ids=segment_ids, scale=scale)
  if impl == "naive":
    return naive_prism(q, k, v, beta, g, **kwargs)
  if impl == "assoc":
    return assoc_prism(q, k, v, beta, g, **kwargs)
  if impl == "chunk":
    return chunk_prism(q, k, v, beta, g, chunk_size=chunk_size, **kwargs)
  return _pallas_impl()(q, k, v, beta, g, chunk_size=chunk_size, **kwargs)


def gated_delta_rule(q, k, v, beta, g, *, initial_state=None, output_final_state=False,
                     segment_ids=None, scale=None, chunk_size=64, impl="auto"):
  """Gated DeltaNet, the L = 1 case with δ = v:
  S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ, o_t = scale · S_tᵀ q_t.

  Shapes: q, k [B, T, H, K]; v [B, T, H, V]; beta, g [B, T, H]; state [B, H, K, V].
  """
  for name, a, rank in (("k", k, 4), ("v", v, 4), ("beta", beta, 3)):
    if a.ndim != rank:
      raise ValueError(f"gated_delta_rule: {name} must have rank {rank}, got shape "
                       f"{tuple(a.shape)}")
  return prism_recurrence(q, k[:, :, :, None], v[:, :, :, None], beta[..., None], g,
                          initial_state=initial_state, output_final_state=output_final_state,
                          segment_ids=segment_ids, scale=scale, chunk_size=chunk_size, impl=impl)
