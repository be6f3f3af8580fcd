"""Gradient-flow plots: `plot_gradient_flow` and `plot_flow_heatmap`.

matplotlib is imported inside the functions only, so importing
`optax_depthnorm` never imports it (install it with the ``plot`` extra).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np

from optax_depthnorm import _report, _track

MAX_NAMED_LAYERS = 16
STAT_LABELS = {
  "norm": "L2 norm",
  "mean_abs": "mean |g|",
  "max_abs": "max |g|",
  "rms": "rms",
  "param_norm": "weight norm",
  "ratio": "norm / weight norm",
}
_STYLES = {"mean_abs": "-", "max_abs": "--", "norm": "-", "rms": "-."}
Reports = Union[_report.FlowReport, Sequence[_report.FlowReport], Mapping[str, _report.FlowReport]]


def _pyplot() -> Any:
  try:
    import matplotlib.pyplot as plt
  except ImportError as error:  # pragma: no cover - matplotlib is in the dev extra
    raise ImportError(
      "plotting needs matplotlib: `pip install 'optax_depthnorm[plot]'`."
    ) from error
  return plt


def _check_stat(stat: str) -> None:
  if not isinstance(stat, str) or stat not in STAT_LABELS:
    raise ValueError(f"stat must be one of {tuple(STAT_LABELS)}, got {stat!r}.")


def _stat_names(stats: str | Sequence[str]) -> tuple[str, ...]:
  """`stats` as a tuple of valid names; a single name is one stat."""
  if isinstance(stats, str):
    stats = (stats,)
  elif not isinstance(stats, Sequence):
    raise TypeError(
      f"stats must be a name or a sequence of names from {tuple(STAT_LABELS)}, got "
      f"{type(stats).__name__}."
    )
  if not stats:
    raise ValueError(f"stats is empty; name at least one of {tuple(STAT_LABELS)}.")
  for stat in stats:
    _check_stat(stat)
  return tuple(stats)


def _history(reports: Sequence[_report.FlowReport], stat: str) -> tuple[Any, Any, Any]:
  """(values, steps, first report) of one-step reports, one row per report, for the heat map."""
  first = reports[0]
  for k, r in enumerate(reports):
    if (r.paths, r.depths) != (first.paths, first.depths):
      raise ValueError(
        f"report {k} has other layers than report 0 ({len(r.paths)} vs {len(first.paths)}: "
        "paths or depths differ); a heat map needs the same layers at every step."
      )
    if np.ndim(r.norm) != 1:
      raise ValueError(
        f"report {k} holds arrays of shape {np.shape(r.norm)} (stacked steps); pass a list "
        "of one-step reports, or the stacked report itself."
      )
    if getattr(r, stat) is None:
      raise ValueError(f"report {k} has no {stat!r}: pass params to gradient_flow.")
  values = np.stack([np.asarray(getattr(r, stat), np.float64) for r in reports])
  steps = [r.step for r in reports]
  known = all(s is not None and np.ndim(s) == 0 for s in steps)
  return values, (np.asarray(steps) if known else None), first


def _runs(reports: Reports, labels: Sequence[str] | None) -> list[tuple[str | None, Any]]:
  """(label, report) pairs; label None for a single unlabelled report."""
  if isinstance(reports, _report.FlowReport):
    runs: list[tuple[str | None, Any]] = [(None, reports)]
  elif isinstance(reports, Mapping):
    runs = [(str(k), v) for k, v in reports.items()]
  elif isinstance(reports, Sequence) and not isinstance(reports, str):
    runs = [(f"run {i}", r) for i, r in enumerate(reports)]
  else:
    raise TypeError(
      "reports must be a FlowReport, a sequence of them or a mapping label -> "
      f"FlowReport; got {type(reports).__name__}."
    )
  if labels is not None:
    if len(labels) != len(runs):
      raise ValueError(f"got {len(labels)} labels for {len(runs)} reports.")
    runs = [(str(label), r) for label, (_, r) in zip(labels, runs)]
  if not runs:
    raise ValueError("no report to plot.")
  for label, report in runs:
    if not isinstance(report, _report.FlowReport):
      raise TypeError(f"{label or 'report'} is a {type(report).__name__}, not a FlowReport.")
    if np.ndim(report.norm) != 1:
      raise ValueError(
        f"{label or 'the report'} holds arrays of shape {np.shape(report.norm)} (stacked "
        "steps); plot one step (`jax.tree.map(lambda x: x[-1], report)`) or use "
        "`plot_flow_heatmap`."
      )
  return runs


def _named(paths: Sequence[str], max_named: int) -> bool:
  """Whether layer names fit and tell more than depth numbers."""
  return 0 < len(paths) <= max_named and not all(p.startswith("layer_") for p in paths)


def _label_layers(
  ax: Any, positions: Sequence[float], paths: Sequence[str], depths: Sequence[int], named: bool
) -> None:
  """Layer names under the columns, or (many layers) about ten depth numbers."""
  if named:
    ax.set_xticks(list(positions), list(paths), rotation=45, ha="right", fontsize="small")
    ax.set_xlabel("layer (input → output)")
    return
  steps = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
  step = next((s for s in steps if len(depths) <= 10 * s), len(depths) // 10 + 1)
  picks = range(0, len(depths), step)
  ax.set_xticks([positions[i] for i in picks], [str(depths[i]) for i in picks])
  ax.set_xlabel("depth (0 = input)")


def plot_gradient_flow(
  reports: Reports,
  ax: Any = None,
  *,
  stats: str | Sequence[str] = ("mean_abs", "max_abs"),
  labels: Sequence[str] | None = None,
  title: str | None = None,
  max_named: int = MAX_NAMED_LAYERS,
) -> Any:
  """Plots per-layer gradient statistics against depth on a log scale.

  The vanishing-gradient report's picture: mean |g| (solid) and max |g| (dashed) of each layer,
  input on the left, one colour per run, several runs overlaid with a legend
  (e.g. plain vs BN vs BGN). Zeros (dead layers) cannot show on a log scale and
  leave gaps. The x axis names the layers when there are at most `max_named`
  of them (and all runs share them), and numbers their depths otherwise.

  Args:
    reports: a `FlowReport` (one step), a sequence of them, or a mapping
      label -> report.
    ax: matplotlib Axes to draw on; a new figure if None.
    stats: which statistics to draw, one line each per run: ``"mean_abs"``,
      ``"max_abs"``, ``"norm"``, ``"rms"``, ``"param_norm"`` or ``"ratio"``
      (a single name, or a sequence of them).
    labels: legend labels for the runs (default: the mapping's keys, or
      ``run 0, run 1, ...``).
    title: the Axes title.
    max_named: name layers on the x axis up to this many layers.

  Returns:
    The matplotlib Axes, with ``len(runs) * len(stats)`` lines.

  Example:
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> grads = {f"Dense_{i}": {"kernel": jnp.full(3, 10.0**-i)} for i in range(4)}
    >>> ax = odn.plot_gradient_flow({"plain": odn.gradient_flow(grads)})
    >>> len(ax.get_lines()), ax.get_yscale()
    (2, 'log')

  References:
    "Analysis of vanishing gradient problem" (the VGG08/VGG38 report), figs. 2-3.
  """
  stats = _stat_names(stats)
  runs = _runs(reports, labels)
  plt = _pyplot()
  if ax is None:
    _, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
  for k, (label, report) in enumerate(runs):
    x = np.asarray(report.depths)
    for stat in stats:
      y = getattr(report, stat)
      if y is None or stat not in report._recorded():
        raise ValueError(
          f"{label or 'the report'} has no {stat!r}: pass params to gradient_flow, or record "
          f"it with `track_gradient_flow(stats=...)` (its default records norm and rms)."
        )
      y = np.asarray(y, np.float64)
      name = STAT_LABELS[stat] if label is None else f"{label}: {STAT_LABELS[stat]}"
      ax.plot(x, np.where(y > 0, y, np.nan), _STYLES.get(stat, ":"), color=f"C{k % 10}", label=name)
  ax.set_yscale("log")
  widest = max((r for _, r in runs), key=lambda r: len(r.depths))
  named = all(r.paths == widest.paths for _, r in runs) and _named(widest.paths, max_named)
  _label_layers(ax, widest.depths, widest.paths, widest.depths, named)
  ax.set_ylabel(f"{runs[0][1].what} per layer (log scale)")
  ax.grid(True, which="major", alpha=0.3)
  ax.legend(fontsize="small")
  if title is not None:
    ax.set_title(title)
  return ax


def _heatmap_rows(source: Any, stat: str, params: Any, depths: Any) -> tuple[Any, Any, Any]:
  """(values (steps, n_layers), steps or None, a report naming the layers) of a heat map."""
  listed = isinstance(source, (list, tuple))
  if listed and source and all(isinstance(r, _report.FlowReport) for r in source):
    return _history(source, stat)
  if isinstance(source, Mapping) and any(
    isinstance(r, _report.FlowReport) for r in source.values()
  ):
    raise TypeError(
      "plot_flow_heatmap draws one run: pass one report (or a list of one-step reports), "
      "not a mapping of runs; draw one heat map per run, with the same `vmin` and `vmax`."
    )
  if listed and any(isinstance(r, _report.FlowReport) for r in source):
    raise TypeError("source mixes FlowReports with other values; pass a list of FlowReports.")
  if isinstance(source, _report.FlowReport):
    report = source
  else:
    report = _track.flow_from_state(source, params, depths=depths, history=True)
  values = getattr(report, stat)
  if values is None or np.ndim(values) != 2:
    raise ValueError(
      f"plot_flow_heatmap needs {stat!r} of shape (steps, n_layers), got "
      f"{None if values is None else np.shape(values)}; pass a history "
      "(`flow_from_state(state, history=True)`, reports stacked by `lax.scan`, or a "
      "list of one-step reports)."
    )
  steps = None if report.step is None else np.asarray(report.step)
  return np.asarray(values, np.float64), steps, report


def plot_flow_heatmap(
  source: Any,
  ax: Any = None,
  *,
  stat: str = "norm",
  params: Any = None,
  depths: Any = None,
  title: str | None = None,
  max_named: int = MAX_NAMED_LAYERS,
  vmin: float | None = None,
  vmax: float | None = None,
) -> Any:
  """Draws a heat map of one per-layer statistic over training steps.

  Rows are steps (oldest at the bottom), columns layers (input on the left),
  colour ``log10`` of the statistic; zeros and non-finite values are blank.

  Args:
    source: a `FlowReport` with arrays of shape ``(steps, n_layers)`` (e.g.
      reports stacked by ``lax.scan``, or ``flow_from_state(..., history=True)``),
      a list of one-step reports of the same layers (one row each, oldest first),
      or an optimizer state holding a `track_gradient_flow` (its recorded
      history is plotted).
    ax: matplotlib Axes to draw on; a new figure if None.
    stat: which statistic, see `plot_gradient_flow`.
    params: with an optimizer state: a tree with the params' paths, to name the
      layers (see `flow_from_state`).
    depths: with an optimizer state: the tracker's `depths`.
    title: the Axes title.
    max_named: name layers on the x axis up to this many layers.
    vmin: the log10 value at the bottom of the colour scale (default: the data's
      minimum); give several heat maps the same `vmin` and `vmax` to compare them.
    vmax: the log10 value at the top of the colour scale.

  Returns:
    The matplotlib Axes (holding one image; a colour bar is added to its figure).

  Example:
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import jax, jax.numpy as jnp
    >>> import optax
    >>> import optax_depthnorm as odn
    >>> params = {"Dense_0": {"w": jnp.ones(2)}, "Dense_1": {"w": jnp.ones(2)}}
    >>> opt = optax.chain(odn.track_gradient_flow(history=8), optax.sgd(0.1))
    >>> state = opt.init(params)
    >>> for _ in range(3):
    ...   _, state = opt.update(params, state, params)
    >>> ax = odn.plot_flow_heatmap(state, params=params)
    >>> ax.images[0].get_array().shape
    (3, 2)
  """
  _check_stat(stat)
  values, steps, report = _heatmap_rows(source, stat, params, depths)
  if values.shape[0] == 0:
    raise ValueError("the history is empty: no update has been recorded yet.")
  plt = _pyplot()
  if ax is None:
    _, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
  logs = np.ma.masked_invalid(np.log10(np.where(values > 0, values, np.nan)))
  image = ax.imshow(
    logs,
    aspect="auto",
    origin="lower",
    interpolation="nearest",
    cmap="viridis",
    vmin=vmin,
    vmax=vmax,
  )
  ax.figure.colorbar(image, ax=ax, label=f"log10 {STAT_LABELS[stat]}")
  steps = np.arange(values.shape[0]) if steps is None else steps
  rows = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 6)).round().astype(int))
  ax.set_yticks(rows, [str(s) for s in steps[rows]])
  ax.set_ylabel("training step")
  named = _named(report.paths, max_named)
  _label_layers(ax, range(len(report.paths)), report.paths, report.depths, named)
  if title is not None:
    ax.set_title(title)
  return ax


def flow_heatmap_image(
  source: Any,
  *,
  stat: str = "norm",
  params: Any = None,
  depths: Any = None,
  title: str | None = None,
  size: tuple[float, float] = (8.0, 4.5),
  dpi: int = 80,
  vmin: float | None = None,
  vmax: float | None = None,
) -> np.ndarray:
  """The heat map of `plot_flow_heatmap` as an RGB image array, for an image summary.

  Drawn off screen on its own matplotlib figure (the Agg canvas; pyplot's
  state is not touched), so it works in a training loop without a display:
  ``writer.add_image("grad_flow", image, step, dataformats="HWC")``
  (tensorboardX), ``wandb.Image(image)``, CLU's ``write_images`` (add a
  leading batch axis).

  Args:
    source: what `plot_flow_heatmap` takes: a `FlowReport` of shape
      ``(steps, n_layers)``, a list of one-step reports, or an optimizer state
      holding a `track_gradient_flow`.
    stat: which statistic, see `plot_gradient_flow`.
    params: with an optimizer state: a tree with the params' paths, to name the layers.
    depths: with an optimizer state: the tracker's `depths`.
    title: the title over the heat map.
    size: the figure's (width, height) in inches.
    dpi: dots per inch: the image is ``size * dpi`` pixels.
    vmin: the log10 value at the bottom of the colour scale, see `plot_flow_heatmap`.
    vmax: the log10 value at the top of the colour scale.

  Returns:
    A ``uint8`` array of shape ``(height, width, 3)``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_depthnorm as odn
    >>> params = {"Dense_0": {"w": jnp.ones(2)}, "Dense_1": {"w": jnp.ones(2)}}
    >>> opt = optax.chain(odn.track_gradient_flow(history=8), optax.sgd(0.1))
    >>> state = opt.init(params)
    >>> for _ in range(3):
    ...   _, state = opt.update(params, state, params)
    >>> image = odn.flow_heatmap_image(state, params=params, size=(4, 3), dpi=50)
    >>> image.shape, image.dtype
    ((150, 200, 3), dtype('uint8'))
  """
  _pyplot()  # the install hint, if matplotlib is missing
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  figure = Figure(figsize=size, dpi=dpi, layout="constrained")
  canvas = FigureCanvasAgg(figure)
  ax = figure.add_subplot()
  plot_flow_heatmap(
    source, ax, stat=stat, params=params, depths=depths, title=title, vmin=vmin, vmax=vmax
  )
  canvas.draw()
  return np.array(canvas.buffer_rgba())[..., :3]
