"""Top device ops of a `jax.profiler` trace: total time, count and share of the step.

    python benchmarks/trace_summary.py DIR [--top 20] [--by op|kernel] [--module NAME]

DIR is what `jax.profiler.trace(DIR)` wrote (or a `*.trace.json.gz` file); the newest
`DIR/plugins/profile/*/*.trace.json.gz` is read. That file is Chrome trace-event JSON. On a GPU
the device timelines are processes named "/device:GPU:<n>" with one thread per CUDA stream
("Stream #<id>(Compute,...)": one event per kernel or copy, its HLO op in `args.hlo_op` when
XLA could attribute it) and bookkeeping threads; a TPU trace has an "XLA Ops" thread (one event
per HLO op) and an "XLA Modules" thread (one event per program run). On the CPU backend there
is no device process: the ops are the host events that carry an `hlo_op` argument, and every
program run has its own `run_id`.

`--by op` (default) groups by HLO op (the "XLA Ops" events, else the kernels' `hlo_op`, else
their names); `--by kernel` groups the stream events by kernel name. Only events of one program
are kept: `--module` (a substring of its name) or, by default, the one with the most op time
(events that name no program are always kept). The step time is the program's run time divided
by its runs, from the "XLA Modules" line, else from the spans of its run_ids, else the span of
all its events divided by `--steps` (gaps between steps count as step time).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os

MODULE_THREAD, OPS_THREAD = "XLA Modules", "XLA Ops"
# Host-side bookkeeping lines of a device process that are not kernels.
NON_KERNEL_THREADS = (MODULE_THREAD, OPS_THREAD, "Steps", "TensorFlow Ops", "Source code",
                      "TensorFlow Name Scope", "Framework Ops", "Framework Name Scope")


def latest_trace(path: str) -> str:
  """The newest `*.trace.json.gz` at or under `path`."""
  if os.path.isfile(path):
    return path
  found = glob.glob(os.path.join(path, "plugins", "profile", "*", "*.trace.json.gz"))
  found += glob.glob(os.path.join(path, "*.trace.json.gz"))
  if not found:
    raise ValueError(f"trace_summary: no *.trace.json.gz under {path!r} (expected what "
                     "jax.profiler.trace writes: DIR/plugins/profile/<run>/<host>.trace.json.gz)")
  return max(found, key=os.path.getmtime)


def load_trace(path: str) -> dict:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    return json.load(f)


def _names(events: list[dict]) -> tuple[dict, dict]:
  """(pid → process name, (pid, tid) → thread name) from the metadata events."""
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") != "M":
      continue
    if e.get("name") == "process_name":
      procs[e["pid"]] = e.get("args", {}).get("name", "")
    elif e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
  return procs, threads


def device_events(trace: dict, by: str = "op") -> tuple[list[dict], list[dict], str]:
  """(op or kernel events, each with its group key in "key"; program-run events; source)."""
  if by not in ("op", "kernel"):
    raise ValueError(f"trace_summary: by must be 'op' or 'kernel', got {by!r}")
  events = [e for e in trace.get("traceEvents", []) if isinstance(e, dict)]
  procs, threads = _names(events)
  devices = {pid for pid, name in procs.items() if name.startswith("/device:")}
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  keyed = lambda evs, key: [dict(e, key=key(e)) for e in evs]
  if devices:
    thread = lambda e: threads.get((e["pid"], e.get("tid")), "")
    on_device = [e for e in complete if e["pid"] in devices]
    modules = [e for e in on_device if thread(e) == MODULE_THREAD]
    if by == "op" and any(thread(e) == OPS_THREAD for e in on_device):
      ops = [e for e in on_device if thread(e) == OPS_THREAD]
      return keyed(ops, lambda e: e["name"]), modules, "device XLA Ops line"
    kernels = [e for e in on_device if thread(e) not in NON_KERNEL_THREADS]
    if by == "op":
      return (keyed(kernels, lambda e: e.get("args", {}).get("hlo_op") or e["name"]), modules,
              "device stream events grouped by their HLO op")
    return keyed(kernels, lambda e: e["name"]), modules, "device stream kernels"
  ops = [e for e in complete if "hlo_op" in e.get("args", {})
         and not e["name"].startswith("end: ")]
  return keyed(ops, lambda e: e["name"]), [], "host events with an hlo_op (CPU backend)"


def _module_of(e: dict) -> str:
  return e.get("args", {}).get("hlo_module", "")


def _runs(ops: list[dict], modules: list[dict], module: str, steps: int | None):
  """(number of runs, total run time in µs) of the program `module` (module docstring)."""
  runs = [e for e in modules if module and module in e.get("name", "") + _module_of(e)]
  if runs:
    return len(runs), sum(e["dur"] for e in runs)
  spans = collections.defaultdict(lambda: [float("inf"), float("-inf")])
  for e in ops:
    span = spans[e.get("args", {}).get("run_id")]
    span[0], span[1] = min(span[0], e["ts"]), max(span[1], e["ts"] + e["dur"])
  if None in spans:  # events without a run_id: one span over all of them
    start = min(a for a, _ in spans.values())
    end = max(b for _, b in spans.values())
    return steps or 1, end - start
  return len(spans), sum(b - a for a, b in spans.values())


def summarise(path: str, top: int = 20, by: str = "op", module: str | None = None,
              steps: int | None = None) -> dict:
  """Aggregate the device events of one program by op (or kernel) name.

  Returns {"module", "source", "steps", "step_us", "busy_us", "rows": [{"name", "count",
  "total_us", "per_step_us", "percent_of_step"}, ...] (largest total first, `top` of them)}.
  `steps` is the number of runs when the trace itself does not tell them apart.
  """
  ops, modules, source = device_events(load_trace(path), by)
  if not ops:
    raise ValueError(f"trace_summary: {path} holds no device op events ({source})")
  per_module = collections.Counter()
  for e in ops:
    per_module[_module_of(e)] += e["dur"]
  if module is None:
    module = per_module.most_common(1)[0][0]
  elif not any(module in m for m in per_module):
    raise ValueError(f"trace_summary: no module matching {module!r}; modules: "
                     f"{sorted(per_module)}")
  ops = [e for e in ops if module in _module_of(e) or not _module_of(e)]
  runs, run_us = _runs(ops, modules, module, steps)

  totals, counts = collections.Counter(), collections.Counter()
  for e in ops:
    totals[e["key"]] += e["dur"]
    counts[e["key"]] += 1
  rows = [{"name": name, "count": counts[name], "total_us": total,
           "per_step_us": total / runs, "percent_of_step": 100.0 * total / run_us}
          for name, total in totals.most_common(top)]
  return {"module": module, "source": source, "steps": runs, "step_us": run_us / runs,
          "busy_us": sum(totals.values()) / runs, "rows": rows}


def format_table(summary: dict) -> str:
  """The summary as a markdown table, preceded by one line on the program and its step."""
  head = (f"{summary['module'] or '(unnamed program)'}: {summary['steps']} runs, "
          f"{summary['step_us'] / 1e3:.2f} ms per run, ops busy {summary['busy_us'] / 1e3:.2f} "
          f"ms per run ({summary['source']})")
  lines = [head, "", "| name | count/run | ms/run | % of run |", "|---|---|---|---|"]
  for r in summary["rows"]:
    name = r["name"] if len(r["name"]) <= 80 else r["name"][:77] + "..."
    lines.append(f"| `{name}` | {r['count'] / summary['steps']:g} | "
                 f"{r['per_step_us'] / 1e3:.3f} | {r['percent_of_step']:.1f} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("path", help="the jax.profiler.trace directory or a *.trace.json.gz file")
  p.add_argument("--top", type=int, default=20)
  p.add_argument("--by", choices=("op", "kernel"), default="op")
  p.add_argument("--module", help="substring of the program's name (default: the busiest)")
  p.add_argument("--steps", type=int, help="runs traced, where the trace does not tell them")
  args = p.parse_args(argv)
  summary = summarise(latest_trace(args.path), args.top, args.by, args.module, args.steps)
  print(format_table(summary))
  return summary


if __name__ == "__main__":
  main()
