"""benchmarks/throughput.py at toy scale on the CPU, its FLOP formulas, and the trace summary."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import throughput as tp  # noqa: E402
import trace_summary as ts  # noqa: E402

from prism_jax.layers.explicit import explicit_solver_step  # noqa: E402
from prism_jax.models import CausalLM, count_parameters  # noqa: E402
from prism_jax.ops.chunk import chunk_prism  # noqa: E402

# The toy run: every mixer, two contexts (the explicit solver at the first only, as by default
# it runs at fewer contexts), 1 warm-up + 2 timed steps, a profile of prism at the first context.
TOY = dict(d_model=64, num_layers=1, num_heads=2, head_dim=32, vocab_size=256, chunk_size=16)
CONTEXTS = (32, 64)
TOKENS = 128
MIXERS = ("prism", "gdn", "attention", "explicit")
ARGS = ["--model", "tiny", "--layers", "1", "--d-model", "64", "--heads", "2", "--head-dim", "32",
        "--vocab", "256", "--chunk-size", "16", "--contexts", "32,64", "--explicit-contexts", "32",
        "--tokens-per-step", str(TOKENS), "--explicit-tokens", str(TOKENS), "--steps", "2",
        "--warmup", "1", "--compile-workers", "2", "--mixers", ",".join(MIXERS),
        "--profile-case", "prism:32"]
# Compile time dominates a toy run on the CPU; the unoptimised backend halves it and changes
# nothing the test checks.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
S = jax.ShapeDtypeStruct


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("throughput")
  paths = {"json": out / "t.json", "markdown": out / "t.md", "profile": out / "prof"}
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE, PRISM_COMMIT="")
  cmd = [sys.executable, os.path.join(REPO, "benchmarks", "throughput.py"), *ARGS,
         "--json", str(paths["json"]), "--markdown", str(paths["markdown"]),
         "--profile", str(paths["profile"])]
  # The timeout only guards against a hang; the run takes about a minute of CPU.
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return {"result": json.loads(paths["json"].read_text()),
          "markdown": paths["markdown"].read_text(), "profile": str(paths["profile"]),
          "stdout": proc.stdout}


def _toy_config(mixer: str, T: int):
  return tp.model_config("tiny", mixer, "auto", "bfloat16", T, TOY)


def test_every_case_ran_with_finite_speed_and_sane_mfu(toy_run):
  rows = toy_run["result"]["rows"]
  assert all("error" not in r for r in rows), [r for r in rows if "error" in r]
  expected = {(m, T) for m in MIXERS for T in CONTEXTS if m != "explicit" or T == CONTEXTS[0]}
  assert {(r["mixer"], r["context"]) for r in rows} == expected
  for r in rows:
    assert r["batch"] * r["context"] == TOKENS
    assert r["steps"] == 2 and len(r["step_ms_all"]) == 2
    assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(TOKENS / (r["step_ms"] / 1e3), rel=1e-9)
    assert r["step_ms"] == pytest.approx(sorted(r["step_ms_all"])[0] / 2
                                         + sorted(r["step_ms_all"])[1] / 2)
    assert 0 < r["mfu"] < 1 and 0 < r["mfu_vs_matmul"] < 1
    assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / 989e12)
    # Random tokens over 256 ids: an untrained model's loss sits near ln 256 and stays finite.
    assert r["finite"] and abs(r["loss_first"] - math.log(256)) < 0.5
    assert r["memory"]["total_bytes"] > r["memory"]["argument_size_in_bytes"] > 0


def test_rows_count_parameters_and_flops_of_the_built_model(toy_run):
  for r in toy_run["result"]["rows"]:
    cfg = _toy_config(r["mixer"], r["context"])
    assert r["params"] == count_parameters(cfg)
    # Tied embeddings: the only embedding-sized leaf is the table, vocab × d.
    assert r["params"] - r["non_embedding_params"] == 256 * 64
    T, H, K = r["context"], 2, 32
    per_head = {"prism": tp.recurrence_flops(K, K, 2, 16),
                "gdn": tp.recurrence_flops(K, K, 1, 16),
                "attention": tp.attention_flops(T, K),
                "explicit": tp.explicit_flops(K, K, 2)}[r["mixer"]]
    expected = 6 * r["non_embedding_params"] + 6 * 64 * 256 + 3 * H * per_head
    assert r["flops_per_token"] == pytest.approx(expected)


def test_explicit_ratio_and_markdown(toy_run):
  rows = {(r["mixer"], r["context"]): r for r in toy_run["result"]["rows"]}
  (ratio,) = toy_run["result"]["explicit_ratios"]
  T = CONTEXTS[0]
  assert ratio["context"] == T
  assert ratio["ratio"] == pytest.approx(rows["prism", T]["tokens_per_s"]
                                         / rows["explicit", T]["tokens_per_s"])
  md = toy_run["markdown"]
  meta = toy_run["result"]["meta"]
  for needle in ("Command: `python benchmarks/throughput.py --model tiny",
                 f"Commit {meta['commit']}", "device cpu", f"date {meta['date'][:10]}",
                 "explicit solver tokens/s at 32"):
    assert needle in md
  assert meta["commit"]
  table = [line for line in md.splitlines() if line.startswith("| tiny |")]
  assert len(table) == len(rows)
  assert "| tiny | prism | auto | 64 | 2 |" in md


def test_profile_of_the_toy_run(toy_run):
  profile = toy_run["result"]["profile"]
  assert profile["case"].startswith("tiny:prism/auto@32x")
  summary = profile["summary"]
  # The three traced steps are three runs of the step program, told apart by their run ids.
  assert summary["steps"] == tp.PROFILE_STEPS and "step" in summary["module"]
  totals = [row["total_us"] for row in summary["rows"]]
  assert totals == sorted(totals, reverse=True) and totals[0] > 0
  assert all(0 < row["percent_of_step"] <= 100 for row in summary["rows"])
  # The CPU runs independent ops side by side, so busy time may exceed the run's span.
  assert summary["step_us"] > 0 and summary["busy_us"] >= totals[0] / tp.PROFILE_STEPS
  assert profile["table"].splitlines()[0].startswith(summary["module"])


def test_trace_summary_cli_reads_the_directory(toy_run, capsys):
  summary = ts.main([toy_run["profile"], "--top", "5"])
  printed = capsys.readouterr().out
  assert len(summary["rows"]) == 5
  assert f"`{summary['rows'][0]['name']}`" in printed
  # Counting every op once: the shares of all ops add up to the busy share of the step.
  full = ts.summarise(ts.latest_trace(toy_run["profile"]), top=10_000)
  assert sum(r["percent_of_step"] for r in full["rows"]) == pytest.approx(
      100 * full["busy_us"] / full["step_us"])


def _gpu_layout_trace(path):
  """A two-step trace in the layout a GPU run writes (module docstring of trace_summary): a
  device process with a compute stream and a copy stream; one kernel lacks an hlo_op."""
  ev = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 7, "tid": 11, "name": "thread_name",
         "args": {"name": "Stream #11(Compute)"}},
        {"ph": "M", "pid": 7, "tid": 12, "name": "thread_name",
         "args": {"name": "Stream #12(MemcpyD2D)"}},
        {"ph": "X", "pid": 1, "tid": 3, "ts": 0, "dur": 500, "name": "PjitFunction(step)",
         "args": {"hlo_op": "host side", "hlo_module": "jit_step"}}]
  for step, t0 in enumerate((0.0, 1000.0)):
    mod = {"hlo_module": "jit_step"}
    ev += [{"ph": "X", "pid": 7, "tid": 11, "ts": t0, "dur": 300, "name": "gemm_a",
            "args": {"hlo_op": "dot.1", **mod}},
           {"ph": "X", "pid": 7, "tid": 11, "ts": t0 + 300, "dur": 100, "name": "gemm_b",
            "args": {"hlo_op": "dot.1", **mod}},
           {"ph": "X", "pid": 7, "tid": 11, "ts": t0 + 400, "dur": 200, "name": "loop_fusion",
            "args": {"hlo_op": "fusion.3", **mod}},
           {"ph": "X", "pid": 7, "tid": 12, "ts": t0 + 600, "dur": 50, "name": "MemcpyD2D",
            "args": {}}]
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": ev}, f)


def test_trace_summary_gpu_layout(tmp_path):
  path = str(tmp_path / "gpu.trace.json.gz")
  _gpu_layout_trace(path)
  by_op = ts.summarise(path, steps=2)
  assert by_op["module"] == "jit_step" and by_op["steps"] == 2
  # No run ids: the span of all device events (0 .. 1650 µs) over the 2 steps given.
  assert by_op["step_us"] == pytest.approx(825.0)
  got = {r["name"]: (r["count"], r["per_step_us"]) for r in by_op["rows"]}
  assert got == {"dot.1": (4, 400.0), "fusion.3": (2, 200.0), "MemcpyD2D": (2, 50.0)}
  assert by_op["rows"][0]["percent_of_step"] == pytest.approx(100 * 400 / 825)
  by_kernel = ts.summarise(path, by="kernel", steps=2)
  assert [r["name"] for r in by_kernel["rows"]] == ["gemm_a", "loop_fusion", "gemm_b",
                                                     "MemcpyD2D"]
  with pytest.raises(ValueError, match="no module matching 'jit_other'"):
    ts.summarise(path, module="jit_other")


def test_trace_summary_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match="no \\*.trace.json.gz under"):
    ts.latest_trace(str(tmp_path))
  with pytest.raises(ValueError, match="by must be 'op' or 'kernel'"):
    ts.device_events({"traceEvents": []}, by="fusion")


def test_recurrence_flops_hand_count():
  # K = 8, V = 4, L = 2 writes, chunk C = 16: the forward products of one chunk, (m, k, n) for
  # an m×k by k×n product (2·m·k·n FLOPs), as written in prism_jax/ops/chunk.py.
  K, V, L, C = 8, 4, 2, 16
  products = [(2 * C, K, L * C),       # [Q; K₁] Kᵀ: scores and the A, M² blocks
              (C, (L - 1) * C, V),     # M² W²: right-hand side of the solve
              (C, C, V + K),           # (I + A)⁻¹ [rhs | diag(β¹γ) K₁]: U and Wk
              (K, (L - 1) * C, V),     # (K² ⊙ e)ᵀ W²: the state's l ≥ 2 writes
              (C, K, V),               # X = U − Wk S
              (K, C, V),               # (K₁ ⊙ e)ᵀ X: the state update
              (C, K + L * C, V)]       # O = [γ Q | P] [S; Y]
  per_chunk = sum(2 * m * k * n for m, k, n in products) + 2 * C**3 / 3  # + (I + A)⁻¹
  assert tp.recurrence_flops(K, V, L, C) == pytest.approx(per_chunk / C)
  assert tp.explicit_flops(K, V, L) == L * (2 * K * V + 2 * K * V) + 2 * K * V
  assert tp.attention_flops(128, 16) == (2 * 128 * 16 + 2 * 128 * 16) / 2


@pytest.mark.parametrize("K,V,L,C", [(64, 64, 2, 64), (96, 96, 2, 64), (128, 64, 1, 64),
                                     (32, 48, 3, 32)], ids=lambda x: str(x))
def test_recurrence_flops_match_xla_cost(K, V, L, C):
  # One chunk (T = C), so the state pass's scan body, which the cost analysis counts once, runs
  # exactly once. XLA's count is higher by the blocked inverse (more than C³/3 multiply-adds)
  # and elementwise work: up to ~11% at these sizes.
  B, T, H = 1, C, 2
  args = (S((B, T, H, K), jnp.float32), S((B, T, H, L, K), jnp.float32),
          S((B, T, H, L, V), jnp.float32), S((B, T, H, L), jnp.float32),
          S((B, T, H), jnp.float32))
  cost = jax.jit(lambda *a: chunk_prism(*a, chunk_size=C)[0]).lower(*args).cost_analysis()
  ratio = cost["flops"] / (tp.recurrence_flops(K, V, L, C) * B * T * H)
  assert 1.0 <= ratio < 1.15, ratio


def test_attention_flops_match_xla_cost():
  T, N, Dh = 256, 2, 32
  q = S((1, T, N, Dh), jnp.float32)
  mask = jnp.tril(jnp.ones((T, T), bool))[None, None]
  f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)
  cost = jax.jit(f).lower(q, q, q).cost_analysis()
  # XLA computes every score and masks afterwards; the formula halves for causality.
  assert cost["flops"] / (2 * N * T * tp.attention_flops(T, Dh)) == pytest.approx(1.0, abs=0.06)


def test_explicit_flops_bound_xla_cost():
  K, V, L = 64, 64, 2
  args = [S((1, 2, K), jnp.float32), S((1, 2, K), jnp.float32), S((1, 2, V), jnp.float32),
          S((1, 2), jnp.float32), S((1, 2), jnp.float32), S((1, 2, K, V), jnp.float32)]
  f = lambda *a: explicit_solver_step(*a, steps=L, scale=1.0)
  cost = jax.jit(f).lower(*args).cost_analysis()
  # The formula counts products only; the K×V elementwise updates XLA also counts add ~50%.
  assert 1.0 <= cost["flops"] / (2 * tp.explicit_flops(K, V, L)) < 1.7


@pytest.mark.parametrize("mixer", ["prism", "gdn", "attention"])
def test_model_flops_match_xla_forward_cost(mixer):
  # The forward of the whole LM at T = C (one chunk) against F / 3, the forward share of F.
  T = 64
  cfg = tp.model_config("tiny", mixer, "chunk", "float32", T,
                        dict(d_model=128, num_layers=2, num_heads=2, head_dim=64,
                             vocab_size=512, chunk_size=64))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
  _, params, _ = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))),
                           nnx.Param, ...)
  _, non_embedding = tp.param_counts(nnx.to_pure_dict(params))
  f = lambda st, tokens: nnx.merge(graphdef, st)(tokens)
  cost = jax.jit(f).lower(state, S((1, T), jnp.int32)).cost_analysis()
  forward = tp.model_flops_per_token(cfg, T, non_embedding) / 3
  if mixer == "attention":  # XLA also computes the masked half of the scores
    forward += cfg.num_layers * cfg.attn_heads * tp.attention_flops(T, cfg.attn_head_dim)
  # Norms, activations and the softmax are elementwise and not in F: a few percent.
  assert 1.0 <= cost["flops"] / (T * forward) < 1.06


def test_bad_arguments():
  with pytest.raises(SystemExit):
    tp.parse_args(["--mixers", "prism,mamba"])
  with pytest.raises(SystemExit):
    tp.parse_args(["--model", "gpt"])
  with pytest.raises(SystemExit):
    tp.parse_args(["--impl", "cuda"])
  with pytest.raises(SystemExit):
    tp.parse_args(["--profile-case", "prism"])
  with pytest.raises(ValueError, match="no FLOP count for mixer 'la'"):
    tp.mixer_flops(_toy_config("prism", 32), "la", 32)


def test_explicit_solver_halves_its_batch_when_the_run_runs_out_of_memory(monkeypatch):
  """A step that compiled within the memory estimate but fails to allocate is retried at half
  the batch (explicit solver only), and the row reports the batch that ran."""
  real, batches = tp.time_case, []

  def out_of_memory_once(case, deadline, traced):
    batches.append(case.batch)
    if len(batches) == 1:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0GiB")
    return real(case, deadline, traced)

  monkeypatch.setattr(tp, "time_case", out_of_memory_once)
  args = [a for a in ARGS]
  args[args.index("--mixers") + 1] = "explicit"
  result = tp.main(args[:args.index("--profile-case")] + ["--steps", "1", "--warmup", "0"])
  assert batches == [TOKENS // 32, TOKENS // 64]
  (row,) = result["rows"]
  assert "error" not in row and row["batch"] == TOKENS // 64 and row["tokens_per_s"] > 0
