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
  """The depths of a leaf that holds several layers along one axis.

  Flax ``nn.scan``, NNX ``vmap`` and Equinox ``filter_vmap`` stack ``L`` layers
  in one leaf of shape ``(L, ...)``. In a depth pytree such a leaf is labelled
  with a `StackedDepth` instead of an int: slice ``i`` along `axis` is a layer
  of its own at depth ``depths[i]`` (-1: not a layer). Every transform then
  treats each slice as its own layer (per-slice norms, decay factors, scales
  and flow statistics), vectorized over the axis. A `StackedDepth` is a pytree
  leaf: it is static data, like the ints beside it.

  Attributes:
    depths: one depth per slice.
    axis: the axis of the leaf that holds the layers.

  Example:
    >>> import optax_depthnorm as odn
    >>> odn.StackedDepth(range(1, 4), axis=0)
    StackedDepth(depths=(1, 2, 3), axis=0)
  """

  depths: tuple[int, ...]
  axis: int

  def __init__(self, depths: Iterable[int], axis: int = 0) -> None:
    values = tuple(as_index(d) for d in depths)
    if not values or any(d is None or d < NOT_A_LAYER for d in values):
      raise ValueError(
        f"StackedDepth needs one integer depth >= {NOT_A_LAYER} per slice, got {depths!r}."
      )
    if as_index(axis) is None:
      raise TypeError(f"StackedDepth axis must be an int, got {type(axis).__name__}.")
    object.__setattr__(self, "depths", values)
    object.__setattr__(self, "axis", int(axis))

  def __len__(self) -> int:
    return len(self.depths)

  def map(self, fn: Callable[[int], int]) -> StackedDepth:
    """The same stack with `fn` applied to every depth but -1."""
    return StackedDepth([fn(d) if d != NOT_A_LAYER else d for d in self.depths], self.axis)

  def text(self) -> str:
    """The depths in short: ``1..12`` for a run, ``1,5,..,45`` otherwise."""
    d = self.depths
    if len(d) > 1 and d == tuple(range(d[0], d[0] + len(d))):
      return f"{d[0]}..{d[-1]}"
    shown = [str(x) if x != NOT_A_LAYER else "-" for x in d]
    return ",".join(shown) if len(d) <= 3 else f"{shown[0]},{shown[1]},..,{shown[-1]}"


Depth = Union[int, StackedDepth]


def valid_depths(label: Depth) -> list[int]:
  """The depths (other than -1) of one leaf's label, an int or a `StackedDepth`."""
  values = label.depths if isinstance(label, StackedDepth) else (label,)
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
      block = axis[1] if axis[1] is not None else layer[:-1]
      info[rank] = (block, leaf.shape[axis[0]], axis[0])
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
  """A `StackedDepth` checked against its leaf's shape, its axis made non-negative."""
  shape = getattr(leaf, "shape", None)
  if not isinstance(label, StackedDepth) or shape is None:
    return label
  ndim = len(shape)
  if not -ndim <= label.axis < ndim or shape[label.axis] != len(label):
    raise ValueError(
      f"depths gives {len(label)} per-slice depths along axis {label.axis} for the leaf at "
      f"{name!r}, whose shape is {tuple(shape)}; the axis must hold one slice per depth."
    )
  return label if label.axis >= 0 else StackedDepth(label.depths, label.axis % ndim)
