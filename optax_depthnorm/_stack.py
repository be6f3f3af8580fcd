"""Stacked layers: `StackedDepth`, the `stack_axis=` argument and per-slice depths.

Flax ``nn.scan``, NNX ``vmap`` and Equinox ``filter_vmap`` keep ``L`` layers in
one leaf of shape ``(L, ...)``. A scanned block runs its sublayers for slice 0,
then for slice 1, and so on, so the slices of the block's sublayers interleave:
with ``blocks/Dense_0`` and ``blocks/Dense_1`` stacked three times, Dense_0 is
at depths (0, 2, 4) and Dense_1 at (1, 3, 5).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Union

from optax_depthnorm import _tree

StackAxis = Union[None, Mapping[str, int], Callable[[str, Any], Union[int, None]]]
NOT_A_LAYER = -1
"""The depth of a leaf that belongs to no layer: every transform passes it through unchanged.

`layer_depths` gives it to leaves that are not parameters (an integer counter, say) and
`infer_depths` to parameters the model never uses (with an `UnusedParamWarning`); a depth
mapping or rule may return it to leave a leaf out.
"""


def as_index(x: Any) -> int | None:
  """`x` as a Python int if it is an integer (not a bool, not a float array)."""
  if isinstance(x, bool):
    return None
  try:
    return operator.index(x)
  except TypeError:
    return None


@dataclasses.dataclass(frozen=True, init=False)
class StackedDepth:
  """The depths of a leaf that holds several layers along one axis (or several).

  Flax ``nn.scan``, NNX ``vmap`` and Equinox ``filter_vmap`` stack ``L`` layers
  in one leaf of shape ``(L, ...)``. In a depth pytree such a leaf is labelled
  with a `StackedDepth` instead of an int: slice ``i`` along `axis` is a layer
  of its own at depth ``depths[i]`` (-1: not a layer). Every transform then
  treats each slice as its own layer (per-slice norms, decay factors, scales
  and flow statistics), vectorized over the axis. Nested scans (Flax
  ``nn.remat_scan(lengths=(2, 3))`` stores six layers as ``(2, 3, ...)``) stack
  along several axes: `axis` is then a tuple and `depths` nested, one level per
  axis. A `StackedDepth` is a pytree leaf: it is static data, like the ints
  beside it.

  Attributes:
    depths: one depth per slice (nested tuples, one level per axis, for a
      tuple `axis`).
    axis: the axis of the leaf that holds the layers, or a tuple of axes.

  Example:
    >>> import optax_depthnorm as odn
    >>> odn.StackedDepth(range(1, 4), axis=0)
    StackedDepth(depths=(1, 2, 3), axis=0)
    >>> odn.StackedDepth([[0, 1, 2], [3, 4, 5]], axis=(0, 1)).shape
    (2, 3)
  """

  depths: tuple[Any, ...]
  axis: int | tuple[int, ...]

  def __init__(self, depths: Iterable[Any], axis: int | tuple[int, ...] = 0) -> None:
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    if not axes or any(as_index(a) is None for a in axes):
      raise TypeError(f"StackedDepth axis must be an int or a tuple of ints, got {axis!r}.")
    values = _nested(depths, len(axes))
    if values is None:
      raise ValueError(
        f"StackedDepth needs one integer depth >= {NOT_A_LAYER} per slice (nested "
        f"{len(axes)} deep, rectangular, for axis={axis!r}), got {depths!r}."
      )
    object.__setattr__(self, "depths", values)
    object.__setattr__(self, "axis", int(axes[0]) if not isinstance(axis, (tuple, list)) else axes)

  @property
  def axes(self) -> tuple[int, ...]:
    """The stack axes, as a tuple."""
    return self.axis if isinstance(self.axis, tuple) else (self.axis,)

  @property
  def shape(self) -> tuple[int, ...]:
    """The number of slices along each stack axis."""
    shape, d = [], self.depths
    for _ in self.axes:
      shape.append(len(d))
      d = d[0]
    return tuple(shape)

  @property
  def flat(self) -> tuple[int, ...]:
    """Every slice's depth, in row-major order over the stack axes."""
    d = self.depths
    for _ in self.axes[1:]:
      d = tuple(x for row in d for x in row)
    return d

  def __len__(self) -> int:
    return len(self.flat)

  def with_axes(self, axes: tuple[int, ...]) -> StackedDepth:
    """The same depths on other axes (as an int for one axis)."""
    return StackedDepth(self.depths, axes if isinstance(self.axis, tuple) else axes[0])

  def with_flat(self, values: Iterable[int]) -> StackedDepth:
    """A stack of the same shape and axes holding `values` (row-major, as `flat`)."""
    return StackedDepth(_reshape(list(values), self.shape), self.axis)

  def map(self, fn: Callable[[int], int]) -> StackedDepth:
    """The same stack with `fn` applied to every depth but -1."""
    return self.with_flat(fn(d) if d != NOT_A_LAYER else d for d in self.flat)

  def text(self) -> str:
    """The depths in short: ``1..12`` for a run, ``1,5,..,45`` otherwise."""
    d = self.flat
    if len(d) > 1 and d == tuple(range(d[0], d[0] + len(d))):
      return f"{d[0]}..{d[-1]}"
    shown = [str(x) if x != NOT_A_LAYER else "-" for x in d]
    return ",".join(shown) if len(d) <= 3 else f"{shown[0]},{shown[1]},..,{shown[-1]}"


