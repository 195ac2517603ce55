"""The recurrences behind the baselines against plain loops of spec §6: the explicit solver,
the diagonal-decay (LA / GLA / MoM) recurrence, MoM routing and softmax attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prism_jax.layers import (CausalSelfAttention, MixtureOfMemories, chunk_diag_decay,
                              diag_decay_step, explicit_solver_scan, naive_diag_decay, rope)
from host_random import normal
from prism_jax.testing import assert_close
from quick_jit import quick_init, quick_jit


def explicit_loop(q, k, v, eta, g, steps, s0):
  """Spec §6 (paper Eq. 6) with L inner gradient steps, σ = tanh, float64 Python loops."""
  q, k, v, eta, g, S = (np.asarray(a, np.float64) for a in (q, k, v, eta, g, s0))
  Bn, Tn, Hn, Kn = q.shape
  o = np.zeros(v.shape)
  for b in range(Bn):
    for h in range(Hn):
      s = S[b, h]
      for t in range(Tn):
        z = s.copy()
        for _ in range(steps):
          pred = np.tanh(z.T @ k[b, t, h])
          z = z + eta[b, t, h] * np.outer(k[b, t, h], (1 - pred**2) * (v[b, t, h] - pred))
        s = np.exp(g[b, t, h]) * s + (z - s)
        o[b, t, h] = Kn**-0.5 * s.T @ q[b, t, h]
      S[b, h] = s
  return o, S


def random_terms(seed, B=2, T=9, H=2, K=6, V=5):
  """q, unit k, v, η = σ(N(0, 1)), g = log σ(2 + N(0, 1)), s0, drawn on the host."""
  draw = lambda i, *shape: np.asarray(normal((seed, i), shape))
  k = draw(1, B, T, H, K)
  return (draw(0, B, T, H, K), k / np.linalg.norm(k, axis=-1, keepdims=True), draw(2, B, T, H, V),
          1 / (1 + np.exp(-draw(3, B, T, H))), -np.logaddexp(0, -(2.0 + draw(4, B, T, H))),
          draw(5, B, H, K, V))


def diag_terms(seed, B, T, H, K, V):
  """q, k, v and the per-channel log-decay g = log σ(2 + N(0, 1)) of the GLA recurrence."""
  q, k, v, z = (np.asarray(normal((seed, i), (B, T, H, d))) for i, d in enumerate((K, K, V, K)))
  return q, k, v, -np.logaddexp(0, -(2.0 + z))


@pytest.mark.parametrize("steps", [1, 3])
def test_explicit_solver_matches_python_loop(steps):
  q, k, v, eta, g, s0 = random_terms(steps)
  run = quick_jit(lambda *a: explicit_solver_scan(*a[:5], steps=steps, initial_state=a[5]))
  o, final = run(q, k, v, eta, g, s0)
  o_ref, final_ref = explicit_loop(q, k, v, eta, g, steps, s0)
  assert_close("explicit o", o_ref, o)
  assert_close("explicit final state", final_ref, final)


def test_explicit_solver_is_state_dependent_and_differentiable():
  """Unlike PRISM, the write depends on the state: the same token written into two different
  states leaves different increments. Gradients through the scan are finite and non-zero."""
  q, k, v, eta, g, s0 = random_terms(5, T=1)
  g = np.zeros_like(g)  # no decay: the state change is the write alone
  write = quick_jit(lambda s: explicit_solver_scan(q, k, v, eta, g, steps=1,
                                                 initial_state=s)[1] - s)
  assert not np.allclose(write(s0), write(np.zeros_like(s0)), atol=1e-4)
  q, k, v, eta, g, s0 = random_terms(6)
  grads = quick_jit(jax.grad(lambda *a: jnp.sum(explicit_solver_scan(*a[:5], steps=2,
                                                                   initial_state=a[5])[0] ** 2),
                           argnums=tuple(range(6))))(q, k, v, eta, g, s0)
  for name, gr in zip("q k v eta g s0".split(), grads):
    assert np.all(np.isfinite(gr)) and np.max(np.abs(gr)) > 0, name


def diag_loop(q, k, v, g, s0, starts):
  """S_t = diag(e^{g_t}) S_{t−1} + k_t v_tᵀ (zeroed at segment starts), float64."""
  q, k, v, g, S = (np.asarray(a, np.float64) for a in (q, k, v, g, s0))
  o = np.zeros(v.shape)
  for t in range(q.shape[1]):
    S = np.where(starts[:, t, None, None, None], 0.0, S)
    S = np.exp(g[:, t])[..., None] * S + k[:, t, ..., None] * v[:, t, :, :, None].swapaxes(-1, -2)
    o[:, t] = q.shape[-1] ** -0.5 * np.einsum("bhk,bhkv->bhv", q[:, t], S)
  return o, S


def test_diag_decay_forms_agree(T=29, chunk=8):
  """Chunked and scanned forms of the GLA recurrence against a float64 loop, with packed
  sequences and an initial state; gradients of the two JAX forms agree."""
  B, H, K, V = 2, 2, 6, 5
  q, k, v, g = diag_terms(T, B, T, H, K, V)
  s0 = normal((T, 4), (B, H, K, V))
  seg = jnp.asarray(np.stack([np.arange(T) // 11, np.arange(T) // 5]), jnp.int32)
  starts = np.concatenate([np.zeros((B, 1), bool), np.diff(np.asarray(seg), axis=1) != 0], 1)
  o_ref, s_ref = diag_loop(q, k, v, g, s0, starts)
  chunked = lambda *a: chunk_diag_decay(*a[:4], initial_state=a[4], segment_ids=seg,
                                        chunk_size=chunk)
  scanned = lambda *a: naive_diag_decay(*a[:4], initial_state=a[4], segment_ids=seg)
  for name, fn in (("chunk", chunked), ("naive", scanned)):
    o, final = quick_jit(fn)(q, k, v, g, s0)
    assert_close(f"{name} o", o_ref, o)
    assert_close(f"{name} final", s_ref, final)

  def loss(fn):
    def value(*args):
      o, final = fn(*args)
      return jnp.sum(o * jnp.cos(o)) + jnp.sum(final**2)
    return quick_jit(jax.grad(value, argnums=tuple(range(5))))

  g_chunk, g_naive = loss(chunked)(q, k, v, g, s0), loss(scanned)(q, k, v, g, s0)
  for name, a, b in zip("q k v g s0".split(), g_chunk, g_naive):
    assert_close(f"grad {name}", b, a, tol=1e-5)


def test_diag_decay_step_continues_the_sequence():
  """Step-by-step decoding from the chunked form's final state == the chunked form over the
  whole sequence (no segments)."""
  B, T, H, K, V = 1, 12, 2, 6, 5
  q, k, v, g = diag_terms(7, B, T, H, K, V)
  chunked = quick_jit(lambda *a: chunk_diag_decay(*a, chunk_size=4))
  o_all, final_all = chunked(q, k, v, g)
  _, state = chunked(q[:, :9], k[:, :9], v[:, :9], g[:, :9])
  step = quick_jit(diag_decay_step, static_argnums=5)
  for t in range(9, T):
    o_t, state = step(q[:, t], k[:, t], v[:, t], g[:, t], state, K**-0.5)
    assert_close(f"step {t}", o_all[:, t], o_t)
  assert_close("final state", final_all, state)


def test_mixture_of_memories_routes_top_k():
  """Each token goes to exactly top_k memories with softmax weights summing to one, and a
  memory that is not routed keeps its state unchanged through that token."""
  D, H, K, M = 16, 2, 8, 4
  mom = quick_init(lambda rngs: MixtureOfMemories(D, H, K, num_memories=M, top_k=2, gate_rank=4,
                                                 rngs=rngs))
  x = normal(1, (3, D))
  weights, routed = nnx.jit(lambda m, x: m.route(m.anchor(x[:, None])[0][:, 0]))(mom, x)
  assert np.all(np.sum(np.asarray(routed), -1) == 2)
  np.testing.assert_allclose(np.sum(np.asarray(weights), -1), 1.0, rtol=1e-6)
  assert np.all((np.asarray(weights) > 0) == np.asarray(routed))
  cache = mom.init_cache(3)
  cache["state"] = normal(2, cache["state"].shape)
  _, new = nnx.jit(lambda m, x, c: m.step(x, c))(mom, x, cache)
  changed = np.any(np.asarray(new["state"] != cache["state"]), axis=(-1, -2))  # [B, M·H]
  np.testing.assert_array_equal(changed.reshape(3, M, H),
                                np.repeat(np.asarray(routed)[..., None], H, -1))


@jax.default_matmul_precision("float32")  # no TF32 on GPU, in the reference's products too
def test_attention_matches_softmax_reference():
  """jax.nn.dot_product_attention path == an explicit masked softmax with RoPE, float64."""
  D, H, Dh, B, T = 16, 2, 8, 2, 7
  att = CausalSelfAttention(D, H, Dh, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (B, T, D))
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  proj = lambda lin: (x @ lin.kernel[...]).reshape(B, T, H, Dh)
  q, k = (np.asarray(rope(proj(p), pos), np.float64) for p in (att.q_proj, att.k_proj))
  v = np.asarray(proj(att.v_proj), np.float64)
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(Dh)
  logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  o = np.einsum("bhts,bshd->bthd", p, v).reshape(B, T, H * Dh)
  assert_close("attention", o @ np.asarray(att.out.kernel[...], np.float64), att(x))


def test_attention_implementation_choice_and_errors():
  """auto stays on XLA off-GPU, for float32 and with packed segments; bad choices are named."""
  with pytest.raises(ValueError, match="implementation must be one of"):
    CausalSelfAttention(16, 2, 8, implementation="flash", rngs=nnx.Rngs(0))
  att = CausalSelfAttention(16, 2, 8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
  on_gpu = jax.default_backend() == "gpu"
  assert att._fused(q, None) == on_gpu
  assert not att._fused(q, jnp.zeros((1, 4), jnp.int32))
  assert not att._fused(q.astype(jnp.float32), None)
  fused = CausalSelfAttention(16, 2, 8, implementation="cudnn", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="takes no segment_ids"):
    fused(jnp.zeros((1, 4, 16)), jnp.zeros((1, 4), jnp.int32))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_cudnn_attention_matches_xla():
  """The fused causal path == the materialised one, outputs and gradients, bf16 on GPU."""
  kw = dict(dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  xla = CausalSelfAttention(64, 4, 32, implementation="xla", **kw)
  fused = CausalSelfAttention(64, 4, 32, implementation="cudnn", **kw)
  nnx.update(fused, nnx.state(xla))
  x = jax.random.normal(jax.random.key(5), (2, 300, 64))
  loss = lambda m, x: jnp.sum(jnp.sin(m(x).astype(jnp.float32)))
  grads = [nnx.grad(loss, argnums=(0, 1))(m, x) for m in (xla, fused)]
  # Both sides are bf16 computations (each within the bf16 tolerance 5e-3 of exact), so
  # their distance is allowed twice that.
  tol = 1e-2
  assert_close("attention cudnn", xla(x), fused(x), tol)
  assert_close("attention cudnn dx", grads[0][1], grads[1][1], tol)
  assert_close("attention cudnn dWq", grads[0][0].q_proj.kernel[...],
               grads[1][0].q_proj.kernel[...], tol)


def test_rope_rotates_pairs_and_is_relative():
  """RoPE keeps norms and makes q·k depend only on the position difference."""
  x = normal(4, (1, 2, 1, 8))
  pos = lambda a, b: jnp.asarray([[a, b]])
  r1, r2 = rope(x, pos(3, 7)), rope(x, pos(10, 14))
  np.testing.assert_allclose(jnp.linalg.norm(r1, axis=-1), jnp.linalg.norm(x, axis=-1),
                             rtol=1e-5)
  dot = lambda r: float(jnp.sum(r[0, 0, 0] * r[0, 1, 0]))
  np.testing.assert_allclose(dot(r1), dot(r2), rtol=1e-4)
  assert abs(dot(r1) - float(jnp.sum(x[0, 0, 0] * x[0, 1, 0]))) > 1e-3
