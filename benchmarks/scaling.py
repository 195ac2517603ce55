"""The train step of train.py under data-parallel, FSDP and tensor-parallel meshes of one host.

    python benchmarks/scaling.py [--presets 130m 1b] [--json PATH] [--markdown PATH]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/scaling.py --presets tiny

Every run is the `Trainer` layout of prism_jax.train.loop (state shardings from the logical
axis rules, the jitted step with its donated state) on the devices `jax.devices()[:n]`, with
the mesh given only by (data, fsdp, tensor); n is the largest power of two <= the device count.

  - strong scaling, one global batch for all (130m: 16 x 2048 tokens, 1b: 4 x 2048): 1 device,
    DP 2 .. n, FSDP n, TP n, DP n/2 x TP 2 (1b: 1 device, FSDP n, DP n);
  - weak scaling: DP n with n times the 1-device batch (the per-device batch fixed);
  - correctness: every run starts from the same initial state (initialised once on one device,
    copied onto each mesh) and reads the same batches; the losses of the first --check-steps
    updates must equal the 1-device run's within the compute dtype's unit roundoff (relative
    2^-8 for bfloat16; 2e-5 for float32, where only the order of cross-device sums differs);
  - speed: median wall time of the updates after --warmup, each closed by block_until_ready,
    as tokens/s; efficiency = tokens/s(n devices) / (n * tokens/s(1 device, B)), with B the
    same global batch (strong) or the per-device batch of the n-device run (weak);
  - memory per device: the train state (float32 parameters and AdamW moments) from the
    shardings, beside its unsharded size, and XLA's peak estimate of the compiled step
    (arguments + outputs - donated aliases + temporaries; the process-wide peak of the
    allocator cannot be reset between runs);
  - checkpoint (--checkpoint presets, default 130m): the state after the FSDP run is saved with
    the project's Checkpointer, restored onto one device and compared bitwise; one more update
    on each mesh from it must give the same loss.

Each run is compiled right before it is timed, one run after the other (several XLA:GPU
compiles at once, each autotuning on the same GPU, starved one another for minutes on a 2-GPU
H200 host), and its compiled step is dropped before the next. Rows print as they finish and
--json / --markdown are rewritten after each row, so a run cut short keeps what it measured;
--budget-s stops starting runs, --preset-min-s presets.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from prism_jax.ops.api import resolve_impl  # noqa: E402
from prism_jax.train import sharding as shd  # noqa: E402
from throughput import git_commit, memory_account  # noqa: E402
from prism_jax.train.checkpoint import Checkpointer  # noqa: E402
from prism_jax.train.config import validate_config  # noqa: E402
from prism_jax.train.loop import Trainer  # noqa: E402
from prism_jax.train.tasks import make_task  # noqa: E402

# preset -> (config module, config overrides, global batch of the strong-scaling runs)
PRESETS = {
    "130m": ("lm_130m", {}, 16),
    # 8 x 2048 would not fit one H200 unsharded (XLA's estimate: 156 GiB), 4 x 2048 does.
    "1b": ("lm_1b", {}, 4),
    # The one-layer model of tests/train, for CPU runs with fake devices.
    "tiny": ("lm_tiny", {"model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2,
                         "model.head_dim": 16, "model.chunk_size": 16, "data.seq_len": 32}, 8),
}
ROUNDOFF = {"bfloat16": 2.0 ** -8, "float32": 2e-5}


@dataclasses.dataclass
class Run:
  """One (preset, mesh, global batch) measurement: its trainer and compiled step."""
  preset: str
  kind: str                      # "strong" or "weak"
  data: int
  fsdp: int
  tensor: int
  batch: int
  trainer: Trainer | None = None
  compiled: object = None        # the compiled train step, kept only while the run is timed
  compile_s: float = 0.0
  peak: int | None = None        # XLA's estimate of the compiled step's bytes per device

  @property
  def devices(self) -> int:
    return self.data * self.fsdp * self.tensor

  @property
  def label(self) -> str:
    parts = [f"{name}{size}" for name, size in (("DP", self.data), ("FSDP", self.fsdp),
                                                ("TP", self.tensor)) if size > 1]
    return " x ".join(parts) or "1 device"


class MeshTrainer(Trainer):
  """Trainer's state layout and step on an explicit device list, sharing a built task.

  Trainer itself always spans `jax.devices()`; a benchmark of sub-meshes needs the first n.
  """

  def __init__(self, cfg, devices, task):
    validate_config(cfg)
    self.cfg, self.run_dir, self.lead, self.stop_signal = cfg, "", True, None
    self.mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
    self.task, self.model_config = task, task.model_config
    self._build_state_layout()


def preset_config(name: str, batch: int, mesh: tuple[int, int, int], impl: str = ""):
  module, overrides, _ = PRESETS[name]
  cfg = importlib.import_module(f"configs.{module}").get_config()
  for key, value in overrides.items():
    section, field = key.split(".")
    cfg[section][field] = value
  cfg.data.batch_size = batch
  cfg.optim.grad_accum = 1   # one micro-batch: the whole global batch per step, on every mesh
  if impl:
    cfg.model.impl = impl
  # Two warm-up updates then the preset's peak rate, so the few compared losses move.
  cfg.optim.warmup_steps = 2
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
  return cfg


def default_runs(preset: str, num_devices: int, batch: int) -> list[Run]:
  """The runs in the order they are timed, most wanted first in case --budget-s cuts the list.

  1 device; then 130m / tiny: DP n, weak DP n, FSDP n, DP 2 .. n/2, TP n, DP n/2 x TP 2 (from
  4 devices; and 2 x 2 x 2 on 8); 1b: FSDP n, DP n. n is the largest power of two <= the
  device count.
  """
  n = max([1] + [s for s in (2, 4, 8) if s <= num_devices])
  runs = [Run(preset, "strong", 1, 1, 1, batch)]
  if n == 1:
    return runs
  if preset == "1b":
    return runs + [Run(preset, "strong", 1, n, 1, batch), Run(preset, "strong", n, 1, 1, batch)]
  runs += [Run(preset, "strong", n, 1, 1, batch), Run(preset, "weak", n, 1, 1, batch * n),
           Run(preset, "strong", 1, n, 1, batch)]
  runs += [Run(preset, "strong", s, 1, 1, batch) for s in (2, 4) if s < n]
  runs.append(Run(preset, "strong", 1, 1, n, batch))
  if n >= 4:
    runs.append(Run(preset, "strong", n // 2, 1, 2, batch))
  if n == 8:
    runs.append(Run(preset, "strong", 2, 2, 2, batch))
  return runs


def parse_runs(meshes: str, weak: str, preset: str, batch: int) -> list[Run]:
  """--meshes "2x1x1,1x4x1" (data x fsdp x tensor, same global batch) and --weak "2,4" (DP
  sizes, batch per device fixed) -> runs, the 1-device run first."""
  shapes = [(1, 1, 1)]
  for item in filter(None, meshes.split(",")):
    parts = item.strip().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) >= 1 for p in parts):
      raise ValueError(f"--meshes: {item!r} is not data x fsdp x tensor (e.g. 2x1x2)")
    shapes.append(tuple(int(p) for p in parts))
  sizes = [s.strip() for s in filter(None, weak.split(","))]
  if not all(s.isdigit() and int(s) >= 2 for s in sizes):
    raise ValueError(f"--weak: {weak!r} is not a list of data-parallel sizes >= 2 (e.g. 2,4)")
  return ([Run(preset, "strong", *m, batch) for m in dict.fromkeys(shapes)]
          + [Run(preset, "weak", int(s), 1, 1, batch * int(s)) for s in sizes])


def state_bytes(abstract_state) -> tuple[int, int]:
  """(bytes on the most loaded device, bytes unsharded) of the train state."""
  per_device, total = {}, 0
  for leaf in jax.tree.leaves(abstract_state):
    size = np.dtype(leaf.dtype).itemsize
    total += int(np.prod(leaf.shape)) * size
    shard = int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * size
    for device in leaf.sharding.device_set:
      per_device[device] = per_device.get(device, 0) + shard
  return max(per_device.values()), total


def abstract_args(trainer: Trainer):
  """ShapeDtypeStructs of (state, batch, lr, poison) with the step's input shardings."""
  rows, repl = trainer.cfg.data.batch_size, shd.replicated(trainer.mesh)
  example = trainer.task.train_batch(0)
  batch = {k: jax.ShapeDtypeStruct((rows,) + v.shape[1:], v.dtype,
                                   sharding=trainer.batch_sharding[k])
           for k, v in example.items()}
  return (trainer.abstract_state, batch, jax.ShapeDtypeStruct((), jnp.float32, sharding=repl),
          jax.ShapeDtypeStruct((), jnp.bool_, sharding=repl))


