"""Train a PRISM model: `python train.py [--config=configs/<preset>.py] [--config.key=value ...]`.

With no arguments it trains the tiny byte-level LM (configs/lm_tiny.py) on the standard-library
sources on CPU, evaluating, checkpointing to runs/lm_tiny and printing a sample at the end.
Running the same command again resumes from the newest checkpoint in the run directory.
`--config.mode=sample` generates text from the run directory's checkpoint instead.
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "lm_tiny.py")
_OVERRIDE_ERRORS = (AttributeError, KeyError, OSError, TypeError, ValueError, flags.Error)


def _exit_on_bad_override(error: Exception, argv: list[str]):
  """One line naming the `--config.<key>` that failed, instead of a traceback."""
  chain = [error]   # config_flags wraps the KeyError of ConfigDict in other exceptions
  while chain[-1].args and isinstance(chain[-1].args[0], BaseException):
    chain.append(chain[-1].args[0])
  text = " ".join(str(chain[-1].args[0] if chain[-1].args else chain[-1]).split())
  quoted = re.search(r"'([A-Za-z_]\w*)'", text)
  name = quoted.group(1) if quoted else ""
  culprit = [a.split("=")[0].lstrip("-") for a in argv[1:]
             if a.startswith("--config.") and a.split("=")[0].endswith("." + name)]
  if any(isinstance(c, (KeyError, AttributeError)) for c in chain):
    text = f"unknown config key ({text})"
  print(f"error: {culprit[0] if culprit else 'command line'}: {text}", file=sys.stderr)
  sys.exit(2)


try:
  # config_flags reads --config.* overrides from sys.argv already while defining the flag.
  _CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "preset file (configs/*.py)")
except _OVERRIDE_ERRORS as e:
  _exit_on_bad_override(e, sys.argv)


def parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except _OVERRIDE_ERRORS as e:
    _exit_on_bad_override(e, argv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go as --config.key=value")
  logging.set_verbosity(logging.WARNING)
  from prism_jax.train.loop import TrainingStopped, Trainer, run_dir_of, sample_from_run
  try:
    cfg = _CONFIG.value
    mode = cfg.mode
  except OSError as e:   # the preset file could not be loaded
    print(f"error: --config: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)
  try:
    if mode == "sample":
      print(sample_from_run(run_dir_of(cfg), cfg.sample))
    else:
      Trainer(cfg).run()
  except TrainingStopped as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
