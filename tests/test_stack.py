"""Stacked layers: a leaf that holds L layers along one axis (`stack_axis`, `StackedDepth`).

Every transform must treat each slice as its own layer: the same numbers as the
unstacked tree with one leaf per layer, checked here against NumPy float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_depthnorm as odn
from tests.tolerance import ATOL, RTOL
from tests.trees import keep_order

L = 4
_RNG = np.random.default_rng(0)


def _arr(*shape, scale=1.0):
  return scale * _RNG.standard_normal(shape).astype(np.float32)


# pre (3 -> 5), L blocks (5 -> 5, stacked on axis 0), post (5 -> 2).
PRE = {"kernel": _arr(3, 5), "bias": _arr(5)}
BLOCKS = {"kernel": _arr(L, 5, 5, scale=3.0), "bias": _arr(L, 5)}
BLOCKS["kernel"][2] *= 1e-3  # one slice much smaller: a single norm would hide it
POST = {"kernel": _arr(5, 2), "bias": _arr(2)}


def stacked_tree(blocks=BLOCKS):
  # Creation order (pre, blocks, post), not sorted order: the dict tells the layer order.
  return {"pre": PRE, "blocks": blocks, "post": POST}


def unstacked_tree(blocks=BLOCKS):
  tree = {"pre": PRE}
  for i in range(L):
    tree[f"blocks_{i}"] = {k: v[i] for k, v in blocks.items()}
  tree["post"] = POST
  return tree


def as_stacked(tree):
  """The unstacked result put back into the stacked layout."""
  blocks = {k: np.stack([np.asarray(tree[f"blocks_{i}"][k]) for i in range(L)]) for k in PRE}
  return {"pre": tree["pre"], "blocks": blocks, "post": tree["post"]}


STACK = {"blocks": 0}
S_DEPTHS = odn.layer_depths(stacked_tree(), stack_axis=STACK)
U_DEPTHS = {
  "pre": {"kernel": 0, "bias": 0},
  **{f"blocks_{i}": {"kernel": i + 1, "bias": i + 1} for i in range(L)},
  "post": {"kernel": L + 1, "bias": L + 1},
}


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def run(tx, tree, params=None, jit=False, **extra):
  update = jax.jit(tx.update) if jit else tx.update
  # Init on the tree that keeps creation order (params when given, as users do).
  out, _ = update(tree, tx.init(tree if params is None else params), params, **extra)
  return out


# ----------------------------------------------------------------------------- labels


def test_layer_depths_gives_each_slice_a_depth_and_moves_later_layers():
  assert S_DEPTHS["pre"]["kernel"] == 0
  assert S_DEPTHS["blocks"]["kernel"] == odn.StackedDepth(range(1, L + 1), axis=0)
  assert S_DEPTHS["blocks"]["bias"] == odn.StackedDepth(range(1, L + 1), axis=0)
  assert S_DEPTHS["post"]["bias"] == L + 1
  rev = odn.layer_depths(stacked_tree(), stack_axis=STACK, reverse=True)
  assert rev["blocks"]["kernel"].depths == tuple(range(L, 0, -1))
  assert rev["pre"]["kernel"] == L + 1 and rev["post"]["kernel"] == 0


def test_stack_axis_callable_and_negative_axis():
  tree = {"w": jnp.ones((2, 3, L))}
  depths = odn.layer_depths(tree, stack_axis=lambda path, leaf: -1)
  assert depths["w"] == odn.StackedDepth(range(L), axis=2)


def test_explicit_rule_keeps_its_numbers_and_gaps():
  depths = odn.layer_depths(
    stacked_tree(), rule={"pre": 0, "blocks": 2, "post": 5}, stack_axis=STACK
  )
  assert depths["pre"]["bias"] == 0
  assert depths["blocks"]["kernel"].depths == (2, 3, 4, 5)
  assert depths["post"]["kernel"] == 5 + L - 1


def test_depth_table_shows_slices():
  table = odn.depth_table(stacked_tree(), S_DEPTHS).splitlines()
  row = next(line for line in table if "blocks/kernel" in line)
  assert row.split()[0] == f"1..{L}" and "(4, 5, 5)@0" in row
  assert table[-1].split()[0] == str(L + 1)
  assert odn.StackedDepth([0, 3, -1, 9]).text() == "0,3,..,9"
  assert odn.StackedDepth([4, 2]).text() == "4,2"


# ----------------------------------------------------------------------------- transforms


def np_norm(x, norm):
  x = np.abs(np.asarray(x, np.float64)).ravel()
  return {
    "l2": np.sqrt(np.sum(x**2)),
    "l1": np.sum(x),
    "max": np.max(x),
    "rms": np.sqrt(np.mean(x**2)),
  }[norm]


@pytest.mark.parametrize("norm", ["l2", "l1", "max", "rms"])
@pytest.mark.parametrize("jit", [False, True])
def test_normalize_per_slice_equals_unstacked_leaves(norm, jit):
  tx = odn.layerwise_normalize(norm=norm, target=2.0, stack_axis=STACK)
  out = run(tx, stacked_tree(), jit=jit)
  ref = run(odn.layerwise_normalize(norm=norm, target=2.0), unstacked_tree(), jit=jit)
  assert_trees_close(out, as_stacked(ref))
  for i in range(L):  # NumPy float64: slice i divided by its own norm
    kernel = BLOCKS["kernel"][i]
    expected = 2.0 * kernel / np_norm(kernel, norm)
    np.testing.assert_allclose(out["blocks"]["kernel"][i], expected, rtol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_normalize_group_layer_joins_slices_of_one_depth(jit):
  tx = odn.layerwise_normalize(group="layer", depths=S_DEPTHS)
  out = run(tx, stacked_tree(), jit=jit)
  ref = run(odn.layerwise_normalize(group="layer", depths=U_DEPTHS), unstacked_tree())
  assert_trees_close(out, as_stacked(ref))
  i = 1
  joint = np.sqrt(np_norm(BLOCKS["kernel"][i], "l2") ** 2 + np_norm(BLOCKS["bias"][i], "l2") ** 2)
  np.testing.assert_allclose(out["blocks"]["bias"][i], BLOCKS["bias"][i] / joint, rtol=1e-5)


def test_last_layer_target_reads_the_deepest_slice():
  # Blocks last: the deepest layer is slice L-1 of the stack.
  tree = {"pre": PRE, "blocks": BLOCKS}
  depths = odn.layer_depths(tree, stack_axis=STACK)
  out = run(odn.layerwise_normalize(target="last_layer", depths=depths), tree)
  last = np.sqrt(np_norm(BLOCKS["kernel"][-1], "l2") ** 2 + np_norm(BLOCKS["bias"][-1], "l2") ** 2)
  kernel = PRE["kernel"]
  np.testing.assert_allclose(out["pre"]["kernel"], last * kernel / np_norm(kernel, "l2"), 1e-5)
  w_out = run(odn.layerwise_normalize(target="last_layer_weights", depths=depths), tree, tree)
  assert_trees_close(w_out, out)


@pytest.mark.parametrize(
  "kwargs",
  [
    {"decay": "linear"},
    {"decay": "exponential", "reverse": True},
    {"decay": "linear", "normalize_depth": True},
    {"decay": lambda g, d: 1.0 / (1.0 + g * d)},
  ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_decay_per_slice_equals_unstacked_layers(kwargs, jit):
  out = run(odn.depth_decay(0.3, depths=S_DEPTHS, **kwargs), stacked_tree(), jit=jit)
  ref = run(odn.depth_decay(0.3, depths=U_DEPTHS, **kwargs), unstacked_tree())
  assert_trees_close(out, as_stacked(ref))


def test_decay_factors_against_numpy():
  out = run(odn.depth_decay(0.5, decay="linear", stack_axis=STACK), stacked_tree())
  for i in range(L):
    expected = np.float64(0.5) ** (i + 1) * BLOCKS["kernel"][i].astype(np.float64)
    np.testing.assert_allclose(out["blocks"]["kernel"][i], expected, rtol=RTOL)
  np.testing.assert_allclose(out["post"]["bias"], 0.5 ** (L + 1) * POST["bias"], rtol=RTOL)


def test_depth_normalized_passes_the_stack_to_both_steps():
  tx = odn.depth_normalized(0.2, stack_axis=STACK, group="layer")
  ref = odn.depth_normalized(0.2, depths=U_DEPTHS, group="layer")
  assert_trees_close(run(tx, stacked_tree()), as_stacked(run(ref, unstacked_tree())))


def test_stack_along_a_middle_axis():
  blocks = {k: np.moveaxis(v, 0, 1) for k, v in BLOCKS.items() if k == "kernel"}
  tree = {"blocks": blocks}  # (5, L, 5)
  out = run(odn.layerwise_normalize(stack_axis={"blocks": 1}), tree)
  for i in range(L):
    kernel = BLOCKS["kernel"][i]
    np.testing.assert_allclose(out["blocks"]["kernel"][:, i], kernel / np_norm(kernel, "l2"), 1e-5)


def test_bf16_stacked_leaf_keeps_its_dtype():
  tree = keep_order(
    stacked_tree(), jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), stacked_tree())
  )
  out = run(odn.depth_normalized(0.1, stack_axis=STACK), tree)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


def test_zero_slice_stays_zero():
  blocks = {k: v.copy() for k, v in BLOCKS.items()}
  blocks["kernel"][1] = 0
  out = run(odn.layerwise_normalize(stack_axis=STACK), stacked_tree(blocks))
  assert np.all(np.isfinite(out["blocks"]["kernel"]))
  assert np.all(out["blocks"]["kernel"][1] == 0)


def test_no_python_loop_over_slices():
  def count(n):
    tree = {"w": jnp.ones((n, 6, 6)), "b": jnp.ones((n, 6))}
    txs = [
      odn.layerwise_normalize(stack_axis={"": 0}),
      odn.depth_decay(0.1, stack_axis={"": 0}),
      odn.scale_normalize("determinant", stack_axis={"": 0}),
    ]
    return [len(jax.make_jaxpr(tx.update)(tree, tx.init(tree), tree).eqns) for tx in txs]

  assert count(3) == count(40)


def test_masked_stack_keeps_its_layers_with_precomputed_depths():
  tree = stacked_tree()
  mask = {k: jax.tree.map(lambda _, k=k: k != "blocks", v) for k, v in tree.items()}
  tx = optax.masked(odn.depth_decay(0.5, decay="linear", depths=S_DEPTHS), mask)
  out = run(tx, tree)
  np.testing.assert_allclose(out["post"]["bias"], 0.5 ** (L + 1) * POST["bias"], rtol=RTOL)
  np.testing.assert_array_equal(out["blocks"]["kernel"], BLOCKS["kernel"])


# ----------------------------------------------------------------------------- flow


@pytest.mark.parametrize("jit", [False, True])
def test_gradient_flow_per_slice_equals_unstacked(jit):
  flow = (lambda g, p: odn.gradient_flow(g, p, S_DEPTHS)) if not jit else None
  if jit:
    flow = jax.jit(lambda g, p: odn.gradient_flow(g, p, S_DEPTHS))
  report = flow(stacked_tree(), stacked_tree())
  ref = odn.gradient_flow(unstacked_tree(), unstacked_tree(), U_DEPTHS)
  assert report.depths == ref.depths == tuple(range(L + 2))
  assert report.sizes == ref.sizes
  assert report.paths[1] == "blocks[0]" and report.paths[L] == f"blocks[{L - 1}]"
  for field in ("norm", "mean_abs", "max_abs", "rms", "param_norm", "ratio"):
    np.testing.assert_allclose(getattr(report, field), getattr(ref, field), rtol=1e-5)
  i = 2
  both = np.concatenate([BLOCKS["kernel"][i].ravel(), BLOCKS["bias"][i].ravel()]).astype(np.float64)
  np.testing.assert_allclose(report.norm[i + 1], np.sqrt(np.sum(both**2)), rtol=RTOL)
  np.testing.assert_allclose(report.mean_abs[i + 1], np.mean(np.abs(both)), rtol=RTOL)


def test_gradient_flow_of_a_vanished_slice_does_not_underflow():
  blocks = {k: v.copy() for k, v in BLOCKS.items()}
  blocks["kernel"][0] = 1e-25
  blocks["bias"][0] = 0
  report = odn.gradient_flow(stacked_tree(blocks), stack_axis=STACK)
  np.testing.assert_allclose(report.norm[1], 1e-25 * 5, rtol=1e-5)


def test_tracker_and_flow_from_state_with_a_stack():
  params = stacked_tree()
  opt = optax.chain(odn.track_gradient_flow(history=2, stack_axis=STACK), optax.sgd(0.1))
  state = opt.init(params)
  _, state = jax.jit(opt.update)(params, state, params)
  report = odn.flow_from_state(state, params, stack_axis=STACK)
  ref = odn.gradient_flow(params, params, stack_axis=STACK)
  assert report.paths == ref.paths and report.sizes == ref.sizes
  np.testing.assert_allclose(report.norm, ref.norm, rtol=RTOL)
  assert len(report.depths) == L + 2


# ----------------------------------------------------------------------------- scale


def test_scale_normalize_per_slice_equals_unstacked():
  params = stacked_tree()
  grads = jax.tree.map(lambda x: 0.1 * np.ones_like(x), params)
  tx = odn.scale_normalize("determinant", depths=S_DEPTHS)
  out = run(tx, grads, params)
  ref_grads = jax.tree.map(lambda x: 0.1 * np.ones_like(x), unstacked_tree())
  ref = run(odn.scale_normalize("determinant"), ref_grads, unstacked_tree())
  assert_trees_close(out, as_stacked(ref), rtol=1e-4, atol=1e-5)
  new = np.asarray(params["blocks"]["kernel"] + out["blocks"]["kernel"], np.float64)
  for i in range(L):  # each slice on its own has pseudo-determinant 1
    np.testing.assert_allclose(np.prod(np.linalg.svd(new[i], compute_uv=False)), 1.0, rtol=1e-3)


def test_scale_normalize_data_mode_takes_stacked_inputs():
  params = stacked_tree()
  grads = jax.tree.map(np.zeros_like, params)
  xs = _arr(L, 7, 5)
  inputs = {"pre": _arr(7, 3), "blocks": xs, "post": _arr(7, 5)}
  out = run(odn.scale_normalize("data", stack_axis=STACK), grads, params, layer_inputs=inputs)
  new = np.asarray(params["blocks"]["kernel"] + out["blocks"]["kernel"], np.float64)
  for i in range(L):
    x = xs[i].astype(np.float64)
    ratio = np.linalg.norm(x @ new[i], axis=1) / np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(ratio.mean(), 1.0, rtol=1e-4)
  bad = {**inputs, "blocks": xs[:2]}
  with pytest.raises(ValueError, match="give them a leading axis of 4"):
    run(odn.scale_normalize("data", stack_axis=STACK), grads, params, layer_inputs=bad)


def test_scale_normalize_probe_mode_with_a_stack_runs_under_jit():
  params = stacked_tree()
  grads = jax.tree.map(np.zeros_like, params)
  out = run(odn.scale_normalize("probe", stack_axis=STACK, num_probes=64), grads, params, jit=True)
  assert out["blocks"]["kernel"].shape == (L, 5, 5)
  np.testing.assert_array_equal(out["blocks"]["bias"], 0)  # biases left alone


# ----------------------------------------------------------------------------- errors


def test_errors():
  tree = stacked_tree()
  with pytest.raises(TypeError, match="stack_axis must be None, a mapping"):
    odn.layerwise_normalize(stack_axis=0)
  with pytest.raises(TypeError, match="stack_axis must be None, a mapping"):
    odn.layer_depths(tree, stack_axis=[0])
  with pytest.raises(ValueError, match="stack_axis names \\['nope'\\]"):
    odn.layer_depths(tree, stack_axis={"nope": 0})
  with pytest.raises(ValueError, match="stack_axis gave axis 3 for the leaf at 'blocks/bias'"):
    odn.layer_depths(tree, stack_axis={"blocks": 3})
  with pytest.raises(ValueError, match="but depths gives it 1"):
    run(
      odn.depth_decay(
        0.1, depths=U_DEPTHS | {"blocks": {"kernel": 1, "bias": 1}}, stack_axis=STACK
      ),
      tree,
    )
  bad = {**S_DEPTHS, "blocks": {"kernel": odn.StackedDepth([1, 2]), "bias": 1}}
  with pytest.raises(ValueError, match="2 per-slice depths along axis 0 for the leaf at"):
    run(odn.depth_decay(0.1, depths=bad), tree)
  with pytest.raises(ValueError, match="one integer depth >= -1 per slice"):
    odn.StackedDepth([1, -2])
  with pytest.raises(ValueError, match="one integer depth >= -1 per slice"):
    odn.StackedDepth([])
  with pytest.raises(TypeError, match="StackedDepth axis must be an int"):
    odn.StackedDepth([1], axis=0.5)


# ----------------------------------------------------------------------------- nested scans

TWO_AXES = odn.StackedDepth([[1, 2], [3, 4]], axis=(0, 1))


def two_axis_tree(blocks=BLOCKS):
  """The L = 4 blocks as nn.remat_scan(lengths=(2, 2)) stores them: shape (2, 2, ...)."""
  return {
    "pre": PRE,
    "blocks": {k: v.reshape(2, 2, *v.shape[1:]) for k, v in blocks.items()},
    "post": POST,
  }


def test_stacked_depth_on_two_axes():
  assert TWO_AXES.shape == (2, 2) and TWO_AXES.flat == (1, 2, 3, 4) and len(TWO_AXES) == 4
  assert TWO_AXES.axes == (0, 1) and TWO_AXES.text() == "1..4"
  assert TWO_AXES.map(lambda d: 5 - d) == odn.StackedDepth([[4, 3], [2, 1]], axis=(0, 1))
  assert odn.StackedDepth(np.arange(6).reshape(2, 3), axis=(1, 0)).depths == ((0, 1, 2), (3, 4, 5))
  depths = {"pre": {"kernel": 0, "bias": 0}, "blocks": {"kernel": TWO_AXES, "bias": TWO_AXES}}
  depths["post"] = {"kernel": 5, "bias": 5}
  table = odn.depth_table(two_axis_tree(), depths)
  assert "1..4   blocks/kernel  (2, 2, 5, 5)@(0, 1)" in table


def test_stacked_depth_axes_in_any_order_reach_the_right_slices():
  # Axis order (1, 0): depths[i][j] labels the slice at leaf index [j, i].
  label = odn.StackedDepth([[0, 1], [2, 3]], axis=(1, 0))
  array = odn._layers.depth_array(label, 3)
  assert array.shape == (2, 2, 1)
  assert array[:, :, 0].tolist() == [[0, 2], [1, 3]]


@pytest.mark.parametrize("jit", [False, True])
def test_two_stack_axes_equal_unstacked_layers(jit):
  depths = {"pre": {"kernel": 0, "bias": 0}, "blocks": {"kernel": TWO_AXES, "bias": TWO_AXES}}
  depths["post"] = {"kernel": 5, "bias": 5}
  for make in (
    lambda d: odn.layerwise_normalize(depths=d),
    lambda d: odn.depth_decay(0.3, decay="linear", depths=d),
  ):
    out = run(make(depths), two_axis_tree(), jit=jit)
    ref = as_stacked(run(make(U_DEPTHS), unstacked_tree(), jit=jit))
    assert_trees_close(out, two_axis_tree(ref["blocks"]) | {"pre": ref["pre"], "post": ref["post"]})
  report = odn.gradient_flow(two_axis_tree(), depths=depths)
  reference = odn.gradient_flow(unstacked_tree(), depths=U_DEPTHS)
  assert report.depths == reference.depths
  np.testing.assert_allclose(report.norm, reference.norm, rtol=RTOL)


def test_two_axis_errors():
  with pytest.raises(ValueError, match="nested 2 deep, rectangular"):
    odn.StackedDepth([[1, 2], [3]], axis=(0, 1))
  with pytest.raises(ValueError, match="nested 2 deep, rectangular"):
    odn.StackedDepth([1, 2], axis=(0, 1))
  with pytest.raises(TypeError, match="StackedDepth axis must be an int or a tuple of ints"):
    odn.StackedDepth([[1]], axis=(0, 0.5))
  tree = two_axis_tree()
  bad = {"pre": 0, "blocks": {"kernel": odn.StackedDepth([[1, 2, 3]], axis=(0, 1)), "bias": 1}}
  with pytest.raises(ValueError, match=r"1x3 per-slice depths along axis \(0, 1\)"):
    run(odn.depth_decay(0.1, depths=bad | {"post": 2}), tree)
  twice = {
    "pre": 0,
    "blocks": {"kernel": odn.StackedDepth([[1, 2], [3, 4]], axis=(0, -4)), "bias": 1},
  }
  with pytest.raises(ValueError, match="the axis must hold one slice per depth"):
    run(odn.depth_decay(0.1, depths=twice | {"post": 2}), tree)
