"""Time the pure-JAX forms of the recurrence on the CPU: naive, assoc and chunk.

    python benchmarks/cpu_ops.py [--lengths 512 2048 8192] [--repeats 5] [--chunk-sizes 32 64]

Forward and forward+backward (gradients of every input and the initial state), B=1, H=4,
K=V=64, L=2, float32, median of `--repeats` timed runs after one warm-up (compile) run. The
chunked form runs at each of `--chunk-sizes` (32 is the fastest on a 2-core x86-64 CPU, 64 the
API's default, tuned for GPUs). Each form is timed on its own, its runs back to back: timing
the forms in alternation was tried and made the chunked forward up to 2× slower (each switch of
program meets the allocator's cache emptied of the previous program's buffer sizes). The
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


def make_fns(impl, chunk_size=64):
  def fwd(q, k, v, beta, g, s0):
    return prism_recurrence(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                            impl=impl, chunk_size=chunk_size)

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
  parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[32, 64])
  args = parser.parse_args()
  B, H, K, V, L = 1, 4, 64, 64, 2

  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "unknown"
  cpu = platform.processor() or platform.machine()
  print(f"date {datetime.date.today()}, commit {commit}, {cpu}"
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
      for c in (args.chunk_sizes if impl == "chunk" else [64]):
        name = f"chunk C={c}" if impl == "chunk" else impl
        fwd, grad = make_fns(impl, c)
        results[T, name] = median_ms(fwd, inputs, args.repeats), median_ms(grad, inputs,
                                                                           args.repeats)
        print(f"| {T} | {name} | {results[T, name][0]:.1f} | {results[T, name][1]:.1f} |",
              flush=True)
  print(f"\nload average after: {os.getloadavg()[0]:.2f}")
  for (T, name), (cf, cb) in results.items():
    if name.startswith("chunk") and (T, "naive") in results:
      nf, nb = results[T, "naive"]
      print(f"T={T}: naive time / {name} time = {nf / cf:.1f}x forward, {nb / cb:.1f}x fwd+bwd")


if __name__ == "__main__":
  main()