def _nested(depths: Any, levels: int) -> tuple[Any, ...] | None:
  """`depths` as nested tuples of ints, `levels` deep and rectangular (None: it is not)."""
  if hasattr(depths, "tolist"):
    depths = depths.tolist()
  try:
    items = list(depths)
  except TypeError:
    return None
  if not items:
    return None
  if levels == 1:
    values = tuple(as_index(d) for d in items)
    return None if any(v is None or v < NOT_A_LAYER for v in values) else values
  rows = [_nested(row, levels - 1) for row in items]
  if any(r is None for r in rows) or len({_shape_of(r, levels - 1) for r in rows}) != 1:
    return None
  return tuple(rows)


def _shape_of(d: tuple[Any, ...], levels: int) -> tuple[int, ...]:
  return (len(d),) + (_shape_of(d[0], levels - 1) if levels > 1 else ())


def _reshape(flat: list[int], shape: tuple[int, ...]) -> Any:
  """Row-major nesting of `flat` into `shape` (flat itself for one axis)."""
  if len(shape) == 1:
    return flat
  step = len(flat) // shape[0]
  return [_reshape(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


Depth = Union[int, StackedDepth]


def valid_depths(label: Depth) -> list[int]:
  """The depths (other than -1) of one leaf's label, an int or a `StackedDepth`."""
  values = label.flat if isinstance(label, StackedDepth) else (label,)
  return [d for d in values if d != NOT_A_LAYER]


def deepest(labels: Iterable[Depth]) -> int:
  """The largest depth among labels (ints or `StackedDepth`), -1 if there is none."""
  return max((d for label in labels for d in valid_depths(label)), default=NOT_A_LAYER)


def reverse_labels(labels: list[Depth]) -> list[Depth]:
  """Depths counted from the output: the deepest layer gets 0."""
  top = max(deepest(labels), 0)
  return [
    label.map(lambda d: top - d)
    if isinstance(label, StackedDepth)
    else (top - label if label != NOT_A_LAYER else label)
    for label in labels
  ]


def check_stack_axis_type(stack_axis: StackAxis) -> None:
  """Raises a TypeError unless `stack_axis` is None, a mapping or a callable."""
  if stack_axis is not None and not isinstance(stack_axis, Mapping) and not callable(stack_axis):
    raise TypeError(
      "stack_axis must be None, a mapping from path prefix to the axis that holds the layers "
      f"(e.g. {{'ScanBlock_0': 0}}), or a callable (path, leaf) -> axis | None; got "
      f"{type(stack_axis).__name__}."
    )


def longest_prefix(rule: Mapping[str, Any], path: str) -> str | None:
  """The key of `rule` that is the longest path prefix of `path` (``''`` matches all)."""
  best = None
  for prefix in rule:
    clean = prefix.strip("/")
    if (path == clean or path.startswith(clean + "/") or not clean) and (
      best is None or len(clean) > len(best.strip("/"))
    ):
      best = prefix
  return best


def _one_axis(stack_axis: StackAxis, name: str, leaf: Any) -> tuple[int | None, Any]:
  """(axis or None, the mapping key that gave it) for one leaf."""
  if isinstance(stack_axis, Mapping):
    key = longest_prefix(stack_axis, name)
    return (None if key is None else stack_axis[key]), key
  return stack_axis(name, leaf), None


def stack_axes(
  stack_axis: StackAxis, names: list[str], leaves: list[Any]
) -> list[tuple[int, Hashable] | None]:
  """The stack axis of each leaf and the scanned block it belongs to (None: not stacked).

  Args:
    stack_axis: None, a mapping from path prefix to axis (longest prefix wins),
      or a callable ``(path, leaf) -> axis | None``.
    names: the ``'/'``-joined path of each leaf.
    leaves: the leaves; one without a shape (`optax.MaskedNode`) is never stacked.

  Returns:
    Per leaf, None or ``(axis, block)``: the non-negative axis and the key of
    the mapping that matched (None for a callable).
  """
  check_stack_axis_type(stack_axis)
  if stack_axis is None:
    return [None] * len(names)
  if isinstance(stack_axis, Mapping):
    used = {longest_prefix(stack_axis, n) for n in names}
    unknown = [k for k in stack_axis if k not in used]
    if unknown:
      raise ValueError(
        f"stack_axis names {unknown!r}, which is no prefix of a leaf's path here "
        f"(paths look like {names[:4]})."
      )
  out: list[tuple[int, Hashable] | None] = []
  for name, leaf in zip(names, leaves):
    shape = getattr(leaf, "shape", None)
    if shape is None or not _tree.is_float_leaf(leaf):
      out.append(None)
      continue
    axis, block = _one_axis(stack_axis, name, leaf)
    if axis is None:
      out.append(None)
      continue
    index, ndim = as_index(axis), len(shape)
    if index is None or not -ndim <= index < ndim:
      raise ValueError(
        f"stack_axis gave axis {axis!r} for the leaf at {name!r} of shape {tuple(shape)}; "
        f"give an int in [-{ndim}, {ndim}) or None."
      )
    out.append((index % ndim, block))
  return out


def stack_group(axis: tuple[int, Hashable], layer: tuple[str, ...]) -> Hashable:
  """The scanned block a stacked leaf belongs to: its `stack_axis` key, else its parent module."""
  return axis[1] if axis[1] is not None else layer[:-1]


def expand_stacks(
  ranks: list[int], layers: list[tuple[str, ...]], leaves: list[Any], axes: list
) -> list[Depth]:
  """Gives each slice of a stacked layer a depth of its own.

  Layers are taken in rank order. A run of stacked layers of one scanned block
  (same `stack_axis` key, or for a callable the same parent module) and the
  same number of slices ``L`` takes ``L * J`` depths for its ``J`` sublayers:
  slice ``i`` of sublayer ``j`` is at ``base + i * J + j``. Every other layer
  takes one depth.

  Args:
    ranks: the rank of each leaf's layer.
    layers: the layer key of each leaf.
    leaves: the leaves (for the stack sizes).
    axes: `stack_axes` of each leaf.

  Returns:
    One int or `StackedDepth` per leaf.
  """
  info: dict[int, tuple[Hashable, int, int] | None] = {}
  for rank, layer, leaf, axis in zip(ranks, layers, leaves, axes):
    if axis is not None:
      info[rank] = (stack_group(axis, layer), leaf.shape[axis[0]], axis[0])
    else:
      info.setdefault(rank, None)
  order = sorted(info)
  runs: list[list[int]] = []
  for rank in order:
    prev = runs[-1][-1] if runs else None
    here = info[rank]
    same = prev is not None and here is not None and info[prev] is not None
    if same and info[prev][:2] == here[:2]:
      runs[-1].append(rank)
    else:
      runs.append([rank])
  place: dict[int, tuple[int, int, int]] = {}  # rank -> (base, stride, slices)
  shift = 0  # extra depths taken by the slices of the stacks before; a rule's gaps stay
  for run in runs:
    slices = info[run[0]][1] if info[run[0]] is not None else 1
    base = run[0] + shift
    for j, rank in enumerate(run):
      place[rank] = (base + j, len(run), slices)
    shift += (slices - 1) * len(run) + (run[0] + len(run) - 1 - run[-1])
  out: list[Depth] = []
  for rank, axis in zip(ranks, axes):
    first, stride, slices = place[rank]
    if axis is None:
      out.append(first)
    else:
      out.append(StackedDepth(range(first, first + stride * slices, stride), axis[0]))
  return out


def check_stacked(label: Depth, leaf: Any, name: str) -> Depth:
  """A `StackedDepth` checked against its leaf's shape, its axes made non-negative."""
  shape = getattr(leaf, "shape", None)
  if not isinstance(label, StackedDepth) or shape is None:
    return label
  ndim = len(shape)
  fits = all(-ndim <= a < ndim for a in label.axes) and len({a % ndim for a in label.axes}) == len(
    label.axes
  )
  if not fits or tuple(shape[a] for a in label.axes) != label.shape:
    raise ValueError(
      f"depths gives {'x'.join(map(str, label.shape))} per-slice depths along axis "
      f"{label.axis} for the leaf at {name!r}, whose shape is {tuple(shape)}; the axis must "
      "hold one slice per depth."
    )
  return label.with_axes(tuple(a % ndim for a in label.axes))
