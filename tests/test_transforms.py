"""`layerwise_normalize`, `depth_decay`, `depth_normalized` against float64 NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_depthnorm as odn
from tests import reference as ref
from tests import trees
from tests.tolerance import ATOL, RTOL

TREE_NAMES = list(trees.TREES)


def _apply(tx, grads, params=None, use_jit=True, steps=1):
  state = tx.init(grads if params is None else params)
  update = jax.jit(tx.update) if use_jit else tx.update
  for _ in range(steps):
    out, state = update(grads, state, params)
  return out


def _check(out, expected, rtol=RTOL, atol=ATOL):
  got = trees.to_numpy(out)
  assert len(got) == len(expected)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("tree_name", TREE_NAMES)
@pytest.mark.parametrize("group", ["leaf", "layer"])
@pytest.mark.parametrize("norm", ["l2", "l1", "max", "rms"])
@pytest.mark.parametrize("use_jit", [True, False])
def test_layerwise_normalize_matches_reference(tree_name, group, norm, use_jit):
  params = trees.TREES[tree_name]()
  grads = trees.random_like(params)
  tx = odn.layerwise_normalize(target=2.5, norm=norm, group=group)
  out = _apply(tx, grads, use_jit=use_jit)
  depths = trees.expected_depths(grads)
  expected = ref.normalize(trees.to_numpy(grads), depths, 2.5, norm, group=group)
  _check(out, expected)


@pytest.mark.parametrize("tree_name", TREE_NAMES)
@pytest.mark.parametrize("target", ["last_layer", "last_layer_weights"])
def test_last_layer_targets(tree_name, target):
  params = trees.TREES[tree_name]()
  grads = trees.random_like(params, seed=3)
  depths = trees.expected_depths(grads)
  source = trees.to_numpy(grads if target == "last_layer" else params)
  last = max(depths)
  n = ref.block_norm([a for a, d in zip(source, depths) if d == last])
  out = _apply(odn.layerwise_normalize(target=target), grads, params)
  _check(out, ref.normalize(trees.to_numpy(grads), depths, n))


def test_callable_target_gets_updates_and_params():
  params = trees.dict_params()
  grads = trees.random_like(params)
  seen = {}

  def target(updates, p):
    seen["args"] = (updates, p)
    return 0.5 * optax.tree.norm(p)

  out = _apply(odn.layerwise_normalize(target=target), grads, params, use_jit=False)
  assert seen["args"][0] is grads and seen["args"][1] is params
  n = 0.5 * ref.block_norm(trees.to_numpy(params))
  _check(out, ref.normalize(trees.to_numpy(grads), trees.expected_depths(grads), n))


@pytest.mark.parametrize("tree_name", TREE_NAMES)
@pytest.mark.parametrize("decay", ["linear", "exponential"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("normalize_depth", [False, True])
@pytest.mark.parametrize("use_jit", [True, False])
def test_depth_decay_matches_reference(tree_name, decay, reverse, normalize_depth, use_jit):
  params = trees.TREES[tree_name]()
  grads = trees.random_like(params)
  tx = odn.depth_decay(0.3, decay=decay, reverse=reverse, normalize_depth=normalize_depth)
  out = _apply(tx, grads, use_jit=use_jit)
  depths = trees.expected_depths(grads)
  expected = ref.decay(trees.to_numpy(grads), depths, 0.3, decay, reverse, normalize_depth)
  _check(out, expected)


def test_depth_decay_callable():
  grads = trees.random_like(trees.linen_params())
  tx = odn.depth_decay(0.2, decay=lambda gamma, d: 1.0 / (1.0 + gamma * d))
  out = _apply(tx, grads)
  expected = [
    g / (1.0 + 0.2 * d) for g, d in zip(trees.to_numpy(grads), trees.expected_depths(grads))
  ]
  _check(out, expected)


def test_depth_decay_gamma_schedule_follows_step_count():
  grads = trees.random_like(trees.nnx_state())
  schedule = optax.linear_schedule(0.0, 1.0, transition_steps=4)
  tx = odn.depth_decay(schedule, decay="linear")
  state = tx.init(grads)
  step = jax.jit(tx.update)
  depths = trees.expected_depths(grads)
  for count in range(6):
    out, state = step(grads, state)
    gamma = min(count / 4, 1.0)
    _check(out, ref.decay(trees.to_numpy(grads), depths, gamma, "linear"))
  assert int(state.count) == 6


def test_depth_decay_under_inject_hyperparams():
  grads = trees.random_like(trees.equinox_params())
  tx = optax.inject_hyperparams(odn.depth_decay)(gamma=0.1)
  state = tx.init(grads)
  state.hyperparams["gamma"] = jnp.asarray(0.7)
  out, state = jax.jit(tx.update)(grads, state)
  depths = trees.expected_depths(grads)
  _check(out, ref.decay(trees.to_numpy(grads), depths, 0.7, "exponential"))


def test_depth_normalized_is_eq1_with_sgd():
  params = trees.linen_params()
  grads = trees.random_like(params, seed=5)
  tx = optax.chain(odn.depth_normalized(0.05, decay="exponential"), optax.sgd(0.1))
  new = optax.apply_updates(params, _apply(tx, grads, params))
  depths = trees.expected_depths(grads)
  expected = ref.eq1_sgd_step(
    trees.to_numpy(params), trees.to_numpy(grads), depths, 0.1, 0.05, "exponential"
  )
  _check(new, expected)


def test_depth_decay_before_adam_cancels_after_adam_scales():
  """The docstring's placement claim: Adam undoes a per-layer gradient scale."""
  params = trees.linen_params()
  grads = trees.random_like(params)
  adam = _apply(optax.adam(1e-2), grads, params)
  before = _apply(optax.chain(odn.depth_decay(0.5), optax.adam(1e-2, eps=0.0)), grads, params)
  after = _apply(optax.chain(optax.adam(1e-2), odn.depth_decay(0.5)), grads, params)
  _check(before, trees.to_numpy(adam), rtol=1e-4, atol=1e-6)
  depths = trees.expected_depths(grads)
  _check(after, ref.decay(trees.to_numpy(adam), depths, 0.5, "exponential"), rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_low_precision_norms_in_float32(dtype):
  # 4096 entries of 1: the sum of squares (4096) is exact in float32 but a
  # bf16 accumulation would lose digits; the output keeps the input dtype.
  grads = {
    "layer_0": {"w": jnp.ones((64, 64), dtype)},
    "layer_1": {"w": jnp.full((8,), 3.0, dtype)},
  }
  with jax.numpy_dtype_promotion("strict"):
    out = _apply(odn.layerwise_normalize(), grads)
    decayed = _apply(odn.depth_decay(0.1), grads)
  assert out["layer_0"]["w"].dtype == dtype and decayed["layer_1"]["w"].dtype == dtype
  np.testing.assert_allclose(np.asarray(out["layer_0"]["w"], np.float64), 1 / 64, rtol=1e-2)
  np.testing.assert_allclose(
    np.asarray(decayed["layer_1"]["w"], np.float64), 3 * np.exp(-0.1), rtol=1e-2
  )


def test_float64_leaves_stay_float64():
  with jax.enable_x64(True):
    g = np.random.default_rng(0).normal(size=(5, 3))
    grads = {"l": {"w": jnp.asarray(g, jnp.float64)}}
    out = _apply(odn.layerwise_normalize(), grads)
    assert out["l"]["w"].dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(out["l"]["w"]), g / np.linalg.norm(g), rtol=1e-12)


