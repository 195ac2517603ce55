"""Puts tests/ on sys.path, so that a test module in any folder imports the helpers kept here
(`from host_random import normal`); the XLA cache of the subprocess runs."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
  """A persistent XLA compilation cache shared by every subprocess of one pytest run (train.py
  and benchmarks/scaling.py build the same tiny model's programs): only the first run of a
  program pays for compiling it."""
  return str(tmp_path_factory.mktemp("xla_cache"))
