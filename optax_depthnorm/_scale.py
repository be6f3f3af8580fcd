"""Scale and determinant normalization of weight matrices: `scale_normalize`.

Placed after the optimizer, it rescales each new weight matrix W* = W + u so
that its scale is 1, and returns the update that gets there. The scale is read
off W* as a (fan_in, fan_out) matrix: from the layer's inputs, from random
probes, or from its singular values (the pseudo-determinant).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_depthnorm import _depths, _layers, _matrices, _tree
from optax_depthnorm._matrices import FanInAxes

MODES = ("data", "probe", "determinant")
_DEFAULT_PROBES = 16
KERNEL_LAYOUTS = ("flax", "equinox", "torch")

NO_PARAMS_MSG = (
  "scale_normalize rescales the new weights W* = params + updates and needs `params`: "
  "call `update(updates, state, params)`, with scale_normalize after the optimizer "
  "(`optax.chain(optax.sgd(lr), odn.scale_normalize(...))`)."
)


COMPLEX_MSG = (
  "scale_normalize rescales real weight matrices; the weight at {name!r} is {dtype}. Leave it "
  "out with `fan_in_axes={{{name!r}: None}}` or `optax.masked`."
)


class ScaleNormalizeState(NamedTuple):
  """State of `scale_normalize`: the step count, the probes' PRNG key and the depths.

  ``depths`` (by leaf path, resolved at `init`) tells which weights stack
  layers (per-slice depths) and which are left alone (-1).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_depthnorm as odn
    >>> state = odn.scale_normalize("probe", key=0).init({"Dense_0": {"kernel": jnp.eye(2)}})
    >>> int(state.count), state.key.shape, state.key.dtype
    (0, (2,), dtype('uint32'))
  """

  count: jax.Array  # int32 scalar
  key: jax.Array  # uint32 key data (`jax.random.key_data`); moves only in mode="probe"
  depths: Any  # dict[str, int32 array], see `_layers`


def _check_args(mode: str, kernel_layout: str, fan_in_axes: Any, num_probes: Any) -> None:
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  if kernel_layout not in KERNEL_LAYOUTS:
    raise ValueError(
      f"kernel_layout must be one of {KERNEL_LAYOUTS}: 'flax' for (in, out) / HWIO kernels, "
      f"'equinox' or 'torch' for (out, in) / OIHW weights; got {kernel_layout!r}."
    )
  if fan_in_axes is not None and not isinstance(fan_in_axes, Mapping) and not callable(fan_in_axes):
    raise TypeError(
      "fan_in_axes must be None, a mapping from weight or layer path to axes, or a callable "
      f"(path, leaf) -> axes; got {type(fan_in_axes).__name__}."
    )
  if num_probes is None or mode != "probe":
    return
  if not isinstance(num_probes, int) or isinstance(num_probes, bool):
    raise TypeError(
      "num_probes sets the probes' shape and must be a Python int; under "
      f"`optax.inject_hyperparams` list it in `static_args`. Got {type(num_probes).__name__}."
    )
  if num_probes < 1:
    raise ValueError(f"num_probes must be >= 1, got {num_probes}.")


def _check_numbers(every_k_steps: Any, first_n_steps: Any, eps: Any) -> None:
  if _tree.is_concrete_number(every_k_steps) and not every_k_steps >= 1:
    raise ValueError(f"every_k_steps must be >= 1, got {every_k_steps!r}.")
  if _tree.is_concrete_number(first_n_steps) and not first_n_steps >= 0:
    raise ValueError(f"first_n_steps must be None or >= 0, got {first_n_steps!r}.")
  if _tree.is_concrete_number(eps) and not eps >= 0:
    raise ValueError(f"eps must be a non-negative number, got {eps!r}.")


# ----------------------------------------------------------------------------- the transform


def _active(count: jax.Array, every_k_steps: Any, first_n_steps: Any) -> jax.Array | None:
  """Whether this step normalizes (None: every step, known statically)."""
  each_step = _tree.is_concrete_number(every_k_steps) and every_k_steps == 1
  if each_step and first_n_steps is None:
    return None
  active = jnp.asarray(True)
  if not each_step:
    active &= count % jnp.asarray(every_k_steps).astype(count.dtype) == 0
  if first_n_steps is not None:
    active &= count < jnp.asarray(first_n_steps).astype(count.dtype)
  return active


def _drop(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
  """`shape` without `axis`: the shape of one slice of a stacked weight."""
  return tuple(n for a, n in enumerate(shape) if a != axis)


def _rescaled_update(u: jax.Array, w: jax.Array, s: jax.Array) -> jax.Array:
  """``(w + u) s - w`` written as ``s u + (s - 1) w``: exactly ``u`` when s = 1."""
  dtype = _tree.acc_dtype(u.dtype, w.dtype)
  s = s.astype(dtype)
  return _tree.cast_back(s * u.astype(dtype) + (s - 1) * w.astype(dtype), u.dtype)


def _init_key(key: Any) -> jax.Array:
  """uint32 key data from a seed, a typed key or raw key data (`jax.random.PRNGKey`)."""
  if hasattr(key, "dtype") and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  key = jnp.asarray(key)
  if key.ndim == 0:
    return jax.random.key_data(jax.random.key(key))
  return key.astype(jnp.uint32)


def scale_normalize(
  mode: str,
  *,
  kernel_layout: str = "flax",
  fan_in_axes: FanInAxes = None,
  num_probes: int | None = None,
  every_k_steps: int | jax.Array = 1,
  first_n_steps: int | jax.Array | None = None,
  eps: float | jax.Array = 1e-8,
  key: jax.Array | int = 0,
  depths: Any = None,
  stack_axis: _depths.StackAxis = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales each new weight matrix to scale 1: scale or determinant normalization.

  $$
  W^* = W + u, \qquad u \leftarrow \frac{W^*}{c} - W
  \quad\text{so that}\quad W + u = \frac{W^*}{c} \quad (1, 3)
  $$

  $$
  c_\text{data} = \frac{1}{B} \sum_{b=1}^{B} \frac{\|W^{*T} x_b\|_2}{\|x_b\|_2} \ (2, 3),
  \qquad
  c_\text{det} = \Big(\prod_{i=1}^{k} \sigma_i(W^*)\Big)^{1/k} \ (1)
  $$

  where ``u`` is the optimizer's update, ``W^*`` is read as a (fan_in, fan_out)
  matrix and ``sigma_1..k`` are its nonzero singular values. Place it *after*
  the optimizer: ``optax.chain(optax.sgd(lr), odn.scale_normalize("probe"))``.

  Modes:

  - ``"data"``: ``x_b`` are the layer's inputs from the forward pass, passed as
    ``update(updates, state, params, layer_inputs=...)`` (eq. 2-3). After it,
    the mean scale over that batch is 1.
  - ``"probe"``: the same mean over ``num_probes`` Gaussian vectors ``x_b``
    drawn afresh each step (a PRNG key in the state): no model change. The
    mean is over directions uniform on the sphere, E ||W^T x|| / ||x||.
  - ``"determinant"``: ``c`` is the geometric mean of the singular values, so
    the pseudo-determinant (their product) becomes 1. Eq. (1) literally divides
    by ``det(W*)`` itself, which gives ``pdet(W*)^(1 - k)``: 1 only for k = 1; dividing
    by pdet^(1/k) is what sets it to 1, and is the paper's own "sets the
    geometric mean of the scales to one". It is taken in log space, so it does
    not underflow where the product of many singular values below 1 does (the
    failure sec. 3.2 reports), from a QR factorization instead of an SVD:
    ``prod |diag R| = prod sigma_i``, about 2 fan_in fan_out r + r^3 / 3
    flops (r = min(fan_in, fan_out); QR and a triangular inverse that bounds
    the condition number), backward stable on ``W*`` itself (the Gram matrix's
    Cholesky would be cheaper but squares the condition number and fails in
    float32 near cond 1e4). Only where that bound cannot rule out singular
    values below numpy's rank tolerance (max(fan_in, fan_out) eps sigma_max)
    does an SVD of the r x r factor run; the pseudo-determinant is then the
    product of the singular values above the tolerance.

  Weight matrices are the floating leaves of rank >= 2; biases, norm scales
  and non-float leaves pass through (restrict further with ``fan_in_axes`` or
  `optax.masked`). A complex weight matrix is a TypeError (the method is
  defined for real weights): leave it out with ``fan_in_axes``. With
  ``kernel_layout="flax"`` the fan-in is every axis but the last (Dense
  ``(in, out)``, conv HWIO as ``(H W I, O)``); with
  ``"equinox"`` or ``"torch"`` every axis but the first (``(out, in)``, OIHW as
  ``(I H W, O)``). The data mode wants the inputs in that fan-in order: for a
  conv, patches (``jax.lax.conv_general_dilated_patches`` gives channels
  first, ``(I, H, W)``: with a Flax HWIO kernel pass ``fan_in_axes={"Conv_0":
  (2, 0, 1)}`` for the matching matrix). A layer's inputs may have any leading
  axes; they are found in ``layer_inputs`` at the weight's path or else at its
  layer's path (``Dense_0/kernel``, else ``Dense_0``), every array at or under
  that path (as `sow` stores them, a tuple per call) taken together. A Flax
  linen model hands them over unchanged through a method interceptor that
  sows each Dense layer's input (the whole train step is in
  docs/methods/scale_normalize.md and runs in the tests)::

    def sow_inputs(next_fun, args, kwargs, context):
      if context.method_name == "__call__" and isinstance(context.module, nn.Dense):
        context.module.sow("layer_inputs", "inputs", args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(sow_inputs):  # inside the loss; return cols as aux
      logits, cols = model.apply({"params": params}, x, mutable=["layer_inputs"])
    updates, state = tx.update(grads, state, params, layer_inputs=cols["layer_inputs"])

  A scale ``c <= eps`` (a zero matrix) leaves the update as it is; a NaN
  shows. Scales are computed in float32 (float64 for float64 leaves) and the
  updates keep their dtypes. Finite weights and inputs, up to the dtype's
  largest, never give NaN or Inf. Precision: the new weights come from
  optax's additive ``W + u``, which lands no closer to ``W^*/c`` than the
  rounding of ``W``'s entries, so each new entry is within about

  $$
  |(W + u)_{ij} - W^*_{ij}/c| \le 2\,\epsilon\,(|W_{ij}| + |W^*_{ij}|/c)
  $$

  (``epsilon`` the dtype's machine epsilon, 1.2e-7 in float32): a relative
  error near ``epsilon c`` for weights rescaled from scale ``c``, 1e-2 at
  ``c = 1e5``; weights of scale above ``1/epsilon`` (8e6) come out as
  rounding noise of that size (e.g. zeros). Skipped steps (``every_k_steps``,
  ``first_n_steps``) return the updates unchanged and skip the computation
  (`lax.cond`), so nothing recompiles.

  The optimizer's own state (momentum, Adam's moments) is *not* rescaled with
  the weights: after a normalization it still holds updates of the scale
  before it. Training works with it (tested with ``sgd(lr, momentum=0.9)``);
  the paper used plain SGD.

  Args:
    mode: ``"data"``, ``"probe"`` or ``"determinant"``.
    kernel_layout: ``"flax"`` (default; also Flax NNX) or ``"equinox"`` /
      ``"torch"``: which axes are the fan-in, as above.
    fan_in_axes: overrides the layout: a mapping from a weight's path or its
      layer's path (``"Dense_0/kernel"``, ``"Dense_0"``) to its fan-in axes (an
      int or a tuple, in the order the inputs' last axis is flattened; None to
      leave that weight alone), or a callable ``(path, leaf) -> axes | None |
      ...`` (``...`` for the layout's default). Under
      `optax.inject_hyperparams` list a callable in ``static_args``.
    num_probes: probes per weight and step in mode ``"probe"``: a Python int
      (None: 16). It sets a shape, so under `optax.inject_hyperparams` (which
      turns every number it is given into an array) list it in
      ``static_args``.
    every_k_steps: normalize only at steps 0, k, 2k, ...
    first_n_steps: normalize only during the first N steps (the paper finds
      the benefit early in training); None for always.
    eps: scales at or below eps are treated as 1 (the weight is left alone).
    key: seed (int) or PRNG key for the probes.
    depths: read (at `init`) only for its stacked leaves (a pytree from
      `infer_depths` or `layer_depths` whose `StackedDepth` leaves mark weights
      that hold one layer per slice) and for leaves at depth -1, which are left
      alone; no other depth matters here.
    stack_axis: weights that hold several layers along one axis (``nn.scan``),
      see `layer_depths`. Each slice is a weight matrix of its own, scaled by
      its own ``c`` (computed for all slices at once with `jax.vmap`); its
      fan-in axes (``kernel_layout``, ``fan_in_axes``) are those of one slice,
      and in mode ``"data"`` its inputs carry a leading axis with one entry
      per slice, as `sow` inside ``nn.scan`` stacks them. Under
      `optax.inject_hyperparams` list a callable in ``static_args``.

  Returns:
    An `optax.GradientTransformationExtraArgs`; its state counts steps and
    holds the probes' key. ``update`` needs ``params`` (and ``layer_inputs`` in
    mode ``"data"``).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> import optax
    >>> import optax_depthnorm as odn
    >>> params = {"Dense_0": {"kernel": jnp.diag(jnp.array([8.0, 0.5])), "bias": jnp.ones(2)}}
    >>> grads = jax.tree.map(jnp.zeros_like, params)
    >>> tx = optax.chain(optax.sgd(0.1), odn.scale_normalize("determinant"))
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> new = optax.apply_updates(params, updates)  # diag(8, 0.5) / 2: det 1
    >>> print(np.round(new["Dense_0"]["kernel"], 4), new["Dense_0"]["bias"])
    [[4.   0.  ]
     [0.   0.25]] [1. 1.]

    Data mode, with the layer's inputs (any leading axes, last axis fan_in):

    >>> tx = odn.scale_normalize("data")
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])  # ||W^T x|| / ||x||: 8 and 0.5
    >>> updates, _ = tx.update(grads, tx.init(params), params, layer_inputs={"Dense_0": x})
    >>> print(np.round(optax.apply_updates(params, updates)["Dense_0"]["kernel"], 4))
    [[1.8824 0.    ]
     [0.     0.1176]]

  References:
    Lo, Amaral & Ding, "Scale Normalization", 2016, sec. 2-3,
    eq. (1)-(3). https://arxiv.org/abs/1604.07796
  """
  _check_args(mode, kernel_layout, fan_in_axes, num_probes)
  _check_numbers(every_k_steps, first_n_steps, eps)
  _depths.check_stack_axis_type(stack_axis)
  num_probes = _DEFAULT_PROBES if num_probes is None else num_probes

  def init_fn(params: Any) -> ScaleNormalizeState:
    stored, _ = _layers.init_depths(params, depths, stack_axis)
    return ScaleNormalizeState(count=jnp.zeros([], jnp.int32), key=_init_key(key), depths=stored)

  def weights(updates: Any, params: Any, stored: Any) -> list[tuple]:
    """(leaf index, path, layer path, fan-in axes, param, stack axis) of each weight matrix."""
    by_name = {_tree.path_name(p): x for p, x in _tree.flatten(params)[0]}
    paths = [p for p, _ in _tree.flatten(updates)[0]]
    leaves, _, found = _layers.read(updates, stored)
    names, out = [], []
    for leaf in found:
      u, path = leaves[leaf.index], paths[leaf.index]
      name, layer = leaf.name, _depths.layer_name(path)
      names.append((name, layer))
      keep = _layers.keep_axes(leaf.depth)
      stack = keep[0] if keep else None
      one = u if stack is None else jax.ShapeDtypeStruct(_drop(u.shape, stack), u.dtype)
      axes = _matrices.fan_in(fan_in_axes, kernel_layout, name, layer, one)
      if axes is None:
        continue
      if jnp.issubdtype(u.dtype, jnp.complexfloating):
        raise TypeError(COMPLEX_MSG.format(name=name, dtype=u.dtype))
      w = by_name.get(name)
      if getattr(w, "shape", None) != u.shape:
        raise ValueError(
          f"params at {name!r} is {getattr(w, 'shape', w)!r} but its update has shape "
          f"{u.shape}: pass the params the updates are for."
        )
      out.append((leaf.index, name, layer, axes, w, stack, leaf.depth))
    _matrices.check_mapping_keys(fan_in_axes, names)
    return out

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(NO_PARAMS_MSG)
    leaves, treedef = _tree.flatten(updates)
    leaves = [x for _, x in leaves]
    found = weights(updates, params, state.depths)
    inputs = _matrices.flat_inputs(extra_args.get("layer_inputs")) if mode == "data" else None
    new_key = state.key
    if mode == "probe":
      new_key, step_key = jax.random.split(jax.random.wrap_key_data(state.key))
      new_key = jax.random.key_data(new_key)

    def matrices() -> tuple[list[jax.Array], list[Any]]:
      """W* of each weight as (fan_in, fan_out) matrices, and its inputs or probes."""
      mats, xs = [], []
      for i, name, layer, axes, w, stack, _ in found:
        dtype = _tree.acc_dtype(leaves[i].dtype, w.dtype)
        new = w.astype(dtype) + leaves[i].astype(dtype)  # W*
        if stack is None:
          mats.append(_matrices.as_matrix(new, axes))
        else:  # one (fan_in, fan_out) matrix per slice: (L, fan_in, fan_out)
          as_matrix = lambda m, axes=axes: _matrices.as_matrix(m, axes)
          mats.append(jax.vmap(as_matrix)(jnp.moveaxis(new, stack, 0)))
        fan_in, lead = mats[-1].shape[-2], mats[-1].shape[:-2]
        if mode == "data":
          xs.append(
            _matrices.inputs_for(inputs, name, layer, fan_in, dtype, lead[0] if lead else None)
          )
        elif mode == "probe":
          xs.append((name, (*lead, num_probes, fan_in), dtype))
      return mats, _matrices.probes(step_key, xs) if mode == "probe" else xs

    def scale(m: jax.Array, x: Any) -> jax.Array:
      fn = _matrices.determinant_scale if mode == "determinant" else _matrices.mean_scale
      args = (m,) if mode == "determinant" else (m, x)
      return fn(*args) if m.ndim == 2 else jax.vmap(fn)(*args)

    def scales() -> list[jax.Array]:
      # Built here, so that a skipped step (inside `lax.cond`) builds no matrix or probe.
      mats, xs = matrices()
      return [scale(m, x) for m, x in zip(mats, xs or [None] * len(mats))]

    def ones() -> list[jax.Array]:
      """The scales of a skipped step: 1 for each weight (each slice of a stacked one)."""
      out = []
      for i, _, _, _, w, stack, _ in found:
        lead = () if stack is None else (leaves[i].shape[stack],)
        out.append(jnp.ones(lead, _tree.acc_dtype(leaves[i].dtype, w.dtype)))
      return out

    active = _active(state.count, every_k_steps, first_n_steps)
    cs = scales() if active is None else jax.lax.cond(active, scales, ones)
    for (i, _, _, _, w, _, depth), c in zip(found, cs):
      keep = c <= jnp.asarray(eps).astype(c.dtype)
      s = jnp.where(keep, 1, 1 / jnp.where(keep, 1, c))
      s = jnp.where(depth >= 0, jnp.reshape(s, np.shape(depth)), 1)
      leaves[i] = _rescaled_update(leaves[i], w, s)
    new_state = ScaleNormalizeState(optax.safe_increment(state.count), new_key, state.depths)
    return jax.tree_util.tree_unflatten(treedef, leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