def train(run: Run, host_state, steps: int, start: int = 0, state=None):
  """`steps` updates from `host_state` (or a device `state`); (state, losses, seconds)."""
  t = run.trainer
  compiled = run.compiled
  if state is None:
    state = jax.device_put(host_state, t.state_sharding)
  repl = shd.replicated(t.mesh)
  poison = jax.device_put(jnp.asarray(False), repl)
  batches = [t._global(t.task.train_batch(i)) for i in range(start, start + steps)]
  rates = [jax.device_put(jnp.float32(t.schedule(i)), repl) for i in range(start, start + steps)]
  jax.block_until_ready((state, batches, rates))
  losses, seconds = [], []
  for batch, lr in zip(batches, rates):
    begin = time.perf_counter()
    state, metrics = compiled(state, batch, lr, poison)
    jax.block_until_ready((state, metrics))
    seconds.append(time.perf_counter() - begin)
    losses.append(float(metrics["loss"]))
  return state, losses, seconds


def checkpoint_check(source: Run, base: Run, state, step: int, roundoff: float) -> dict:
  """Save `state` (on source's mesh), restore it on base's single device; bitwise and next loss."""
  directory = tempfile.mkdtemp(prefix="prism_scaling_ckpt_")
  try:
    ckpt = Checkpointer(directory, keep=1, use_async=False)
    begin = time.perf_counter()
    ckpt.save(step, state, {"step": step})
    ckpt.wait()
    restored, _ = ckpt.restore(step, base.trainer.abstract_state)
    seconds = time.perf_counter() - begin
    ckpt.close()
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  mismatched = [jax.tree_util.keystr(path) for (path, a), b in
                zip(jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0],
                    jax.tree.leaves(jax.device_get(restored)))
                if not np.array_equal(np.asarray(a), np.asarray(b))]
  on_one = {len(leaf.sharding.device_set) for leaf in jax.tree.leaves(restored)} == {1}
  _, next_source, _ = train(source, None, 1, start=step, state=state)
  _, next_base, _ = train(base, None, 1, start=step, state=restored)
  diff = abs(next_source[0] - next_base[0]) / abs(next_base[0])
  return {"saved_on": source.label, "saved_devices": source.devices, "restored_devices": 1,
          "step": step, "bitwise_equal": not mismatched and on_one, "mismatched": mismatched[:5],
          "next_loss_saved_mesh": next_source[0], "next_loss_restored": next_base[0],
          "next_loss_rel_diff": diff, "loss_ok": diff <= roundoff,
          "save_restore_s": round(seconds, 2)}


