"""Shared checks of the Pallas kernels against the sequential reference (values and gradients)."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from host_random import normal, prism_inputs
from pallas_kernels import pallas_prism
from prism_jax.ops import naive_prism
from prism_jax.testing import assert_close
from quick_jit import quick_jit

# (B, T, H, K, V, L, chunk, initial state, packed segments, dtype)
CASES = [
    (2, 1, 1, 32, 32, 1, 16, True, False, jnp.float32),
    (1, 37, 2, 48, 32, 2, 16, True, True, jnp.float32),
    (1, 130, 1, 32, 48, 3, 32, False, False, jnp.float32),
    (1, 37, 1, 32, 32, 2, 16, True, True, jnp.bfloat16),
    # Chunks of 64: four sub-blocks in the GPU prepare kernel's block forward substitution.
    (1, 150, 1, 16, 16, 2, 64, True, True, jnp.float32),
]


def case_id(c) -> str:
  B, T, H, K, V, L, C, init, seg, dtype = c
  return (f"B{B}-T{T}-H{H}-K{K}-V{V}-L{L}-C{C}-{'s0' if init else 'zero'}"
          f"{'-seg' if seg else ''}-{jnp.dtype(dtype).name}")


def random_case(case, seed):
  """Inputs, segment ids (or None) and random cotangents for o and the final state."""
  B, T, H, K, V, L, _, init, seg, dtype = case
  q, k, v, beta, g, s0 = prism_inputs(seed, B, T, H, K, V, L, dtype, initial_state=init)
  segment_ids = None
  if seg:
    cuts = np.random.default_rng((seed, 1)).random((B, T)) < 0.1
    segment_ids = jnp.asarray(np.cumsum(cuts, axis=1, dtype=np.int32))
  # Rounded to the input dtype so that the kernel and the reference see the same cotangent.
  do = normal((seed, 2), (B, T, H, V), dtype).astype(jnp.float32)
  ds = normal((seed, 3), (B, H, K, V))
  return (q, k, v, beta, g, s0), segment_ids, do, ds


def _loss_and_grads(fn, inputs, segment_ids, do, ds):
  """(o, final state, gradients of <o, do> + <S_T, ds> for every input incl. the state)."""
  q, k, v, beta, g, s0 = inputs
  with_state = s0 is not None

  def run(q, k, v, beta, g, s0):
    return fn(q, k, v, beta, g, initial_state=s0 if with_state else None,
              output_final_state=True, segment_ids=segment_ids)

  @quick_jit
  def forward_and_vjp(*args):
    (o, final), vjp = jax.vjp(run, *args)
    return o, final, vjp((do.astype(o.dtype), ds))

  s0 = s0 if with_state else jnp.zeros(ds.shape, jnp.float32)
  o, final, grads = forward_and_vjp(q, k, v, beta, g, s0)
  return o, final, grads[:6 if with_state else 5]


# Bytes of per-step states the sequential reference's backward may keep at once (its scan saves
# the [K, V] state of every step: 69 GiB for the whole acceptance shape B4 T4096 H16 K=V=128).
REFERENCE_STATE_BYTES = 2 * 2**30


def _reference_in_pieces(inputs, segment_ids, do, ds):
  """`_loss_and_grads(naive_prism, ...)`, over one batch row and a group of heads at a time
  when the whole would not fit (rows and heads are independent recurrences), put together."""
  B, T, H, K = inputs[0].shape
  V = do.shape[-1]
  if B * T * H * K * V * 4 <= REFERENCE_STATE_BYTES:
    return _loss_and_grads(naive_prism, inputs, segment_ids, do, ds)
  group = max(1, min(H, REFERENCE_STATE_BYTES // (T * K * V * 4)))
  while H % group:
    group -= 1
  # Head axis of the inputs (q, k, v, beta, g, s0) and of the results (o, final state, dq, dk,
  # dv, dbeta, dg, ds0): 2 for per-token arrays, 1 for states [B, H, K, V].
  in_axes, out_axes = (2, 2, 2, 2, 2, 1), (2, 1, 2, 2, 2, 2, 2, 1)
  pick = lambda x, b, hs, axis: x[(slice(b, b + 1),) + (slice(None),) * (axis - 1) + (hs,)]
  rows = []
  for b in range(B):
    groups = []
    for h in range(0, H, group):
      hs = slice(h, h + group)
      piece = tuple(None if x is None else pick(x, b, hs, ax) for x, ax in zip(inputs, in_axes))
      seg = None if segment_ids is None else segment_ids[b:b + 1]
      o, final, grads = _loss_and_grads(naive_prism, piece, seg, pick(do, b, hs, 2),
                                        pick(ds, b, hs, 1))
      groups.append((o, final, *grads))
    rows.append([jnp.concatenate(xs, ax) for xs, ax in zip(zip(*groups), out_axes)])
  o, final, *grads = (jnp.concatenate(xs) for xs in zip(*rows))
  return o, final, tuple(grads)


def launched_kernels(jaxpr) -> list:
  """Names of the kernels in a jaxpr (pallas_calls, and the mpmd_maps of Mosaic GPU kernels),
  inner jaxprs too, in order."""
  names = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("pallas_call", "mpmd_map"):
      names.append(eqn.params["name"])
    for p in eqn.params.values():
      for inner in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          names.extend(launched_kernels(inner))
  return names


def forward_and_grad_kernels(run, args) -> tuple[set, set]:
  """The kernels `run(*args)` (returning (o, final state)) launches alone and under jax.grad."""
  loss = lambda *a: run(*a)[0].astype(jnp.float32).sum()
  alone = set(launched_kernels(jax.make_jaxpr(run)(*args).jaxpr))
  grad = jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)
  return alone, set(launched_kernels(grad.jaxpr))


def check_against_naive(case, *, backend, interpret, backward="pallas", seed=0,
                        forward_alone=False):
  """Kernel outputs, final state and every gradient against `naive_prism` in float32;
  forward_alone: also the outputs of the forward run without a backward (the custom_vjp's
  primal, which need not store what the backward reads).

  The reference runs on the float32 upcast of the (possibly bf16) inputs, so a bf16 kernel
  result differs from it by its own rounding only: the bf16 tolerance of STYLE.md applies.
  """
  C = case[6]
  inputs, segment_ids, do, ds = random_case(case, seed)
  kernel = functools.partial(pallas_prism, chunk_size=C, backward=backward, interpret=interpret,
                             backend=backend)
  with warnings.catch_warnings():
    # A fallback to the pure-JAX form must not pass silently.
    warnings.filterwarnings("error", message="pallas_prism falls back")
    o, final, grads = _loss_and_grads(kernel, inputs, segment_ids, do, ds)
  up = tuple(None if x is None else x.astype(jnp.float32) for x in inputs)
  o_ref, final_ref, grads_ref = _reference_in_pieces(up, segment_ids, do, ds)
  assert o.dtype == inputs[0].dtype and final.dtype == jnp.float32
  assert_close("o", o_ref, o)
  # The state and all gradients are float32 sums of the same terms in another order; with bf16
  # inputs the kernels' products run at the tensor-core default (TF32) on GPU and the gradients
  # are rounded to bf16, so the bf16 tolerance applies to them.
  tol = 2e-5 if inputs[0].dtype == jnp.float32 else 5e-3
  assert_close("final_state", final_ref, final, tol)
  for name, ref, got in zip(("dq", "dk", "dv", "dbeta", "dg", "dinitial_state"), grads_ref, grads):
    assert got.dtype == (jnp.float32 if name == "dinitial_state" else inputs[0].dtype), name
    assert_close(name, ref, got.astype(jnp.float32), tol)
  if forward_alone:
    q, k, v, beta, g, s0 = inputs
    o, final = quick_jit(lambda *a: kernel(*a, initial_state=s0, output_final_state=True,
                                           segment_ids=segment_ids))(q, k, v, beta, g)
    assert_close("o (forward alone)", o_ref, o)
    assert_close("final_state (forward alone)", final_ref, final, tol)


def answer_gpu_queries_as_h200(monkeypatch):
  """Let the Triton kernels lower for CUDA on a machine without a GPU: the Pallas Triton
  lowering's query of the device is answered with an H200's description."""
  from jax._src.pallas.triton import gpu_info, pallas_call_registration
  h200 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
  monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: h200)


def lowered_forward_and_backward(args, platform, **kernel_kw) -> str:
  """The text of `pallas_prism`'s forward and backward (every gradient, initial state
  included) lowered for `platform` ("cuda" or "tpu") from args (q, k, v, beta, g, s0: arrays
  or ShapeDtypeStructs) and `pallas_prism` keywords; a fallback to the pure-JAX form fails."""
  def loss(q, k, v, beta, g, s0):
    o, final = pallas_prism(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                            interpret=False, **kernel_kw)
    return o.astype(jnp.float32).sum() + final.sum()

  with warnings.catch_warnings():
    warnings.filterwarnings("error", message="pallas_prism falls back")
    return jax.jit(jax.grad(loss, argnums=tuple(range(6)))).trace(*args).lower(
        lowering_platforms=(platform,)).as_text()