@pytest.mark.parametrize("group", ["leaf", "layer"])
def test_zero_gradient_stays_zero_nan_shows(group):
  grads = {"layer_0": {"w": jnp.zeros((3, 2))}, "layer_1": {"w": jnp.array([1.0, jnp.nan])}}
  out = _apply(odn.layerwise_normalize(group=group), grads)
  assert np.all(np.asarray(out["layer_0"]["w"]) == 0)
  assert np.isnan(np.asarray(out["layer_1"]["w"])).all()
  tx = odn.depth_normalized(0.1, target="last_layer")
  zero = _apply(tx, {"layer_0": jnp.zeros(3), "layer_1": jnp.zeros(2)})
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(zero))


def test_non_float_leaves_pass_through():
  grads = {"a": {"w": jnp.ones(3), "step": jnp.array(7, jnp.int32), "none": None}, "e": jnp.ones(0)}
  for tx in (odn.layerwise_normalize(), odn.depth_decay(0.5), odn.depth_normalized(0.5)):
    out = _apply(tx, grads)
    assert out["a"]["step"] is grads["a"]["step"] or int(out["a"]["step"]) == 7
    assert out["a"]["none"] is None and out["e"].shape == (0,)


_ERRORS = [
  (lambda: odn.depth_decay(-0.1), ValueError, "non-negative"),
  (lambda: odn.depth_decay(float("nan")), ValueError, "non-negative"),
  (lambda: odn.depth_decay(1.5, decay="linear"), ValueError, r"\[0, 1\] for decay='linear'"),
  (lambda: odn.depth_decay(0.1, decay="cosine"), ValueError, "decay must be one of"),
  (lambda: odn.depth_decay(0.1, decay=3), TypeError, "decay must be a string or a callable"),
  (lambda: odn.layerwise_normalize(norm="l3"), ValueError, "norm must be one of"),
  (lambda: odn.layerwise_normalize(group="block"), ValueError, "group must be one of"),
  (lambda: odn.layerwise_normalize(target="first_layer"), ValueError, "target must be"),
  (lambda: odn.layerwise_normalize(target=-1.0), ValueError, "non-negative number"),
  (lambda: odn.layerwise_normalize(eps=-1.0), ValueError, "eps must be a non-negative"),
  (lambda: odn.depth_normalized(2.0, decay="linear"), ValueError, "decay='linear'"),
]


@pytest.mark.parametrize("make, error, match", _ERRORS)
def test_construction_errors(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_last_layer_weights_needs_params():
  tx = odn.layerwise_normalize(target="last_layer_weights")
  grads = trees.dict_params()
  with pytest.raises(ValueError, match="needs `params`"):
    tx.update(grads, tx.init(grads))


def test_last_layer_masked_out_is_an_error():
  grads = {"Dense_0": {"kernel": jnp.ones(2)}, "Dense_1": {"kernel": jnp.ones(2)}}
  mask = {"Dense_0": {"kernel": True}, "Dense_1": {"kernel": False}}
  tx = optax.masked(odn.layerwise_normalize(target="last_layer"), mask)
  with pytest.raises(ValueError, match="needs the final layer"):
    tx.update(grads, tx.init(grads))


def test_masked_keeps_depths_of_hidden_layers():
  grads = {f"Dense_{i}": {"kernel": jnp.ones(2)} for i in range(3)}
  mask = {"Dense_0": {"kernel": False}, "Dense_1": {"kernel": True}, "Dense_2": {"kernel": True}}
  tx = optax.masked(odn.depth_decay(0.5, decay="linear", normalize_depth=True), mask)
  out = _apply(tx, grads)
  # Dense_0 is hidden from the inner transform but still counts: depths 1, 2 of
  # max 2, so factors 0.5^(1/2) and 0.5^1 (not 1 and 0.5, as if it were absent).
  np.testing.assert_allclose(out["Dense_1"]["kernel"], 0.5**0.5, rtol=RTOL)  # float32 pow
  np.testing.assert_allclose(out["Dense_2"]["kernel"], 0.5, rtol=RTOL)
  np.testing.assert_allclose(out["Dense_0"]["kernel"], 1.0)


def test_precomputed_depths_and_rules():
  params = trees.linen_params()
  grads = trees.random_like(params)
  depths = odn.layer_depths(params, reverse=True)
  out = _apply(odn.depth_decay(0.2, depths=depths), grads)
  _check(
    out,
    ref.decay(trees.to_numpy(grads), trees.expected_depths(grads), 0.2, reverse=True),
  )
  by_rule = _apply(odn.depth_decay(0.2, depths=r"Dense_(\d+)/"), grads)
  _check(by_rule, ref.decay(trees.to_numpy(grads), trees.expected_depths(grads), 0.2))
  sub = functools.partial(odn.depth_decay, 0.2)
  with pytest.raises(ValueError, match="no entry for the leaf"):
    _apply(sub(depths={"Dense_0": {"kernel": 0}, "other": {"kernel": 1}}), grads)


def test_zero_block_stays_zero_when_eps_underflows_in_float16():
  # inject_hyperparams casts eps=1e-8 to the params' dtype: 0 in float16.
  grads = {"layer_0": {"w": jnp.zeros(3, jnp.float16)}, "layer_1": {"w": jnp.ones(4, jnp.float16)}}
  tx = optax.inject_hyperparams(odn.layerwise_normalize)(eps=1e-8)
  state = tx.init(grads)
  assert float(state.hyperparams["eps"]) == 0.0
  out, _ = jax.jit(tx.update)(grads, state, grads)
  assert np.all(np.asarray(out["layer_0"]["w"]) == 0)
  np.testing.assert_allclose(np.asarray(out["layer_1"]["w"], np.float32), 0.5, rtol=1e-3)