class Report:
  """Rows and checkpoint results, printed as they come and rewritten to --json/--markdown."""

  def __init__(self, args, argv):
    self.args = args
    commit = args.commit or git_commit()
    if commit == "unknown":
      commit += " (no git checkout; pass --commit)"
    device = jax.devices()[0]
    self.head = {
        "command": "python benchmarks/scaling.py " + " ".join(shlex.quote(a) for a in argv),
        "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "device": f"{len(jax.devices())} x {getattr(device, 'device_kind', device.platform)}",
        "jax": jax.__version__}
    self.presets, self.rows, self.checkpoints, self.notes = {}, [], [], []

  def add_row(self, row: dict) -> None:
    self.rows.append(row)
    print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    self.write()

  def note(self, text: str) -> None:
    self.notes.append(text)
    print(text, flush=True)
    self.write()

  def write(self) -> None:
    if self.args.json:
      with open(self.args.json, "w") as f:
        json.dump({**self.head, "presets": self.presets, "rows": self.rows,
                   "checkpoints": self.checkpoints, "notes": self.notes}, f, indent=1)
    if self.args.markdown:
      with open(self.args.markdown, "w") as f:
        f.write(self.markdown())

  def markdown(self) -> str:
    h = self.head
    out = [f"Command `{h['command']}`, commit {h['commit']}, {h['device']}, jax {h['jax']}, "
           f"{h['date']}.", ""]
    for name, info in self.presets.items():
      out.append(f"- {name}: {info['params']:,} parameters, {info['compute_dtype']} compute, "
                 f"recurrence impl {info['impl']}, "
                 f"seq {info['seq_len']}; train state {_size(info['state_bytes'])} unsharded; "
                 f"loss tolerance relative {info['rtol']:.2g}")
    out += ["", "| preset | mesh | scaling | devices | global batch | tokens/s | efficiency | "
            "step ms | state / device | peak / device (XLA) | max loss rel diff vs 1 |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in self.rows:
      eff = "" if r["efficiency"] is None else f"{100 * r['efficiency']:.1f}%"
      diff = "" if r["loss_rel_diff"] is None else \
          f"{r['loss_rel_diff']:.1e} ({'ok' if r['loss_ok'] else 'OVER'})"
      out.append(f"| {r['preset']} | {r['mesh']} | {r['kind']} | {r['devices']} | "
                 f"{r['batch']} x {r['seq_len']} | {r['tokens_per_s']:,.0f} | {eff} | "
                 f"{r['step_ms']:.1f} | {_size(r['state_bytes'])} | {_size(r['peak_bytes'])} | "
                 f"{diff} |")
    for c in (c for c in self.checkpoints if "error" not in c):   # failures are in the notes
      out.append(f"\nCheckpoint ({c['preset']}) saved on {c['saved_on']} ({c['saved_devices']} "
                 f"devices) at update {c['step']}, restored on 1: bitwise equal "
                 f"{c['bitwise_equal']}; next update's loss {c['next_loss_saved_mesh']:.6f} vs "
                 f"{c['next_loss_restored']:.6f} (relative {c['next_loss_rel_diff']:.1e}); "
                 f"save + restore {c['save_restore_s']} s.")
    out += [""] + [f"- {n}" for n in self.notes]
    return "\n".join(out) + "\n"


def _size(num_bytes: int | None) -> str:
  if num_bytes is None:
    return ""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
    if num_bytes >= scale:
      return f"{num_bytes / scale:.2f} {unit}"
  return f"{num_bytes / 2**10:.1f} KiB"


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


def bench_preset(preset: str, runs: list[Run], args, report: Report, deadline: float) -> None:
  devices = jax.devices()
  wanted = max(r.devices for r in runs)
  if wanted > len(devices):
    raise ValueError(f"--meshes: {wanted} devices asked, {len(devices)} available")
  tasks = {}
  for run in runs:
    cfg = preset_config(preset, run.batch, (run.data, run.fsdp, run.tensor), args.impl)
    if run.batch not in tasks:
      tasks[run.batch] = make_task(cfg)
    run.trainer = MeshTrainer(cfg, devices[:run.devices], tasks[run.batch])
  base = runs[0]
  dtype = base.trainer.model_config.dtype
  roundoff = ROUNDOFF.get(dtype, 2.0 ** -8)
  seq_len = base.trainer.cfg.data.seq_len
  _, unsharded = state_bytes(base.trainer.abstract_state)
  report.presets[preset] = {"params": base.trainer.num_params, "compute_dtype": dtype,
                            "impl": resolve_impl(base.trainer.model_config.impl),
                            "seq_len": seq_len, "state_bytes": unsharded, "rtol": roundoff}
  print(f"{preset}: {base.trainer.num_params:,} parameters, train state {_size(unsharded)} "
        f"unsharded, {dtype} compute, impl {report.presets[preset]['impl']}", flush=True)

  host_state = jax.device_get(base.trainer._init_state(base.trainer._init_params()))
  baseline = {}   # global batch -> (tokens/s, losses) of the 1-device run
  ckpt_source = next((r for r in runs if r.fsdp == max(x.fsdp for x in runs) > 1
                      and r.kind == "strong"), None)
  steps = args.warmup + args.timed
  for run in runs:
    if time.time() > deadline:
      report.note(f"{preset} {run.label} ({run.kind}): skipped, --budget-s reached")
      continue
    if not compile_run(run, preset, report):
      continue
    try:
      state, losses, seconds = train(run, host_state, steps)
    except jax.errors.JaxRuntimeError as e:   # e.g. RESOURCE_EXHAUSTED: it does not fit
      report.note(f"{preset} {run.label} ({run.kind}, batch {run.batch}): failed: "
                  f"{_first_line(e)}")
      continue
    step_s = float(np.median(seconds[args.warmup:]))
    tokens_per_s = run.batch * seq_len / step_s
    if run.devices == 1:
      baseline[run.batch] = (tokens_per_s, losses)
    one_batch = run.batch if run.kind == "strong" else run.batch // run.devices
    ref_rate, ref_losses = baseline.get(one_batch, (None, None))
    efficiency = None if ref_rate is None else tokens_per_s / (run.devices * ref_rate)
    diff = None
    if run.kind == "strong" and ref_losses is not None:
      n = args.check_steps
      diff = float(np.max(np.abs(np.subtract(losses[:n], ref_losses[:n]))
                          / np.abs(ref_losses[:n])))
    state_dev, _ = state_bytes(run.trainer.abstract_state)
    report.add_row({
        "preset": preset, "mesh": run.label, "kind": run.kind, "devices": run.devices,
        "data": run.data, "fsdp": run.fsdp, "tensor": run.tensor, "batch": run.batch,
        "seq_len": seq_len, "tokens_per_s": round(tokens_per_s, 1),
        "efficiency": None if efficiency is None else round(efficiency, 4),
        "step_ms": round(1e3 * step_s, 2), "state_bytes": state_dev, "peak_bytes": run.peak,
        "compile_s": round(run.compile_s, 1),
        "losses": [round(x, 6) for x in losses], "loss_rel_diff": diff,
        "loss_ok": None if diff is None else diff <= roundoff})
    if run is ckpt_source and preset in args.checkpoint and base.compiled is not None:
      try:
        result = checkpoint_check(run, base, state, steps, roundoff)
      except Exception as e:   # reported as a failed check, the other runs still go ahead
        report.note(f"{preset} checkpoint from {run.label}: failed: {_first_line(e)}")
        report.checkpoints.append({"preset": preset, "saved_on": run.label,
                                   "bitwise_equal": False, "loss_ok": False,
                                   "error": _first_line(e)})
      else:
        report.checkpoints.append({"preset": preset, **result})
        report.write()
        print(f"{preset} checkpoint: saved on {run.label}, restored on 1 device, bitwise "
              f"{result['bitwise_equal']}, next loss relative diff "
              f"{result['next_loss_rel_diff']:.1e}", flush=True)
    del state
    if run is not base:   # the 1-device step stays for the checkpoint check's next update
      run.compiled = None


def compile_run(run: Run, preset: str, report: Report) -> bool:
  """Lower and compile the step of `run`, noting its time and memory; False if it failed."""
  begin = time.perf_counter()
  try:
    run.compiled = run.trainer.train_step.lower(*abstract_args(run.trainer)).compile()
  except Exception as e:   # a failed compile loses that run only
    report.note(f"{preset} {run.label} ({run.kind}): compile failed: {_first_line(e)}")
    return False
  run.compile_s = time.perf_counter() - begin
  run.peak = (memory_account(run.compiled) or {}).get("total_bytes")
  report.note(f"{preset} {run.label} ({run.kind}, batch {run.batch}): compiled in "
              f"{run.compile_s:.0f} s; per device train state "
              f"{_size(state_bytes(run.trainer.abstract_state)[0])}, XLA peak {_size(run.peak)}")
  return True


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", nargs="+", default=["130m", "1b"], choices=sorted(PRESETS))
  parser.add_argument("--meshes", default="", help="strong-scaling meshes, data x fsdp x "
                      "tensor, e.g. 2x1x1,1x4x1 (default, with --weak also empty: the set of the "
                      "docstring)")
  parser.add_argument("--weak", default="", help="weak-scaling DP sizes, e.g. 2,4")
  parser.add_argument("--warmup", type=int, default=2, help="untimed first updates")
  parser.add_argument("--timed", type=int, default=5, help="timed updates after warm-up")
  parser.add_argument("--check-steps", type=int, default=4,
                      help="first updates whose loss must match the 1-device run")
  parser.add_argument("--checkpoint", nargs="*", default=["130m", "tiny"],
                      help="presets whose FSDP state is saved and restored on one device")
  parser.add_argument("--impl", default="", help="model.impl of every run (default: preset's)")
  parser.add_argument("--budget-s", type=float, default=210.0,
                      help="start no further run after this many seconds")
  parser.add_argument("--preset-min-s", type=float, default=100.0,
                      help="start a preset only if this many seconds of the budget remain")
  parser.add_argument("--commit", default="", help="commit to report (default: git HEAD)")
  parser.add_argument("--json", default="")
  parser.add_argument("--markdown", default="")
  args = parser.parse_args(argv)
  if args.check_steps > args.warmup + args.timed:
    parser.error("--check-steps exceeds --warmup + --timed")
  deadline = time.time() + args.budget_s
  report = Report(args, argv)
  print(f"{report.head['device']}, jax {jax.__version__}", flush=True)
  for preset in args.presets:
    if time.time() > deadline - args.preset_min_s:
      report.note(f"{preset}: skipped, less than --preset-min-s={args.preset_min_s:.0f} s of "
                  f"--budget-s={args.budget_s:.0f} s left")
      continue
    batch = PRESETS[preset][2]
    runs = (parse_runs(args.meshes, args.weak, preset, batch) if args.meshes or args.weak
            else default_runs(preset, len(jax.devices()), batch))
    bench_preset(preset, runs, args, report, deadline)
  failed = [r for r in report.rows if r["loss_ok"] is False]
  failed += [c for c in report.checkpoints if not (c["bitwise_equal"] and c["loss_ok"])]
  print(f"done: {len(report.rows)} runs, {len(failed)} failing the loss or checkpoint check",
        flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
