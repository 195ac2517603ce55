"""`pallas_prism`: the chunked PRISM recurrence as Pallas kernels (GPU or TPU), any shape.

    S_t = α_t (I − β¹_t k¹_t k¹_tᵀ) S_{t−1} + Σ_{l=1..L} k^l_t (β^l_t δ^l_t)ᵀ,  α_t = exp(g_t)
    o_t = scale · S_tᵀ q_t

This layer adapts any input to what the kernels take — T padded to a multiple of the chunk
(g = 0, β = 0, δ = 0 there, which leaves the state unchanged), K and V zero-padded to powers of
two, the cumulative log-decay and packed-sequence indices precomputed — in plain JAX, so autodiff
carries the cotangents through the padding and the cumulative sum.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings

import jax
import jax.numpy as jnp

from prism_jax.ops.chunk import chunk_prism
from prism_jax.ops.utils import segment_starts

MAX_WRITES = 4  # L: one program keeps the L key/value blocks of a chunk live at once
MAX_HEAD_DIM = 256  # K, V after padding: the per-chunk blocks and the state must fit on chip
MAX_CHUNK = 64  # the C×C products and the inverse stay in registers / VMEM
BACKENDS = ("gpu", "tpu")

_warned: set[str] = set()


def _fall_back(reason: str) -> None:
  """Warn once per reason that the kernel cannot take these inputs."""
  if reason not in _warned:
    _warned.add(reason)
    warnings.warn(f"pallas_prism falls back to chunk_prism: {reason}", RuntimeWarning,
                  stacklevel=3)


# Compiled GPU kernels hold a chunk's key, value and gradient tiles in shared memory (227 KB on
# Hopper). Measured on the H200: float32 inputs at padded K = V = 128 with L = 4 asked for 329 KB;
# bf16 operands halve the tiles. These bounds are what was compiled there (benchmarks/RESULTS.md).
# Since the gradient kernel reads the saved (I + A)⁻¹, U and Wk, float32 at padded K = V = 64
# with L = 4 asks for 240 KB; L = 3 did not finish compiling within the time of that check (the
# offline estimate of benchmarks/shared_memory.py, which errs high, puts it just under the
# limit), so float32 at head dim 64 takes L ≤ 2 until a device compile confirms L = 3.
GPU_MAX_HEAD_DIM = {"float32": 64, "bfloat16": 128, "float16": 128}
GPU_MAX_WRITES_AT_128 = 3
GPU_MAX_WRITES_FLOAT32_AT_64 = 2


def unsupported_reason(q, v, chunk_size, *, backend="gpu", interpret=True) -> str | None:
  """Why the kernels cannot take these shapes, or None when they can."""
  K, L, V = q.shape[-1], v.shape[-2], v.shape[-1]
  dim = max(_padded_dim(K), _padded_dim(V))
  if L > MAX_WRITES:
    return f"L = {L} write keys per token (at most {MAX_WRITES})"
  if dim > MAX_HEAD_DIM:
    return f"head dims K = {K}, V = {V} (at most {MAX_HEAD_DIM})"
  if chunk_size > MAX_CHUNK:
    return f"chunk_size = {chunk_size} (at most {MAX_CHUNK})"
  if backend == "gpu" and not interpret:
    dtype = jnp.dtype(q.dtype).name
    limit = GPU_MAX_HEAD_DIM.get(dtype, 64)
    if dim > limit:
      return (f"{dtype} inputs with head dims K = {K}, V = {V} (padded {dim}; the compiled GPU "
              f"kernels take at most {limit} in {dtype}: cast to bfloat16 or use impl='chunk')")
    if dim > 64 and L > GPU_MAX_WRITES_AT_128:
      return (f"L = {L} write keys at padded head dim {dim} (the compiled GPU kernels take at "
              f"most L = {GPU_MAX_WRITES_AT_128} there)")
    if dtype == "float32" and dim > 32 and L > GPU_MAX_WRITES_FLOAT32_AT_64:
      return (f"L = {L} write keys with float32 inputs at padded head dim {dim} (the compiled "
              f"GPU kernels take at most L = {GPU_MAX_WRITES_FLOAT32_AT_64} there: cast to "
              f"bfloat16 or use impl='chunk')")
  return None


def _padded_dim(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


def _pad(x, axis, size):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def kernel_inputs(g, segment_ids, B, T, chunk):
  """Chunk-local cumulative log-decay G [B, Tp, H] and float32 sequence indices [B, Tp] of each
  position (seq) and of the state entering its chunk (prev), Tp = T rounded up to the chunk."""
  Tp = -(-T // chunk) * chunk
  N = Tp // chunk
  g = _pad(g.astype(jnp.float32), 1, Tp)
  G = jnp.cumsum(g.reshape(B, N, chunk, -1), axis=2).reshape(B, Tp, -1)
  seq = jnp.cumsum(segment_starts(segment_ids, B, T).astype(jnp.float32), axis=1)
  seq = jnp.concatenate([seq, jnp.repeat(seq[:, -1:], Tp - T, axis=1)], axis=1)
  ends = seq.reshape(B, N, chunk)[:, :, -1]
  before = jnp.concatenate([jnp.zeros((B, 1), jnp.float32), ends[:, :-1]], axis=1)  # [B, N]
  prev = jnp.repeat(before, chunk, axis=1)  # [B, Tp]
  return G, seq, prev


def _run_kernels(q, k, v, beta, g, h0, segment_ids, *, scale, chunk, backend, interpret):
  """Pad, run the backend's custom_vjp kernels, crop. Returns (o [B,T,H,V], state [B,H,K,V])."""
  B, T, H, K = q.shape
  V = v.shape[-1]
  Kp, Vp = _padded_dim(K), _padded_dim(V)
  Tp = -(-T // chunk) * chunk
  dtype = q.dtype
  q = _pad(_pad(q, 3, Kp), 1, Tp)
  k = _pad(_pad(k.astype(dtype), 4, Kp), 1, Tp)
  v = _pad(_pad(v.astype(dtype), 4, Vp), 1, Tp)
  beta = _pad(beta.astype(dtype), 1, Tp)
  h0 = _pad(_pad(h0.astype(jnp.float32), 2, Kp), 3, Vp)
  G, seq, prev = kernel_inputs(g, segment_ids, B, T, chunk)
  if backend == "tpu":
    from pallas_kernels.tpu import prism as tpu_prism
    o, hT = tpu_prism.run(q, k, v, beta, G, seq, prev, h0, scale=scale, chunk=chunk,
                          interpret=interpret)
  else:
    from pallas_kernels.gpu import prism as gpu_prism
    bs = gpu_block_sizes(chunk, interpret)
    o, hT = gpu_prism.chunked_prism(q, k, v, beta, G, seq, prev, h0, scale, bs, interpret)
  return o[:, :T, :, :V], hT[:, :, :K, :V]


def gpu_block_sizes(chunk: int, interpret: bool):
  """GPU tiling: PRISM_GPU_BLOCKS (the format of `BlockSizes.parse`) overrides the default, for
  tuning runs; PRISM_MOSAIC_STAGES (a comma list from `gpu.mosaic.STAGES`, "all" or "none";
  adding "narrow" sets `BlockSizes.mosaic_narrow`, "wy_pass" `BlockSizes.wy_pass`)
  replaces the stages that run on their Mosaic GPU versions where they take the shapes.
  Interpret mode splits V and K into blocks of 16 (32 in the passes over chunks) so CPU tests
  cover the loops over column blocks and the key-block partial sums, and keeps every stage on
  the Triton kernels unless PRISM_MOSAIC_STAGES names some (the Mosaic versions have their own
  interpret tests)."""
  from pallas_kernels.gpu.kernels import BlockSizes
  spec = os.environ.get("PRISM_GPU_BLOCKS")
  if spec:
    bs = BlockSizes.parse(spec, chunk)
  else:
    bs = (BlockSizes(chunk=chunk, block_v=16, block_k=16, seq_block_v=32, chunk_block_v=16,
                     mosaic=()) if interpret else BlockSizes(chunk=chunk))
  stages = os.environ.get("PRISM_MOSAIC_STAGES")
  if stages:
    from pallas_kernels.gpu.mosaic import STAGES
    words = [x.strip() for x in stages.split(",") if x.strip() not in ("", "none")]
    flags = ("narrow", "wy_pass")
    names = tuple(STAGES if "all" in words else (x for x in words if x not in flags))
    if not set(names) <= set(STAGES):
      raise ValueError(f"PRISM_MOSAIC_STAGES={stages!r}: unknown stage "
                       f"{sorted(set(names) - set(STAGES))}; Mosaic GPU stages are {STAGES} "
                       '(or "all", "none", "narrow", "wy_pass")')
    bs = dataclasses.replace(bs, mosaic=names, mosaic_narrow="narrow" in words,
                             wy_pass="wy_pass" in words)
  return bs


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _kernels_with_jax_backward(q, k, v, beta, g, h0, segment_ids, scale, chunk, backend,
                               interpret):
  """Kernel forward; backward by differentiating the pure-JAX chunked form (`chunk_prism`)."""
  return _run_kernels(q, k, v, beta, g, h0, segment_ids, scale=scale, chunk=chunk,
                      backend=backend, interpret=interpret)


def _jax_backward_fwd(q, k, v, beta, g, h0, segment_ids, scale, chunk, backend, interpret):
  out = _run_kernels(q, k, v, beta, g, h0, segment_ids, scale=scale, chunk=chunk,
                     backend=backend, interpret=interpret)
  return out, (q, k, v, beta, g, h0, segment_ids)


def _jax_backward_bwd(scale, chunk, backend, interpret, res, cotangents):
  q, k, v, beta, g, h0, segment_ids = res

  def reference(q, k, v, beta, g, h0):
    return chunk_prism(q, k, v, beta, g, initial_state=h0, output_final_state=True,
                       segment_ids=segment_ids, scale=scale, chunk_size=chunk)

  _, vjp = jax.vjp(reference, q, k, v, beta, g, h0)
  return (*vjp(cotangents), None)


_kernels_with_jax_backward.defvjp(_jax_backward_fwd, _jax_backward_bwd)


def pallas_prism(q, k, v, beta, g, *, initial_state=None, output_final_state=False,
                 segment_ids=None, scale=None, chunk_size=64, backward="pallas", interpret=None,
                 backend=None):
  """The PRISM recurrence by Pallas kernels; arguments and results as `prism_recurrence`.

  Args (beyond `prism_recurrence`'s):
    backward: "pallas" (hand-written backward kernels) or "jax" (differentiate `chunk_prism`;
      the reference for the kernels' gradients).
    interpret: run the kernels in Pallas interpret mode; None means interpret unless the
      default device is the kernels' own platform.
    backend: "gpu" or "tpu" kernels; None means the TPU kernels on TPU, else the GPU kernels.

  Shapes the kernels cannot take (see `unsupported_reason`) run `chunk_prism` instead, with one
  warning per reason.
  """
  if backward not in ("pallas", "jax"):
    raise ValueError(f'backward must be "pallas" or "jax", got {backward!r}')
  platform = jax.default_backend()
  if backend is None:
    backend = "tpu" if platform == "tpu" else "gpu"
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
  if interpret is None:
    interpret = platform != backend
  reason = unsupported_reason(q, v, chunk_size, backend=backend, interpret=interpret)
  if reason is not None:
    _fall_back(reason)
    return chunk_prism(q, k, v, beta, g, initial_state=initial_state,
                       output_final_state=output_final_state, segment_ids=segment_ids,
                       scale=scale, chunk_size=chunk_size)
  B, T, H, K = q.shape
  V = v.shape[-1]
  scale = float(K**-0.5 if scale is None else scale)
  h0 = (jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  static = dict(scale=scale, chunk=chunk_size, backend=backend, interpret=bool(interpret))
  if backward == "jax":
    o, final = _kernels_with_jax_backward(q, k, v, beta, g, h0, segment_ids, *static.values())
  else:
    o, final = _run_kernels(q, k, v, beta, g, h0, segment_ids, **static)
  return o.astype(q.dtype), (final if output_final_state else None)
