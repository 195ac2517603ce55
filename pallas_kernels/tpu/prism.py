"""The TPU kernels under one `jax.custom_vjp` (same stages as the GPU version), and `run`, which
moves the caller's [B, T, H, ...] arrays to the head-major layout the kernels take."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from prism_jax.ops import chunk_math as cm
from pallas_kernels.tpu import kernels
from pallas_kernels.tpu.kernels import BlockSizes


def _gate_layouts(G, seq, prev, chunk):
  """Column and row layouts of the per-position gates (see kernels' module docstring)."""
  B, H, T = G.shape
  N = T // chunk
  return (G[..., None], G.reshape(B, H, N, 1, chunk), seq[..., None],
          seq.reshape(B, N, 1, chunk), prev[..., None])


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def chunked_prism(q, k, v, beta, G, seq, prev, h0, scale, bs: BlockSizes, interpret: bool):
  """Head-major, kernel-ready arrays: q [B,H,T,K], k [B,H,L,T,K], v [B,H,L,T,V],
  beta [B,H,L,T,1], G [B,H,T] float32, seq / prev [B,T] float32, h0 [B,H,K,V] float32.
  Returns (o [B,H,T,V] in q's dtype, final state [B,H,K,V] float32)."""
  o, hT, _ = _forward(q, k, v, beta, G, seq, prev, h0, scale, bs, interpret)
  return o, hT


def _forward(q, k, v, beta, G, seq, prev, h0, scale, bs, interpret):
  kw = dict(bs=bs, precision=cm.matmul_precision(q.dtype), interpret=interpret)
  gates = _gate_layouts(G, seq, prev, bs.chunk)
  u, wk = kernels.prepare(k, v, beta, gates, **kw)
  h, x, hT = kernels.state_forward(k, v, beta, gates, u, wk, h0, **kw)
  o = kernels.output(q, k, v, beta, gates, x, h, scale=scale, **kw)
  return o, hT, (q, k, v, beta, G, seq, prev, wk, h)


def _fwd(q, k, v, beta, G, seq, prev, h0, scale, bs, interpret):
  o, hT, res = _forward(q, k, v, beta, G, seq, prev, h0, scale, bs, interpret)
  return (o, hT), res


def _bwd(scale, bs, interpret, res, cotangents):
  q, k, v, beta, G, seq, prev, wk, h = res
  do, dhT = cotangents
  kw = dict(scale=scale, bs=bs, precision=cm.matmul_precision(q.dtype), interpret=interpret)
  gates = _gate_layouts(G, seq, prev, bs.chunk)
  dh, dh0 = kernels.state_backward(q, k, gates, wk, do, dhT.astype(jnp.float32), **kw)
  out = kernels.grads(q, k, v, beta, gates, h, dh, do, **kw)
  L = k.shape[2]
  dk, dv, dbeta = out[1:1 + L], out[1 + L:1 + 2 * L], out[1 + 2 * L:1 + 3 * L]
  return (out[0].astype(q.dtype), jnp.stack(dk, axis=2).astype(k.dtype),
          jnp.stack(dv, axis=2).astype(v.dtype), jnp.stack(dbeta, axis=2).astype(beta.dtype),
          out[-1][..., 0], jnp.zeros_like(seq), jnp.zeros_like(prev), dh0)


chunked_prism.defvjp(_fwd, _bwd)


def run(q, k, v, beta, G, seq, prev, h0, *, scale, chunk, interpret):
  """Caller layout in and out: q [B,T,H,K], k [B,T,H,L,K], v [B,T,H,L,V], beta [B,T,H,L],
  G [B,T,H]; returns (o [B,T,H,V], final state [B,H,K,V])."""
  o, hT = chunked_prism(
      jnp.transpose(q, (0, 2, 1, 3)), jnp.transpose(k, (0, 2, 3, 1, 4)),
      jnp.transpose(v, (0, 2, 3, 1, 4)), jnp.transpose(beta, (0, 2, 3, 1))[..., None],
      jnp.transpose(G, (0, 2, 1)), seq, prev, h0, scale, BlockSizes(chunk=chunk), interpret)
  return jnp.transpose(o, (0, 2, 1, 3)), hT
