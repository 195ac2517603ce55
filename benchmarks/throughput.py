"""Training throughput of the causal LM on one device: tokens/s, model FLOPs utilisation, memory.

    python benchmarks/throughput.py                         # paper shape, 4 mixers, 2K/8K/16K
    python benchmarks/throughput.py --model lm_130m --impl chunk,pallas --json t.json
    python benchmarks/throughput.py --profile /tmp/prof     # also a trace of 3 prism steps at 2K
    python benchmarks/throughput.py --model tiny --contexts 64,128 --tokens-per-step 256  # CPU

One step is the project's full training step (`prism_jax.train.make_train_step`: forward,
backward, global-norm clipping, AdamW) under `jax.jit` with the state donated, bf16 compute and
float32 parameters, on random tokens. Every case is lowered in the main thread and compiled
ahead of time in a thread pool (XLA releases the GIL while it compiles); then the cases are
timed one after another, so compilation never overlaps a timed step. Each reported step time is
the median of `--steps` steps after `--warmup` steps, every step closed by `block_until_ready`
on the whole new state; tokens/s = B·T / median step time.

Memory is the compiled program's own account (`memory_analysis()`): arguments + outputs −
donated aliases + temporaries, i.e. the live bytes of one step. The process-wide
`peak_bytes_in_use` cannot be reset between cases, so it is printed only as a running maximum.

Model FLOPs per token (forward + backward, backward counted as twice the forward):

    F = 6·N + 6·D·V_vocab + 3 · Σ_layers H · f_mix

N is the number of non-embedding parameters (every weight does one multiply-add per token
forward), D·V_vocab the LM head (the tied embedding's product; the lookup itself is free) and
f_mix the forward sequence-mixing FLOPs of one head per token:

    attention (causal, QKᵀ and PV each 2·T·D_h, halved by the mask):   2·T·D_h
        (so 3·H·f_mix = 6·T·d per layer with d = H·D_h)
    chunked recurrence (PRISM with L writes, GDN with L = 1), chunk C, the dense products of
    `prism_jax/ops/chunk.py` divided by C, with (I + A)⁻¹ counted as C³/3 multiply-adds:
        C·((4L + 2)·K + 4L·V) + (2/3)·C² + 2L·K·V + 4K·V
    explicit solver (spec §6), L inner steps of Zᵀk and a rank-1 update, then the read-out:
        4L·K·V + 2K·V

MFU = F · tokens/s / 989 TFLOP/s (H200 dense bf16 peak); the table also gives it against the
797 TFLOP/s that a bf16 8192³ matmul reaches on the same chip.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs.base import base_config  # noqa: E402
from prism_jax.models import CausalLM, ModelConfig, lm_130m_config, tiny_lm_config  # noqa: E402
from prism_jax.ops import chunk as chunk_ops  # noqa: E402
from prism_jax.ops.api import IMPLS  # noqa: E402
from prism_jax.train import init_state, make_optimizer, make_train_step  # noqa: E402
from prism_jax.train.tasks import lm_loss_sum  # noqa: E402

PEAK_FLOPS = 989e12     # H200 dense bf16
MATMUL_FLOPS = 797e12   # bf16 8192³ matmul measured on the H200 (GPU-NOTES)
MIXERS = {"prism": ("prism",), "gdn": ("gdn",), "attention": ("attention",),
          "explicit": ("explicit",), "hybrid": ("prism", "prism", "prism", "attention")}
RECURRENT = ("prism", "gdn")
PROFILE_STEPS = 3   # mixers whose recurrence takes `impl`
MODELS = ("paper", "lm_130m", "tiny")
# Tokens/s of PyTorch runs on the same H200 (GPU-NOTES): the PRISM authors' code at the paper
# shape, and flash-linear-attention's Gated DeltaNet LM (191M).
ANCHORS = {"authors PRISM (paper shape)": {2048: 69.1e3, 8192: 32.4e3},
           "fla Gated DeltaNet LM 191M": {2048: 90.8e3, 8192: 94.9e3}}


def recurrence_flops(K: int, V: int, L: int, C: int) -> float:
  """Forward FLOPs of the chunked recurrence per head per token (module docstring)."""
  return C * ((4 * L + 2) * K + 4 * L * V) + 2 * C * C / 3 + 2 * L * K * V + 4 * K * V


def explicit_flops(K: int, V: int, L: int) -> float:
  """Forward FLOPs of the explicit solver per head per token."""
  return 4 * L * K * V + 2 * K * V


def attention_flops(T: int, head_dim: int) -> float:
  """Forward FLOPs of causal softmax attention per head per token at context T."""
  return 2 * T * head_dim


def mixer_flops(cfg: ModelConfig, mixer: str, T: int) -> float:
  """Forward sequence-mixing FLOPs per token of one layer of `mixer` (all heads)."""
  K, V = cfg.head_dim, cfg.value_head_dim or cfg.head_dim
  if mixer == "attention":
    return cfg.attn_heads * attention_flops(T, cfg.attn_head_dim)
  if mixer == "explicit":
    return cfg.num_heads * explicit_flops(K, V, cfg.solver_steps)
  if mixer in RECURRENT:
    L = cfg.solver_steps if mixer == "prism" else 1
    return cfg.num_heads * recurrence_flops(K, V, L, cfg.chunk_size)
  raise ValueError(f"mixer_flops: no FLOP count for mixer {mixer!r}; known: "
                   f"{('attention', 'explicit') + RECURRENT}")


def model_flops_per_token(cfg: ModelConfig, T: int, non_embedding_params: int) -> float:
  """F = 6·N + 6·D·V_vocab + 3·Σ_layers f_mix (module docstring)."""
  mixing = sum(mixer_flops(cfg, cfg.mixer_of_layer(i), T) for i in range(cfg.num_layers))
  return 6 * non_embedding_params + 6 * cfg.d_model * cfg.vocab_size + 3 * mixing


def param_counts(abs_params) -> tuple[int, int]:
  """(all parameters, non-embedding parameters): the embedding table and an untied head are
  left out of the second, since F counts the head as 6·D·V_vocab on its own."""
  total, embedding = 0, 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(abs_params):
    names = [str(getattr(k, "key", k)) for k in path]
    total += leaf.size
    if names[0] in ("embed", "head"):
      embedding += leaf.size
  return total, total - embedding


def model_config(model: str, mixer: str, impl: str, dtype: str, max_len: int,
                 overrides: dict) -> ModelConfig:
  """The ModelConfig of a case: `paper` is D 768, 8 layers of 8 heads × 96, L = 2, GPT-2
  vocabulary (with the `lm_130m` preset's rank-64 second key and gains); `lm_130m` the preset;
  `tiny` the CPU preset. `overrides` (d_model, num_layers, ...) apply last."""
  fields = dict(mixer_pattern=MIXERS[mixer], impl=impl, dtype=dtype, param_dtype="float32",
                max_seq_len=max_len)
  if model == "paper":
    return lm_130m_config(**{"num_layers": 8, "num_heads": 8, "head_dim": 96, **fields,
                             **overrides})
  if model == "lm_130m":
    return lm_130m_config(**fields, **overrides)
  if model == "tiny":
    return tiny_lm_config(**fields, **overrides)
  raise ValueError(f"--model must be one of {MODELS}, got {model!r}")


@dataclasses.dataclass
class Case:
  """One measured configuration and what was built for it."""
  model: str
  mixer: str
  impl: str
  context: int
  batch: int
  warmup: int
  steps: int
  cfg: ModelConfig | None = None
  params: int = 0
  non_embedding_params: int = 0
  init: object = None     # future of the compiled () -> (state, non-parameter state)
  step: object = None     # compiled: (state, rest, tokens, lr, poison) -> (state, metrics)
  compile_s: float = 0.0
  memory: dict | None = None

  @property
  def name(self) -> str:
    impl = f"/{self.impl}" if self.mixer in RECURRENT + ("hybrid",) else ""
    return f"{self.model}:{self.mixer}{impl}@{self.context}x{self.batch}"


def lower_case(case: Case, overrides: dict, dtype: str, max_len: int, pool, inits: dict):
  """Trace the train step of `case` (main thread: tracing holds the GIL) and return it lowered.

  The init program (parameters and optimizer state) depends on the model only, so one is
  compiled per ModelConfig, in `pool`, and shared through `inits` by the cases that use it.
  """
  cfg = model_config(case.model, case.mixer, case.impl, dtype, max_len, overrides)
  case.cfg = cfg
  graphdef, abs_params, _ = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))),
                                      nnx.Param, ...)
  abs_params = nnx.to_pure_dict(abs_params)
  case.params, case.non_embedding_params = param_counts(abs_params)
  tx, _ = make_optimizer(base_config("lm", cfg).optim, 1000, abs_params)

  def init():
    _, params, rest = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    return init_state(nnx.to_pure_dict(params), tx, 0), nnx.to_pure_dict(rest)

  def step(state, rest, tokens, lr, poison):
    def loss_sum(params, batch, rng):
      del rng   # the models are deterministic
      return lm_loss_sum(nnx.merge(graphdef, params, rest), batch["tokens"])
    return make_train_step(loss_sum, tx, 1)(state, {"tokens": tokens}, lr, poison)

  if cfg not in inits:
    inits[cfg] = pool.submit(jax.jit(init).lower().compile)
  case.init = inits[cfg]
  abs_state, abs_rest = jax.eval_shape(init)
  tokens = jax.ShapeDtypeStruct((case.batch, case.context + 1), jnp.int32)
  scalar = lambda dt: jax.ShapeDtypeStruct((), dt)
  return jax.jit(step, donate_argnums=(0,)).lower(abs_state, abs_rest, tokens,
                                                  scalar(jnp.float32), scalar(jnp.bool_))


def compile_case(case: Case, lowered) -> Case:
  """Compile the step (thread-pool worker) and read its memory account."""
  t0 = time.perf_counter()
  case.step = lowered.compile()
  case.compile_s = time.perf_counter() - t0
  case.memory = memory_account(case.step)
  return case


def memory_account(compiled) -> dict | None:
  """Live bytes of one call of `compiled`: arguments + outputs − aliases + temporaries."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - some backends have no analysis; memory is then unknown
    return None
  if m is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes")
  out = {f: int(getattr(m, f, 0)) for f in fields}
  out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                        - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  return out


def fit_to_memory(case: Case, overrides: dict, dtype: str, max_len: int, pool, inits: dict,
                  share: float = 0.9) -> None:
  """Halve the batch of `case` until its step's live bytes fit `share` of the device's memory
  limit (the explicit solver's backward keeps the K×V state of every token). The row reports
  the batch used; where a step is latency-bound (the explicit solver's serial scan), a smaller
  batch lowers tokens/s, which makes the PRISM / explicit ratio an upper estimate."""
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  while (limit and case.memory and case.batch > 1
         and case.memory["total_bytes"] > share * limit):
    need = case.memory["total_bytes"] / 2**30
    halve_batch(case, f"{need:.0f} GiB > {share:.0%} of {limit / 2**30:.0f} GiB", overrides,
                dtype, max_len, pool, inits)


def halve_batch(case: Case, why: str, overrides: dict, dtype: str, max_len: int, pool,
                inits: dict) -> None:
  """Halve the batch of `case` and rebuild its step (its init program is already in `inits`)."""
  case.batch //= 2
  print(f"# {why}: {case.name} (halved)", flush=True)
  compile_case(case, lower_case(case, overrides, dtype, max_len, pool, inits))


def device_peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def run_steps(case: Case, state, rest, tokens, n: int) -> tuple[object, list[float], list]:
  """n synchronised steps; (state, seconds per step, losses)."""
  lr, poison = jnp.float32(1e-4), jnp.bool_(False)
  times, losses = [], []
  for _ in range(n):
    t0 = time.perf_counter()
    state, metrics = case.step(state, rest, tokens, lr, poison)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
    losses.append(float(metrics["loss"]))
  return state, times, losses


def time_case(case: Case, deadline: float, profile_dir: str | None = None) -> dict:
  """Warm up, time and optionally trace `case`; one result row."""
  state, rest = case.init.result()()
  tokens = jax.random.randint(jax.random.key(case.context), (case.batch, case.context + 1), 0,
                              case.cfg.vocab_size, jnp.int32)
  state, warm_times, losses = run_steps(case, state, rest, tokens, case.warmup)
  steps = case.steps
  if warm_times and time.perf_counter() + steps * warm_times[-1] > deadline:
    # A slow case (the explicit solver) keeps at least one timed step rather than none.
    steps = max(1, int((deadline - time.perf_counter()) / warm_times[-1]))
  state, times, timed_losses = run_steps(case, state, rest, tokens, steps)
  profile_error = None
  if profile_dir:
    try:
      with jax.profiler.trace(profile_dir):
        state, _, _ = run_steps(case, state, rest, tokens, PROFILE_STEPS)
    except Exception as e:  # noqa: BLE001 - e.g. no CUPTI: the timing above still stands
      profile_error = f"{type(e).__name__}: {str(e)[:300]}"
  del state
  step_s = statistics.median(times)
  tokens_per_s = case.batch * case.context / step_s
  flops = model_flops_per_token(case.cfg, case.context, case.non_embedding_params)
  losses += timed_losses
  return {
      "case": case.name, "model": case.model, "mixer": case.mixer,
      "impl": case.impl if case.mixer in RECURRENT + ("hybrid",) else None,
      "context": case.context, "batch": case.batch, "warmup": case.warmup, "steps": steps,
      "step_ms": 1e3 * step_s, "step_ms_all": [1e3 * t for t in times],
      "tokens_per_s": tokens_per_s, "flops_per_token": flops,
      "mfu": flops * tokens_per_s / PEAK_FLOPS,
      "mfu_vs_matmul": flops * tokens_per_s / MATMUL_FLOPS,
      "params": case.params, "non_embedding_params": case.non_embedding_params,
      "memory": case.memory, "peak_bytes_in_use_so_far": device_peak_bytes(),
      "compile_s": case.compile_s, "loss_first": losses[0], "loss_last": losses[-1],
      "finite": all(map(math.isfinite, losses)),
      **({"profile_error": profile_error} if profile_error else {}),
  }


def plan_cases(args) -> list[Case]:
  """The cases in timing order: the explicit solver last, as it is the slowest."""
  cases = []
  for model in args.model:
    for mixer in args.mixers:
      contexts = args.explicit_contexts if mixer == "explicit" else args.contexts
      tokens = args.explicit_tokens if mixer == "explicit" else args.tokens_per_step
      warmup, steps = ((min(args.warmup, 1), min(args.steps, 2)) if mixer == "explicit"
                       else (args.warmup, args.steps))
      impls = args.impl if mixer in RECURRENT + ("hybrid",) else ["auto"]
      for impl in impls:
        for T in contexts:
          cases.append(Case(model, mixer, impl, T, max(1, tokens // T), warmup, steps))
  return sorted(cases, key=lambda c: c.mixer == "explicit")


def format_row(row: dict) -> str:
  if "error" in row:
    return f"| {row['case']} | error: {row['error']} |"
  mem = row["memory"]
  gib = f"{mem['total_bytes'] / 2**30:.2f}" if mem else "n/a"
  return (f"| {row['model']} | {row['mixer']} | {row['impl'] or '-'} | {row['context']} | "
          f"{row['batch']} | {row['step_ms']:.1f} | {row['tokens_per_s'] / 1e3:.1f}K | "
          f"{row['flops_per_token'] / 1e9:.3f} | {100 * row['mfu']:.1f}% | "
          f"{100 * row['mfu_vs_matmul']:.1f}% | {gib} | {row['compile_s']:.0f} |")


HEADER = ("| model | mixer | impl | T | B | step ms | tokens/s | GFLOP/token | MFU (989T) | "
          "MFU (797T) | memory GiB | compile s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def explicit_ratios(rows: list[dict]) -> list[dict]:
  """PRISM tokens/s over explicit-solver tokens/s, per (model, context) where both ran."""
  ok = [r for r in rows if "error" not in r]
  out = []
  for e in (r for r in ok if r["mixer"] == "explicit"):
    for p in (r for r in ok if r["mixer"] == "prism" and r["model"] == e["model"]
              and r["context"] == e["context"]):
      out.append({"model": e["model"], "context": e["context"], "impl": p["impl"],
                  "ratio": p["tokens_per_s"] / e["tokens_per_s"]})
  return out


def markdown(meta: dict, rows: list[dict], ratios: list[dict], profile: dict | None) -> str:
  lines = [f"Command: `{meta['command']}`  ",
           f"Commit {meta['commit']}, device {meta['device']}, jax {meta['jax']}, "
           f"date {meta['date']}.", "", HEADER] + [format_row(r) for r in rows]
  lines.append("")
  for r in ratios:
    lines.append(f"- PRISM ({r['impl']}) / explicit solver tokens/s at {r['context']} "
                 f"({r['model']}): {r['ratio']:.0f}× (paper: ≥ 174×)")
  for name, by_context in ANCHORS.items():
    lines.append(f"- anchor, {name}: " + ", ".join(f"{v / 1e3:.1f}K tokens/s at {T}"
                                                 for T, v in by_context.items()))
  if profile:
    lines += ["", f"Profile of {profile['case']} ({profile['dir']}):", "",
              profile["table"]]
  return "\n".join(lines) + "\n"


def git_state(*paths: str) -> tuple[str, bool]:
  """(short commit of the checkout, whether tracked files under `paths` — all when none — have
  uncommitted edits). PRISM_COMMIT, when set, names the commit instead, with no edits (a copy
  of the tree whose .git lags behind it, as on a remote machine, cannot tell; device_env.sh)."""
  if os.environ.get("PRISM_COMMIT"):
    return os.environ["PRISM_COMMIT"], False
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, cwd=repo, timeout=10)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                            *paths], capture_output=True, text=True, cwd=repo, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return "unknown", False
  if out.returncode:
    return "unknown", False
  return out.stdout.strip(), bool(dirty.stdout.strip())


def git_commit() -> str:
  """The checkout's commit, "+dirty" when it has uncommitted edits."""
  commit, dirty = git_state()
  return commit + ("+dirty" if dirty else "")


def int_list(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", type=lambda s: s.split(","), default=["paper"],
                 help=f"comma list of {MODELS}")
  p.add_argument("--mixers", type=lambda s: s.split(","),
                 default=["prism", "gdn", "attention", "explicit"],
                 help=f"comma list of {tuple(MIXERS)}")
  p.add_argument("--impl", type=lambda s: s.split(","), default=["auto"],
                 help="comma list of recurrence impls for prism/gdn/hybrid: chunk, pallas, auto")
  p.add_argument("--contexts", type=int_list, default=[2048, 8192, 16384])
  p.add_argument("--tokens-per-step", type=int, default=16384, help="B·T of every case")
  p.add_argument("--explicit-contexts", type=int_list, default=[2048],
                 help="contexts of the explicit solver (serial in T: ~T/2048 × slower)")
  p.add_argument("--explicit-tokens", type=int, default=16384,
                 help="B·T of the explicit solver; halved until the step fits the device")
  p.add_argument("--steps", type=int, default=5, help="timed steps (explicit: at most 2)")
  p.add_argument("--warmup", type=int, default=2, help="warm-up steps (explicit: at most 1)")
  p.add_argument("--dtype", default="bfloat16", help="compute dtype; parameters stay float32")
  p.add_argument("--d-model", type=int)
  p.add_argument("--layers", type=int)
  p.add_argument("--heads", type=int)
  p.add_argument("--head-dim", type=int)
  p.add_argument("--vocab", type=int)
  p.add_argument("--chunk-size", type=int, help="chunk of the recurrence (default: the preset's)")
  p.add_argument("--parallel-min-chunks", type=int,
                 help="chunks per sequence from which the chunked form's pass over chunks runs "
                      "as a parallel prefix scan off CPU (prism_jax.ops.chunk.PARALLEL_MIN_CHUNKS; "
                      "0 = always, a huge value = never)")
  p.add_argument("--compile-workers", type=int, default=min(8, os.cpu_count() or 1))
  p.add_argument("--time-budget", type=float, default=400.0,
                 help="seconds after which remaining cases are skipped (rows say so)")
  p.add_argument("--profile", metavar="DIR", help="jax.profiler trace of 3 steps of one case")
  p.add_argument("--profile-case", default="prism:2048", metavar="MIXER:T")
  p.add_argument("--json", metavar="PATH")
  p.add_argument("--markdown", metavar="PATH")
  args = p.parse_args(argv)
  for m in args.model:
    if m not in MODELS:
      p.error(f"--model: unknown {m!r}; known: {MODELS}")
  for m in args.mixers:
    if m not in MIXERS:
      p.error(f"--mixers: unknown {m!r}; known: {tuple(MIXERS)}")
  for impl in args.impl:
    if impl not in IMPLS:
      p.error(f"--impl: unknown {impl!r}; known: {IMPLS}")
  mixer, _, T = args.profile_case.partition(":")
  if mixer not in MIXERS or not T.isdigit():
    p.error(f"--profile-case: need MIXER:T with MIXER in {tuple(MIXERS)}, got "
            f"{args.profile_case!r}")
  if min(args.steps, args.tokens_per_step, args.explicit_tokens) < 1 or args.warmup < 0:
    p.error("--steps, --tokens-per-step, --explicit-tokens must be >= 1, --warmup >= 0")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.parallel_min_chunks is not None:
    chunk_ops.PARALLEL_MIN_CHUNKS = args.parallel_min_chunks
  start = time.perf_counter()
  deadline = start + args.time_budget
  overrides = {k: v for k, v in (("d_model", args.d_model), ("num_layers", args.layers),
                                 ("num_heads", args.heads), ("head_dim", args.head_dim),
                                 ("vocab_size", args.vocab), ("chunk_size", args.chunk_size))
               if v is not None}
  dev = jax.devices()[0]
  meta = {"command": "python benchmarks/throughput.py " + shlex.join(sys.argv[1:] if argv is None
                                                                     else argv),
          "commit": git_commit(),
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "device": f"{dev.platform} {dev.device_kind}", "jax": jax.__version__,
          "host": platform.node(), "peak_flops": PEAK_FLOPS, "matmul_flops": MATMUL_FLOPS,
          "parallel_min_chunks": chunk_ops.PARALLEL_MIN_CHUNKS}
  print(f"# {meta['command']}\n# commit {meta['commit']}, {meta['device']}, jax {meta['jax']}, "
        f"{meta['date']}", flush=True)

  cases = plan_cases(args)
  profile_mixer, profile_T = args.profile_case.split(":")
  profile_case = next((c for c in cases if c.mixer == profile_mixer
                       and c.context == int(profile_T)), None) if args.profile else None
  if args.profile and profile_case is None:
    profile_case = Case(args.model[0], profile_mixer, args.impl[0], int(profile_T),
                        max(1, args.tokens_per_step // int(profile_T)), 1, 1)
    cases.insert(0, profile_case)

  futures, inits, rows = {}, {}, []
  max_len = max(c.context for c in cases)
  with concurrent.futures.ThreadPoolExecutor(max(1, args.compile_workers)) as pool:
    for case in cases:
      try:
        lowered = lower_case(case, overrides, args.dtype, max_len, pool, inits)
      except Exception as e:  # noqa: BLE001 - one broken case must not stop the others
        rows.append({"case": case.name, "error": f"lowering: {type(e).__name__}: {e}"})
        continue
      futures[id(case)] = pool.submit(compile_case, case, lowered)
    print(f"# lowered {len(futures)} cases in {time.perf_counter() - start:.0f} s; compiling "
          f"on {args.compile_workers} threads", flush=True)
    for case in cases:
      if id(case) not in futures:
        continue
      try:
        futures[id(case)].result()
        print(f"# compiled {case.name} in {case.compile_s:.0f} s", flush=True)
        fit_to_memory(case, overrides, args.dtype, max_len, pool, inits)
      except Exception as e:  # noqa: BLE001
        rows.append({"case": case.name, "error": f"compile: {type(e).__name__}: {e}"})
        futures.pop(id(case))
  print(HEADER, flush=True)
  profile = None
  for case in cases:
    if id(case) not in futures:
      continue
    if time.perf_counter() > deadline:
      row = {"case": case.name, "error": f"skipped: --time-budget {args.time_budget:.0f} s spent"}
    else:
      traced = args.profile if case is profile_case else None
      while True:
        try:
          row = time_case(case, deadline, traced)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at one context
          row = {"case": case.name, "error": f"run: {type(e).__name__}: {str(e)[:300]}"}
          # The compiled estimate can fit while the allocator cannot (fragmentation, buffers
          # of earlier cases): the explicit solver then retries at half the batch.
          if (case.mixer == "explicit" and case.batch > 1 and "RESOURCE_EXHAUSTED" in str(e)
              and time.perf_counter() < deadline):
            halve_batch(case, "out of memory at run time", overrides, args.dtype, max_len,
                        pool, inits)
            continue
        break
      if traced and "error" not in row and "profile_error" not in row:
        try:
          profile = summarise_profile(traced, case.name)
        except Exception as e:  # noqa: BLE001 - the trace stays on disk for trace_summary.py
          print(f"# profile summary failed: {type(e).__name__}: {e}", flush=True)
    case.step = None  # free the executable early
    rows.append(row)
    print(format_row(row), flush=True)
    write_outputs(args, meta, rows, profile, start)  # a run killed later keeps these rows

  result = write_outputs(args, meta, rows, profile, start)
  print("\n" + markdown(meta, rows, result["explicit_ratios"], profile).split("\n\n", 1)[1],
        flush=True)
  return result


def write_outputs(args, meta: dict, rows: list[dict], profile: dict | None,
                  start: float) -> dict:
  """The result so far as JSON (`--json`) and markdown (`--markdown`)."""
  ratios = explicit_ratios(rows)
  result = {"meta": meta, "rows": rows, "explicit_ratios": ratios, "profile": profile,
            "total_s": time.perf_counter() - start}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(markdown(meta, rows, ratios, profile))
  return result


def summarise_profile(trace_dir: str, case_name: str) -> dict:
  """Top device ops of the trace just written (benchmarks/trace_summary.py)."""
  from benchmarks import trace_summary
  summary = trace_summary.summarise(trace_summary.latest_trace(trace_dir), top=15,
                                    steps=PROFILE_STEPS)
  return {"case": case_name, "dir": trace_dir, "table": trace_summary.format_table(summary),
          "summary": summary}


if __name__ == "__main__":
  main()
