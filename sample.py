"""Generate text from a trained run: `python sample.py --run_dir=runs/lm_tiny --prompt="def "`.

Reads the run's config.json and its newest checkpoint (weights only).
"""

import sys

from absl import app, flags, logging

flags.DEFINE_string("run_dir", "runs/lm_tiny", "run directory written by train.py")
flags.DEFINE_string("prompt", None, "text to continue (default: the run's sample.prompt)")
flags.DEFINE_integer("max_new_tokens", None, "tokens to generate (default: the run's setting)")
flags.DEFINE_float("temperature", None, "0 = greedy (default: the run's setting)")
flags.DEFINE_integer("top_k", None, "keep the k most likely tokens; 0 = all")
flags.DEFINE_integer("seed", 0, "sampling seed")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from prism_jax.train.loop import sample_from_run
  overrides = {k: getattr(FLAGS, k) for k in ("prompt", "max_new_tokens", "temperature", "top_k")
               if getattr(FLAGS, k) is not None}
  try:
    print(sample_from_run(FLAGS.run_dir, overrides, seed=FLAGS.seed))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
