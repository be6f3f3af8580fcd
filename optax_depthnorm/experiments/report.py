"""Writing results: JSON, a Markdown table and PNG figures in one folder per experiment."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _plain(x: Any) -> Any:
  """JSON-ready copy: arrays to lists, NaN / inf to None, numpy scalars to Python."""
  if isinstance(x, dict):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, np.ndarray):
    return _plain(x.tolist())
  if isinstance(x, (np.integer, np.bool_)):
    return x.item()
  if isinstance(x, (float, np.floating)):
    x = float(x)
    return x if math.isfinite(x) else None
  return x


def machine() -> dict[str, Any]:
  """Where the run happened: platform, CPU count, JAX backend and devices, versions."""
  import jax
  import optax

  from optax_depthnorm import __version__

  return {
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count(),
    "python": sys.version.split()[0],
    "jax": jax.__version__,
    "optax": optax.__version__,
    "optax_depthnorm": __version__,
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
  }


def fmt_mean_std(values: Sequence[float], digits: int = 3) -> str:
  """Mean ± sample standard deviation over runs (``± 0`` for one run).

  Example:
    >>> fmt_mean_std([0.94, 0.95, 0.96])
    '0.950 ± 0.010'
  """
  values = np.asarray(values, np.float64)
  if values.size == 0 or not np.any(np.isfinite(values)):
    return "nan"
  std = float(np.nanstd(values, ddof=1)) if np.sum(np.isfinite(values)) > 1 else 0.0
  return f"{float(np.nanmean(values)):.{digits}f} ± {std:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub Markdown table; a ``|`` in a cell is escaped, so it stays in its cell.

  Example:
    >>> print(markdown_table(["depth", "mean|g|"], [[30, 0.9]]), end="")
    | depth | mean\\|g\\| |
    | --- | --- |
    | 30 | 0.9 |
  """
  headers = [str(h).replace("|", "\\|") for h in headers]
  cells = [[str(c).replace("|", "\\|") for c in row] for row in rows]
  for row in cells:
    if len(row) != len(headers):
      raise ValueError(f"a row has {len(row)} cells for {len(headers)} headers: {row}")
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells]) + "\n"


class Writer:
  """Collects one experiment's outputs into ``out/<name>/``.

  ``results.json`` holds the settings, the machine, wall times and every
  number; ``results.md`` the tables with a header saying what ran; figures are
  PNG files beside them.
  """

  def __init__(self, out: str | os.PathLike, name: str) -> None:
    self.dir = Path(out) / name
    self.dir.mkdir(parents=True, exist_ok=True)
    self.name = name
    self.figures: list[str] = []

  def figure(self, fig: Any, filename: str) -> Path:
    """Saves a matplotlib figure as PNG and closes it."""
    import matplotlib.pyplot as plt

    path = self.dir / filename
    fig.savefig(path, dpi=110)
    plt.close(fig)
    self.figures.append(filename)
    return path

  def finish(
    self,
    *,
    title: str,
    results: dict[str, Any],
    tables: Sequence[tuple[str, str]],
    notes: Sequence[str] = (),
  ) -> dict[str, Any]:
    """Writes results.json and results.md; returns the JSON object."""
    results = {**results, "figures": list(self.figures), "written": _now()}
    with open(self.dir / "results.json", "w") as f:
      json.dump(_plain(results), f, indent=1, allow_nan=False)
      f.write("\n")
    lines = [f"# {title}", ""]
    setup = results.get("setup", {})
    lines.append(f"- command: `{results.get('command', '')}`")
    lines.append(
      f"- preset: `{results.get('preset', '')}`; settings: `{json.dumps(_plain(setup))}`"
    )
    data = results.get("data", {})
    label = " **(GENERATED data: not comparable with the paper)**" if data.get("generated") else ""
    lines.append(f"- data: {data.get('name')} ({data.get('source')}){label}")
    m = results.get("machine", {})
    lines.append(
      f"- machine: {m.get('processor')}, {m.get('cpu_count')} CPUs, JAX {m.get('jax')} "
      f"on {m.get('backend')}; wall time {results.get('wall_s', 0):.0f} s"
    )
    lines += [f"- {note}" for note in notes]
    for caption, table in tables:
      lines += ["", f"## {caption}", "", table.rstrip()]
    if self.figures:
      lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in self.figures]
    with open(self.dir / "results.md", "w") as f:
      f.write("\n".join(lines) + "\n")
    return results


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def pyplot() -> Any:
  """matplotlib.pyplot with the non-interactive Agg backend."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt
