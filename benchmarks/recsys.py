"""Sequential recommendation: PRISM against GDN, LA and a SASRec-style Transformer, or PRISM
against its paper Table 3 ablations, with the training loop of train.py.

    scripts/fetch_movielens.sh            # optional: data_cache/ml-100k/u.data
    python benchmarks/recsys.py --data data_cache/ml-100k/u.data [--steps 300] [--ablations]
        [--write benchmarks/RESULTS.md]

Each variant is the `rec_base` preset (users >= 40 and items >= 5 interactions, leave-one-out
by time, full-catalogue softmax) with a smaller model and history (`--d-model`, `--seq-len`)
so that it trains on a CPU; only the mixer (or the ablation switch) changes between rows.
The table reports Hit@10, NDCG@10 and AUC on the test targets (the last item of each user,
ranked against every other item), next to the most-popular baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import rec_base  # noqa: E402
from probing import ABLATIONS, provenance, provenance_line, replace_section  # noqa: E402
from prism_jax.train.loop import Trainer  # noqa: E402

MIXERS = {"prism": "prism", "gdn": "gdn", "la": "la", "transformer": "attention"}


def rec_config(mixer: str, data: str, steps: int, seed: int, d_model: int, seq_len: int,
               run_dir: str, **model_overrides):
  """rec_base with a CPU-sized model: D = d_model, 2 layers of 2 heads, history seq_len."""
  c = rec_base.get_config()
  c.model.mixer_pattern = (mixer,)
  c.model.d_model = d_model
  c.model.head_dim = d_model // 2
  c.model.chunk_size = 32
  c.model.max_seq_len = seq_len
  for key, value in model_overrides.items():
    c.model[key] = value
  c.data.path = data
  c.data.seq_len = seq_len
  c.seed = seed
  c.run_dir = run_dir
  c.optim.warmup_steps = max(1, steps // 10)
  c.train.steps = steps
  c.train.eval_every = steps
  c.train.checkpoint_every = steps
  c.train.log_every = max(1, steps // 5)
  c.train.progress = False
  return c


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default="", help="interaction log; default: the synthetic log")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--seeds", type=int, default=1)
  parser.add_argument("--d-model", type=int, default=64)
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--models", nargs="+", default=list(MIXERS), choices=list(MIXERS))
  parser.add_argument("--ablations", action="store_true")
  parser.add_argument("--write", default="")
  parser.add_argument("--note", default="")
  args = parser.parse_args(argv)
  if args.ablations:
    variants = {n: ("prism", o) for n, o in ABLATIONS.items()}
  else:
    variants = {m: (MIXERS[m], {}) for m in args.models}
  start, rows, popular, k = time.perf_counter(), {}, None, 10
  with tempfile.TemporaryDirectory() as runs:
    for name, (mixer, overrides) in variants.items():
      results = []
      for seed in range(args.seeds):
        cfg = rec_config(mixer, args.data, args.steps, seed, args.d_model, args.seq_len,
                         os.path.join(runs, f"{name}-{seed}"), **overrides)
        trainer = Trainer(cfg)
        result = trainer.run()
        # The loop scores the test split (each user's last item) once at the end.
        results.append({k.removeprefix("test_"): v for k, v in result.items()
                        if k.startswith("test_")})
        popular = popular or trainer.task.popularity_metrics("test")
        k = cfg.train.metrics_k
        print(f"{name} seed {seed}: {results[-1]}", flush=True)
      rows[name] = results
  keys = [f"hit@{k}", f"ndcg@{k}", "auc"]
  lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
  for name, results in rows.items():
    cells = []
    for key in keys:
      v = np.array([r[key] for r in results])
      cells.append(f"{v.mean():.4f} ± {v.std():.4f}" if len(v) > 1 else f"{v.mean():.4f}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines.append("| most popular | " + " | ".join(f"{popular[key]:.4f}" for key in keys) + " |")
  body = (provenance_line(provenance(argv, time.perf_counter() - start, 'recsys')) + "\n\n"
          + "\n".join(lines) + "\n")
  if args.note:
    body += f"\n{args.note}\n"
  print(body)
  if args.write:
    title = "Recommendation ablations" if args.ablations else "Recommendation"
    replace_section(args.write, title, body)


if __name__ == "__main__":
  main()
