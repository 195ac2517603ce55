"""Forward and forward+backward times of the PRISM recurrence implementations on one GPU.

    python benchmarks/kernels.py [--quick] [--skip-naive] [--json PATH]
    python benchmarks/kernels.py --memory     # peak memory of Pallas fwd+bwd, fresh process
    python benchmarks/kernels.py --profile --writes 1,2   # device time of every kernel

Times are medians over samples after warm-up; each sample is the mean of enough back-to-back
calls to last ~20 ms, closed by one device synchronisation (`block_until_ready` of the last
call; for flash-linear-attention the CUDA events of `triton.testing.do_bench`, which include
the gaps PyTorch leaves between its kernels). `--profile` gives each side's kernel time
alone. The table's JAX programs are compiled side by side before any timing
(`--compile-workers`), so a fresh machine spends one compile's time on them, not one per row.
Inputs are bf16 (log-decay float32), keys L2-normalised, fresh random data. The floor is
max(FLOPs / 790 TFLOP/s, bytes / 4.3 TB/s) — the bf16 matrix rate and copy bandwidth measured
on this H200 — with FLOPs the matrix products of the chunked form (C = 64) and bytes one read
of every input and one write of every output.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prism_jax.ops import prism_recurrence  # noqa: E402

SHAPES = [(4, 4096, 16, 128), (8, 2048, 8, 64), (1, 16384, 16, 128)]  # B, T, H, K = V
WRITES = (1, 2, 3)
MEMORY_SHAPE = (1, 65536, 16, 128, 2)  # B, T, H, K = V, L
PEAK_FLOPS, PEAK_BYTES = 790e12, 4.3e12
CHUNK = 64
STAGE_SCALE = 0.1  # the attention scale of the kernels timed alone
# The sequential scan keeps every per-step state for its backward (tens of GiB at the table's
# shapes): timed forward only.
FORWARD_ONLY = ("naive",)


def make_inputs(B, T, H, D, L, seed=0, dtype=jnp.bfloat16):
  ks = jax.random.split(jax.random.key(seed), 6)
  bf = dtype
  q = jax.random.normal(ks[0], (B, T, H, D))
  k = jax.random.normal(ks[1], (B, T, H, L, D))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[2], (B, T, H, L, D))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H, L)))
  g = jax.nn.log_sigmoid(3.0 + jax.random.normal(ks[4], (B, T, H)))
  do = jax.random.normal(ks[5], (B, T, H, D)).astype(bf)
  return (q.astype(bf), k.astype(bf), v.astype(bf), beta.astype(bf), g), do


def forward_fn(impl):
  def f(q, k, v, beta, g):
    return prism_recurrence(q, k, v, beta, g, chunk_size=CHUNK, impl=impl)[0]
  return f


def fwd_bwd_fn(impl):
  f = forward_fn(impl)

  def run(args, do):
    o, vjp = jax.vjp(f, *args)
    return o, vjp(do)
  return run


def median_ms(call, target_s=0.02, samples=7):
  """Median per-call milliseconds of `call()` (which returns JAX arrays without waiting for
  them): each sample issues enough calls back to back to last ~`target_s` and then waits for
  the last one's results, so the time is the device's per call (or the host's, if dispatching
  is slower) without one host round trip per call."""
  jax.block_until_ready(call())
  jax.block_until_ready(call())
  t0 = time.perf_counter()
  jax.block_until_ready(call())
  reps = max(1, min(200, int(target_s / max(time.perf_counter() - t0, 1e-6))))
  times = []
  for _ in range(samples):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = call()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / reps)
  return 1e3 * float(np.median(times))


def time_jax(impl, args, do, samples, backward=True, programs=None):
  """(forward, forward+backward) ms of `impl`; programs: its two executables compiled before
  (`compile_programs`), else each is compiled at its first call."""
  f, fb = programs or (jax.jit(forward_fn(impl)), jax.jit(fwd_bwd_fn(impl)))
  fwd = median_ms(lambda: f(*args), samples=samples)
  if not backward:
    return fwd, None
  both = median_ms(lambda: fb(args, do), samples=samples)
  return fwd, both


def compile_programs(jobs, workers):
  """Compile the table's programs side by side before any timing: {key: (impl, args, do,
  backward)} → {key: (forward, forward+backward or None) executables, or the exception that
  stopped one}. XLA and the Pallas kernels compile outside the GIL, so on a fresh machine the
  rows' compiles (tens of seconds each) overlap instead of adding up; nothing runs on the
  device while timings are taken."""
  from concurrent.futures import ThreadPoolExecutor

  def build(fn, *args):
    return jax.jit(fn).lower(*args).compile()

  with ThreadPoolExecutor(max_workers=workers) as pool:
    futures = {key: (pool.submit(build, forward_fn(impl), *args),
                     pool.submit(build, fwd_bwd_fn(impl), args, do) if backward else None)
               for key, (impl, args, do, backward) in jobs.items()}
  out = {}
  for key, (fwd, both) in futures.items():
    try:
      out[key] = (fwd.result(), both and both.result())
    except Exception as err:  # reported where the row would have timed it
      out[key] = err
  return out


def _fla_calls(args, do):
  """flash-linear-attention's chunk_gated_delta_rule (L = 1) as (forward, forward+backward)
  closures over PyTorch copies of the inputs."""
  import torch
  import fla.ops.common.chunk_o as chunk_o
  from fla.ops.gated_delta_rule import chunk_gated_delta_rule
  # Its backward refuses Hopper with Triton < 3.7.1 (a correctness guard); timing only.
  chunk_o.IS_NVIDIA_HOPPER = False
  to_t = lambda x, grad=True: torch.from_numpy(np.asarray(x, np.float32)).cuda().to(
      torch.bfloat16 if x.dtype == jnp.bfloat16 else torch.float32).requires_grad_(grad)
  q, k, v, beta, g = args
  tq, tk, tv = to_t(q), to_t(k[:, :, :, 0]), to_t(v[:, :, :, 0])
  tb, tg, tdo = to_t(beta[..., 0]), to_t(g), to_t(do, False)

  def fwd():
    with torch.no_grad():
      return chunk_gated_delta_rule(tq, tk, tv, tg, tb)[0]

  def both():
    o = chunk_gated_delta_rule(tq, tk, tv, tg, tb)[0]
    o.backward(tdo)
  return fwd, both


def time_fla(args, do):
  """flash-linear-attention's chunk_gated_delta_rule (L = 1 only), or None if unavailable."""
  try:
    import triton
    fwd, both = _fla_calls(args, do)
  except ImportError as err:
    print(f"flash-linear-attention unavailable: {err}", file=sys.stderr)
    return None
  median = lambda fn: float(triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median"))
  return median(fwd), median(both)


def floor_ms(B, T, H, D, L, backward=False):
  """Lower bound from the chunked form's matrix products and one pass over inputs/outputs."""
  C, N = CHUNK, B * H * T // CHUNK
  per_chunk = (L * 2 * C * C * D  # K¹ K^lᵀ
               + 2 * C * C * 2 * D + (L - 1) * 2 * C * C * D  # U, Wk, M^l W^l
               + (1 + L) * 2 * C * D * D  # Wk S and the state update
               + 2 * C * D * D + L * 2 * C * C * D * 2)  # Q S, Q K^lᵀ, P^l Y^l
  flops = N * per_chunk * (3 if backward else 1)
  elems = B * T * H * (D + 2 * L * D + L + 1)  # q, k, v, beta, g
  out = B * T * H * D
  nbytes = 2 * (elems + out) * (2 if backward else 1) + (2 * out if backward else 0)
  return 1e3 * max(flops / PEAK_FLOPS, nbytes / PEAK_BYTES)


def peak_memory():
  B, T, H, D, L = MEMORY_SHAPE
  args, do = make_inputs(B, T, H, D, L)
  fb = jax.jit(fwd_bwd_fn("pallas"))
  stats = fb.lower(args, do).compile().memory_analysis()
  jax.block_until_ready(fb(args, do))
  peak = jax.devices()[0].memory_stats().get("peak_bytes_in_use", -1)
  return {"shape": f"B{B} T{T} H{H} K=V={D} L{L}", "peak_bytes_in_use": peak,
          "temp_bytes": getattr(stats, "temp_size_in_bytes", -1),
          "argument_bytes": getattr(stats, "argument_size_in_bytes", -1),
          "output_bytes": getattr(stats, "output_size_in_bytes", -1)}


def stage_calls(bs, B, T, H, D, L, seed=0, interpret=False, dtype=jnp.bfloat16, solve=None):
  """Each GPU kernel alone as a jitted function with concrete inputs, in the order the
  custom_vjp runs them: {name: (fn, args)}. solve: precision of the products inside the
  inverse kernel and of those applying it (default: what the kernels use for `dtype`)."""
  from pallas_kernels.gpu import kernels as gk
  from prism_jax.ops import chunk_math as cm
  from pallas_kernels.gpu.prism import operand_precision, store_dtype
  from pallas_kernels.prism import kernel_inputs
  (q, k, v, beta, g), do = make_inputs(B, T, H, D, L, seed, dtype)
  bs = bs.fitted(dtype, L)  # what the custom_vjp launches
  G, seq, prev = kernel_inputs(g, None, B, T, CHUNK)
  kw = dict(bs=bs, precision=operand_precision(dtype), interpret=interpret)
  store = dict(store_dtype=store_dtype(dtype))
  # Default: float32 products inside the inverse, the operand precision where it is applied.
  inv_solve = dict(solve=cm.HIGHEST if solve is None else solve)
  solve = dict(solve=kw["precision"] if solve is None else solve)
  f32 = lambda *shape: jnp.zeros(shape, jnp.float32)
  rows, stored = f32(B, T, H, D), f32(B, T, H, D).astype(store["store_dtype"])
  inv = f32(B, T, H, CHUNK).astype(store["store_dtype"])
  state = f32(B, H, D, D)
  h = f32(B, H, T // CHUNK * D, D).astype(store["store_dtype"])
  scale = dict(scale=STAGE_SCALE)
  wy_args = (k, v, beta, G, seq, prev, inv, rows, stored, rows, rows, h, [rows] * L, [rows] * L)
  call = lambda fn, *extra: jax.jit(lambda *a: fn(*a, **kw, **{k: v for d in extra
                                                             for k, v in d.items()}))
  return {
      "inverse": (call(gk.inverse, inv_solve, store), (k, beta, G, seq)),
      "apply_inverse": (call(gk.apply_inverse, solve, store),
                        (k, v, beta, G, seq, prev, inv)),
      "state_forward": (call(gk.state_forward, store),
                        (k, v, beta, G, seq, prev, rows, stored, state)),
      "output": (call(gk.output, scale), (q, k, v, beta, G, seq, prev, stored, h)),
      "local_dy": (call(gk.local_dy, scale), (q, k, G, seq, prev, do)),
      "state_backward": (call(gk.state_backward, scale, store),
                         (q, k, G, seq, prev, stored, do, rows, state)),
      "state_grads": (call(gk.state_grads, scale),
                      (q, k, v, beta, G, seq, prev, stored, h, h, rows, do)),
      # L ≥ 2: the writes after the first, before the Mosaic WY kernel (the erase write).
      **({"wy_further_grads": (call(gk.wy_further_grads, solve), further_args(wy_args))}
         if L > 1 else {}),
      "wy_grads": (call(gk.wy_grads, solve), wy_args),
  }


def further_args(wy_args):
  """The arguments of `kernels.wy_further_grads` among those of `wy_grads`."""
  k, v, beta, G, seq, prev, inv, _, _, dx, _, dh, local, dk_state = wy_args
  return k, v, beta, G, seq, prev, inv, dx, dh, local, dk_state


def profile_kernels(shape, writes, runs=5):
  """Device time of every kernel inside Pallas forward+backward (a `jax.profiler` trace) and
  inside flash-linear-attention's (the PyTorch profiler, L = 1), per run: where each side's time
  goes, without the host synchronisation a kernel timed alone pays. Prints one JSON line per
  implementation and L: {"profile": ..., "kernels": {name: µs per run}, "busy_us": ...}."""
  import tempfile
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import trace_summary
  B, T, H, D = shape
  label = f"B{B} T{T} H{H} K=V={D}"
  fla_args = None
  for L in writes:  # JAX first: once PyTorch's profiler has run, CUPTI refuses a second client
    args, do = make_inputs(B, T, H, D, L)
    fla_args = (args, do) if L == 1 else fla_args
    fb = jax.jit(fwd_bwd_fn("pallas"))
    f = jax.jit(forward_fn("pallas"))
    for name, call in (("pallas fwd", lambda: f(*args)), ("pallas fwd+bwd", lambda: fb(args, do))):
      jax.block_until_ready(call())
      with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
          for _ in range(runs):
            jax.block_until_ready(call())
        summary = trace_summary.summarise(trace_summary.latest_trace(tmp), top=40,
                                           by="kernel")
      kernels = {r["name"]: round(r["total_us"] / runs, 1) for r in summary["rows"]}
      print(json.dumps({"profile": name, "shape": label, "L": L, "runs": runs,
                        "busy_us": round(sum(kernels.values()), 1), "kernels": kernels}),
            flush=True)
  if fla_args is not None:
    try:
      _profile_fla(*fla_args, label, runs)
    except Exception as err:  # keep the JAX rows when the PyTorch side breaks
      print(f"fla profile failed: {err!r}"[:2000], file=sys.stderr)


def _profile_fla(args, do, label, runs):
  import torch
  from torch.profiler import ProfilerActivity, profile
  fwd, both = _fla_calls(args, do)
  for name, call in (("fla fwd", fwd), ("fla fwd+bwd", both)):
    for _ in range(3):
      call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
      for _ in range(runs):
        call()
      torch.cuda.synchronize()
    kernels = {}
    for e in prof.key_averages():
      us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
      if us and e.key and not e.key.startswith(("ProfilerStep", "aten::")):
        kernels[e.key] = round(us / runs, 1)
    kernels = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:40])
    print(json.dumps({"profile": name, "shape": label, "L": 1, "runs": runs,
                      "busy_us": round(sum(kernels.values()), 1), "kernels": kernels}),
          flush=True)


