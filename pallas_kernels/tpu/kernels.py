"""Pallas (Mosaic TPU) kernels of the chunked PRISM recurrence.

Head-major layout so every block's last two dims are (C, K) or (C, V): rows on sublanes, the
head dim on lanes (lane-dense at K, V = 128; at 64 the block spans the full dim, which Mosaic
accepts). Per-position gates come in two thin layouts, columns [.., C, 1] and rows [.., 1, C],
so the kernels never transpose a vector. The passes over chunks put the chunk axis last in the
grid, marked "arbitrary", with the float32 state in a VMEM scratch buffer that persists across
its steps; every other axis is "parallel".

Arrays: q [B,H,T,K]; k [B,H,L,T,K]; v [B,H,L,T,V]; beta [B,H,L,T,1]; G_col [B,H,T,1] and
G_row [B,H,N,1,C] (chunk-local cumulative log-decay); seq_col, prev_col [B,T,1] and
seq_row [B,N,1,C] (float32 packed-sequence indices); states [B,H,K,V]; per-chunk states
h [B,H,N,K,V] float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from prism_jax.ops import chunk_math as cm


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """chunk: positions per chunk (C, a multiple of 8); block_v: value columns per program of
  the passes over chunks (a multiple of 128, or all of V)."""
  chunk: int = 64
  block_v: int = 128

  def __post_init__(self):
    if self.chunk < 16 or self.chunk & (self.chunk - 1):
      raise ValueError(f"BlockSizes.chunk must be a power of two >= 16, got {self.chunk}")
    if self.block_v % 128:
      raise ValueError(f"BlockSizes.block_v must be a multiple of 128, got {self.block_v}")


def _interpret(flag: bool):
  return pltpu.InterpretParams() if flag else False


def _params(*semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


PARALLEL3 = ("parallel", "parallel", "parallel")
SEQUENTIAL4 = ("parallel", "parallel", "parallel", "arbitrary")


def _gates(G_col_ref, G_row_ref, seq_col_ref, seq_row_ref, prev_ref):
  return cm.chunk_gates(G_col_ref[...], G_row_ref[...], seq_col_ref[...], seq_row_ref[...],
                        prev_ref[...])


def _load(refs):
  return [r[...].astype(jnp.float32) for r in refs]


# Kernel bodies. Gate refs come as (G_col, G_row, seq_col, seq_row, prev_col).

def _prepare_kernel(*refs, L, precision):
  k_refs, v_refs, beta_refs, gate_refs, (u_ref, wk_ref) = cm.split_refs(refs, (L, L, L, 5, 2))
  gates = _gates(*gate_refs)
  k, beta = _load(k_refs), _load(beta_refs)
  w = [b * x for b, x in zip(beta, _load(v_refs))]
  intra = cm.intra_chunk(k, w, beta[0], gates, precision)
  u_ref[...] = intra.u
  wk_ref[...] = intra.wk


def _state_forward_kernel(*refs, L, precision):
  (k_refs, v_refs, beta_refs, gate_refs,
   (u_ref, wk_ref, h0_ref, h_ref, x_ref, hT_ref, state_ref)) = cm.split_refs(refs, (L, L, L, 5, 7))
  n = pl.program_id(3)

  @pl.when(n == 0)
  def _():
    state_ref[...] = h0_ref[...]

  state = state_ref[...]
  gates = _gates(*gate_refs)
  k, beta = _load(k_refs), _load(beta_refs)
  w = [b * x for b, x in zip(beta, _load(v_refs))]
  h_ref[...] = state
  x = u_ref[...] - cm.mm(wk_ref[...], state, precision)
  x_ref[...] = x
  state = cm.next_state(state, x, k, w, gates, precision)
  state_ref[...] = state

  @pl.when(n == pl.num_programs(3) - 1)
  def _():
    hT_ref[...] = state


def _output_kernel(*refs, L, scale, precision):
  (q_ref,), k_refs, v_refs, beta_refs, gate_refs, (x_ref, h_ref, o_ref) = cm.split_refs(
      refs, (1, L, L, L, 5, 3))
  gates = _gates(*gate_refs)
  k, beta = _load(k_refs), _load(beta_refs)
  w = [b * x for b, x in zip(beta, _load(v_refs))]
  q = q_ref[...].astype(jnp.float32) * scale
  o = cm.chunk_output(q, h_ref[...], x_ref[...], k, w, gates, precision)
  o_ref[...] = o.astype(o_ref.dtype)


def _state_backward_kernel(q_ref, k1_ref, G_col_ref, G_row_ref, seq_col_ref, seq_row_ref,
                           prev_ref, wk_ref, do_ref, dhT_ref, dh_ref, dh0_ref, dstate_ref, *,
                           scale, precision):
  i = pl.program_id(3)

  @pl.when(i == 0)
  def _():
    dstate_ref[...] = dhT_ref[...]

  dstate = dstate_ref[...]
  dh_ref[...] = dstate
  gates = _gates(G_col_ref, G_row_ref, seq_col_ref, seq_row_ref, prev_ref)
  q = q_ref[...].astype(jnp.float32) * scale
  dstate = cm.state_cotangent_step(dstate, q, do_ref[...].astype(jnp.float32), wk_ref[...],
                                   k1_ref[...].astype(jnp.float32), gates, precision)
  dstate_ref[...] = dstate

  @pl.when(i == pl.num_programs(3) - 1)
  def _():
    dh0_ref[...] = dstate


def _grads_kernel(*refs, L, scale, precision):
  ((q_ref,), k_refs, v_refs, beta_refs, gate_refs, (h_ref, dh_ref, do_ref, dq_ref),
   dk_refs, dv_refs, dbeta_refs, (dG_ref,)) = cm.split_refs(refs, (1, L, L, L, 5, 4, L, L, L, 1))
  gates = _gates(*gate_refs)
  q = q_ref[...].astype(jnp.float32) * scale
  g = cm.chunk_grads(q, _load(k_refs), _load(v_refs), _load(beta_refs), h_ref[...],
                     dh_ref[...], do_ref[...].astype(jnp.float32), gates, precision)
  dq_ref[...] = g.dq * scale
  for refs_out, values in ((dk_refs, g.dk), (dv_refs, g.dv), (dbeta_refs, g.dbeta)):
    for r, x in zip(refs_out, values):
      r[...] = x
  dG_ref[...] = g.dG


# BlockSpecs for grid (B, H, N) (chunk-parallel) or (B, H, V/BV, N) (passes over chunks, where
# `rev` walks the chunks backwards).

def _idx(seq_grid: bool, rev: bool, N: int):
  """Map grid indices to (b, h, n, j): j is the value block (0 on the parallel grid)."""
  if not seq_grid:
    return lambda f: (lambda b, h, n: f(b, h, n, 0))
  if rev:
    return lambda f: (lambda b, h, j, i: f(b, h, N - 1 - i, j))
  return lambda f: (lambda b, h, j, n: f(b, h, n, j))


def _specs(L, C, K, V, N, *, seq_grid=False, rev=False, BV=None):
  at = _idx(seq_grid, rev, N)
  BV = BV or V
  s = dict(
      q=pl.BlockSpec((None, None, C, K), at(lambda b, h, n, j: (b, h, n, 0))),
      k=[pl.BlockSpec((None, None, None, C, K), at(lambda b, h, n, j, l=l: (b, h, l, n, 0)))
         for l in range(L)],
      v=[pl.BlockSpec((None, None, None, C, BV), at(lambda b, h, n, j, l=l: (b, h, l, n, j)))
         for l in range(L)],
      beta=[pl.BlockSpec((None, None, None, C, 1), at(lambda b, h, n, j, l=l: (b, h, l, n, 0)))
            for l in range(L)],
      gates=[pl.BlockSpec((None, None, C, 1), at(lambda b, h, n, j: (b, h, n, 0))),
             pl.BlockSpec((None, None, None, 1, C), at(lambda b, h, n, j: (b, h, n, 0, 0))),
             pl.BlockSpec((None, C, 1), at(lambda b, h, n, j: (b, n, 0))),
             pl.BlockSpec((None, None, 1, C), at(lambda b, h, n, j: (b, n, 0, 0))),
             pl.BlockSpec((None, C, 1), at(lambda b, h, n, j: (b, n, 0)))],
      rows_k=pl.BlockSpec((None, None, C, K), at(lambda b, h, n, j: (b, h, n, 0))),
      rows_v=pl.BlockSpec((None, None, C, BV), at(lambda b, h, n, j: (b, h, n, j))),
      h=pl.BlockSpec((None, None, None, K, BV), at(lambda b, h, n, j: (b, h, n, 0, j))),
      state=pl.BlockSpec((None, None, K, BV), at(lambda b, h, n, j: (b, h, 0, j))),
  )
  return s


def prepare(k, v, beta, gates, *, bs: BlockSizes, precision, interpret):
  """U [B,H,T,V] and Wk [B,H,T,K] (float32) of every chunk."""
  B, H, L, T, K = k.shape
  V, C = v.shape[-1], bs.chunk
  s = _specs(L, C, K, V, T // C)
  return pl.pallas_call(
      functools.partial(_prepare_kernel, L=L, precision=precision),
      grid=(B, H, T // C),
      in_specs=[*s["k"], *s["v"], *s["beta"], *s["gates"]],
      out_specs=[s["rows_v"], s["rows_k"]],
      out_shape=[jax.ShapeDtypeStruct((B, H, T, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, T, K), jnp.float32)],
      compiler_params=_params(*PARALLEL3), interpret=_interpret(interpret),
      name="prism_prepare_tpu",
  )(*([k] * L), *([v] * L), *([beta] * L), *gates)


def _block_v(bs, V):
  return bs.block_v if V % bs.block_v == 0 else V


def state_forward(k, v, beta, gates, u, wk, h0, *, bs: BlockSizes, precision, interpret):
  """States entering each chunk h [B,H,N,K,V], new values X [B,H,T,V], final state."""
  B, H, L, T, K = k.shape
  V, C = v.shape[-1], bs.chunk
  N, BV = T // C, _block_v(bs, V)
  s = _specs(L, C, K, V, N, seq_grid=True, BV=BV)
  return pl.pallas_call(
      functools.partial(_state_forward_kernel, L=L, precision=precision),
      grid=(B, H, V // BV, N),
      in_specs=[*s["k"], *s["v"], *s["beta"], *s["gates"], s["rows_v"], s["rows_k"],
                s["state"]],
      out_specs=[s["h"], s["rows_v"], s["state"]],
      out_shape=[jax.ShapeDtypeStruct((B, H, N, K, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, T, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((K, BV), jnp.float32)],
      compiler_params=_params(*SEQUENTIAL4), interpret=_interpret(interpret),
      name="prism_state_forward_tpu",
  )(*([k] * L), *([v] * L), *([beta] * L), *gates, u, wk, h0)


def output(q, k, v, beta, gates, x, h, *, scale, bs: BlockSizes, precision, interpret):
  """O [B,H,T,V] in q's dtype."""
  B, H, L, T, K = k.shape
  V, C = v.shape[-1], bs.chunk
  s = _specs(L, C, K, V, T // C)
  return pl.pallas_call(
      functools.partial(_output_kernel, L=L, scale=scale, precision=precision),
      grid=(B, H, T // C),
      in_specs=[s["q"], *s["k"], *s["v"], *s["beta"], *s["gates"], s["rows_v"], s["h"]],
      out_specs=s["rows_v"],
      out_shape=jax.ShapeDtypeStruct((B, H, T, V), q.dtype),
      compiler_params=_params(*PARALLEL3), interpret=_interpret(interpret),
      name="prism_output_tpu",
  )(q, *([k] * L), *([v] * L), *([beta] * L), *gates, x, h)


def state_backward(q, k, gates, wk, do, dhT, *, scale, bs: BlockSizes, precision, interpret):
  """Cotangents of the states leaving each chunk dh [B,H,N,K,V] and of the initial state."""
  B, H, L, T, K = k.shape
  V, C = do.shape[-1], bs.chunk
  N, BV = T // C, _block_v(bs, V)
  s = _specs(1, C, K, V, N, seq_grid=True, rev=True, BV=BV)
  return pl.pallas_call(
      functools.partial(_state_backward_kernel, scale=scale, precision=precision),
      grid=(B, H, V // BV, N),
      in_specs=[s["q"], s["k"][0], *s["gates"], s["rows_k"], s["rows_v"], s["state"]],
      out_specs=[s["h"], s["state"]],
      out_shape=[jax.ShapeDtypeStruct((B, H, N, K, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((K, BV), jnp.float32)],
      compiler_params=_params(*SEQUENTIAL4), interpret=_interpret(interpret),
      name="prism_state_backward_tpu",
  )(q, k, *gates, wk, do, dhT)


def grads(q, k, v, beta, gates, h, dh, do, *, scale, bs: BlockSizes, precision, interpret):
  """Float32 cotangents: dq, L × dk, L × dv, L × dβ [B,H,T,1], dG [B,H,T,1]."""
  B, H, L, T, K = k.shape
  V, C = v.shape[-1], bs.chunk
  s = _specs(L, C, K, V, T // C)
  col = pl.BlockSpec((None, None, C, 1), lambda b, h, n: (b, h, n, 0))
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  return pl.pallas_call(
      functools.partial(_grads_kernel, L=L, scale=scale, precision=precision),
      grid=(B, H, T // C),
      in_specs=[s["q"], *s["k"], *s["v"], *s["beta"], *s["gates"], s["h"], s["h"], s["rows_v"]],
      out_specs=[s["rows_k"]] * (1 + L) + [s["rows_v"]] * L + [col] * (L + 1),
      out_shape=[f32(B, H, T, K)] * (1 + L) + [f32(B, H, T, V)] * L + [f32(B, H, T, 1)] * (L + 1),
      compiler_params=_params(*PARALLEL3), interpret=_interpret(interpret),
      name="prism_grads_tpu",
  )(q, *([k] * L), *([v] * L), *([beta] * L), *gates, h, dh, do)
