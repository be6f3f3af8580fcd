"""Layer order from a tree: creation order where the tree keeps it, a warning where it does not.

A dict whose key order differs from sorted order holds creation order (what an
unjitted linen `model.init` returns, a hand-built dict). Lists, tuples and
Equinox modules are ordered. A dict in sorted order (`jax.jit`, `jax.grad`,
`jax.eval_shape`, an `nnx.State`) is ordered by name where running numbers
decide (``Dense_0 .. Dense_11``, list indices) and is ambiguous otherwise
(``encoder`` against ``head``): then `DepthOrderWarning` names the siblings.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import warnings
from collections.abc import Mapping
from typing import Any

Key = tuple[str, ...]

_NUMBERED = re.compile(r"^(.*?)(\d+)$")
_CURE = (
  "Resolve depths once from a tree that keeps the order and pass them on: "
  "`depths=odn.layer_depths(model)` for an NNX module, "
  "`depths=odn.layer_depths(variables['params'])` on the dict an unjitted linen "
  "`model.init` returns, or `depths=odn.infer_depths(apply_fn, params, x)` from the "
  "computation; check with `print(odn.depth_table(params, depths))`."
)


def _library_dirs() -> tuple[str, ...]:
  """Directories of this package and of the libraries that call into it."""
  dirs = [os.path.dirname(os.path.abspath(__file__))]
  for name in ("optax", "jax", "flax", "equinox", "chex"):
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.origin:
      dirs.append(os.path.dirname(os.path.abspath(spec.origin)))
  return tuple(d + os.sep for d in dirs)


_LIBRARY_DIRS = _library_dirs()


def caller_stacklevel() -> int:
  """The `stacklevel` that points a warning at the first frame of the user's code.

  Frames in this package and in optax, jax, flax, equinox and chex are
  skipped, so a warning raised in `optax.chain(...).init` or `nnx.Optimizer`
  names the user's line.
  """
  frame, level = sys._getframe(1), 1
  while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_LIBRARY_DIRS):
    frame, level = frame.f_back, level + 1
  return level


class DepthOrderWarning(UserWarning):
  """Warns that the tree does not tell the order of some layers.

  Keys come back sorted from `jax.jit`, `jax.grad`, `jax.eval_shape`,
  `optax.apply_updates` and in an ``nnx.State``; where sibling names carry no
  running number (``encoder_norm``, ``encoderblock_0``; ``layers``, ``head``)
  the order is then unknown and depths follow sorted names. The warning names
  the siblings and the call that fixes it: resolve depths once from a tree that
  keeps creation order (`layer_depths` on an NNX module or on the dict an
  unjitted linen ``model.init`` returns, or `infer_depths`) and pass them as
  ``depths=``.

  Example:
    >>> import warnings
    >>> import jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> tree = {"body": {"kernel": jnp.ones(2)}, "head": {"kernel": jnp.ones(2)}}
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   depths = odn.layer_depths(tree)  # sorted keys: body, head
    >>> [w.category.__name__ for w in caught]
    ['DepthOrderWarning']
    >>> odn.layer_depths({"stem": {"kernel": jnp.ones(2)}, **tree})["stem"]["kernel"]
    0
  """


def natural_key(part: str) -> tuple[Any, ...]:
  """A sort key that compares the digit runs of a name as numbers."""
  pieces = re.split(r"(\d+)", part)
  return tuple(int(p) if i % 2 else p for i, p in enumerate(pieces))


def _names_decide(names: list[str]) -> bool:
  """Whether running numbers order these siblings: one stem, distinct numbers."""
  matches = [_NUMBERED.match(n) for n in names]
  if not all(matches):
    return False
  stems = {m.group(1) for m in matches}
  return len(stems) == 1 and len({int(m.group(2)) for m in matches}) == len(names)


def _node_orders(tree: Any) -> dict[Key, list[str] | None]:
  """Key order of every mapping in `tree` by its path; None for ordered nodes."""
  orders: dict[Key, list[str] | None] = {}

  def walk(node: Any, prefix: Key) -> None:
    if isinstance(node, Mapping):
      orders[prefix] = [str(k) for k in node]
      for k in node:
        walk(node[k], (*prefix, str(k)))
    elif isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
      for i, child in enumerate(node):
        walk(child, (*prefix, str(i)))

  walk(tree, ())
  return orders


def _children(keys: list[Key]) -> dict[Key, list[str]]:
  """Each prefix's next parts, in the order the keys come (the flatten order)."""
  children: dict[Key, list[str]] = {}
  for key in keys:
    for i in range(len(key)):
      names = children.setdefault(key[:i], [])
      if key[i] not in names:
        names.append(key[i])
  return children


