"""`optax-depthnorm`: one subcommand per reproduced experiment.

  optax-depthnorm bgn-table --quick            # minutes on a CPU
  optax-depthnorm depth-decay                  # the "cpu" preset (default)
  optax-depthnorm scale-norm --preset full     # the paper's settings (a GPU)
  optax-depthnorm vgg-flow --set epochs=2 --seeds 0,1 --out results/

Each writes ``OUT/<experiment>/results.json``, ``results.md`` and PNG figures.
Presets: ``quick`` (a smoke run), ``cpu`` (the largest that runs on a laptop
CPU in minutes, the default) and ``full`` (the paper's scale). ``--set
field=value`` overrides any setting of the preset (``--list`` shows them).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from types import ModuleType
from typing import Any

from optax_depthnorm.experiments import (
  bgn_table,
  combinations,
  data,
  depth_decay,
  depth_decay_nets,
  report,
  scale_norm,
  train,
  vgg_flow,
)

EXPERIMENTS: dict[str, ModuleType] = {
  m.NAME: m for m in (bgn_table, combinations, depth_decay, depth_decay_nets, scale_norm, vgg_flow)
}


def _parse_value(field: dataclasses.Field, text: str) -> Any:
  kind = str(field.type)
  scalar = {"int": int, "float": float, "str": str}
  try:
    if kind.startswith("tuple["):
      inner = kind[len("tuple[") :].split(",")[0].strip()
      return tuple(scalar[inner](v) for v in text.split(",") if v.strip())
    if kind == "bool":
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
      return text.lower() in ("true", "1")
    return scalar[kind](text)
  except (KeyError, ValueError) as error:
    raise ValueError(f"cannot read {text!r} as {kind} for {field.name!r}") from error


def configure(module: ModuleType, preset: str, sets: list[str], args: argparse.Namespace) -> Any:
  """The preset's config with --set / --seeds / --epochs overrides applied."""
  cfg = module.PRESETS[preset]
  fields = {f.name: f for f in dataclasses.fields(cfg)}
  changes: dict[str, Any] = {}
  for item in sets:
    name, sep, text = item.partition("=")
    if not sep or name not in fields:
      raise ValueError(
        f"--set wants field=value with a field of {module.NAME}: {', '.join(fields)}; got {item!r}."
      )
    changes[name] = _parse_value(fields[name], text)
  if args.seeds is not None:
    changes["seeds"] = _parse_value(fields["seeds"], args.seeds)
  if args.epochs is not None:
    changes["epochs"] = args.epochs
  return dataclasses.replace(cfg, **changes)


def build_parser() -> argparse.ArgumentParser:
  """The argument parser: one subcommand per experiment."""
  parser = argparse.ArgumentParser(
    prog="optax-depthnorm",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
  for name, module in EXPERIMENTS.items():
    p = sub.add_parser(
      name,
      help=module.TITLE,
      description=module.__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
      "--preset",
      choices=list(module.PRESETS),
      default="cpu",
      help="scale of the run (default: cpu)",
    )
    p.add_argument(
      "--quick",
      action="store_const",
      const="quick",
      dest="preset",
      help="same as --preset quick: a minutes-long smoke run",
    )
    p.add_argument("--out", default="results", help="output folder (default: results/)")
    p.add_argument(
      "--data-dir",
      default=None,
      help="an MNIST-format folder (default: Fashion-MNIST"
      " from /usr/share/datasets/fashion-mnist, else a generated data set)",
    )
    p.add_argument("--generated", action="store_true", help="use the generated data set")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--epochs", type=_positive, default=None, help="training epochs")
    p.add_argument(
      "--set",
      action="append",
      default=[],
      metavar="FIELD=VALUE",
      help="override a setting of the preset (repeatable)",
    )
    p.add_argument("--list", action="store_true", help="print the settings and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
  return parser


def _positive(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
  """Runs one experiment from the command line; returns its results (None for --list)."""
  parser = build_parser()
  args = parser.parse_args(argv)
  module = EXPERIMENTS[args.experiment]
  try:
    cfg = configure(module, args.preset, args.set, args)
  except ValueError as error:
    parser.error(str(error))
  if args.list:
    for field in dataclasses.fields(cfg):
      print(f"{field.name} = {getattr(cfg, field.name)!r}")
    return None
  command = "optax-depthnorm " + shlex.join(sys.argv[1:] if argv is None else argv)
  start = time.perf_counter()
  dataset = data.load_dataset(args.data_dir, generated=args.generated)
  writer = report.Writer(args.out, module.NAME)
  results = module.run(cfg, dataset, writer, quiet=args.quiet)
  tables = results.pop("tables")
  notes = results.pop("notes", [])
  wall = time.perf_counter() - start
  speed = train.speed_probe(**({"depth": 8, "steps": 20} if args.preset == "quick" else {}))
  notes = [*notes, _speed_note(speed)]
  results = {
    "experiment": module.NAME,
    "command": command,
    "preset": args.preset,
    "setup": dataclasses.asdict(cfg),
    "data": dataset.describe(),
    "machine": report.machine(),
    "wall_s": wall,
    "harness_speed": speed,
    **results,
  }
  results = writer.finish(title=module.TITLE, results=results, tables=tables, notes=notes)
  for caption, table in tables:
    print(f"\n## {caption}\n\n{table.rstrip()}")
  print(
    f"\n{module.NAME}: {wall:.0f} s; results in {writer.dir}/ (results.md, results.json, "
    f"{len(writer.figures)} figures)"
  )
  return results


def _speed_note(speed: dict[str, Any]) -> str:
  return (
    f"harness speed on this machine: {speed['steps_per_s']:.0f} Adam steps/s per run, "
    f"{speed['runs']} runs of a {speed['depth']}-layer width-64 ReLU MLP vmapped, batch "
    f"{speed['batch_size']}, one epoch of {speed['steps']} steps as one compiled scan"
    + (" (the quick preset probes an 8-layer MLP)" if speed["depth"] != 90 else "")
  )


def entry() -> None:
  """The ``optax-depthnorm`` command: `main`, printing the tables, not the results dict.

  A console script passes what its function returns to `sys.exit`, which
  would print the whole results dict; this returns None.
  """
  main()


if __name__ == "__main__":  # pragma: no cover
  main()
