"""assoc, chunk and step-by-step decoding against the sequential reference."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from host_random import normal, prism_inputs
from quick_jit import quick_jit
from prism_jax.ops import prism_recurrence, prism_step
from prism_jax.testing import assert_close


@quick_jit(static_argnames=("impl", "chunk_size"))
def run(q, k, v, beta, g, s0, segment_ids=None, *, impl, chunk_size=64):
  return prism_recurrence(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                          segment_ids=segment_ids, impl=impl, chunk_size=chunk_size)


@quick_jit
def run_steps(q, k, v, beta, g, s0):
  def body(state, xs):
    o, state = prism_step(*xs, state)
    return state, o
  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, g))
  final, o = jax.lax.scan(body, s0, xs)
  return jnp.moveaxis(o, 0, 1), final


# (B, T, H, K, V, L, initial state, dtype); chunk 64 throughout.
CASES = [
    (2, 1, 4, 32, 32, 2, True, jnp.float32),
    (2, 63, 1, 48, 48, 3, True, jnp.float32),
    (1, 200, 4, 48, 48, 1, False, jnp.float32),
    (2, 200, 2, 32, 24, 2, True, jnp.float32),
    (1, 130, 1, 16, 40, 3, False, jnp.float32),
    (2, 63, 4, 32, 32, 1, True, jnp.bfloat16),
    (1, 200, 2, 48, 48, 2, False, jnp.bfloat16),
    (2, 1, 1, 16, 24, 3, True, jnp.bfloat16),
]
case_id = lambda c: "B{}-T{}-H{}-K{}-V{}-L{}-{}-{}".format(
    *c[:6], "s0" if c[6] else "zero", jnp.dtype(c[7]).name)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("impl", ["assoc", "chunk", "step"])
def test_matches_naive(impl, case):
  B, T, H, K, V, L, init, dtype = case
  seed = zlib.crc32(f"{impl}-{case_id(case)}".encode())
  q, k, v, beta, g, s0 = prism_inputs(seed, B, T, H, K, V, L, dtype, initial_state=init)
  o_ref, final_ref = run(q, k, v, beta, g, s0, impl="naive")
  if impl == "step":
    state = jnp.zeros((B, H, K, V), jnp.float32) if s0 is None else s0
    o, final = run_steps(q[:, :], k, v, beta, g, state)
  else:
    o, final = run(q, k, v, beta, g, s0, impl=impl)
  assert o.dtype == q.dtype and final.dtype == jnp.float32
  # Every form computes in float32 from the same (possibly bf16) inputs, so only the final cast
  # of o to bf16 separates them: the bf16 output tolerance applies to o, float32 to the state.
  # One exception: on GPU/TPU the chunked form multiplies at the backend's fast float32 (TF32 on
  # GPU) when the inputs are bf16, so its state is held to the bf16 tolerance there (measured
  # on an H200: 0.7-3.6e-4); on CPU its products are exact and the float32 bound stays.
  fast = impl == "chunk" and dtype == jnp.bfloat16 and jax.default_backend() != "cpu"
  assert_close("o", o_ref.astype(jnp.float32), o.astype(jnp.float32),
               5e-3 if dtype == jnp.bfloat16 else 2e-5)
  assert_close("final_state", final_ref, final, 5e-3 if fast else 2e-5)


@functools.cache  # one compiled reference per case, whichever form it is compared with
def _loss(impl, chunk_size=64):
  def loss(q, k, v, beta, g, s0, do, dS):
    o, final = prism_recurrence(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                                impl=impl, chunk_size=chunk_size)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(final * dS)
  return quick_jit(jax.grad(loss, argnums=tuple(range(6))))


GRAD_CASES = [(2, 63, 2, 32, 32, 2), (1, 130, 1, 48, 24, 3), (1, 40, 2, 16, 16, 1)]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "B{}-T{}-H{}-K{}-V{}-L{}".format(*c))
@pytest.mark.parametrize("impl", ["chunk", "assoc"])
def test_gradients_match_naive(impl, case):
  B, T, H, K, V, L = case
  seed = T + 100 * L
  q, k, v, beta, g, s0 = prism_inputs(seed, B, T, H, K, V, L)
  do = normal((seed, 1), (B, T, H, V))
  dS = normal((seed, 2), (B, H, K, V))
  ref = _loss("naive")(q, k, v, beta, g, s0, do, dS)
  got = _loss(impl, chunk_size=32)(q, k, v, beta, g, s0, do, dS)
  for name, r, x in zip(("dq", "dk", "dv", "dbeta", "dg", "dinitial_state"), ref, got):
    # Gradients sum over the whole sequence through the triangular solve: allow 1e-4.
    assert_close(name, r, x, 1e-4)


def time_slice(arrays, start, stop):
  """arrays[:, start:stop], cut on the host (an eager slice of a jax array is compiled)."""
  return tuple(np.asarray(x)[:, start:stop] for x in arrays)


@pytest.mark.parametrize("split", [1, 64, 100, 170])
def test_chunk_continues_from_its_final_state(split):
  q, k, v, beta, g, s0 = prism_inputs(split, B=2, T=200, H=2, K=32, V=32, L=2)
  o_full, final_full = run(q, k, v, beta, g, s0, impl="chunk")
  o1, s1 = run(*time_slice((q, k, v, beta, g), 0, split), s0, impl="chunk")
  o2, s2 = run(*time_slice((q, k, v, beta, g), split, 200), s1, impl="chunk")
  assert_close("o", o_full, np.concatenate([o1, o2], axis=1), 2e-5)
  assert_close("final_state", final_full, s2, 2e-5)


@pytest.mark.parametrize("impl", ["naive", "assoc", "chunk"])
def test_packed_segments_equal_separate_runs(impl):
  lengths = [17, 64, 5, 50]  # crosses chunk boundaries of 32 and leaves a partial tail
  T = sum(lengths)
  q, k, v, beta, g, s0 = prism_inputs(11, B=1, T=T, H=2, K=16, V=16, L=2)
  seg = np.repeat(np.arange(len(lengths)), lengths)[None]
  o, final = run(q, k, v, beta, g, s0, seg, impl=impl, chunk_size=32)
  start = 0
  for i, n in enumerate(lengths):
    part = time_slice((q, k, v, beta, g), start, start + n)
    # The first packed sequence continues from the initial state, later ones start from zero.
    init = s0 if i == 0 else np.zeros_like(s0)
    o_i, final_i = run(*part, init, impl="naive")
    assert_close(f"o[segment {i}]", o_i, np.asarray(o)[:, start:start + n], 2e-5)
    start += n
  assert_close("final_state", final_i, final, 2e-5)


def test_packed_segment_gradients_match_naive():
  q, k, v, beta, g, s0 = prism_inputs(12, B=2, T=70, H=1, K=16, V=16, L=2)
  seg = jnp.array([[0] * 20 + [1] * 50, [0] * 33 + [1] * 30 + [2] * 7])

  def loss(impl):
    def f(*args):
      o, final = prism_recurrence(*args, initial_state=s0, output_final_state=True,
                                  segment_ids=seg, impl=impl, chunk_size=16)
      return jnp.sum(jnp.sin(o)) + jnp.sum(final**2)
    return quick_jit(jax.grad(f, argnums=tuple(range(5))))

  for name, r, x in zip(("dq", "dk", "dv", "dbeta", "dg"), loss("naive")(q, k, v, beta, g),
                        loss("chunk")(q, k, v, beta, g)):
    assert_close(name, r, x, 1e-4)


def test_chunk_gradients_from_one_output_match_naive():
  # The hand-written backward gets a zero cotangent for whichever result the loss ignores;
  # with segment restarts and a partial last chunk. One vjp serves both cases.
  q, k, v, beta, g, s0 = prism_inputs(21, B=1, T=45, H=2, K=16, V=24, L=2)
  seg = jnp.array([[0] * 10 + [1] * 35])
  do = normal(22, (1, 45, 2, 24))
  dS = normal(23, (1, 2, 16, 24))

  def grads(impl):
    def f(*args):
      _, vjp = jax.vjp(lambda *a: prism_recurrence(
          *a[:5], initial_state=a[5], output_final_state=True, segment_ids=seg, impl=impl,
          chunk_size=16), *args)
      return vjp((do, jnp.zeros_like(dS))), vjp((jnp.zeros_like(do), dS))
    return quick_jit(f)(q, k, v, beta, g, s0)

  names = ("dq", "dk", "dv", "dbeta", "dg", "dinitial_state")
  for case, ref, got in zip(("output only", "final state only"), grads("naive"), grads("chunk")):
    for name, r, x in zip(names, ref, got):
      assert_close(f"{name} ({case})", r, x, 1e-4)


def test_chunk_under_vmap_matches_naive():
  # A leading vmapped axis (e.g. over layers or ensembles) through the custom backward.
  q, k, v, beta, g, s0 = prism_inputs(23, B=3, T=40, H=2, K=16, V=16, L=2)
  add_axis = lambda x: x.reshape(3, 1, *x.shape[1:])
  args = tuple(add_axis(x) for x in (q, k, v, beta, g, s0))
  do = normal(24, (1, 40, 2, 16))  # one cotangent of o for every vmapped problem

  def loss(impl):
    def f(*a):
      o, final = prism_recurrence(*a[:5], initial_state=a[5], output_final_state=True,
                                  impl=impl, chunk_size=16)
      return jnp.sum(o * do) + jnp.sum(final**2)
    return quick_jit(jax.vmap(jax.value_and_grad(f, argnums=tuple(range(6)))))

  (l_ref, g_ref), (l_chk, g_chk) = loss("naive")(*args), loss("chunk")(*args)
  assert_close("loss", l_ref, l_chk, 2e-5)
  for name, r, x in zip(("dq", "dk", "dv", "dbeta", "dg", "dinitial_state"), g_ref, g_chk):
    assert_close(name, r, x, 1e-4)
