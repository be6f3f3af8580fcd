"""Block-normalized gradients: `layerwise_normalize`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_depthnorm import _checks, _depths, _layers, _reduce, _tree

Target = Union[float, jax.Array, str, Callable[[Any, Any], jax.Array]]
TARGETS = ("last_layer", "last_layer_weights")
GROUPS = ("leaf", "layer")
TARGET_ACCEPTS = f"a number, a scalar array, one of {TARGETS} or a callable (updates, params)"
NO_PARAMS_MSG = (
  "target='last_layer_weights' normalizes to the final layer's weight norm and needs "
  "`params`: call `update(updates, state, params)`."
)


def _check_args(target: Target, norm: str, eps: Any, group: str) -> bool:
  """Raises for a bad static argument; returns whether a numeric target is static."""
  _tree.check_norm(norm)
  if group not in GROUPS:
    raise ValueError(f"group must be one of {GROUPS}, got {group!r}.")
  _checks.check("eps", eps, _checks.EPS)
  if isinstance(target, str) and target not in TARGETS:
    raise ValueError(
      f"target must be a number, one of {TARGETS} or a callable (updates, params) -> "
      f"scalar; got {target!r}."
    )
  if isinstance(target, str) or callable(target):
    return False
  return _checks.check("target", target, _checks.NON_NEGATIVE, TARGET_ACCEPTS)


class LayerwiseNormalizeState(NamedTuple):
  """State of `layerwise_normalize`: the depth of every leaf, resolved at `init`.

  ``depths`` maps each parameter leaf's ``'/'``-joined path to an int32 array
  (its depth; per-slice depths for a stacked leaf; -1: left alone).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> params = {"Dense_0": {"kernel": jnp.ones(2)}, "Dense_1": {"kernel": jnp.ones(2)}}
    >>> odn.layerwise_normalize().init(params).depths
    {'Dense_0/kernel': Array(0, dtype=int32), 'Dense_1/kernel': Array(1, dtype=int32)}
  """

  depths: Any  # dict[str, int32 array], see `_layers`


def _check_last_layer(target: Target, stored: dict[str, np.ndarray], tree: Any) -> None:
  """At init: a ``last_layer`` target needs a floating leaf in the deepest layer."""
  if not isinstance(target, str) or not stored:
    return
  floats = {_tree.path_name(p) for p, x in _tree.flatten(tree)[0] if _tree.is_float_leaf(x)}
  deepest = max(int(np.max(d)) for d in stored.values())
  if deepest >= 0 and not any(n in floats and np.any(d == deepest) for n, d in stored.items()):
    what = "" if target == "last_layer" else "_weights"
    raise ValueError(
      f"target='last_layer{what}' needs the final layer (depth {deepest}), but none of "
      "its leaves is a floating array here (masked out, or no parameters at all)."
    )


def _deepest_norm(tree: Any, stored: _layers.Depths, norm: str) -> jax.Array:
  """The norm of the deepest layer of `tree` (all its leaves and slices together)."""
  leaves, _, found = _layers.read(tree, stored)
  d = _layers.concat([leaf.depth for leaf in found])
  ids = jnp.where(d == jnp.max(d), 0, -1)
  xs = [leaves[leaf.index] for leaf in found]
  totals, l2 = _layers.layer_stats(xs, found, ids, 1, l2=norm in ("l2", "rms"))
  return _reduce.norm(l2, totals, norm)[0]


def _target_value(
  target: Target, updates: Any, params: Any, stored: Any, norm: str, static: bool
) -> Any:
  """N: a static number as given; a traced one, or a callable's value, clipped to [0, inf).

  A final layer of norm exactly 0 (a frozen head's gradient, a zero-initialized
  head's weights) would zero every update forever: N falls back to 1 there.
  """
  if isinstance(target, str):
    if target != "last_layer" and params is None:
      raise ValueError(NO_PARAMS_MSG)
    n = _deepest_norm(updates if target == "last_layer" else params, stored, norm)
    return jnp.where(n > 0, n, jnp.ones_like(n))
  if callable(target):
    return _checks.bounded("target(updates, params)", target(updates, params), _checks.NON_NEGATIVE)
  return target if static else _checks.bounded("target", target, _checks.NON_NEGATIVE)


def _block_norms(leaves: list[Any], found: list[_layers.Leaf], group: str, norm: str) -> list:
  """The norm of each leaf's block, shaped like its depth (per slice for stacks)."""
  xs = [leaves[leaf.index] for leaf in found]
  need_l2 = norm in ("l2", "rms")
  if group == "leaf":  # every leaf (every slice) is its own block
    totals, l2 = _layers.layer_stats(xs, found, l2=need_l2)
    return _layers.split(_reduce.norm(l2, totals, norm), [leaf.depth for leaf in found])
  d = _layers.concat([leaf.depth for leaf in found])
  ids = _layers.dense_ranks(d)  # one id per distinct depth, -1 for none
  totals, l2 = _layers.layer_stats(xs, found, ids, d.shape[0], l2=need_l2)
  return _layers.per_leaf(_reduce.norm(l2, totals, norm), ids, found)


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

  $$
  g_b \leftarrow N \, \frac{g_b}{\max(\|g_b\|, \epsilon)}
  $$

  where a block $b$ is one leaf (``group="leaf"``, e.g. a kernel) or one layer
  (``group="layer"``: all leaves of one depth, e.g. kernel and bias, share one
  norm). This is the block-normalized gradient of Yu et al. (2017) and the
  $N(w) / \|g\|$ factor of eq. (1) of Kwiatkowski & Chang. N is 1, the norm of
  the final layer's gradient (``target="last_layer"``), the norm of its weights
  (``"last_layer_weights"``), or any function of the updates and params
  (docs/methods/layerwise_normalize.md explains these readings of the paper).
  Where the final layer's norm is exactly 0 (a frozen head's gradient, a
  zero-initialized head's weights) the paper's N would zero every update for
  good; N is 1 there instead (the plain block-normalized gradient).

  A zero block stays zero (never NaN); a NaN or Inf in a block shows in the
  output. Norms are computed in float32 (float64 for float64 leaves) without
  overflow or underflow (a block of 1e-30 or of 1e30 per entry normalizes to
  norm N), and the output keeps each leaf's dtype. A complex leaf's norm is
  of its moduli, sum |g|^2, and it keeps its phase. Leaves that are not
  floating arrays, and leaves at depth -1, pass through untouched. Before an adaptive
  optimizer (Adam) a per-block rescale mostly cancels: the paper uses SGD.

  Args:
    target: N: a non-negative finite number or scalar array (default 1),
      ``"last_layer"``, ``"last_layer_weights"`` (needs `params` in `update`),
      or a callable ``(updates, params) -> scalar``. A static number out of
      range is a ValueError; a traced one (under `optax.inject_hyperparams`)
      and a callable's value are clipped into [0, inf) at use (a NaN stays
      NaN). Under `optax.inject_hyperparams` list a callable target in
      `static_args`.
    norm: the block norm: ``"l2"`` (the paper's), ``"l1"``, ``"max"`` or
      ``"rms"`` (root mean square, $\sqrt{\mathrm{mean}\, g^2}$).
    eps: blocks with a norm below eps are divided by eps instead (so they are
      scaled up by at most N / eps): a non-negative finite number. An eps
      below the smallest normal float of the norm's dtype (1.2e-38 in float32),
      0 and subnormals included, acts as that smallest normal (XLA flushes
      subnormals to zero). A traced eps is clipped the same way at use.
    group: ``"leaf"`` or ``"layer"``.
    depths: what defines the layers (for ``group="layer"``, the ``last_layer``
      targets and stacked leaves): ``None`` (the order of the tree given to
      `init`, see `layer_depths`), a rule, an NNX module, or a pytree from
      `layer_depths` or `infer_depths`. Resolved once, at `init`, and kept in
      the state. A leaf labelled with a `StackedDepth` holds one layer per
      slice: each slice is normalized on its own (``group="leaf"``) or with the
      leaves of its depth (``"layer"``), in one vectorized pass.
    stack_axis: leaves that hold several layers along one axis (``nn.scan``),
      see `layer_depths`. Under `optax.inject_hyperparams` list a callable in
      ``static_args``.

  Returns:
    An `optax.GradientTransformationExtraArgs`; its state is a
    `LayerwiseNormalizeState`.

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
    learning", eq. (1).
    Yu et al., "Block-normalized gradient method: an empirical study for training
    deep neural network", 2017, https://arxiv.org/abs/1707.04822
  """
  static = _check_args(target, norm, eps, group)
  _depths.check_stack_axis_type(stack_axis)

  def init_fn(params: Any) -> LayerwiseNormalizeState:
    stored, resolved = _layers.init_depths(params, depths, stack_axis)
    _check_last_layer(target, resolved, params)
    return LayerwiseNormalizeState(depths=stored)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    n = _target_value(target, updates, params, state.depths, norm, static)
    leaves, treedef, found = _layers.read(updates, state.depths)
    for leaf, block in zip(found, _block_norms(leaves, found, group, norm)):
      alone = leaf.depth < 0
      inverse = jnp.where(alone, 1, _tree.safe_ratio(1, block, _checks.floor_eps(eps, block.dtype)))
      leaves[leaf.index] = _tree.scale_leaf(leaves[leaf.index], inverse, jnp.where(alone, 1, n))
    return jax.tree_util.tree_unflatten(treedef, leaves), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
