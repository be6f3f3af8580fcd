"""Every benchmark at full size in one command, its tables written to a folder.

Meant for a session that is lent a GPU (or any accelerator) for a few minutes:
one call fills in the device columns of benchmarks/README.md. Each benchmark
runs in this process, one after the other, its printed Markdown tables going to
``DIR/<name>.md`` (and the terminal) and its numbers to ``DIR/<name>.json``;
``DIR/summary.md`` and ``DIR/summary.json`` list what ran, how long it took,
the machine and the load. A benchmark that fails is recorded and the suite
goes on; once ``--budget-s`` seconds are spent the remaining ones are skipped
(recorded as such), so the suite ends in time (8 minutes by default).

Run from the repository root::

  python3 benchmarks/device_suite.py --out /tmp/gpu_tables            # full size
  python3 benchmarks/device_suite.py --out /tmp/cpu_smoke --quick     # smallest sizes, any CPU
  python3 benchmarks/device_suite.py --out /tmp/x --dry-run           # print the plan only
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (name, module, arguments at full size). Order: the targets first. Ten steps a
# round, so that each round of an `every_k_steps=10` tracker holds one recorded step.
PLAN: tuple[tuple[str, str, tuple[str, ...]], ...] = (
  ("transform_overhead_resnet50", "transform_overhead", ("--variant", "all", "--steps", "10")),
  (
    "transform_overhead_transformer",
    "transform_overhead",
    ("--tree", "transformer", "--steps", "10"),
  ),
  ("bgn_overhead", "bgn_overhead", ()),
  ("scale_train_step", "scale_train_step", ()),
  ("scale_overhead", "scale_overhead", ()),
  ("norm_check_cost", "norm_check_cost", ()),
  ("infer_time", "infer_time", ()),
)
# The transformer tree's tracker rows (the default variants plus these).
TRANSFORMER_EXTRA = (
  "track_gradient_flow(stats=norm|mean_abs|max_abs)+adam",
  "track_gradient_flow(every_k_steps=10)+adam",
)
QUICK = ("--quick", "--rounds", "1", "--steps", "1", "--warmup", "0")


def plan(quick: bool, only: list[str] | None) -> list[tuple[str, str, list[str]]]:
  """(name, module, argv) of each benchmark to run, in order."""
  out = []
  for name, module, argv in PLAN:
    if only and name not in only:
      continue
    argv = list(argv)
    if name == "transform_overhead_transformer":
      argv += [
        "--variant",
        "adam",
        "--variant",
        "layerwise_normalize+depth_decay+adam",
        "--variant",
        "track_gradient_flow+adam",
      ]
      for extra in TRANSFORMER_EXTRA:
        argv += ["--variant", extra]
    if quick:
      if module == "infer_time":
        argv += ["--quick"]
      else:
        argv += list(QUICK)
      if name == "transform_overhead_resnet50":  # all nine variants take minutes to compile
        argv = [a for a in argv if a not in ("--variant", "all")]
    out.append((name, module, argv))
  return out


class _Tee(io.TextIOBase):
  """Writes to several streams."""

  def __init__(self, *streams: Any) -> None:
    self.streams = streams

  def write(self, text: str) -> int:
    for s in self.streams:
      s.write(text)
    return len(text)

  def flush(self) -> None:
    for s in self.streams:
      s.flush()


def _loadavg() -> str | None:
  import os

  return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else None


def run(out: Path, steps: list[tuple[str, str, list[str]]], budget_s: float) -> dict[str, Any]:
  """Runs `steps`, writing each one's tables and numbers under `out`; returns the summary."""
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  summary: dict[str, Any] = {"loadavg_at_start": _loadavg(), "budget_s": budget_s, "runs": []}
  for name, module, argv in steps:
    spent = time.perf_counter() - start
    entry: dict[str, Any] = {"name": name, "argv": [*argv, "--json", str(out / f"{name}.json")]}
    if spent > budget_s:
      entry.update(status="skipped (budget spent)", seconds=0.0)
      summary["runs"].append(entry)
      continue
    t0 = time.perf_counter()
    with (out / f"{name}.md").open("w") as md:
      md.write(f"# {name}\n\n`python3 benchmarks/{module}.py {' '.join(argv)}`\n\n")
      with contextlib.redirect_stdout(_Tee(sys.stdout, md)):
        try:
          importlib.import_module(module).main(entry["argv"])
          entry["status"] = "ok"
        except (Exception, SystemExit) as error:  # record it and go on
          entry["status"] = f"failed: {type(error).__name__}: {error}"
          traceback.print_exc(file=md)
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    summary["runs"].append(entry)
    print(f"[device_suite] {name}: {entry['status']} in {entry['seconds']} s", file=sys.stderr)
  summary["seconds"] = round(time.perf_counter() - start, 1)
  summary["loadavg_at_end"] = _loadavg()
  try:
    from _harness import machine_facts

    summary["machine"] = machine_facts()
  except Exception as error:  # pragma: no cover - only when jax itself is broken
    summary["machine"] = f"unknown ({error})"
  (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  lines = [
    "# Device suite",
    "",
    f"Machine: {summary['machine']}",
    f"Load average at start: {summary['loadavg_at_start']}, at end: {summary['loadavg_at_end']}; "
    f"total {summary['seconds']} s (budget {budget_s:.0f} s).",
    "",
    "| benchmark | status | seconds | tables |",
    "|---|---|---:|---|",
  ]
  for r in summary["runs"]:
    lines.append(f"| {r['name']} | {r['status']} | {r['seconds']} | {r['name']}.md |")
  (out / "summary.md").write_text("\n".join(lines) + "\n")
  return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=Path, required=True, help="folder for the tables")
  parser.add_argument("--quick", action="store_true", help="smallest sizes, 1 round (CPU smoke)")
  parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
  parser.add_argument(
    "--only",
    action="append",
    choices=[name for name, _, _ in PLAN],
    help="run only this benchmark (repeat for several)",
  )
  parser.add_argument(
    "--budget-s", type=float, default=450.0, help="skip what is left after this many seconds"
  )
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  steps = plan(args.quick, args.only)
  if args.dry_run:
    for name, module, rest in steps:
      print(f"{name}: python3 benchmarks/{module}.py {' '.join(rest)}")
    return {"plan": [list(s) for s in steps]}
  return run(args.out, steps, args.budget_s)


if __name__ == "__main__":
  main()
