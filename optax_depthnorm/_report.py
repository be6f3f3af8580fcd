"""Gradient-flow reports: `FlowReport`, the rows of a labelled tree and `gradient_flow`.

One number per layer (L2 norm, mean |g|, max |g|, RMS) shows where gradients
vanish or explode on their way down a deep network. A row is a depth group, as
in every transform of the library: the leaves (and slices) of one depth.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_depthnorm import _depths, _layers, _reduce, _tree

STATS = ("norm", "mean_abs", "max_abs", "rms", "param_norm", "ratio")
TRACED_MSG = (
  "{what} needs concrete values, but the report holds traced arrays (inside `jit`); "
  "return the report from the jitted function and call {what} outside."
)


# ----------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True, eq=False)
class FlowReport:
  """Per-layer gradient statistics, ordered by depth (0 at the input side).

  A pytree: the arrays are its leaves and the paths, depths and sizes static
  data, so a report can be returned from `jit` or stacked by `lax.scan` (then
  every array gains a leading step axis). ``print(report)`` shows a table.

  Attributes:
    paths: one name per layer: the path of its module (``'Dense_3'``).
    depths: the depth of each layer.
    sizes: number of elements of each layer (-1 where unknown).
    what: what was measured, for labels (``'gradient'``).
    norm: L2 norm of each layer's gradient, all its leaves together.
    mean_abs: mean |g| over the layer's elements.
    max_abs: max |g|.
    rms: root mean square, ``norm / sqrt(size)``.
    param_norm: L2 norm of the layer's parameters (``None`` without params).
    ratio: ``norm / param_norm``: the update/weight ratio when the report is
      taken of the updates (``None`` without params).
    step: the training step each row was taken at (from the tracker), or None.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> grads = {f"Dense_{i}": {"kernel": jnp.full(4, 10.0 ** (3 * i - 6))} for i in range(3)}
    >>> report = odn.gradient_flow(grads)
    >>> report.paths, report.depths, report.sizes
    (('Dense_0', 'Dense_1', 'Dense_2'), (0, 1, 2), (4, 4, 4))
    >>> print(report.norm)
    [2.e-06 2.e-03 2.e+00]
    >>> print(report)
    depth  path     size  norm       mean|g|    max|g|     rms
    0      Dense_0  4     2.000e-06  1.000e-06  1.000e-06  1.000e-06
    1      Dense_1  4     2.000e-03  1.000e-03  1.000e-03  1.000e-03
    2      Dense_2  4     2.000e+00  1.000e+00  1.000e+00  1.000e+00
  """

  paths: tuple[str, ...]
  depths: tuple[int, ...]
  sizes: tuple[int, ...]
  what: str
  norm: jax.Array
  mean_abs: jax.Array
  max_abs: jax.Array
  rms: jax.Array
  param_norm: jax.Array | None = None
  ratio: jax.Array | None = None
  step: jax.Array | None = None

  def _check_one_step(self, name: str, verb: str) -> None:
    """Raises unless the report holds concrete values of one step (for `name`)."""
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(self)):
      raise TypeError(TRACED_MSG.format(what=f"FlowReport.{name}()"))
    if np.ndim(self.norm) != 1:
      raise ValueError(
        f"{name}() {verb} one step, but this report holds arrays of shape "
        f"{np.shape(self.norm)} (stacked steps); pick one first: "
        "`jax.tree.map(lambda x: x[-1], report)`."
      )

  def table(self) -> str:
    """The report as a text table, one layer per line."""
    self._check_one_step("table", "shows")
    columns = [
      ("depth", [str(d) for d in self.depths]),
      ("path", list(self.paths)),
      ("size", [str(s) if s >= 0 else "-" for s in self.sizes]),
    ]
    for field in self._recorded():
      values = np.asarray(getattr(self, field), np.float64)
      columns.append((_HEADERS[field], [f"{v:.3e}" for v in values]))
    rows = list(zip(*(values for _, values in columns)))
    header = tuple(name for name, _ in columns)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)

  def __str__(self) -> str:
    try:
      return self.table()
    except (TypeError, ValueError):
      return repr(self)

  def _recorded(self) -> list[str]:
    """The statistics the report holds, in `STATS` order.

    ``norm`` and ``rms`` always; the others unless None or all NaN (not
    recorded: no params, or a tracker built with fewer ``stats``).
    """
    out = ["norm"]
    for field in STATS[1:]:
      v = getattr(self, field)
      if field == "rms" or (v is not None and not _all_nan(v, empty=field in STATS[4:])):
        out.append(field)
    return out

  def scalars(self, prefix: str = "grad_flow") -> dict[str, float]:
    """The report as a flat dict of floats, one entry per layer and statistic.

    The form ``wandb.log``, CLU's ``metric_writers`` (``write_scalars``) and
    tensorboardX's ``add_scalar`` take: keys ``"<prefix>/<layer>/<stat>"``
    (``"grad_flow/Dense_0/norm"``), statistics as `FlowReport` names them, in
    depth order. Statistics the report does not hold (``param_norm`` and
    ``ratio`` without params, those a tracker was not asked for) are left
    out; a NaN or inf of a recorded statistic stays (it shows the problem).
    Layers of the same name (a layer called twice) get ``@<depth>``.

    Args:
      prefix: the first part of every key; ``""`` for keys ``"<layer>/<stat>"``.

    Returns:
      A dict from key to Python float (needs concrete values: call it outside
      `jit`, on a report of one step).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_depthnorm as odn
      >>> grads = {"Dense_0": {"w": jnp.array([3.0, -4.0])}, "Dense_1": {"w": jnp.ones(4)}}
      >>> scalars = odn.gradient_flow(grads).scalars()
      >>> scalars["grad_flow/Dense_0/norm"], scalars["grad_flow/Dense_1/rms"]
      (5.0, 1.0)
      >>> sorted(odn.gradient_flow(grads).scalars(prefix=""))[:4]
      ['Dense_0/max_abs', 'Dense_0/mean_abs', 'Dense_0/norm', 'Dense_0/rms']
    """
    self._check_one_step("scalars", "logs")
    if not isinstance(prefix, str):
      raise TypeError(f"prefix must be a str, got {type(prefix).__name__}.")
    counts: dict[str, int] = {}
    for path in self.paths:
      counts[path] = counts.get(path, 0) + 1
    names = [p if counts[p] == 1 else f"{p}@{d}" for p, d in zip(self.paths, self.depths)]
    head = f"{prefix.rstrip('/')}/" if prefix else ""
    fields = self._recorded()
    values = {f: np.asarray(getattr(self, f), np.float64) for f in fields}
    rows = enumerate(names)
    return {f"{head}{name}/{f}": float(values[f][i]) for i, name in rows for f in fields}


def _all_nan(values: Any, empty: bool) -> bool:
  """Whether every value is NaN (`empty`: what an empty array counts as)."""
  values = np.asarray(values)
  return empty if values.size == 0 else bool(np.all(np.isnan(values)))


_HEADERS = {
  "norm": "norm",
  "mean_abs": "mean|g|",
  "max_abs": "max|g|",
  "rms": "rms",
  "param_norm": "norm(w)",
  "ratio": "norm/norm(w)",
}
jax.tree_util.register_dataclass(
  FlowReport,
  data_fields=["norm", "mean_abs", "max_abs", "rms", "param_norm", "ratio", "step"],
  meta_fields=["paths", "depths", "sizes", "what"],
)


# ----------------------------------------------------------------------------- layers


class Rows(NamedTuple):
  """The layers of a labelled tree as rows of a report, ordered by depth.

  ``ids`` gives the row of every slice of every floating leaf (in the order of
  `_layers.concat`; -1: in no row), ``sizes`` the number of elements of each row.
  """

  depths: tuple[int, ...]
  names: tuple[str, ...]
  sizes: tuple[int, ...]
  ids: np.ndarray


def _row_name(names: list[str]) -> str:
  names = list(dict.fromkeys(names))
  return "+".join(names) if len(names) <= 3 else f"{names[0]}+{len(names) - 1} more"


def rows(tree: Any, stored: dict[str, Any]) -> Rows:
  """The rows of `tree` from concrete depths by path (NumPy or concrete arrays).

  Every stored depth has a row, a masked-out layer's too (size 0, in its
  place, named by its leaves). Reads paths and shapes only (works on
  `jax.ShapeDtypeStruct`s).
  """
  _, _, found = _layers.read(tree, stored)
  floating = {f.name for f in found}
  order = tuple(sorted({int(v) for a in stored.values() for v in np.reshape(a, -1) if v >= 0}))
  row = {depth: k for k, depth in enumerate(order)}
  names: dict[int, list[str]] = {k: [] for k in range(len(order))}
  sizes = np.zeros(len(order), np.int64)
  for path, x in _tree.flatten(tree)[0]:
    name = _tree.path_name(path)
    if name not in stored:
      continue
    a, layer = np.asarray(stored[name]), _depths.layer_name(path)
    per = math.prod(x.shape) // a.size if name in floating else 0
    for k, v in enumerate(np.reshape(a, -1)):
      if v >= 0:
        names[row[int(v)]].append(layer if not a.ndim else f"{layer}[{k}]")
        sizes[row[int(v)]] += per
  d = np.concatenate([np.reshape(np.asarray(f.depth), -1) for f in found]) if found else []
  ids = np.asarray([row.get(int(v), -1) for v in d], np.int32)
  return Rows(order, tuple(_row_name(names[k]) for k in names), tuple(map(int, sizes)), ids)


def _float_dtype(leaves: Sequence[Any]) -> Any:
  return _tree.acc_dtype(*(x.dtype for x in leaves if _tree.is_float_leaf(x)))


def layer_stats(
  tree: Any, stored: Any, ids: Any, n: int, exact_zero: bool = True
) -> tuple[_reduce.Sums, jax.Array]:
  """`_reduce.Sums` and safe L2 norms of the `n` rows of `tree` (depths by path, ids per slice).

  `exact_zero`: see `_reduce.l2` (False reads only the sums of squares when the
  max |x| and sum |x| are not used).
  """
  leaves, _, found = _layers.read(tree, stored)
  xs = [leaves[f.index] for f in found]
  return _layers.layer_stats(xs, found, jnp.asarray(ids), n, exact_zero=exact_zero)


def stats(totals: _reduce.Sums, norm: jax.Array) -> list[jax.Array]:
  """(L2 norm, mean |g|, max |g|, RMS) of each row."""
  size = jnp.maximum(totals.size, 1)
  return [norm, totals.abs / size, totals.max, norm / jnp.sqrt(size)]


def ratio(norm: jax.Array, param_norm: jax.Array) -> jax.Array:
  """``norm / param_norm``; inf where the params are zero and the norm is not, 0 for 0/0."""
  positive = param_norm > 0
  quotient = norm / jnp.where(positive, param_norm, 1)
  return jnp.where(positive, quotient, jnp.where(norm > 0, jnp.inf, 0))


def param_shapes(tree: Any) -> dict[str, tuple[int, ...] | None]:
  """The parameter leaves of `tree` by path, in tree order: their shapes (None: masked)."""
  return {
    _tree.path_name(path): (None if getattr(x, "shape", None) is None else tuple(x.shape))
    for path, x in _tree.flatten(tree)[0]
    if _tree.is_param_leaf(x)
  }


def check_same_tree(
  tree: Any, reference: dict[str, tuple[int, ...] | None], names: tuple[str, str], hint: str
) -> None:
  """Raises a ValueError naming the first path where `tree` and `reference` differ.

  `reference` is `param_shapes` of the other tree (a shape of None is not
  compared); `names` name the two trees in the message, `hint` ends it.
  """
  a, b = names
  got = param_shapes(tree)
  problems = []
  for name, shape in reference.items():
    if name not in got:
      problems.append(f"they have no leaf {name!r} (which {b} have)")
    elif None not in (shape, got[name]) and shape != got[name]:
      problems.append(f"their {name!r} has shape {got[name]}, not {shape} as in {b}")
  problems += [f"they have a leaf {name!r} that {b} lack" for name in got if name not in reference]
  if problems:
    more = f" (and {len(problems) - 1} more paths differ)" if len(problems) > 1 else ""
    what = "paths and shapes" if any(v is not None for v in reference.values()) else "paths"
    raise ValueError(f"{a} must have the {what} of {b}, but {problems[0]}{more}; {hint}")


def gradient_flow(
  grads: Any, params: Any = None, depths: Any = None, *, stack_axis: Any = None
) -> FlowReport:
  r"""Per-layer statistics of a gradient (or update) pytree, ordered by depth.

  For each layer $l$ (the leaves of one depth, e.g. a Dense kernel and bias)
  with $n_l$ elements $g_i$:

  $$
  \|g_l\|_2 = \sqrt{\textstyle\sum_i g_i^2}, \quad
  \overline{|g_l|} = \tfrac{1}{n_l} \textstyle\sum_i |g_i|, \quad
  \max_i |g_i|, \quad
  \mathrm{rms}_l = \|g_l\|_2 / \sqrt{n_l}
  $$

  and, with `params`, the weight norm $\|w_l\|$ and the ratio
  $\|g_l\| / \|w_l\|$ (taken of the updates an optimizer applies, it is the
  update/weight ratio; inf where $w_l = 0$ and $g_l$ is not, 0 for 0/0).

  Statistics are computed in float32 (float64 for float64 leaves) without
  overflow or underflow (a vanished gradient of 1e-25 per entry has its true
  norm); complex leaves count by their moduli |g|. Pure JAX: works inside
  `jit` (arrays out, no host sync). Leaves that are not floating arrays are
  left out; a layer with no floating leaf (masked
  out) has size 0 and zero statistics.

  Args:
    grads: a gradient or update pytree (linen, NNX, Equinox, dicts).
    params: optional parameters with the same paths and shapes, for the weight
      norms (a ValueError names the first path where they differ).
    depths: what defines the layers: ``None`` (the order of `grads`, see
      `layer_depths`; gradients from `jax.grad` have sorted keys, so pass the
      depths of the params when the names do not tell the order), a rule, an
      NNX module, or a pytree from `layer_depths` or `infer_depths`. Each slice
      of a `StackedDepth` leaf is a layer of its own (named ``path[i]``).
    stack_axis: leaves that stack layers, see `layer_depths`.

  Returns:
    A `FlowReport`: one entry per layer, ordered by depth; print it for a table.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> grads = {"Dense_0": {"kernel": jnp.array([3.0, -4.0])},
    ...          "Dense_1": {"kernel": jnp.array([0.0, 1e-9])}}
    >>> print(odn.gradient_flow(grads))
    depth  path     size  norm       mean|g|    max|g|     rms
    0      Dense_0  2     5.000e+00  3.500e+00  4.000e+00  3.536e+00
    1      Dense_1  2     1.000e-09  5.000e-10  1.000e-09  7.071e-10

  References:
    "Analysis of vanishing gradient problem" (the VGG08/VGG38 report), sec. 2:
    mean |grad| per layer, figs. 2-3. Cabana & Lago-Fernández, "Backward
    Gradient Normalization in Deep Neural Networks", 2021, sec. 3.
  """
  stored = _layers.resolve(grads, depths, stack_axis)
  table = rows(grads, stored)
  dtype = _float_dtype(jax.tree.leaves(grads))
  norm, mean_abs, max_abs, rms = stats(*layer_stats(grads, stored, table.ids, len(table.depths)))
  param_norm = ratio_ = None
  if params is not None:
    hint = "pass the params the gradient was taken of (or none)."
    check_same_tree(params, param_shapes(grads), ("params", "grads"), hint)
    param_norm = layer_stats(params, stored, table.ids, len(table.depths))[1]
    ratio_ = ratio(norm, param_norm)
  values = [v if v is None else v.astype(dtype) for v in (norm, mean_abs, max_abs, rms)]
  extra = [v if v is None else v.astype(dtype) for v in (param_norm, ratio_)]
  return FlowReport(table.names, table.depths, table.sizes, "gradient", *values, *extra)
