"""Gradient-flow diagnosis: `diagnose` flags dead, vanishing and exploding layers."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from optax_depthnorm import _tree
from optax_depthnorm._report import STATS, TRACED_MSG, FlowReport

KINDS = ("dead", "vanishing", "exploding", "nonfinite")
DEAD_MSG = (
  "the gradient is exactly zero{at}; common and intended at init below a zero-initialized "
  "layer (a zero-init head, a ResNet block's zero-init last BatchNorm scale), which passes "
  "no gradient down until its own weights move; a real problem if still zero after the "
  "first few updates (a layer that never moves: frozen, cut off from the loss, or ReLUs "
  "off for every input)"
)
NOT_A_REPORT_MSG = (
  "diagnose takes one FlowReport (from `odn.gradient_flow(grads)`, `odn.flow_from_state"
  "(opt_state)` or `odn.activation_gradient_norms`), got {what}; for a gradient pytree "
  "call `odn.diagnose(odn.gradient_flow(grads))`."
)


class Flag(NamedTuple):
  """One problem `diagnose` found: what, where, and why (one line).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> grads = {f"Dense_{i}": {"kernel": jnp.full(4, 10.0 ** (3 * i - 6))} for i in range(3)}
    >>> flag = odn.diagnose(odn.gradient_flow(grads))[0]
    >>> flag.kind, flag.depth, flag.path
    ('vanishing', 0, 'Dense_0')
    >>> print(flag)  # doctest: +ELLIPSIS
    vanishing at depth 0 (Dense_0): rms 1.00e-06 is 1.0e-06 x the largest above it ...
  """

  kind: str  # one of KINDS
  depth: int
  path: str
  reason: str

  def __str__(self) -> str:
    return f"{self.kind} at depth {self.depth} ({self.path}): {self.reason}"


def _concrete(report: FlowReport, field: str) -> np.ndarray:
  value = getattr(report, field)
  if isinstance(value, jax.core.Tracer):
    raise TypeError(TRACED_MSG.format(what="diagnose"))
  value = np.asarray(value, np.float64)
  if value.ndim != 1:
    raise ValueError(
      f"diagnose reads one step, but the report's {field} has shape {value.shape}; pick "
      "one step first: `jax.tree.map(lambda x: x[-1], report)`."
    )
  return value


def _check_report(report: Any) -> int | None:
  """Raises a clear error unless `report` is one diagnosable step; returns its step (or None)."""
  if not isinstance(report, FlowReport):
    what = "an empty dict" if isinstance(report, dict) and not report else type(report).__name__
    if isinstance(report, (list, tuple)) and any(isinstance(r, FlowReport) for r in report):
      what = f"a {type(report).__name__} of reports (diagnose each one)"
    raise TypeError(NOT_A_REPORT_MSG.format(what=what))
  step = report.step
  if step is None or isinstance(step, jax.core.Tracer) or np.ndim(step) != 0:
    return None  # stacked steps and traced values are refused by `_concrete`
  step = int(step)
  if step < 0:
    raise ValueError(
      "the report holds no step yet (step -1: the tracker has seen no update, its "
      "statistics are the zeros of `init`); diagnose it after the first `update`."
    )
  return step


def _check_thresholds(stat: str, thresholds: dict[str, float]) -> None:
  if stat not in STATS[:4]:
    raise ValueError(f"stat must be one of {STATS[:4]}, got {stat!r}.")
  for name, value in thresholds.items():
    if not (_tree.is_concrete_number(value) and value > 0):
      raise ValueError(f"{name} must be a positive number, got {value!r}.")
  if thresholds["vanish_ratio"] >= 1 or thresholds["explode_ratio"] <= 1:
    raise ValueError(
      f"need vanish_ratio < 1 < explode_ratio, got {thresholds['vanish_ratio']!r} and "
      f"{thresholds['explode_ratio']!r}."
    )
  if thresholds["floor"] >= thresholds["ceiling"]:
    raise ValueError(
      f"need floor < ceiling, got {thresholds['floor']!r} and {thresholds['ceiling']!r}."
    )


def _flag(report: FlowReport, i: int, values: np.ndarray, max_abs: np.ndarray, t: dict) -> Any:
  """The kind and reason of layer i's problem, or None."""
  name, value = t["stat"], values[i]
  if not np.isfinite(max_abs[i]):
    return "nonfinite", f"the gradient holds inf or nan (max|g| = {max_abs[i]})"
  if max_abs[i] == 0:
    return "dead", DEAD_MSG.format(at="" if t["step"] is None else f" at step {t['step']}")
  finite = [
    (values[j], j)
    for j in range(i + 1, len(values))
    if report.sizes[j] != 0 and np.isfinite(values[j]) and values[j] > 0
  ]
  if not np.isfinite(value) or value > t["ceiling"]:
    return "exploding", f"{name} {value:.2e} is above the ceiling {t['ceiling']:.0e}"
  if value < t["floor"]:
    return "vanishing", f"{name} {value:.2e} is below the floor {t['floor']:.0e}"
  if finite:
    top, j = max(finite)
    if value < t["vanish_ratio"] * top:
      return "vanishing", (
        f"{name} {value:.2e} is {value / top:.1e} x the largest above it "
        f"({top:.2e} at depth {report.depths[j]}; threshold {t['vanish_ratio']:.0e})"
      )
    low, j = min(finite)
    if value > t["explode_ratio"] * low:
      return "exploding", (
        f"{name} {value:.2e} is {value / low:.1e} x the smallest above it "
        f"({low:.2e} at depth {report.depths[j]}; threshold {t['explode_ratio']:.0e})"
      )
  return None


def diagnose(
  report: FlowReport,
  *,
  stat: str = "rms",
  vanish_ratio: float = 1e-3,
  explode_ratio: float = 1e3,
  floor: float = 1e-8,
  ceiling: float = 10.0,
) -> list[Flag]:
  r"""Flags dead, vanishing and exploding layers in a gradient-flow report.

  With ``s_d`` the chosen statistic of the layer at depth ``d`` and "above" the
  layers between it and the output (larger depth, where backpropagation
  comes from), a layer is

  $$
  \text{dead:}\ \max|g_d| = 0, \qquad
  \text{vanishing:}\ s_d < \text{floor} \ \text{or}\
    s_d < r_v \max_{d' > d} s_{d'}, \qquad
  \text{exploding:}\ s_d > \text{ceiling} \ \text{or}\
    s_d > r_e \min_{d' > d} s_{d'}
  $$

  (the min over nonzero finite ``s``), and ``nonfinite`` where the gradient
  holds inf or nan. Comparing with the layers *above* (not only the next one)
  catches the slow, compounding decay of a deep sigmoid stack, whose
  neighbouring layers differ by a factor of ~4 only. The defaults:

  - ``stat="rms"``: root mean square per element, so that layers of very
    different sizes (a classifier head, a wide hidden layer) compare fairly.
  - ``vanish_ratio=1e-3``, ``explode_ratio=1e3``: three orders of magnitude
    from the layers above. A well-initialized net stays within ~10x.
  - ``floor=1e-8``: per-element gradients below it are below Adam's default
    ``eps`` (so Adam's step shrinks with them) and, times any learning rate
    up to 1, below the float32 resolution of a weight of size ~0.1: the layer
    effectively stops learning.
  - ``ceiling=10``: for a loss of order 1 (a mean over the batch), per-element
    gradients above it move a weight of size ~0.1 by more than its own size
    at an SGD learning rate of 0.01. (An over-scaled ReLU net hits it at every
    layer: its weight gradients stay level across depth, since growing
    pre-activation gradients meet shrinking inputs, Cabana & Lago-Fernández, sec. 3.1.)

  Floor and ceiling are in the unit of `stat`; set them for a loss of unusual
  scale. Layers of size 0 (masked out) are skipped. Depths must count from the
  input (the default labels, not ``reverse=True``).

  A ``dead`` flag at init is often intended: a zero-initialized layer (big_vision's
  zero-init head, the zero-init last BatchNorm scale of each block of Flax's
  ResNet) passes no gradient to the layers below it until its own weights move,
  so those layers are exactly zero at step 0; the flag's reason says so (and
  names the step when the report has one). A layer still exactly zero after
  the first few updates never moves: that is the real problem.

  Args:
    report: a one-step `FlowReport` (from `gradient_flow`, `flow_from_state`
      or `activation_gradient_norms`), with concrete values.
    stat: the statistic compared: ``"rms"``, ``"norm"``, ``"mean_abs"`` or
      ``"max_abs"``.
    vanish_ratio: relative threshold r_v < 1 for vanishing.
    explode_ratio: relative threshold r_e > 1 for exploding.
    floor: absolute threshold for vanishing.
    ceiling: absolute threshold for exploding.

  Returns:
    A list of `Flag` (kind, depth, path, one-line reason), ordered by depth;
    empty when every layer looks healthy.

  Raises:
    TypeError: `report` is not a `FlowReport` (a gradient pytree, a list of
      reports), or holds traced values.
    ValueError: a report of stacked steps, a tracker's report before its first
      update (step -1), or invalid thresholds.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> grads = {f"Dense_{i}": {"kernel": jnp.full(4, s)}
    ...          for i, s in enumerate([1e-9, 0.0, 2e-7, 1e-3, 1e-2])}
    >>> for flag in odn.diagnose(odn.gradient_flow(grads)):  # doctest: +ELLIPSIS
    ...   print(flag)
    vanishing at depth 0 (Dense_0): rms 1.00e-09 is below the floor 1e-08
    dead at depth 1 (Dense_1): the gradient is exactly zero; common and intended at init ...
    vanishing at depth 2 (Dense_2): rms 2.00e-07 is 2.0e-05 x the largest above it
    (1.00e-02 at depth 4; threshold 1e-03)

  References:
    "Analysis of vanishing gradient problem" (the VGG08/VGG38 report), sec. 2
    (mean |grad| "approaches zero" below a layer: VGG38).
    Cabana & Lago-Fernández 2021, sec. 3 (exponential decay of the
    gradient norms with depth).
  """
  thresholds = {
    "vanish_ratio": vanish_ratio,
    "explode_ratio": explode_ratio,
    "floor": floor,
    "ceiling": ceiling,
  }
  step = _check_report(report)
  _check_thresholds(stat, thresholds)
  values, max_abs = _concrete(report, stat), _concrete(report, "max_abs")
  if stat not in report._recorded():
    raise ValueError(
      f"the report holds no {stat!r} (all NaN); compare a statistic it holds, or record it: "
      f"`track_gradient_flow(stats=({stat!r},))`."
    )
  if "max_abs" not in report._recorded():  # a tracker without it: the norm tells the same
    max_abs = _concrete(report, "norm")  # (0 only for zeros, inf or nan with any inf or nan)
  flags = []
  for i in range(len(values)):
    if report.sizes[i] == 0:
      continue
    found = _flag(report, i, values, max_abs, {**thresholds, "stat": stat, "step": step})
    if found is not None:
      flags.append(Flag(found[0], report.depths[i], report.paths[i], found[1]))
  return flags
