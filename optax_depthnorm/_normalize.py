"""Block-normalized gradients: `layerwise_normalize`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_depthnorm import _depths, _tree

Target = Union[float, jax.Array, str, Callable[[Any, Any], jax.Array]]
TARGETS = ("last_layer", "last_layer_weights")
GROUPS = ("leaf", "layer")
NO_PARAMS_MSG = (
  "target='last_layer_weights' normalizes to the final layer's weight norm and needs "
  "`params`: call `update(updates, state, params)`."
)


def _check_args(target: Target, norm: str, eps: Any, group: str) -> None:
  _tree.check_norm(norm)
  if group not in GROUPS:
    raise ValueError(f"group must be one of {GROUPS}, got {group!r}.")
  if isinstance(target, str) and target not in TARGETS:
    raise ValueError(
      f"target must be a number, one of {TARGETS} or a callable (updates, params) -> "
      f"scalar; got {target!r}."
    )
  if _tree.is_concrete_number(target) and not target >= 0:
    raise ValueError(f"target must be a non-negative number, got {target!r}.")
  if _tree.is_concrete_number(eps) and not eps > 0:
    raise ValueError(f"eps must be a positive number, got {eps!r}.")


def _last_layer_norm(tree: Any, labels: list[_depths.Depth], norm: str, what: str) -> jax.Array:
  """The block norm of all float leaves (and slices) of the deepest layer of `tree`."""
  leaves = [x for _, x in _tree.flatten(tree)[0]]
  deepest = _depths.deepest(labels)
  block = []
  for x, label in zip(leaves, labels):
    if not _tree.is_float_leaf(x):
      continue
    if isinstance(label, _depths.StackedDepth):
      index = [i for i, d in enumerate(label.depths) if d == deepest]
      if index:
        block.append(jnp.take(x, np.asarray(index), axis=label.axis))
    elif label == deepest:
      block.append(x)
  if not block:
    raise ValueError(
      f"target='last_layer{what}' needs the final layer (depth {deepest}), but none of "
      "its leaves is a floating array here (masked out, or no parameters at all)."
    )
  return _tree.block_norm(block, norm)


def _target_value(target: Target, updates: Any, params: Any, labels: Any, norm: str) -> Any:
  if isinstance(target, str) and target == "last_layer":
    return _last_layer_norm(updates, labels(updates), norm, "")
  if isinstance(target, str):
    if params is None:
      raise ValueError(NO_PARAMS_MSG)
    return _last_layer_norm(params, labels(params), norm, "_weights")
  if callable(target):
    return target(updates, params)
  return target


def _blocks(leaves: list[Any], labels: list[Any] | None, group: str) -> list[list[int]]:
  """Indices of the flattened float leaves, grouped into blocks normalized together."""
  floats = [i for i, x in enumerate(leaves) if _tree.is_float_leaf(x)]
  if labels is not None:  # a float leaf labelled -1 (unused in `infer_depths`) is left alone
    floats = [i for i in floats if labels[i] != _depths.NOT_A_LAYER]
  if group == "leaf":
    return [[i] for i in floats]
  by_depth: dict[int, list[int]] = defaultdict(list)
  for i in floats:
    by_depth[labels[i]].append(i)
  return list(by_depth.values())


def stacked_pieces(leaves: list[Any], labels: list[Any], group: str) -> tuple[list, int]:
  """Blocks of a tree with stacked leaves, as `_tree.segment_norms` pieces.

  ``group="leaf"``: each whole leaf and each slice of a stacked leaf is a block;
  ``"layer"``: each depth (slices of one depth across leaves join). Returns the
  pieces ``(leaf index, axis, ids)`` and the number of blocks.
  """
  ids: dict[Any, int] = {}
  pieces = []
  for i, (x, label) in enumerate(zip(leaves, labels)):
    if not _tree.is_float_leaf(x) or label == _depths.NOT_A_LAYER:
      continue
    stacked = isinstance(label, _depths.StackedDepth)
    depths = label.depths if stacked else (label,)
    keys = [(i, k) for k in range(len(depths))] if group == "leaf" else list(depths)
    block = [
      ids.setdefault(k, len(ids)) if d != _depths.NOT_A_LAYER else -1 for k, d in zip(keys, depths)
    ]
    pieces.append((i, label.axis if stacked else None, np.asarray(block) if stacked else block[0]))
  return pieces, len(ids)


def _normalize_stacked(leaves, labels, group, n, norm, eps) -> list[Any]:
  pieces, count = stacked_pieces(leaves, labels, group)
  norms = _tree.segment_norms([(leaves[i], a, ids) for i, a, ids in pieces], count, norm)
  factors = _tree.safe_ratio(n, norms, eps)
  out = list(leaves)
  for i, axis, ids in pieces:
    f = _tree.block_values(factors, ids) if axis is not None else factors[ids]
    out[i] = _tree.scale_leaf(leaves[i], _tree.along(f, axis, leaves[i].ndim))
  return out


def layerwise_normalize(
  *,
  target: Target = 1.0,
  norm: str = "l2",
  eps: float | jax.Array = 1e-8,
  group: str = "leaf",
  depths: Any = None,
  stack_axis: _depths.StackAxis = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Divides each block of the gradient by its norm and multiplies it by N.

  .. math::

    g_b \leftarrow N \, \frac{g_b}{\max(\|g_b\|, \epsilon)}

  where a block ``b`` is one leaf (``group="leaf"``, e.g. a kernel) or one layer
  (``group="layer"``: all leaves of one depth, e.g. kernel and bias, share one
  norm). This is the block-normalized gradient of Yu et al. (2017) and the
  ``N(w) / ||.||`` factor of seed 000, eq. (1).

  Seed 000's eq. (1) literally divides by ``||w_dj||``, the weights of element
  ``j``; its text says it normalizes the *gradients*, per layer, so we divide by
  the gradient's block norm (dividing a single element by itself would give
  sign-SGD). The seed names two targets N: "normalization to 1" and "to the L2
  norm of the weights of the final layer" (sec. 1.1), and in its conclusion "the
  norm of the gradient of the final layer". Both are offered:
  ``target="last_layer"`` is the final layer's *gradient* norm and
  ``target="last_layer_weights"`` the final layer's *weight* norm (all its
  float leaves together, kernel and bias).

  A zero block stays zero (never NaN); a NaN or Inf in a block shows in the
  output (it is not hidden). Norms are computed in float32 (float64 for float64
  leaves) and the output keeps each leaf's dtype. Leaves that are not floating
  arrays pass through untouched.

  Before an adaptive optimizer (Adam, RMSProp) a per-block rescale of the
  gradient mostly cancels out in the optimizer's own normalization; the paper
  uses it with SGD.

  Args:
    target: N: a non-negative number (default 1), ``"last_layer"``,
      ``"last_layer_weights"`` (needs `params` in `update`), or a callable
      ``(updates, params) -> scalar`` (the paper's general N(w)). Under
      `optax.inject_hyperparams` list a callable target in `static_args`.
    norm: the block norm: ``"l2"`` (the paper's), ``"l1"``, ``"max"`` or
      ``"rms"`` (root mean square, sqrt(mean g^2)).
    eps: blocks with a norm below eps are divided by eps instead (so they are
      scaled up by at most N / eps).
    group: ``"leaf"`` or ``"layer"``.
    depths: what defines the layers (for ``group="layer"`` and the
      ``last_layer`` targets): ``None`` (labels from the updates' paths, see
      `layer_depths`), a rule, or a pytree from `layer_depths` or
      `infer_depths`. A leaf labelled with a `StackedDepth` holds one layer
      per slice: each slice is normalized on its own (``group="leaf"``) or
      with the leaves of its depth (``"layer"``), in one vectorized pass.
    stack_axis: leaves that hold several layers along one axis (``nn.scan``),
      see `layer_depths`; or carry them in `depths`. Under
      `optax.inject_hyperparams` list a callable in ``static_args``.

  Returns:
    An `optax.GradientTransformationExtraArgs` with an empty state.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_depthnorm as odn
    >>> grads = {"Dense_0": {"kernel": jnp.array([3.0, 4.0])},
    ...          "Dense_1": {"kernel": jnp.array([0.0, 0.0])}}
    >>> tx = odn.layerwise_normalize()
    >>> updates, _ = tx.update(grads, tx.init(grads))
    >>> print(updates["Dense_0"]["kernel"], updates["Dense_1"]["kernel"])
    [0.6 0.8] [0. 0.]
    >>> opt = optax.chain(odn.layerwise_normalize(target=0.5), optax.sgd(0.1))

  References:
    Kwiatkowski & Chang, "Gradient normalization & depth based decay for deep
    learning" (seed 000), eq. (1).
    Yu et al., "Block-normalized gradient method: an empirical study for training
    deep neural network", 2017, https://arxiv.org/abs/1707.04822
  """
  _check_args(target, norm, eps, group)
  _depths._check_stack_axis_type(stack_axis)

  def init_fn(params: Any) -> optax.EmptyState:
    del params
    return optax.EmptyState()

  labels = lambda tree: _depths.leaf_depths(tree, depths, stack_axis)
  # Stacks can only come from a depth pytree or `stack_axis`: otherwise "leaf" needs no labels.
  may_stack = stack_axis is not None or not (depths is None or _depths._is_rule(depths))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    n = _target_value(target, updates, params, labels, norm)
    leaves, treedef = _tree.flatten(updates)
    leaves = [x for _, x in leaves]
    found = labels(updates) if group == "layer" or may_stack else None
    if found is not None and any(isinstance(d, _depths.StackedDepth) for d in found):
      leaves = _normalize_stacked(leaves, found, group, n, norm, eps)
      return jax.tree_util.tree_unflatten(treedef, leaves), state
    for block in _blocks(leaves, found, group):
      factor = _tree.safe_ratio(n, _tree.block_norm([leaves[i] for i in block], norm), eps)
      for i in block:
        leaves[i] = _tree.scale_leaf(leaves[i], factor)
    return jax.tree_util.tree_unflatten(treedef, leaves), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
