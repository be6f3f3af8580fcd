"""`depth_table`: what every leaf's depth is, as a person checks it before training."""

from __future__ import annotations

from typing import Any

from optax_depthnorm import _order, _tree
from optax_depthnorm._depths import NOT_A_LAYER, StackAxis, StackedDepth, leaf_depths, valid_depths


def depth_table(tree: Any, depths: Any = None, *, stack_axis: StackAxis = None) -> str:
  """A text table of every leaf: path, shape, dtype and depth.

  Print it before training to check how layers were labelled. A stacked leaf
  (`StackedDepth`) shows its per-slice depths (``1..12``) and its stack axis
  after the shape (``(12, 64, 64)@0``).

  Args:
    tree: a parameter pytree.
    depths: ``None`` (label with the default rule), a rule, or a pytree of
      depths as returned by `layer_depths` or `infer_depths`.
    stack_axis: leaves that stack layers, see `layer_depths`.

  Returns:
    The table as a string, one leaf per line, ordered by depth then path.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> params = {"Dense_0": {"kernel": jnp.ones((3, 4))}, "Dense_1": {"kernel": jnp.ones((4, 2))}}
    >>> print(odn.depth_table(params))
    depth  path            shape   dtype
    0      Dense_0/kernel  (3, 4)  float32
    1      Dense_1/kernel  (4, 2)  float32
    >>> print(odn.depth_table(params, stack_axis={"Dense_1": 0}))
    depth  path            shape     dtype
    0      Dense_0/kernel  (3, 4)    float32
    1..4   Dense_1/kernel  (4, 2)@0  float32
  """
  leaves = _tree.flatten(tree)[0]
  labels = leaf_depths(tree, depths, stack_axis)
  rows = [
    (
      d.text() if isinstance(d, StackedDepth) else str(d) if d != NOT_A_LAYER else "-",
      _tree.path_name(p) or "<root>",
      str(tuple(getattr(x, "shape", ()))) + (f"@{d.axis}" if isinstance(d, StackedDepth) else ""),
      "masked"
      if not _tree.is_float_leaf(x) and _tree.is_param_leaf(x)
      else str(getattr(x, "dtype", type(x).__name__)),
      min(valid_depths(d), default=None),
    )
    for (p, x), d in zip(leaves, labels)
  ]
  rows.sort(key=lambda r: (r[4] is None, r[4] or 0, _order.natural_key(r[1])))
  header = ("depth", "path", "shape", "dtype")
  rows = [header, *(r[:4] for r in rows)]
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  lines = ["  ".join([*(c.ljust(w) for c, w in zip(r[:3], widths)), r[3]]) for r in rows]
  return "\n".join(lines)
