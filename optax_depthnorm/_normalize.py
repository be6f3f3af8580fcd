"""Block-normalized gradients: `layerwise_normalize`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any, Union

import jax
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


def _last_layer_norm(tree: Any, depths: Any, norm: str, what: str) -> jax.Array:
  """The block norm of all float leaves of the deepest layer of `tree`."""
  leaves = [x for _, x in _tree.flatten(tree)[0]]
  labels = _depths.depths_by_path(tree, depths)
  deepest = max(labels, default=_depths.NOT_A_LAYER)
  block = [x for x, d in zip(leaves, labels) if d == deepest and _tree.is_float_leaf(x)]
  if not block:
    raise ValueError(
      f"target='last_layer{what}' needs the final layer (depth {deepest}), but none of "
      "its leaves is a floating array here (masked out, or no parameters at all)."
    )
  return _tree.block_norm(block, norm)


def _target_value(target: Target, updates: Any, params: Any, depths: Any, norm: str) -> Any:
  if isinstance(target, str) and target == "last_layer":
    return _last_layer_norm(updates, depths, norm, "")
  if isinstance(target, str):
    if params is None:
      raise ValueError(NO_PARAMS_MSG)
    return _last_layer_norm(params, depths, norm, "_weights")
  if callable(target):
    return target(updates, params)
  return target


def _blocks(updates: Any, depths: Any, group: str) -> list[list[int]]:
  """Indices of the flattened float leaves, grouped into blocks normalized together."""
  leaves = [x for _, x in _tree.flatten(updates)[0]]
  floats = [i for i, x in enumerate(leaves) if _tree.is_float_leaf(x)]
  if group == "leaf":
    return [[i] for i in floats]
  labels = _depths.depths_by_path(updates, depths)
  by_depth: dict[int, list[int]] = defaultdict(list)
  for i in floats:
    by_depth[labels[i]].append(i)
  return list(by_depth.values())


def layerwise_normalize(
  *,
  target: Target = 1.0,
  norm: str = "l2",
  eps: float | jax.Array = 1e-8,
  group: str = "leaf",
  depths: Any = None,
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
      `layer_depths`), a rule, or a pytree from `layer_depths`.

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

  def init_fn(params: Any) -> optax.EmptyState:
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    n = _target_value(target, updates, params, depths, norm)
    leaves, treedef = _tree.flatten(updates)
    leaves = [x for _, x in leaves]
    for block in _blocks(updates, depths, group):
      factor = _tree.safe_ratio(n, _tree.block_norm([leaves[i] for i in block], norm), eps)
      for i in block:
        leaves[i] = _tree.scale_leaf(leaves[i], factor)
    return jax.tree_util.tree_unflatten(treedef, leaves), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