def _sibling_order(
  prefix: Key,
  names: list[str],
  orders: dict[Key, list[str] | None],
  ambiguous: list[str],
  in_order: bool = False,
) -> list[str]:
  """The order of one level's siblings (`names` in flatten order)."""
  if len(names) < 2 or prefix not in orders:
    return names  # one child, or a list / tuple / Equinox module: ordered as it is
  inserted = [n for n in orders[prefix] or () if n in names]
  if inserted and (in_order or inserted != names):
    return inserted  # a mapping whose key order is not the sorted one: creation order
  by_number = sorted(names, key=natural_key)
  if not _names_decide(names):
    where = "/".join(prefix) or "<root>"
    shown = ", ".join(by_number[:6]) + (", ..." if len(names) > 6 else "")
    ambiguous.append(f"{where!r}: {shown}")
  return by_number


def layer_ranks(tree: Any, keys: list[Key], *, in_order: bool = False) -> dict[Key, int]:
  """The rank (0: input side) of each layer key, in the order the tree tells.

  Args:
    tree: the tree the keys come from (read for its mappings' key order).
    keys: the distinct ordering key of every layer, in flatten order.
    in_order: every mapping of `tree` holds creation order, even where it is the
      sorted one (the dicts `nnx_ordered_params` builds from an NNX module).

  Returns:
    A mapping from each key to its rank.
  """
  orders = _node_orders(tree)
  children = _children(keys)
  ambiguous: list[str] = []
  ordered = {
    prefix: {n: i for i, n in enumerate(_sibling_order(prefix, names, orders, ambiguous, in_order))}
    for prefix, names in children.items()
  }
  if ambiguous:
    warnings.warn(
      "The tree does not tell the order of these sibling layers (their keys are sorted, "
      "as `jax.jit`, `jax.grad`, `jax.eval_shape` and `nnx.State` give them, and their "
      f"names carry no running number), so depths follow sorted names: {'; '.join(ambiguous)}. "
      + _CURE,
      DepthOrderWarning,
      stacklevel=caller_stacklevel(),
    )
  sort_key = lambda key: tuple(ordered[key[:i]][part] for i, part in enumerate(key))
  return {key: rank for rank, key in enumerate(sorted(keys, key=sort_key))}


def nnx_ordered_params(module: Any) -> dict[Any, Any]:
  """The `nnx.Param` values of an NNX module as nested dicts in definition order.

  Keys follow ``nnx.state(module, nnx.Param)`` (attribute names; integers for
  `nnx.List` items), and every dict keeps the order the attributes were set in
  ``__init__``, which is the order `layer_depths` reads as creation order.
  """
  from flax import nnx

  def walk(node: Any) -> Any:
    if isinstance(node, nnx.Variable):
      return node.get_value() if isinstance(node, nnx.Param) else None  # the array, not a copy
    if isinstance(node, nnx.List):
      items = [(i, node[i]) for i in range(len(node))]
    elif isinstance(node, nnx.Pytree):
      items = [(k, v) for k, v in vars(node).items() if not k.startswith("_")]
    elif isinstance(node, Mapping):
      items = list(node.items())
    elif isinstance(node, (list, tuple)):
      items = list(enumerate(node))
    else:
      return None
    out = {k: walk(v) for k, v in items}
    return {k: v for k, v in out.items() if v is not None and not (isinstance(v, dict) and not v)}

  return walk(module)