def mosaic_calls(calls, interpret=False, pass_block_v=64):
  """The Mosaic GPU versions of stages (pallas_kernels/gpu/mosaic.py), keyed "<stage>_mosaic",
  on the inputs of their Triton counterparts in `calls` (what `stage_calls` returned; the two
  take the same arguments): timed beside them to decide each stage's backend. pass_block_v:
  value columns per program of the passes over chunks (what `seq_tiling` gives the Triton
  ones)."""
  import inspect
  from pallas_kernels.gpu import mosaic
  out = {}
  L = calls["inverse"][1][0].shape[3]  # the keys [B, T, H, L, K] of the inverse kernel
  for stage in mosaic.STAGES:
    if L > mosaic.MAX_WRITES.get(stage, L) or stage not in calls:
      continue  # more writes than its shared memory holds, or none after the first (L = 1)
    fn = getattr(mosaic, stage)
    kw = dict(chunk=CHUNK, interpret=interpret)
    params = inspect.signature(fn).parameters
    if "scale" in params:
      kw["scale"] = STAGE_SCALE
    if "block_v" in params:
      kw["block_v"] = pass_block_v
    if stage == "wy_grads" and L > 1:  # the writes after the first on Triton, then this
      further = calls["wy_further_grads"][0]
      fn = lambda *a, fn=fn, kw=kw: fn(*a, further=further(*further_args(a)), **kw)
      kw = {}
    out[stage + "_mosaic"] = (jax.jit(functools.partial(fn, **kw)), calls[stage][1])
  return out


