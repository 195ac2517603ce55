"""Time the pure-JAX forms of the recurrence on the CPU: naive, assoc and chunk.

    python benchmarks/cpu_ops.py [--lengths 512 2048 8192] [--repeats 5]

Forward and forward+backward (gradients of every input and the initial state), B=1, H=4,
K=V=64, L=2, float32, median of `--repeats` timed runs after one warm-up (compile) run. The
1-minute load average is printed before and after: on a shared machine, numbers taken under a
load above the core count mostly measure the contention.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp

from prism_jax.ops import prism_recurrence
from prism_jax.testing import random_prism_inputs

# assoc materialises [T, K, K] transition matrices several times over: skip sizes beyond this.
ASSOC_MAX_BYTES = 3 * 2**30


def make_fns(impl):
  def fwd(q, k, v, beta, g, s0):
    return prism_recurrence(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                            impl=impl)

  def loss(*args):
    o, final = fwd(*args)
    return jnp.sum(o) + jnp.sum(final)

  return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=tuple(range(6))))


def median_ms(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--impls", nargs="+", default=["naive", "assoc", "chunk"])
  args = parser.parse_args()
  B, H, K, V, L = 1, 4, 64, 64, 2

  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "unknown"
  print(f"date {datetime.date.today()}, commit {commit}, {platform.processor() or platform.machine()}"
        f", {jax.device_count()} CPU device(s), jax {jax.__version__}")
  print(f"B={B} H={H} K=V={K} L={L} float32, median of {args.repeats} after warm-up, ms")
  print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)\n")
  print("| T | impl | forward | fwd+bwd |")
  print("|---|---|---|---|")
  results = {}
  for T in args.lengths:
    inputs = random_prism_inputs(jax.random.key(T), B, T, H, K, V, L)
    for impl in args.impls:
      if impl == "assoc" and 4 * B * T * H * K * K * 6 > ASSOC_MAX_BYTES:
        print(f"| {T} | assoc | skipped (O(T·K²) memory) | |")
        continue
      fwd, grad = make_fns(impl)
      t_f = median_ms(fwd, inputs, args.repeats)
      t_b = median_ms(grad, inputs, args.repeats)
      results[T, impl] = (t_f, t_b)
      print(f"| {T} | {impl} | {t_f:.1f} | {t_b:.1f} |", flush=True)
  print(f"\nload average after: {os.getloadavg()[0]:.2f}")
  for T in args.lengths:
    if (T, "naive") in results and (T, "chunk") in results:
      (nf, nb), (cf, cb) = results[T, "naive"], results[T, "chunk"]
      print(f"T={T}: naive time / chunk time = {nf / cf:.1f}x forward, {nb / cb:.1f}x fwd+bwd")


if __name__ == "__main__":
  main()
