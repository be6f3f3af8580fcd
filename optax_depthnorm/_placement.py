"""From the uses the jaxpr walk records to one label per parameter leaf.

A leaf sliced by scans gets a depth per slice; one consumed by a layer gets
the depth of its first use. A leaf used only elementwise (a bias, a norm's
scale) acts on a value between two layers, the one that made it (``d - 1``)
and the one that reads it (``d``): it joins the one inside its own module
scope, looking outward from its parent module, so a Dense's bias joins its
kernel, a BatchNorm after a conv the conv, and a pre-LayerNorm the block it
opens.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import NamedTuple

from optax_depthnorm._graph import Use
from optax_depthnorm._stack import NOT_A_LAYER, Depth, StackedDepth


class Unit(NamedTuple):
  """One layer-like unit: a whole leaf, or one slice of a stacked leaf."""

  leaf: int
  slice: int | None  # flat (row-major) slice index, None for a whole leaf
  stack: Hashable | None  # the scans that sliced it
  consumed: list[int]  # depths at which a layer consumed it
  elementwise: list[int]  # depths of the values it acted on elementwise


def _slicing(uses: Sequence[Use], shape: tuple[int, ...]) -> tuple | None:
  """(axes, scans) if every use of a leaf slices it the same way along distinct axes."""
  ways = {tuple((a, s) for a, _, s in u.tag.sliced) for u in uses}
  if len(ways) != 1:
    return None
  way = ways.pop()
  axes = tuple(a for a, _ in way)
  if not way or None in axes or len(set(axes)) != len(axes) or max(axes) >= len(shape):
    return None
  return axes, tuple(s for _, s in way)


def units(uses: Sequence[Use], shape: tuple[int, ...], leaf: int) -> tuple[list[Unit], tuple]:
  """The units of one leaf from its uses, and its stack axes (``()``: not stacked)."""
  how = _slicing(uses, shape) if uses else None
  if how is None:
    consumed = [u.depth for u in uses if not u.elementwise]
    return [Unit(leaf, None, None, consumed, [u.depth for u in uses if u.elementwise])], ()
  axes, scans = how
  sizes = tuple(shape[a] for a in axes)
  per = {k: Unit(leaf, k, scans, [], []) for k in range(math.prod(sizes))}
  for u in uses:
    index = tuple(i for _, i, _ in u.tag.sliced)
    if all(0 <= i < n for i, n in zip(index, sizes)):
      k = 0
      for i, n in zip(index, sizes):
        k = k * n + i
      (per[k].elementwise if u.elementwise else per[k].consumed).append(u.depth)
  return list(per.values()), axes


class Scopes:
  """The depths of the consuming units inside each module scope (a path prefix)."""

  def __init__(self, placed: Sequence[tuple[tuple[str, ...], Unit, int]]) -> None:
    self.inside: dict[tuple[str, ...], list[tuple[Hashable, int | None, int]]] = {}
    for parts, unit, depth in placed:
      for k in range(len(parts)):
        self.inside.setdefault(parts[:k], []).append((unit.stack, unit.slice, depth))

  def place(self, parts: tuple[str, ...], unit: Unit, value: int) -> int:
    """The depth of an elementwise-only unit acting on a value at depth `value`."""
    for k in range(len(parts) - 1, -1, -1):
      depths = {
        d
        for stack, s, d in self.inside.get(parts[:k], ())
        if unit.stack is None or stack != unit.stack or s == unit.slice  # its own slice only
      }
      for candidate in (value - 1, value):
        if candidate in depths:
          return max(candidate, 0)
    return max(value - 1, 0)


def _first_use(unit: Unit) -> int:
  """A consumed unit's depth: its first use (an elementwise use joins the layer before)."""
  return min(unit.consumed + [max(e - 1, 0) for e in unit.elementwise])


def layer_labels(
  parts: Sequence[tuple[str, ...]], leaf_units: Sequence[list[Unit]]
) -> tuple[list[list[int]], list[list[int]]]:
  """Per leaf, per unit: the layer-granularity depth and the position (see `_blocks.Leaf`)."""
  placed = [(parts[u.leaf], u, _first_use(u)) for us in leaf_units for u in us if u.consumed]
  scopes = Scopes(placed)
  depths, positions = [], []
  for us in leaf_units:
    d, p = [], []
    for u in us:
      if not u.consumed and not u.elementwise:
        d.append(NOT_A_LAYER)
        p.append(NOT_A_LAYER)
        continue
      if u.consumed:
        d.append(_first_use(u))
      else:
        d.append(scopes.place(parts[u.leaf], u, min(u.elementwise)))
      p.append(min([2 * c for c in u.consumed] + [2 * e - 1 for e in u.elementwise]))
    depths.append(d)
    positions.append(p)
  return depths, positions


def as_label(values: list[int], axes: tuple[int, ...], shape: tuple[int, ...]) -> Depth:
  """An int for a whole leaf, a `StackedDepth` on `axes` for a stacked one."""
  if not axes:
    return values[0]
  zeros = _zeros(tuple(shape[a] for a in axes))
  return StackedDepth(zeros, axes if len(axes) > 1 else axes[0]).with_flat(values)


def _zeros(sizes: tuple[int, ...]) -> list:
  return [0] * sizes[0] if len(sizes) == 1 else [_zeros(sizes[1:]) for _ in range(sizes[0])]