WY_PASS = ("wy_state_forward_mosaic", "wy_state_forward_inference_mosaic")


def wy_pass_calls(calls, interpret=False, pass_block_v=64):
  """At L = 1, the Mosaic GPU pass forming U and Wk itself (`BlockSizes.wy_pass`), with the
  backward's residuals and without ("_inference"), keyed as in WY_PASS, on the inputs of
  apply_inverse and state_forward in `calls` (what `stage_calls` returned): timed against those
  two kernels together. {} at L > 1."""
  from pallas_kernels.gpu import mosaic
  k, v, beta, G, seq, prev, inv = calls["apply_inverse"][1]
  if k.shape[3] != 1:
    return {}
  args = (k, v, beta, G, seq, prev, inv, calls["state_forward"][1][-1])
  kw = dict(chunk=CHUNK, block_v=pass_block_v, interpret=interpret)
  return {name: (jax.jit(functools.partial(mosaic.wy_state_forward, residuals=residuals, **kw)),
                 args) for name, residuals in zip(WY_PASS, (True, False))}


def _block_sizes(spec):
  from pallas_kernels.gpu.kernels import BlockSizes
  return BlockSizes.parse(spec, CHUNK)


def compile_check(configs, writes=(1, 3), B=1, T=256, H=2, D=128, dtype=jnp.bfloat16):
  """Compile every GPU kernel alone for each tiling; print which fit (Triton shared memory)."""
  ok = {}
  for cfg in configs:
    for L in writes:
      calls = stage_calls(_block_sizes(cfg), B, T, H, D, L, dtype=dtype)
      for name, (fn, args) in calls.items():
        try:
          fn.lower(*args).compile()
          res = "ok"
        except Exception as err:  # report and go on: the point is the table
          res = str(err).split("\n")[0][-90:]
        ok[(cfg, L, name)] = res == "ok"
        print(f"compile {cfg} {jnp.dtype(dtype).name} D={D} L={L} {name}: {res}", flush=True)
  good = [c for c in configs if all(v for (cfg, _, _), v in ok.items() if cfg == c)]
  print("configs that compile:", good)
  return good


