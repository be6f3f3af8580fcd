"""The layer map: depths resolved once at `init`, kept in state, read at every step.

A transform's `init` labels the tree it is given (the tree that still knows
the layer order: an unjitted ``model.init`` dict, an Equinox module, depths
the user passed) and stores one int32 array per parameter leaf, keyed by the
leaf's ``'/'``-joined path: shape ``()`` for a leaf that is one layer, and a
shape that broadcasts against the leaf (``(L, 1, 1)``) for a leaf that stacks
``L`` layers. `update` reads those arrays by path, so the labels never depend
on the order keys come back in, and they travel with the state (checkpoints,
`jit`, sharding). docs/design.md says why.

The per-layer numbers (norms, statistics) go through `_reduce`: one read of
each leaf gives its (per-slice) `Sums`, which a segment sum gathers into layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_depthnorm import _depths, _reduce, _tree
from optax_depthnorm._stack import NOT_A_LAYER, StackedDepth

Depths = Any  # dict[str, jax.Array]: the depth of each parameter leaf, by path

MISMATCH_MSG = (
  "the tree given to `update` is not the one given to `init`: {what}. A transform "
  "resolves each leaf's depth at `init` and keeps it in its state by path; init it "
  "on the params it will update (same paths, e.g. `tx.init(params)` with the params "
  "you train)."
)


def depth_array(label: _depths.Depth, ndim: int) -> np.ndarray:
  """A leaf's label as int32: a scalar, or per-slice depths shaped to broadcast."""
  if not isinstance(label, StackedDepth):
    return np.asarray(label, np.int32)
  # A leaf hidden by `optax.masked` (`MaskedNode`) has no shape: give the depths
  # just enough axes to hold the stack axis.
  ndim = max([ndim, *(a + 1 if a >= 0 else -a for a in label.axes)])
  shape = [1] * ndim
  for a, n in zip(label.axes, label.shape):
    shape[a] = n
  axes = [a % ndim for a in label.axes]  # nested in `axes` order: put them in leaf order
  values = np.transpose(np.asarray(label.depths, np.int32), np.argsort(axes))
  return np.reshape(values, shape)


def resolve(tree: Any, depths: Any, stack_axis: Any = None) -> dict[str, np.ndarray]:
  """The depth of every parameter leaf of `tree`, by path, as int32 NumPy arrays.

  Args:
    tree: a parameter tree (values unused: `jax.ShapeDtypeStruct`s work).
    depths: the `depths=` argument of a transform, see `_depths.leaf_depths`.
    stack_axis: the `stack_axis=` argument.

  Returns:
    A dict from each parameter leaf's path to its depth array.
  """
  flat = _tree.flatten(tree)[0]
  labels = _depths.leaf_depths(tree, depths, stack_axis)
  out: dict[str, np.ndarray] = {}
  for (path, x), label in zip(flat, labels):
    if not _tree.is_param_leaf(x):
      continue
    name = _tree.path_name(path)
    if name in out:
      raise ValueError(
        f"two leaves share the path {name!r} once joined with '/'; rename one key "
        "(a key that holds '/' reads as two levels)."
      )
    out[name] = depth_array(label, len(getattr(x, "shape", ())))
  return out


def init_depths(tree: Any, depths: Any, stack_axis: Any = None) -> tuple[Depths, dict]:
  """`resolve` as the state field (int32 arrays), and as NumPy arrays for checks.

  A tree with no leaves at all (``optax.tree.map_params`` calls `init` on such
  a placeholder) gets an empty int32 array, a leaf that any state matches.
  """
  if not _tree.flatten(tree)[0]:
    return jnp.zeros((0,), jnp.int32), {}
  resolved = resolve(tree, depths, stack_axis)
  return {name: jnp.asarray(d) for name, d in resolved.items()}, resolved


def concrete(stored: Depths) -> dict[str, np.ndarray]:
  """Stored depths as NumPy arrays (from a state outside `jit`); {} for the placeholder."""
  return {k: np.asarray(v) for k, v in stored.items()} if isinstance(stored, Mapping) else {}


class Leaf(NamedTuple):
  """One floating leaf of an update tree and its depth array."""

  index: int  # position among the flattened leaves
  name: str
  depth: Any  # int32 array: shape (), or broadcasting against the leaf


def read(tree: Any, stored: Depths) -> tuple[list[Any], Any, list[Leaf]]:
  """Flattens `tree` and pairs each floating leaf with its stored depth.

  Returns:
    The leaves, the treedef and a `Leaf` per floating leaf. Raises a
    ValueError naming the paths if `tree` has other parameter leaves than the
    tree the depths were stored for.
  """
  flat, treedef = _tree.flatten(tree)
  table = stored if isinstance(stored, Mapping) else {}
  names = [_tree.path_name(p) for p, _ in flat]
  params = [n for n, (_, x) in zip(names, flat) if _tree.is_param_leaf(x)]
  missing = [n for n in params if n not in table]
  extra = sorted(set(table) - set(params))
  if missing or extra:
    what = ", ".join(
      part
      for part in (
        f"{len(missing)} leaves it has no depth for ({missing[:4]})" if missing else "",
        f"{len(extra)} leaves missing ({extra[:4]})" if extra else "",
      )
      if part
    )
    raise ValueError(MISMATCH_MSG.format(what=what))
  found = []
  for i, (name, (_, x)) in enumerate(zip(names, flat)):
    if not _tree.is_float_leaf(x):
      continue
    d = table[name]  # NumPy (labels resolved now) or a jax array (from a state)
    if not _broadcasts(np.shape(d), x.shape):
      what = f"{name!r} has shape {x.shape}, its depths {np.shape(d)}"
      raise ValueError(MISMATCH_MSG.format(what=what))
    found.append(Leaf(i, name, d))
  return [x for _, x in flat], treedef, found


