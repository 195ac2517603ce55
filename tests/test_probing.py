"""The probing runner: its CI-sized training run, the independence of a (task, seed) run
from what trains beside it, the outputs it writes, and argument checks."""

import json
import pathlib
import sys
import time

import jax
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import probing  # noqa: E402


def test_small_mode_trains_and_writes_its_outputs(tmp_path):
  out, js, md = tmp_path / "RESULTS.md", tmp_path / "probe.json", tmp_path / "probe.md"
  results = probing.main(["--small", "--write", str(out), "--json", str(js),
                          "--markdown", str(md)])
  prism, la = results["parity", "prism"], results["parity", "la"]
  print(f"small mode parity: PRISM {prism}, LA {la}")
  assert set(results) == {(t, m) for t in probing.SMALL["tasks"] for m in ("prism", "la")}
  # A real run: every answer loss has fallen from ln 64 ≈ 4.2 (uniform over the vocabulary at
  # init) to about the entropy of the answer, ln 2 for these yes/no tasks.
  data = json.loads(js.read_text())
  for model in ("prism", "la"):
    run = data["runs"][model]
    assert run["steps_done"] == probing.SMALL["steps"]
    for task in probing.SMALL["tasks"]:
      first, last = run["loss_curve"][task][0][0], run["loss_curve"][task][0][-1]
      assert last < 0.75 < first, (model, task, first, last)
  # The paper's separation on parity at this budget (probing.SMALL): PRISM's ShortConv anchor
  # and non-linear write compute the parity of the three bits before the query; LA, a linear
  # memory without that front end, cannot.
  assert prism[0] >= 0.9, f"PRISM parity accuracy {prism[0]:.3f} after the small budget"
  assert la[0] <= 0.65, f"LA parity accuracy {la[0]:.3f} after the small budget"
  text = out.read_text()
  assert "## Probing" in text and "--small" in text and "| parity | 0.50 |" in text
  assert md.read_text().strip() in text
  assert data["command"].startswith("python benchmarks/probing.py --small")
  assert data["device"] and data["date"] and data["commit"]


# A one-layer LA on tiny batches: the cheapest program to compile on CPU.
TINY = probing.ProbeSettings(steps=4, batch_size=4, seq_len=24, segment_steps=2,
                             eval_batches=2)
TINY_CFG = probing.probe_model_config("la", num_layers=1)


def test_a_run_does_not_depend_on_what_trains_beside_it():
  """Init from the seed, batches from (seed, task, step): the same whichever tasks and seeds
  share the vmapped program."""
  alone = probing._program(TINY_CFG, TINY, ("parity",), 1)
  shared = probing._program(TINY_CFG, TINY, ("mqar", "parity"), 2)
  keys_alone = probing.run_keys(("parity",), (5,))
  keys_shared = probing.run_keys(("mqar", "parity"), (4, 5))
  step = int(np.random.default_rng().integers(1000))
  a = alone._batches(keys_alone[1], step)
  b = shared._batches(keys_shared[1], step)
  for name in a:
    np.testing.assert_array_equal(a[name][0], b[name][3])
  assert not np.array_equal(b["tokens"][1], b["tokens"][3])
  init_a = jax.tree.leaves(alone.init(keys_alone[0])[0])
  init_b = jax.tree.leaves(shared.init(keys_shared[0])[0])
  for x, y in zip(init_a, init_b):
    np.testing.assert_array_equal(x[0], y[3])
    np.testing.assert_array_equal(y[1], y[3])  # parity and mqar of seed 5 start alike


def test_deadline_stops_after_a_segment_and_evaluates_there():
  start = time.perf_counter()
  stopped = probing.train_variant(TINY_CFG, TINY, ["parity"], [0], deadline=start)
  assert stopped.steps_done == TINY.segment_steps and len(stopped.segment_seconds) == 1
  full = probing.train_variant(TINY_CFG, TINY, ["parity"], [0])
  assert full.steps_done == TINY.steps and len(full.loss_curve["parity"][0]) == 2
  # The stopped run is the full one's first segment: same init, same batches.
  np.testing.assert_allclose(stopped.loss_curve["parity"][0][0],
                             full.loss_curve["parity"][0][0], rtol=1e-5)
  assert 0.0 <= stopped.accuracy["parity"][0] <= 1.0


def test_writes_only_its_own_section(tmp_path):
  path = tmp_path / "RESULTS.md"
  path.write_text("# results\n\n## Throughput\n\nkeep me\n\n## Probing\n\nold table\n\n"
                  "## Kernels\n\nkeep me too\n")
  probing.replace_section(str(path), "Probing", "new table")
  probing.replace_section(str(path), "Ablations", "ablation table")
  text = path.read_text()
  assert "old table" not in text
  assert text.index("## Throughput") < text.index("new table") < text.index("## Kernels")
  assert "keep me\n" in text and "keep me too" in text and text.endswith("ablation table\n")
  missing = tmp_path / "new.md"
  probing.replace_section(str(missing), "Probing", "t")
  assert missing.read_text().startswith("# ") and "## Probing\n\nt\n" in missing.read_text()


def test_table_has_mean_std_and_the_paper_column():
  results = {("parity", "prism"): [1.0, 0.5], ("parity", "la"): [0.5, 0.5]}
  table = probing.markdown_table(results, ["parity", "mux"], ["prism", "la"],
                                 {"parity": [1.00, 0.49], "mux": [0.98, 0.98]})
  header, _, row, unfinished = table.splitlines()
  assert header == "| task | chance | prism | la | paper prism | paper la |"
  assert row == "| parity | 0.50 | 0.75 ± 0.25 | 0.50 ± 0.00 | 1.00 | 0.49 |"
  assert unfinished == "| mux | 0.50 | — | — | 0.98 | 0.98 |"


def test_segments_divide_the_steps():
  assert probing.segment_length(10_000, 1000) == 1000
  assert probing.segment_length(1001, 1000) == 143
  assert probing.segment_length(7, 1000) == 7
  with pytest.raises(ValueError, match="segment_steps=300 must divide steps=1000"):
    probing.ProbeSettings(steps=1000, segment_steps=300)


def test_set_overrides_model_fields():
  assert probing.parse_overrides(["d_model=64", "use_short_conv=False", "dtype=bfloat16"]) == \
      {"d_model": 64, "use_short_conv": False, "dtype": "bfloat16"}
  cfg = probing.probe_model_config("la", **probing.parse_overrides(["d_model=32"]))
  assert cfg.d_model == 32 and not cfg.use_short_conv   # the baseline's own setting stays


@pytest.mark.parametrize("argv, match", [(["--steps", "0"], "--steps"),
                                         (["--seeds", "0"], "--seeds"),
                                         (["--set", "foo=1"], "--set"),
                                         (["--set", "d_model"], "--set")])
def test_bad_flags(argv, match):
  with pytest.raises(ValueError, match=match):
    probing.main(argv)


def test_unknown_names():
  with pytest.raises(ValueError, match="model: unknown probing model 'rwkv'"):
    probing.probe_model_config("rwkv")
  with pytest.raises(ValueError, match="task: unknown probing task 'sort'"):
    probing.train_variant(probing.probe_model_config("la"), probing.ProbeSettings(), ["sort"],
                          [0])
  with pytest.raises(ValueError, match="seq_len: task 'var_tracking' needs >= 20 tokens"):
    probing.train_variant(probing.probe_model_config("la"), probing.ProbeSettings(seq_len=8),
                          ["var_tracking"], [0])