SOLVES = ("tf32x3", "highest", "bf16")  # chunk_math's TF32X3, HIGHEST and BF16


def stage_times(bs, shape, writes, solve=None, only=None):
  """Milliseconds of each kernel alone at one shape (where the time of the Pallas path goes).
  solve: one of SOLVES (timing other precisions of the inverse); only: kernel names to time."""
  from prism_jax.ops import chunk_math as cm
  B, T, H, D = shape
  for L in writes:
    row = {"shape": f"B{B} T{T} H{H} K=V={D}", "L": L,
           "tiling": [getattr(bs, f) for f in bs.FIELDS], "warps": bs.kernel_warps,
           "solve": solve or "default"}
    solve_arg = solve and getattr(cm, solve.upper())
    calls = stage_calls(bs, B, T, H, D, L, solve=solve_arg)
    if not only or any(name.endswith("_mosaic") for name in only):
      from pallas_kernels.gpu.kernels import seq_tiling
      calls.update(mosaic_calls(calls, pass_block_v=seq_tiling(bs, B, H, D)[0]))
    if not only or any(name in WY_PASS for name in only):
      from pallas_kernels.gpu.kernels import seq_tiling
      calls.update(wy_pass_calls(calls, pass_block_v=seq_tiling(bs, B, H, D)[0]))
    for diag in ("rows", "doubling"):  # inverse_<diag>: either way of inverting the diagonal
      if only and "inverse_" + diag in only:
        calls["inverse_" + diag] = stage_calls(dataclasses.replace(bs, inverse_diag=diag),
                                               B, T, H, D, L, solve=solve_arg)["inverse"]
    for name, (fn, args) in calls.items():
      if only and name not in only:
        continue
      try:
        row[name] = median_ms(lambda: fn(*args))
      except Exception as err:  # one stage failing must not hide the others
        row[name] = str(err).split("\n")[0][-90:]
    print(json.dumps({"stages": row}), flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true",
                      help="first shape, L = 1 and 2 only, no memory run")
  parser.add_argument("--full", action="store_true",
                      help="every shape and L and the memory row (the default without --quick; "
                           "names it where a script passes arguments)")
  parser.add_argument("--skip-naive", action="store_true")
  parser.add_argument("--impls", default=None,
                      help="the table's JAX implementations, from naive,chunk,pallas (default: "
                           "all three, less naive with --skip-naive)")
  parser.add_argument("--table-writes", default=None,
                      help="the table's L values, e.g. 1 or 2 (default: 1,2,3; 1,2 with "
                           "--quick); fla (L = 1, the first write) runs beside the first")
  parser.add_argument("--no-memory", action="store_true", help="the table without its memory row")
  parser.add_argument("--compile-workers", type=int, default=4,
                      help="the table's JAX programs compiled this many at a time before any "
                           "timing (1: each just before it is timed)")
  parser.add_argument("--memory", action="store_true")
  parser.add_argument("--stages", action="store_true",
                      help="time each kernel alone at one shape (--shape; L from --writes)")
  parser.add_argument("--tilings", default=None,
                      help='with --stages: tilings to time, ";"-separated, each in '
                           'BlockSizes.parse\'s format "block_v,num_warps,num_stages[,...]" '
                           '(default: the one the kernels use)')
  parser.add_argument("--solves", default=None,
                      help=f"with --stages: precisions of the inverse to time, from {SOLVES}")
  parser.add_argument("--only", default=None,
                      help="with --stages: kernels to time, e.g. inverse,wy_grads "
                           "(<kernel>_mosaic: its Mosaic GPU version, where one exists; "
                           "inverse_rows, inverse_doubling: the inverse kernel each way)")
  parser.add_argument("--warps", default=None,
                      help='with --stages: per-kernel warps to time, e.g. '
                           '"prism_inverse=2;prism_inverse=8,prism_output=8"')
  parser.add_argument("--profile", action="store_true",
                      help="device time of every kernel of Pallas and fla fwd / fwd+bwd at one "
                           "shape (--shape; L from --writes)")
  parser.add_argument("--shape", type=int, default=None,
                      help=f"which of {SHAPES} (B, T, H, K = V): the one --stages and --profile "
                      "time (default the first); restricts the table to it")
  parser.add_argument("--json", default=None)
  parser.add_argument("--compile-check", default=None,
                      help='tilings to try, e.g. "64,4,2;32,4,1"; the first that compiles is '
                           'written to stdout as PRISM_GPU_BLOCKS=...')
  parser.add_argument("--dtype", default="bfloat16", help="inputs of --compile-check")
  parser.add_argument("--dim", type=int, default=128, help="K = V of --compile-check")
  parser.add_argument("--writes", default="1,3", help="L values of --compile-check and --stages")
  a = parser.parse_args()
  if a.compile_check:
    configs = a.compile_check.split(";")
    good = compile_check(configs, tuple(int(x) for x in a.writes.split(",")), D=a.dim,
                         dtype=jnp.dtype(a.dtype))
    if good:
      print("PRISM_GPU_BLOCKS=" + good[0])
    return
  if a.memory:
    print(json.dumps(peak_memory()))
    return
  if a.profile:
    profile_kernels(SHAPES[a.shape or 0], tuple(int(x) for x in a.writes.split(",")))
    return
  if a.stages:
    from pallas_kernels.prism import gpu_block_sizes
    tilings = ([_block_sizes(c) for c in a.tilings.split(";")]
               if a.tilings else [gpu_block_sizes(CHUNK, interpret=False)])
    solves = a.solves.split(",") if a.solves else [None]
    if not set(solves) <= {None, *SOLVES}:
      parser.error(f"--solves takes names from {SOLVES}, got {a.solves!r}")
    if a.warps:  # per-kernel warps on top of each tiling
      tilings = [dataclasses.replace(bs, kernel_warps=tuple(
          (name, int(n)) for name, n in (x.split("=") for x in group.split(","))))
          for bs in tilings for group in a.warps.split(";")]
    for bs in tilings:
      for solve in solves:
        stage_times(bs, SHAPES[a.shape or 0], tuple(int(x) for x in a.writes.split(",")), solve,
                    a.only and a.only.split(","))
    return
  print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}")
  rows = []
  shapes = ([SHAPES[a.shape]] if a.shape is not None else SHAPES[:1] if a.quick else SHAPES)
  impls = (a.impls.split(",") if a.impls else
           ("chunk", "pallas") if a.skip_naive else ("naive", "chunk", "pallas"))
  if not set(impls) <= {"naive", "chunk", "pallas"}:
    parser.error(f"--impls takes names from naive,chunk,pallas, got {a.impls!r}")
  writes = ((1, 2) if a.quick else WRITES) if a.table_writes is None else tuple(
      int(x) for x in a.table_writes.split(","))
  inputs = {(shape, L): make_inputs(*shape, L) for shape in shapes for L in writes}
  programs = {}
  if a.compile_workers > 1:
    t0 = time.perf_counter()
    programs = compile_programs({(key, impl): (impl, *inputs[key], impl not in FORWARD_ONLY)
                                 for key in inputs for impl in impls}, a.compile_workers)
    print(json.dumps({"compiled": len(programs), "workers": a.compile_workers,
                      "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)
  for B, T, H, D in shapes:
    fla = None
    for L in writes:
      args, do = inputs.pop(((B, T, H, D), L))
      # Seconds each timing took, compiles (without --compile-workers) and autotuning included:
      # where a job's limit goes.
      wall, t0 = {}, time.perf_counter()
      if L == writes[0]:  # fla (L = 1: the first write of these inputs) once per shape
        try:
          fla = time_fla(args, do)
        except Exception as err:  # keep the JAX rows when the PyTorch side breaks
          print(f"fla failed: {err!r}"[:3000], file=sys.stderr)
        wall["fla"] = round(time.perf_counter() - t0, 1)
      row = {"shape": f"B{B} T{T} H{H} K=V={D}", "L": L}
      for impl in impls:
        t0 = time.perf_counter()
        try:
          built = programs.pop((((B, T, H, D), L), impl), None)
          if isinstance(built, Exception):
            raise built
          row[impl] = time_jax(impl, args, do, samples=3 if impl == "naive" else 7,
                               backward=impl not in FORWARD_ONLY, programs=built)
        except Exception as err:  # one failing implementation must not hide the others
          print(f"{impl} L={L} failed: {err!r}"[:3000], file=sys.stderr)
          row[impl] = None
        wall[impl] = round(time.perf_counter() - t0, 1)
      row["fla_L1"] = fla
      row["wall_s"] = wall
      row["floor"] = (floor_ms(B, T, H, D, L), floor_ms(B, T, H, D, L, backward=True))
      rows.append(row)
      print(json.dumps(row), flush=True)
  mem = None
  if not (a.quick or a.no_memory):
    memory = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory"],
                            capture_output=True, text=True)
    mem = json.loads(memory.stdout.strip().splitlines()[-1]) if memory.returncode == 0 else {
        "error": memory.stderr[-2000:]}
  print(json.dumps({"memory": mem}))
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"rows": rows, "memory": mem}, f, indent=1)
  ms = lambda x: "-" if x is None else f"{x:.2f}"
  fmt = lambda t: "-" if t is None else f"{ms(t[0])} / {ms(t[1])}"
  print("\n| shape | L | naive | chunk | pallas | fla (L=1) | pallas / fla | floor |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    ratio = ("-" if r["fla_L1"] is None or r.get("pallas") is None else
             f"{r['pallas'][0] / r['fla_L1'][0]:.2f} / {r['pallas'][1] / r['fla_L1'][1]:.2f}")
    print(f"| {r['shape']} | {r['L']} | {fmt(r.get('naive'))} | {fmt(r.get('chunk'))} | "
          f"{fmt(r.get('pallas'))} | {fmt(r['fla_L1'])} | {ratio} | {fmt(r['floor'])} |")


if __name__ == "__main__":
  main()
