"""What a run leaves behind: metrics.jsonl, TensorBoard events and loss.png (process 0 only)."""

from __future__ import annotations

import json
import math
import os


class RunLog:
  """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard.

  Records carry "step" and "kind" ("train" or "eval"); a resumed run appends to the same file,
  and entries past the resume step (written before a crash) are dropped first so the file
  reads as one uninterrupted run.
  """

  def __init__(self, run_dir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self.writer = None
    if not enabled:
      return
    os.makedirs(run_dir, exist_ok=True)
    if os.path.exists(self.path):
      kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step and resume_step > 0]
      with open(self.path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    from tensorboardX import SummaryWriter
    self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

  def write(self, kind: str, step: int, values: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "kind": kind}
    record.update({k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "dtype") else v)
                   for k, v in values.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key not in ("step", "kind") and isinstance(value, float) and math.isfinite(value):
        self.writer.add_scalar(f"{kind}/{key}", value, step)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.flush()
      self.writer.close()


def read_metrics(path: str) -> list[dict]:
  """Records of a metrics.jsonl; a line cut short by a crash is ignored."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def plot_losses(run_dir: str) -> str:
  """loss.png: train loss and eval loss against step; returns the file path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
  fig, ax = plt.subplots(figsize=(7, 4))
  for kind, key, style in (("train", "loss", "-"), ("eval", "eval_loss", "o-")):
    points = [(r["step"], r[key]) for r in records if r["kind"] == kind and key in r]
    if points:
      ax.plot(*zip(*points), style, label=f"{kind} loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / token)")
  ax.grid(alpha=0.3)
  ax.legend()
  path = os.path.join(run_dir, "loss.png")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
