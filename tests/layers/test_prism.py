"""PrismMixer against a float64 loop written from spec §3, Gated DeltaNet as its L = 1 case,
and what each ablation flag of the paper's Table 3 changes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from prism_jax.layers import GatedDeltaNet, PrismMixer
from host_random import normal
from prism_jax.testing import assert_close
from quick_jit import quick_jit

D, H, K, B, T = 32, 2, 16, 2, 19


def w(linear):
  return np.asarray(linear.kernel[...], np.float64)


def project(lowrank, u):
  """A `LowRank` (or full) projection applied in float64."""
  return u @ w(lowrank.up) if lowrank.down is None else (u @ w(lowrank.down)) @ w(lowrank.up)


def l2n(a):
  return a / np.sqrt(np.sum(a * a, -1, keepdims=True) + 1e-6)


def silu(a):
  return a / (1 + np.exp(-a))


def sigmoid(a):
  return 1 / (1 + np.exp(-a))


def gelu(a):
  return 0.5 * a * (1 + erf(a / np.sqrt(2)))


def rmsnorm(a, scale, eps=1e-6):
  return a / np.sqrt(np.mean(a * a, -1, keepdims=True) + eps) * scale


def spec_reference(m, x):
  """Spec §3 and §2 token by token in float64, reading the module's weights.

  Weight layout (the only thing shared with the module): fused projections are laid out
  [..., L, H, dim] for k^{l≥2} and p^l, and [..., H, L] for β."""
  x = np.asarray(x, np.float64)
  Bn, Tn, _ = x.shape
  Hn, Kn, Vn, L = m.num_heads, m.head_dim, m.value_head_dim, m.solver_steps
  if m.conv is None:
    U = silu(x)
  else:
    kern = np.asarray(m.conv.kernel[...], np.float64)  # [w, D]
    width = kern.shape[0]
    xp = np.concatenate([np.zeros((Bn, width - 1, D)), x], 1)
    U = silu(sum(kern[i] * xp[:, i:i + Tn] for i in range(width)))
  q = l2n((U @ w(m.q_proj)).reshape(Bn, Tn, Hn, Kn))
  keys = [(U @ w(m.k_proj)).reshape(Bn, Tn, Hn, 1, Kn)]
  if L > 1:
    rest = project(m.k_rest_proj, U).reshape(Bn, Tn, L - 1, Hn, Kn)
    keys.append(rest.transpose(0, 1, 3, 2, 4))
  k = l2n(np.concatenate(keys, 3))  # [B, T, H, L, K]
  v = (U @ w(m.v_proj)).reshape(Bn, Tn, Hn, Vn)
  beta = sigmoid(U @ w(m.beta_proj)).reshape(Bn, Tn, Hn, L)
  alpha = sigmoid(U @ w(m.alpha_proj) + np.asarray(m.alpha_proj.bias[...], np.float64))
  if m.bypass_solver:
    delta = v[:, :, :, None]
  else:
    u = U if m.u_proj is None else U @ w(m.u_proj)
    r = v - u.reshape(Bn, Tn, Hn, Vn)
    if m.gain_proj is None:
      p = np.ones((Bn, Tn, Hn, L, Vn))
    else:
      p = project(m.gain_proj, U).reshape(Bn, Tn, L, Hn, Vn).transpose(0, 1, 3, 2, 4)
    act = gelu if m.use_nonlinearity else (lambda a: a)
    deltas = []
    for l in range(L):
      deltas.append(act(p[:, :, :, l] * r))
      r = r - deltas[-1]
    delta = np.stack(deltas, 3)  # [B, T, H, L, V]
  S = np.zeros((Bn, Hn, Kn, Vn))
  o = np.zeros((Bn, Tn, Hn, Vn))
  for t in range(Tn):
    k1, b1 = k[:, t, :, 0], beta[:, t, :, 0]
    erase = S - b1[..., None, None] * k1[..., :, None] * np.einsum("bhk,bhkv->bhv", k1, S)[
        ..., None, :]
    writes = np.einsum("bhlk,bhlv->bhkv", k[:, t], beta[:, t, ..., None] * delta[:, t])
    S = alpha[:, t][..., None, None] * erase + writes
    o[:, t] = Kn**-0.5 * np.einsum("bhk,bhkv->bhv", q[:, t], S)
  o = rmsnorm(o, np.asarray(m.out_norm.scale[...], np.float64))
  gated = o.reshape(Bn, Tn, Hn * Vn) * silu(x @ w(m.gate))
  return gated @ w(m.out)


def forward(m, x):
  graphdef, state = nnx.split(m)
  return quick_jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)


@pytest.mark.parametrize("kwargs", [
    dict(solver_steps=2),
    dict(solver_steps=3, value_head_dim=12, key_rank=5, gain_rank=3, conv_width=3),
], ids=["L2-full-rank", "L3-V12-low-rank"])
def test_matches_spec_reference(kwargs):
  # The sequential impl keeps compile time low; chunk == naive is tested in tests/ops and
  # the chunked mixer == its decode steps in test_mixers.
  m = PrismMixer(D, H, K, impl="naive", rngs=nnx.Rngs(0), **kwargs)
  x = normal(1, (B, T, D))
  assert_close("mixer vs spec §3 loop", spec_reference(m, x), forward(m, x), tol=1e-5)


def test_gated_delta_net_is_prism_with_one_step_and_no_solver():
  """Same weights, same output: GatedDeltaNet is PrismMixer(L = 1, δ = v), and both match
  the float64 Gated DeltaNet loop S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ."""
  prism = PrismMixer(D, H, K, solver_steps=1, bypass_solver=True, impl="naive",
                     rngs=nnx.Rngs(0))
  gdn = GatedDeltaNet(D, H, K, impl="naive", rngs=nnx.Rngs(1))
  paths = lambda m: [p for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))]
  assert paths(prism) == paths(gdn)
  assert prism.gain_proj is None and prism.u_proj is None and prism.k_rest_proj is None
  x = normal(2, (B, T, D))
  before = forward(gdn, x)
  nnx.update(gdn, nnx.state(prism, nnx.Param))
  y_gdn, y_prism = forward(gdn, x), forward(prism, x)
  assert not np.allclose(before, y_gdn)  # the weights really were replaced
  np.testing.assert_array_equal(np.asarray(y_gdn), np.asarray(y_prism))
  assert_close("gdn vs float64 delta-rule loop", spec_reference(gdn, x), y_gdn, tol=1e-5)


def anchor_terms(m, x):
  u, _ = m.anchor(x)
  return m.write_terms(u)


def write_matrix_ranks(m, x):
  """Numerical rank of the per-token write B_t = Σ_l β^l k^l δ^lᵀ, [B, T, H]."""
  _, k, delta, beta, _ = anchor_terms(m, x)
  writes = jnp.einsum("bthlk,bthlv->bthkv", k, beta[..., None] * delta)
  sv = np.linalg.svd(np.asarray(writes, np.float64), compute_uv=False)
  return np.sum(sv > 1e-5 * sv[..., :1], axis=-1)


def test_solver_steps_one_writes_rank_one():
  """L = 1 (ablation "w/o iterative refinement"): each token writes a rank-1 update; with
  L = 3 the write B_t has rank 3."""
  x = normal(3, (B, T, D))
  one = PrismMixer(D, H, K, solver_steps=1, rngs=nnx.Rngs(0))
  three = PrismMixer(D, H, K, solver_steps=3, rngs=nnx.Rngs(0))
  assert one.k_rest_proj is None
  assert np.all(write_matrix_ranks(one, x) == 1)
  assert np.all(write_matrix_ranks(three, x) == 3)


def test_without_nonlinearity_the_solver_is_linear():
  """use_nonlinearity=False replaces GELU by the identity: δ¹ = p¹ ⊙ r, δ² = p² ⊙ (r − δ¹),
  so δ is linear in the residual; with GELU it is not, on the same weights."""
  linear = PrismMixer(D, H, K, solver_steps=2, use_nonlinearity=False, rngs=nnx.Rngs(0))
  gelu_m = PrismMixer(D, H, K, solver_steps=2, rngs=nnx.Rngs(0))
  r = normal(4, (B, T, H, K))
  p = normal(5, (B, T, H, 2, K))
  d = linear.solve(r, p)
  expected = jnp.stack([p[..., 0, :] * r, p[..., 1, :] * (r - p[..., 0, :] * r)], -2)
  assert_close("linear solver", expected, d)
  assert_close("homogeneous", 2 * d, linear.solve(2 * r, p))
  r2 = normal(9, r.shape)
  assert_close("additive", d + linear.solve(r2, p), linear.solve(r + r2, p))
  d_gelu = gelu_m.solve(r, p)
  assert_close("gelu solver first step", jax.nn.gelu(p[..., 0, :] * r, approximate=False),
               d_gelu[..., 0, :])
  assert not np.allclose(2 * d_gelu, gelu_m.solve(2 * r, p), atol=1e-3)
  x = normal(6, (B, T, D))
  assert not np.allclose(anchor_terms(linear, x)[2], anchor_terms(gelu_m, x)[2], atol=1e-3)


def test_without_short_conv_the_anchor_sees_only_the_current_token():
  """use_short_conv=False: U_t = SiLU(x_t), no conv parameters, and ∂U_t/∂x_{t−1} = 0; with
  the conv the anchor mixes the previous w − 1 tokens."""
  x = normal(7, (1, 6, D))
  plain = PrismMixer(D, H, K, use_short_conv=False, rngs=nnx.Rngs(0))
  conv = PrismMixer(D, H, K, rngs=nnx.Rngs(0))
  assert plain.conv is None and "conv" not in dict(nnx.to_flat_state(nnx.state(plain)))
  np.testing.assert_allclose(plain.anchor(x)[0], jax.nn.silu(x), rtol=1e-6)
  back = lambda m: jax.jacobian(lambda x: m.anchor(x)[0][0, 4])(x)[:, 0]  # [D, 6, D]
  jac_plain, jac_conv = back(plain), back(conv)
  assert np.max(np.abs(jac_plain[:, :4])) == 0 and np.max(np.abs(jac_plain[:, 4])) > 0
  assert all(np.max(np.abs(jac_conv[:, s])) > 0 for s in (1, 2, 3, 4))
  assert np.max(np.abs(jac_conv[:, 0])) == 0  # width 4 reaches back three tokens only


def test_without_gain_the_solver_uses_unit_gain():
  """use_gain=False (p^l = 1): no gain parameters and δ¹ = GELU(v − u), δ² = GELU(r²)."""
  x = normal(8, (B, T, D))
  plain = PrismMixer(D, H, K, solver_steps=2, use_gain=False, rngs=nnx.Rngs(0))
  gained = PrismMixer(D, H, K, solver_steps=2, rngs=nnx.Rngs(0))
  assert plain.gain_proj is None and gained.gain_proj is not None
  u, _ = plain.anchor(x)
  v = plain.v_proj(u).reshape(B, T, H, K)
  r1 = v - u.reshape(B, T, H, K)
  gelu = lambda a: jax.nn.gelu(a, approximate=False)
  d1 = gelu(r1)
  delta = anchor_terms(plain, x)[2]
  assert_close("unit-gain step 1", d1, delta[..., 0, :])
  assert_close("unit-gain step 2", gelu(r1 - d1), delta[..., 1, :])
  assert not np.allclose(anchor_terms(gained, x)[2], delta, atol=1e-3)


def test_invalid_options_are_named():
  with pytest.raises(ValueError, match="solver_steps must be a positive int, got 0"):
    PrismMixer(D, H, K, solver_steps=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="bypass_solver .* needs solver_steps=1, got 2"):
    PrismMixer(D, H, K, solver_steps=2, bypass_solver=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="gain_rank must be None or a positive int, got 0"):
    PrismMixer(D, H, K, gain_rank=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="impl must be one of"):
    PrismMixer(D, H, K, impl="fast", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="head_dim must be a positive int, got -1"):
    PrismMixer(D, H, -1, rngs=nnx.Rngs(0))