def _broadcasts(depth: tuple[int, ...], shape: tuple[int, ...]) -> bool:
  """Whether a depth array of this shape labels a leaf of `shape` (scalar, or per slice)."""
  return not depth or (len(depth) == len(shape) and all(d in (1, n) for d, n in zip(depth, shape)))


def deepest(stored: Depths) -> jax.Array:
  """The largest stored depth (0 if none), over every leaf, masked ones included."""
  values = [jnp.reshape(v, (-1,)) for v in (stored.values() if isinstance(stored, Mapping) else ())]
  return jnp.maximum(jnp.max(jnp.concatenate(values), initial=0) if values else 0, 0)


def keep_axes(depth: Any) -> tuple[int, ...]:
  """The stack axes of a leaf: the axes its depth array does not broadcast."""
  return tuple(a for a, n in enumerate(np.shape(depth)) if n > 1)


def leaf_sums(x: jax.Array, depth: Any) -> _reduce.Sums:
  """`_reduce.Sums` of one leaf, per slice: shaped like its depth array."""
  parts = _reduce.sums(x, keep_axes(depth))
  return _reduce.Sums(*(jnp.reshape(v, np.shape(depth)) for v in parts))


def concat(values: list[Any]) -> jax.Array:
  """Per-leaf arrays (scalars or per-slice) as one flat vector."""
  return jnp.concatenate([jnp.reshape(v, (-1,)) for v in values]) if values else jnp.zeros(0)


def split(vector: jax.Array, like: list[Any]) -> list[jax.Array]:
  """Undoes `concat`: pieces of `vector` shaped like the arrays of `like`."""
  out, start = [], 0
  for d in like:
    size = int(np.prod(np.shape(d)))
    out.append(jnp.reshape(vector[start : start + size], np.shape(d)))
    start += size
  return out


def dense_ranks(d: jax.Array) -> jax.Array:
  """The rank of each depth among the distinct depths >= 0; -1 stays -1.

  Depths 0, 3, 3, 7 give 0, 1, 1, 2: the row of each piece in a per-layer
  table. Works on traced depths (a sort and a search over a short vector).
  """
  s = jnp.sort(d)
  new = jnp.concatenate([s[:1] >= 0, (s[1:] != s[:-1]) & (s[1:] >= 0)])
  rank = jnp.cumsum(new.astype(jnp.int32)) - 1
  return jnp.where(d >= 0, rank[jnp.searchsorted(s, d)], NOT_A_LAYER)


def gatherer(found: list[Leaf], ids: Any = None, n: int | None = None):
  """A function that gathers per-leaf values (per slice) into layers.

  With `ids` (the layer of every slice, in `concat` order; -1: none) and `n`
  layers it sums (or, with ``how="max"``, maxes) the slices of each layer;
  without, every slice is its own layer (a flat vector of all slices).
  """

  def gather(values: list[Any], how: str = "sum") -> jax.Array:
    flat = concat([jnp.reshape(v, np.shape(f.depth)) for v, f in zip(values, found)])
    if ids is None:
      return flat
    index = jnp.where(jnp.asarray(ids) < 0, n, ids)
    if how == "max":
      return jnp.maximum(jax.ops.segment_max(flat, index, n), 0)
    return jax.ops.segment_sum(flat, index, n)

  return gather


def layer_stats(
  xs: list[jax.Array],
  found: list[Leaf],
  ids: Any = None,
  n: int | None = None,
  l2: bool = True,
  exact_zero: bool = False,
) -> tuple[_reduce.Sums, jax.Array | None]:
  """Per-layer `_reduce.Sums` and safe L2 norms of the leaves `xs` (see `gatherer`).

  One read of each leaf in the common case; the L2 norms are recomputed in
  Blue's three ranges only where a layer's sum of squares is out of range.
  Slices at depth -1 never trigger that (`exact_zero`: see `_reduce.l2`).
  """
  sums = [leaf_sums(x, f.depth) for x, f in zip(xs, found)]
  gather = gatherer(found, ids, n)
  totals = _reduce.Sums(
    gather([s.sq for s in sums]),
    gather([s.abs for s in sums]),
    gather([s.max for s in sums], "max"),
    gather([s.size for s in sums]),
  )
  if not l2:
    return totals, None
  active = None
  if ids is None:  # every slice is a layer: those at depth -1 are left alone anyway
    active = concat([jnp.asarray(f.depth) for f in found]) >= 0
  keeps = [keep_axes(f.depth) for f in found]
  return totals, _reduce.l2(xs, keeps, gather, totals, active, exact_zero)


def per_leaf(values: jax.Array, ids: jax.Array, leaves: list[Leaf], fill: float = 1.0) -> list:
  """``values[ids]`` cut back into one array per leaf (shaped like its depth); `fill` at -1."""
  padded = jnp.concatenate([values, jnp.full((1,), fill, values.dtype)])
  taken = padded[jnp.where(ids < 0, values.shape[0], ids)]
  return split(taken, [leaf.depth for leaf in leaves])
