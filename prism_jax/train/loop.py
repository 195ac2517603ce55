"""The training program: build, resume, step, evaluate, checkpoint, report.

`Trainer(cfg).run()` is what `train.py` calls. Errors a user can fix are ValueError with a
one-line message; `TrainingStopped` ends a run whose updates keep failing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from prism_jax.train import sharding as shd
from prism_jax.train.checkpoint import CheckpointError, Checkpointer, restore_params
from prism_jax.models import CausalLM, generate
from prism_jax.train.config import model_config, validate_config
from prism_jax.train.optim import make_optimizer
from prism_jax.train.outputs import RunLog, plot_losses
from prism_jax.train.step import init_state, make_train_step
from prism_jax.train.tasks import make_task


class TrainingStopped(RuntimeError):
  """Too many non-finite updates in a row; the message names the last good checkpoint."""


def setup_distributed(cfg) -> None:
  """jax.distributed.initialize when the config asks or JAX_COORDINATOR_ADDRESS is set."""
  dist = cfg.distributed
  env_address = os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if not (dist.initialize or dist.coordinator_address or env_address):
    return
  if jax.distributed.is_initialized():
    return
  # Only read by the CPU backend; asking which backend is in use would start it too early.
  jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
  jax.distributed.initialize(
      coordinator_address=dist.coordinator_address or env_address or None,
      num_processes=dist.num_processes or None,
      process_id=dist.process_id if dist.process_id >= 0 else None)


def run_dir_of(cfg) -> str:
  return cfg.run_dir or os.path.join("runs", cfg.preset or cfg.task)


def _jsonable(value):
  return json.loads(json.dumps(value, default=list))


def _abstract(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


class Trainer:
  """Everything a run needs, built before the first compilation."""

  def __init__(self, cfg):
    validate_config(cfg)
    setup_distributed(cfg)
    self.cfg = cfg
    self.run_dir = os.path.abspath(run_dir_of(cfg))
    self.lead = jax.process_index() == 0
    self.mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    self.task = make_task(cfg, jax.process_index(), jax.process_count())
    self.model_config = self.task.model_config
    self._build_state_layout()
    self.stop_signal = None

  def _build_state_layout(self) -> None:
    cfg, task, mesh = self.cfg, self.task, self.mesh

    def build():
      model = task.build_model(nnx.Rngs(cfg.seed))
      _, params, rest = nnx.split(model, nnx.Param, ...)
      return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    abstract_model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(cfg.seed)))
    self.graphdef, abs_params, _ = nnx.split(abstract_model, nnx.Param, ...)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abs_params))
    abs_params = nnx.to_pure_dict(abs_params)
    rules = tuple(tuple(r) for r in cfg.mesh.rules)
    param_sh = shd.tree_shardings(abs_params, logical, mesh, rules)
    self.tx, self.schedule = make_optimizer(cfg.optim, cfg.train.steps, abs_params)
    repl = shd.replicated(mesh)
    self.state_sharding = {
        "params": param_sh,
        "opt_state": shd.opt_state_shardings(self.tx, abs_params, param_sh, mesh),
        "step": repl, "rng": repl, "bad_in_row": repl, "skipped": repl}
    self.abstract_params = _abstract(abs_params, param_sh)
    self.num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abs_params))

    # Non-parameter state (usually empty); XLA drops the unused parameter initialisers.
    self.rest = jax.jit(lambda: build()[1], out_shardings=repl)()
    self._init_params = jax.jit(lambda: build()[0], out_shardings=param_sh)
    self._init_state = jax.jit(lambda p: init_state(p, self.tx, cfg.seed),
                               in_shardings=(param_sh,), out_shardings=self.state_sharding)
    self.abstract_state = _abstract(jax.eval_shape(self._init_state, abs_params),
                                    self.state_sharding)

    def under_mesh(method):
      """task.<method>(model, batch) with the mesh as context, so that the layers'
      `shard_batch` hints keep activations split by rows."""
      def run(params, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
          return getattr(task, method)(nnx.merge(self.graphdef, params, self.rest), batch)
      return run

    def loss_sum(params, batch, rng):
      del rng   # the models are deterministic (no dropout); the key is kept for ones that are not
      return under_mesh("loss_sum")(params, batch)

    example = task.train_batch(0)
    self.batch_sharding = {k: shd.batch_sharding(mesh, v.ndim) for k, v in example.items()}
    self.train_step = jax.jit(
        make_train_step(loss_sum, self.tx, cfg.optim.grad_accum),
        in_shardings=(self.state_sharding, self.batch_sharding, repl, repl),
        out_shardings=(self.state_sharding, repl), donate_argnums=(0,))
    eval_example = task.eval_batches()[0]
    eval_sharding = {k: shd.batch_sharding(mesh, v.ndim) for k, v in eval_example.items()}
    self.eval_step = jax.jit(
        under_mesh("eval_metrics"),
        in_shardings=(param_sh, eval_sharding), out_shardings=repl)

  def _global(self, local: dict) -> dict:
    rows = self.cfg.data.batch_size
    return {k: shd.global_batch(self.mesh, v, rows) for k, v in local.items()}

  def model(self, params) -> nnx.Module:
    return nnx.merge(self.graphdef, params, self.rest)

  def evaluate(self, params, batches=None) -> dict:
    """Validation metrics (or those of `batches`), summed over batches inside jit."""
    sums = None
    for batch in self.task.eval_batches() if batches is None else batches:
      out = jax.device_get(self.eval_step(params, self._global(batch)))
      sums = out if sums is None else {k: sums[k] + out[k] for k in sums}
    return self.task.finish_eval(sums)

  def meta(self, step: int) -> dict:
    """JSON saved beside the state; batch n of the stream is a function of n, so the data
    position is the step."""
    corpus = getattr(self.task, "corpus", None)
    return {"step": step, "data_position": step, "task": self.cfg.task,
            "fingerprint": corpus.fingerprint if corpus is not None else "",
            "model_config": _jsonable(dataclasses.asdict(self.model_config)),
            "config": json.loads(self.cfg.to_json_best_effort())}

  def initial_state(self, ckpt: Checkpointer, log) -> dict:
    """Resume from the run's latest checkpoint, else init (optionally from init_from)."""
    latest = ckpt.latest_step()
    if latest is not None:
      meta = ckpt.read_meta(latest)
      want = _jsonable(dataclasses.asdict(self.model_config))
      if meta.get("model_config") != want:
        changed = sorted(k for k in want if meta.get("model_config", {}).get(k) != want[k])
        raise CheckpointError(
            f"checkpoint {ckpt.directory}/{latest} was written by a different model (differs in "
            f"{changed}); resume with its config or choose a new run_dir")
      if meta.get("fingerprint", "") != self.meta(0)["fingerprint"]:
        log(f"warning: data fingerprint changed since the checkpoint ({meta.get('fingerprint')} "
            f"-> {self.meta(0)['fingerprint']}); the data stream will differ")
      state, _ = ckpt.restore(latest, self.abstract_state)
      log(f"resumed from {ckpt.directory}/{latest}")
      return state
    if self.cfg.init_from:
      params, step = restore_params(self.cfg.init_from, self.abstract_params)
      log(f"initialised weights from {self.cfg.init_from} (step {step})")
      return self._init_state(params)
    return self._init_state(self._init_params())

  def _on_signal(self, signum, frame):
    del frame
    if self.stop_signal is not None:
      raise KeyboardInterrupt
    self.stop_signal = signal.Signals(signum).name

  def run(self) -> dict:
    cfg, t = self.cfg, self.cfg.train
    say = (lambda msg: tqdm.write(msg)) if self.lead else (lambda msg: None)
    ckpt = Checkpointer(os.path.join(self.run_dir, "checkpoints"), t.keep_checkpoints,
                        t.async_checkpoints)
    state = self.initial_state(ckpt, say)
    start = int(jax.device_get(state["step"]))
    applied = start - int(jax.device_get(state["skipped"]))   # updates the schedule has seen
    if self.lead:
      os.makedirs(self.run_dir, exist_ok=True)
      with open(os.path.join(self.run_dir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))
    info = self.task.describe()
    say(f"{cfg.preset or cfg.task}: {self.num_params:,} parameters, mesh "
        f"{dict(self.mesh.shape)}, run dir {self.run_dir}")
    say("data: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in info.items()))
    runlog = RunLog(self.run_dir, self.lead, resume_step=start)
    old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    nan_steps = set(int(s) for s in cfg.debug.nan_steps)
    prof_first, prof_last = tuple(t.profile_steps)
    profiling, last_eval, result = False, {}, {"stopped": None}
    bar = tqdm(total=t.steps, initial=start, disable=not (t.progress and self.lead),
               dynamic_ncols=True, desc="train")
    window_time, window_tokens = 0.0, 0.0   # step time only: eval and saves do not count
    try:
      for step in range(start, t.steps):
        done = step + 1                       # 1-based number of this update, as logged
        if prof_last > 0 and prof_first <= done <= prof_last and not profiling:
          jax.profiler.start_trace(os.path.join(self.run_dir, "profile"))
          profiling = True
        batch = self._global(self.task.train_batch(step))
        lr = float(self.schedule(applied))
        step_start = time.perf_counter()
        state, metrics = self.train_step(state, batch, jnp.float32(lr),
                                         jnp.asarray(done in nan_steps))
        if profiling and done >= prof_last:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
          profiling = False
        metrics = jax.device_get(metrics)
        window_time += time.perf_counter() - step_start
        metrics["lr"] = lr
        applied += int(metrics["finite"])
        if cfg.debug.sleep_per_step:
          time.sleep(cfg.debug.sleep_per_step)
        window_tokens += float(metrics["tokens"])
        bar.update(1)
        if not metrics["finite"]:
          bad, skipped = int(state["bad_in_row"]), int(state["skipped"])
          say(f"step {done}: non-finite loss or gradient, update skipped ({skipped} skipped so "
              f"far, {bad} in a row)")
          runlog.write("train", done, {"skipped_step": 1.0, "skipped_total": skipped})
          if bad >= t.max_bad_steps:
            ckpt.wait()
            good = ckpt.latest_step()
            raise TrainingStopped(
                f"stopped at step {done}: {bad} non-finite updates in a row (train.max_bad_steps="
                f"{t.max_bad_steps}); the last good checkpoint is "
                f"{ckpt.directory}/{good}" + ("" if good is not None else " (none saved)") +
                "; lower optim.lr or check the data, then rerun to resume from it")
        if done % t.log_every == 0 or done == t.steps:
          record = {k: float(metrics[k]) for k in ("loss", "grad_norm", "lr")}
          record["tokens_per_s"] = window_tokens / max(window_time, 1e-9)
          runlog.write("train", done, record)
          bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
          window_time, window_tokens = 0.0, 0.0
        evaluated = done % t.eval_every == 0 or done == t.steps
        if evaluated:
          last_eval = self.evaluate(state["params"])
          runlog.write("eval", done, last_eval)
          say(f"step {done}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items()))
        if done % t.checkpoint_every == 0 or done == t.steps:
          ckpt.save(done, state, self.meta(done),
                    {"eval_loss": last_eval["eval_loss"]} if evaluated else None)
        if self.stop_signal:
          ckpt.save(done, state, self.meta(done))
          ckpt.wait()
          say(f"{self.stop_signal}: saved checkpoint {ckpt.directory}/{done}; run the same "
              "command again to resume")
          result["stopped"] = self.stop_signal
          break
      if start >= t.steps:
        say(f"the run is already at step {start} of train.steps={t.steps}; raise train.steps "
            "to train further")
      if not last_eval and result["stopped"] is None:
        last_eval = self.evaluate(state["params"])
      result.update(last_eval)
      if cfg.task == "rec" and result["stopped"] is None:
        # The held-out last item of every user, scored once at the end (spec §7).
        test = {k.replace("eval_", "test_"): v for k, v in
                self.evaluate(state["params"], self.task.eval_batches("test")).items()}
        runlog.write("test", int(jax.device_get(state["step"])), test)
        say("test: " + ", ".join(f"{k}={v:.4f}" for k, v in test.items()))
        result.update(test)
      result["step"] = int(jax.device_get(state["step"]))
      result["skipped"] = int(jax.device_get(state["skipped"]))
      result["describe"] = info
    finally:
      bar.close()
      if profiling:
        jax.profiler.stop_trace()
      for s, h in old_handlers.items():
        signal.signal(s, h)
      ckpt.close()
      runlog.close()
    if result["stopped"] is None and self.lead:
      say(f"metrics: {runlog.path}; plot: {plot_losses(self.run_dir)}")
      self._report(info, result, say)
      if cfg.sample.max_new_tokens > 0 and cfg.task == "lm" and jax.process_count() == 1:
        text = sample_text(self.model(state["params"]), cfg, self.task.corpus.byte_level)
        say("sample:\n" + text)
    self.state = state
    return result

  def _report(self, info: dict, result: dict, say) -> None:
    for key, value in info.items():
      if key.startswith("unigram_") or key.startswith("popular_"):
        ours = result.get("eval_" + key.split("_", 1)[1])
        if ours is not None:
          say(f"{key.split('_', 1)[1]}: model {ours:.4f} vs {key.split('_', 1)[0]} baseline "
              f"{value:.4f}")


def sample_text(model, cfg, byte_level: bool, seed: int | None = None) -> str:
  """Continue `cfg.sample.prompt` with `generate`; bytes are decoded as UTF-8 (lossy)."""
  s = cfg.sample
  if byte_level:
    prompt = np.frombuffer(s.prompt.encode("utf-8") or b"\n", np.uint8).astype(np.int32)
  else:
    prompt = np.asarray([int(x) for x in s.prompt.split()] or [0], np.int32)
  rng = jax.random.key(cfg.seed if seed is None else seed)
  out = generate(model, jnp.asarray(prompt)[None], s.max_new_tokens,
                 temperature=s.temperature, top_k=s.top_k or None, rng=rng)
  tokens = np.asarray(out[0])
  if byte_level:
    return bytes(tokens.astype(np.uint8).tolist()).decode("utf-8", errors="replace")
  return " ".join(map(str, tokens.tolist()))


def sample_from_run(run_dir: str, sample_settings=None, seed: int = 0) -> str:
  """Text generated by the newest checkpoint of `run_dir` (its config.json says the model).

  `sample_settings` (a dict or config section) overrides prompt, max_new_tokens, temperature
  and top_k of the run's own `sample` section.
  """
  path = os.path.join(run_dir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{path} not found; give the run directory of a train.py run")
  with open(path) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  if cfg.task != "lm":
    raise ValueError(f"{run_dir} is a task={cfg.task} run; sampling text needs an lm run")
  for key, value in dict(sample_settings or {}).items():
    cfg.sample[key] = value
  model_cfg = model_config(cfg)
  mesh = shd.make_mesh(-1, 1, 1)
  abstract = nnx.eval_shape(lambda: CausalLM(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
  abs_params = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shd.replicated(mesh)),
      nnx.to_pure_dict(abs_params))
  params, _ = restore_params(run_dir, abs_params)
  model = nnx.merge(graphdef, params, nnx.to_pure_dict(rest))
  return sample_text(model, cfg, byte_level=not cfg.data.path.endswith(".bin"), seed=seed)
