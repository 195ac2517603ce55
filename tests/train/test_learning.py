"""Training actually learns: the LM beats the unigram baseline of its corpus, the recommender
beats the most-popular ranking; sample.py continues a prompt from the saved checkpoint."""

import os
import subprocess
import sys

from subprocess_runs import REPO, TINY, assert_ok, env_for, metrics, run_train


def _float_after(text, prefix):
  line = next(line for line in text.splitlines() if line.startswith(prefix))
  return [float(tok) for tok in line.replace(",", " ").split() if tok.replace(".", "").isdigit()]


def test_lm_beats_unigram_and_samples(tmp_path, jax_cache):
  run_dir = tmp_path / "lm"
  args = [a for a in TINY if "max_new_tokens" not in a and "seq_len" not in a]
  proc = run_train(run_dir, *args, "--config.data.seq_len=64", "--config.data.batch_size=16",
                   "--config.train.steps=150", "--config.train.eval_every=150",
                   "--config.train.checkpoint_every=150", "--config.train.log_every=10",
                   "--config.optim.lr=1e-2", "--config.optim.warmup_steps=10",
                   "--config.sample.max_new_tokens=24", "--config.sample.prompt=import ",
                   jax_cache=jax_cache, timeout=900)
  assert_ok(proc)
  model_bpb, unigram_bpb = _float_after(proc.stdout, "bpb: model")
  assert unigram_bpb > 4.0                  # bytes of Python source, add-one unigram
  assert model_bpb < unigram_bpb - 0.5, proc.stdout[-2000:]
  assert metrics(run_dir, "eval")[-1]["eval_bpb"] == model_bpb or \
      abs(metrics(run_dir, "eval")[-1]["eval_bpb"] - model_bpb) < 1e-3
  train_losses = [r["loss"] for r in metrics(run_dir)]
  assert train_losses[-1] < train_losses[0] - 1.0
  assert "sample:\nimport " in proc.stdout
  for name in ("loss.png", "metrics.jsonl", "config.json"):
    assert os.path.getsize(run_dir / name) > 0
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(run_dir / "tensorboard"))

  # Weights only: a new run starts from the trained parameters with a fresh optimizer at step 0.
  warm = tmp_path / "warm"
  started = run_train(warm, *args, "--config.data.seq_len=64", "--config.data.batch_size=16",
                      "--config.train.steps=1", f"--config.init_from={run_dir}",
                      jax_cache=jax_cache, timeout=600)
  assert_ok(started)
  assert f"initialised weights from {run_dir} (step 150)" in started.stdout
  assert metrics(warm)[0]["loss"] < train_losses[0] - 1.0

  out = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), f"--run_dir={run_dir}",
                        "--prompt=def ", "--max_new_tokens=16", "--temperature=0"], cwd=REPO,
                       text=True, capture_output=True, env=env_for(jax_cache), timeout=400)
  assert out.returncode == 0, out.stderr[-2000:]
  text = out.stdout.rstrip("\n")
  assert text.startswith("def ") and len(text.encode("utf-8", "replace")) >= 4


def test_rec_tiny_beats_most_popular(tmp_path, jax_cache):
  run_dir = tmp_path / "rec"
  proc = run_train(run_dir, "--config.train.steps=80", "--config.train.eval_every=80",
                   "--config.train.checkpoint_every=80", "--config.train.progress=False",
                   "--config.model.num_layers=1", "--config.optim.lr=5e-3",
                   "--config.data.synthetic_users=400",
                   config="rec_tiny.py", jax_cache=jax_cache, timeout=900)
  assert_ok(proc)
  model_hit, popular_hit = _float_after(proc.stdout, "hit@10: model")
  final = metrics(run_dir, "eval")[-1]
  assert abs(final["eval_hit@10"] - model_hit) < 1e-3
  assert model_hit > popular_hit + 0.1, proc.stdout[-2000:]
  assert final["eval_auc"] > 0.5
  test = metrics(run_dir, "test")[-1]
  assert test["step"] == 80 and test["test_hit@10"] > popular_hit + 0.1
  assert "test: test_loss=" in proc.stdout
