"""Test utilities shared by the op, kernel and layer tests (and handy in notebooks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Relative RMS error bounds by the dtype of the compared arrays (fla's convention: bf16 outputs
# agree to ~5e-3; float32 paths that only reorder sums agree to ~1e-5).
TOLERANCES = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 5e-3,
              jnp.dtype(jnp.float16): 2e-3}


def relative_error(ref, out) -> float:
  """‖out − ref‖₂ / max(‖ref‖₂, tiny), computed in float64."""
  ref = np.asarray(ref, dtype=np.float64)
  out = np.asarray(out, dtype=np.float64)
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def assert_close(name: str, ref, out, tol: float | None = None) -> None:
  """Assert relative RMS error under `tol` (default by `out`'s dtype) and no NaN/Inf."""
  if tol is None:
    tol = TOLERANCES.get(jnp.dtype(out.dtype), 2e-5)
  out64 = np.asarray(out, dtype=np.float64)
  if not np.all(np.isfinite(out64)):
    raise AssertionError(f"{name}: non-finite values")
  if tuple(np.shape(ref)) != tuple(np.shape(out)):
    raise AssertionError(f"{name}: shape {np.shape(out)} != reference {np.shape(ref)}")
  err = relative_error(ref, out)
  if not err <= tol:
    raise AssertionError(f"{name}: relative error {err:.3e} > {tol:.1e}")


def random_prism_inputs(seed, B=2, T=37, H=2, K=32, V=32, L=2, dtype=jnp.float32,
                        initial_state=True, decay=(1.0, 4.0)):
  """Fresh random inputs in the ranges the layer produces.

  Keys are L2-normalised, gates are sigmoids, and the log-decay is log σ(x) with x drawn from
  N(mean, 1) for mean uniform in `decay` per head (larger mean ⇒ slower decay). `seed` is an
  int or a JAX PRNG key (its key data seeds the draw). Drawn with numpy on the host: on the CPU,
  jax.random compiles its generator anew for every array shape (~1 s each), more than most
  checks take.

  Returns (q, k, v, beta, g, initial_state or None); the state is float32.
  """
  if not isinstance(seed, (int, np.integer)):
    key = jnp.asarray(seed)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      key = jax.random.key_data(key)
    seed = np.asarray(key).ravel().tolist()
  rng = np.random.default_rng(seed)
  draw = lambda *shape: rng.standard_normal(shape, np.float32)
  q = draw(B, T, H, K)
  k = draw(B, T, H, L, K)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  v = draw(B, T, H, L, V)
  beta = 1 / (1 + np.exp(-draw(B, T, H, L)))
  mean = rng.uniform(decay[0], decay[1], (1, 1, H)).astype(np.float32)
  g = -np.logaddexp(0, -(mean + draw(B, T, H)))                   # log σ(x)
  s0 = jnp.asarray(draw(B, H, K, V)) if initial_state else None
  cast = lambda x: jnp.asarray(x.astype(np.float32).astype(dtype))
  return cast(q), cast(k), cast(v), cast(beta), cast(g), s0
