"""The probing runner: its CI-sized run (LA stays at chance on parity), and the markdown it
writes into RESULTS.md (only its own section)."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import probing  # noqa: E402


def test_small_mode_la_stays_at_chance_on_parity(tmp_path):
  out = tmp_path / "RESULTS.md"
  results = probing.main(["--small", "--write", str(out)])
  prism, la = results["parity", "prism"][0], results["parity", "la"][0]
  # Held-out accuracy after a real short training run. PRISM >= 0.9 is not asserted: at this
  # budget it reached 1.00 in 1 of 4 runs and stayed on the ln 2 plateau in the others
  # (RESULTS.md, Probing), so the check would fail most of the time.
  print(f"small mode parity: PRISM {prism:.3f}, LA {la:.3f}")
  assert la <= 0.65, f"LA parity accuracy {la:.3f} after the small budget"
  assert 0.0 <= prism <= 1.0 and set(results) == {(t, m) for t in ("parity", "local_xor")
                                                  for m in ("prism", "la")}
  text = out.read_text()
  assert "## Probing" in text and "--small" in text and "| parity | 0.50 |" in text


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
  table = probing.markdown_table(results, ["parity"], ["prism", "la"],
                                 {"parity": [1.00, 0.49]})
  header, _, row = table.splitlines()
  assert header == "| task | chance | prism | la | paper prism | paper la |"
  assert row == "| parity | 0.50 | 0.75 ± 0.25 | 0.50 ± 0.00 | 1.00 | 0.49 |"


@pytest.mark.parametrize("argv, match", [(["--steps", "0"], "--steps"),
                                         (["--seeds", "0"], "--seeds")])
def test_bad_flags(argv, match):
  with pytest.raises(ValueError, match=match):
    probing.main(argv)


def test_unknown_names():
  with pytest.raises(ValueError, match="model: unknown probing model 'rwkv'"):
    probing.probe_model_config("rwkv")
  with pytest.raises(ValueError, match="task: unknown probing task 'sort'"):
    probing.train_probe("sort", probing.probe_model_config("la"), probing.ProbeSettings(), 0)
