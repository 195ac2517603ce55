"""The recommendation runner end to end on the synthetic interaction log (a few steps)."""

import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import recsys  # noqa: E402


def test_runner_writes_a_table_with_provenance(tmp_path):
  out = tmp_path / "results.md"
  out.write_text("# results\n\n## Other\n\nkept\n")
  recsys.main(["--steps", "2", "--models", "prism", "--d-model", "16", "--seq-len", "16",
               "--write", str(out)])
  text = out.read_text()
  assert "## Other\n\nkept" in text
  section = text.split("## Recommendation\n", 1)[1]
  assert "Command: `python benchmarks/recsys.py --steps 2" in section
  rows = {m.group(1): [float(x) for x in m.group(2).split(" | ")]
          for m in re.finditer(r"^\| (prism|most popular) \| (.+) \|$", section, re.M)}
  assert set(rows) == {"prism", "most popular"}
  for name, values in rows.items():
    assert len(values) == 3 and all(0.0 <= v <= 1.0 for v in values), (name, values)
