"""Fixtures of the train.py subprocess tests (their XLA cache, jax_cache, is in
tests/conftest.py)."""

import os

import pytest


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
  """A few hundred KB of real Python source (deterministic choice of stdlib files)."""
  import sysconfig
  root = sysconfig.get_paths()["stdlib"]
  out = tmp_path_factory.mktemp("corpus")
  for name in ("argparse.py", "difflib.py", "textwrap.py", "fractions.py", "heapq.py",
               "bisect.py", "shlex.py", "calendar.py"):
    with open(os.path.join(root, name), "rb") as src, open(out / name, "wb") as dst:
      dst.write(src.read())
  return str(out)
