"""Shared timing harness for the benchmarks: compiled runners, alternation, reports.

Timings of many small kernels swing a lot from run to run, so every benchmark
here compiles all its variants first, then alternates them for many rounds and
reports medians with min/max and ratios to a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import optax

# The repository root goes last on the path, so an installed copy or one on
# PYTHONPATH (e.g. a patched copy under test) is the one measured.
sys.path.append(str(Path(__file__).resolve().parent.parent))

import optax_depthnorm as odn


class Runner:
  """One variant: its compiled step and its own (donated) carry.

  `step(carry, *inputs) -> carry` is jitted with the carry donated, so the
  variant's params and state are updated in place and memory does not double.
  """

  def __init__(self, step: Callable[..., Any], carry: Any, *inputs: Any) -> None:
    start = time.perf_counter()
    with warnings.catch_warnings():
      # Inside jit dict keys come back sorted, so default depth labels may warn
      # that linen names cannot tell the layer order; that changes the factors'
      # values, not the work done, so it does not matter for timing.
      warnings.simplefilter("ignore", odn.DepthOrderWarning)
      lowered = jax.jit(step, donate_argnums=0).lower(carry, *inputs)
    self.hlo_ops = _count_hlo_ops(lowered.as_text())
    self.step = lowered.compile()
    self.compile_s = time.perf_counter() - start
    self.kernels = _count_kernels(self.step.as_text())
    self.carry = carry
    self.inputs = inputs

  def run(self, steps: int) -> float:
    """Runs `steps` consecutive steps; returns the mean seconds per step."""
    jax.block_until_ready(self.carry)
    start = time.perf_counter()
    for _ in range(steps):
      self.carry = self.step(self.carry, *self.inputs)
    jax.block_until_ready(self.carry)
    return (time.perf_counter() - start) / steps


def alternate(runners: dict[str, Runner], rounds: int, steps: int) -> dict[str, list[float]]:
  """Per-step seconds of each runner in each round; the order rotates every round."""
  names = list(runners)
  times: dict[str, list[float]] = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      times[name].append(runners[name].run(steps))
  return times


def _count_hlo_ops(stablehlo: str) -> int:
  """Number of StableHLO ops in the lowered (pre-optimization) module."""
  return sum(1 for line in stablehlo.splitlines() if "= stablehlo." in line)


_NOT_KERNELS = ("parameter(", "constant(", "tuple(", "get-tuple-element(", "bitcast(")


def _count_kernels(hlo: str) -> int:
  """Instructions of the optimized module's entry computation, less the free ones.

  After XLA's fusion each such instruction (a fusion, a custom call, a copy) is
  one kernel launched per step: a proxy for the per-step launch overhead.
  """
  entry = hlo[hlo.find("\nENTRY") :].split("\n}\n", 1)[0]
  return sum(
    1
    for line in entry.splitlines()[1:]
    if " = " in line and not any(f" {op}" in line for op in _NOT_KERNELS)
  )


# --------------------------------------------------------------------------- #
# Machine facts and reporting.


def _cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_facts() -> dict[str, Any]:
  """The machine and library versions a timing was taken with."""
  device = jax.devices()[0]
  affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  return {
    "backend": jax.default_backend(),
    "device_kind": device.device_kind,
    "device_count": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "cpus_usable": affinity,
    "cpu_model": _cpu_model(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
    "optax": optax.__version__,
    "optax_depthnorm": f"{odn.__version__} ({Path(odn.__file__).parent})",
    "loadavg_at_start": _loadavg(),
  }


def _loadavg() -> str | None:
  """The 1/5/15-minute load averages: a busy shared machine skews every timing."""
  if not hasattr(os, "getloadavg"):
    return None
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def summarize(times: dict[str, list[float]], baseline: str) -> list[dict[str, Any]]:
  """Median, min, max per variant; ratios to the baseline's median and per round.

  ``paired_ratio`` is the median over rounds of (this variant's time / the
  baseline's time in the same round): rounds are short and adjacent, so it is
  less sensitive than the ratio of medians to load that drifts during the run.
  """
  base = statistics.median(times[baseline])
  return [
    {
      "variant": name,
      "median_ms": 1e3 * statistics.median(ts),
      "min_ms": 1e3 * min(ts),
      "max_ms": 1e3 * max(ts),
      "ratio": statistics.median(ts) / base,
      "paired_ratio": statistics.median(t / b for t, b in zip(ts, times[baseline], strict=True)),
    }
    for name, ts in times.items()
  ]


def markdown_table(rows: list[dict[str, Any]], runners: dict[str, Runner], baseline: str) -> str:
  """The results as a Markdown table, ratios against `baseline`."""
  lines = [
    f"| variant | median ms/step | min | max | median / {baseline} median "
    "| per-round ratio (median) | XLA kernels | StableHLO ops | trace+compile s |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    runner = runners[r["variant"]]
    lines.append(
      f"| {r['variant']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['max_ms']:.2f} "
      f"| {r['ratio']:.3f}x | {r['paired_ratio']:.3f}x "
      f"| {runner.kernels} | {runner.hlo_ops} | {runner.compile_s:.1f} |"
    )
  return "\n".join(lines)


def add_timing_args(parser: argparse.ArgumentParser) -> None:
  """The options every benchmark shares."""
  parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15)")
  parser.add_argument("--steps", type=int, default=5, help="consecutive steps per round")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
  parser.add_argument("--quick", action="store_true", help="smoke test: small and 3 rounds")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", type=Path, default=None, help="write the results here")


def check_timing_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Fills the default number of rounds and rejects impossible counts."""
  if args.rounds is None:
    args.rounds = 3 if args.quick else 15
  if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
    parser.error("--rounds and --steps must be >= 1, --warmup >= 0")


def compile_all(makers: dict[str, Callable[[], Runner]], warmup: int) -> dict[str, Runner]:
  """Builds and compiles every runner, then runs its warm-up steps."""
  runners = {}
  for name, make in makers.items():
    runners[name] = make()
    for _ in range(warmup):
      runners[name].run(1)
    print(f"compiled {name} in {runners[name].compile_s:.1f} s")
  return runners


def print_machine(facts: dict[str, Any]) -> None:
  print("## Machine")
  for key, value in facts.items():
    print(f"- {key}: {value}")


def report(
  runners: dict[str, Runner], times: dict[str, list[float]], facts: dict[str, Any]
) -> list[dict[str, Any]]:
  """Prints the results table and the load averages; returns the rows."""
  baseline = next(iter(runners))
  rows = summarize(times, baseline=baseline)
  print("\n## Results\n")
  print(markdown_table(rows, runners, baseline))
  facts["loadavg_at_end"] = _loadavg()
  print(f"\nload average at start: {facts['loadavg_at_start']}, at end: {facts['loadavg_at_end']}")
  return rows


def measure(
  makers: dict[str, Callable[[], Runner]], args: argparse.Namespace, facts: dict[str, Any]
) -> dict[str, Any]:
  """Compiles, alternates and reports every variant: rows, kernel counts, every round's times."""
  runners = compile_all(makers, args.warmup)
  times = alternate(runners, args.rounds, args.steps)
  return {
    "results": report(runners, times, facts),
    "compile_s": {name: r.compile_s for name, r in runners.items()},
    "stablehlo_ops": {name: r.hlo_ops for name, r in runners.items()},
    "xla_kernels": {name: r.kernels for name, r in runners.items()},
    "round_times_ms": {name: [1e3 * t for t in ts] for name, ts in times.items()},
  }


def write_json(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
  """Writes `result` to ``--json`` when given; returns it."""
  if args.json is not None:
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
  return result


def run_all(
  makers: dict[str, Callable[[], Runner]],
  args: argparse.Namespace,
  facts: dict[str, Any],
  setup: dict[str, Any],
) -> dict[str, Any]:
  """Compiles, alternates and reports every variant; writes ``--json`` if asked.

  Args:
    makers: variant name -> a function building its `Runner`, baseline first.
    args: the parsed timing options (see `add_timing_args`).
    facts: `machine_facts()`, printed already.
    setup: what was measured (network or tree sizes), stored in the result.

  Returns:
    The result: machine, setup, config, per-variant rows and every round's times.
  """
  result = {
    "machine": facts,
    "setup": setup,
    "config": {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup},
    **measure(makers, args, facts),
  }
  return write_json(args, result)
