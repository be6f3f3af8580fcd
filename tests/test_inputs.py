"""Bad inputs (issue 15): a clear error when static, a defined result when traced.

One rule (`optax_depthnorm._checks`): a static hyperparameter out of range is a
ValueError naming it, its value and the range; a traced one (under `jit`,
`optax.inject_hyperparams`) and a schedule's value are clipped into the range at
use (a NaN stays NaN); a non-scalar is an error either way. A norm floor ``eps``
never goes below the smallest normal float (XLA flushes subnormals to zero).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_depthnorm as odn
from tests.tolerance import RTOL, assert_close

PARAMS = {f"layer_{i}": {"w": jnp.array([3.0, 4.0])} for i in range(3)}
WITH_ZERO = {"layer_0": {"w": jnp.zeros(2)}, "layer_1": {"w": jnp.array([3.0, 4.0])}}
TINY32 = float(np.finfo(np.float32).tiny)


def _apply(tx, grads=PARAMS, use_jit=True):
  update = jax.jit(tx.update) if use_jit else tx.update
  return update(grads, tx.init(grads), grads)[0]


def _firsts(updates):
  """The first entry of every layer's update, in layer order."""
  return [float(updates[k]["w"][0]) for k in sorted(updates)]


def _cotangent(x, g, **kwargs):
  return jax.vjp(lambda v: odn.bgn(v, **kwargs), x)[1](g)[0]


def _changed(injected, grads, **hyperparams):
  """`injected`'s update under jit after its state's hyperparams are set (traced values)."""
  state = injected.init(grads)
  for name, value in hyperparams.items():
    state.hyperparams[name] = jnp.asarray(value, jnp.float32)
  return jax.jit(injected.update)(grads, state, grads)[0]


# ----------------------------------------------------------------------------- static: errors

_NAN, _INF = float("nan"), float("inf")
_STATIC_ERRORS = [
  (lambda: odn.bgn(jnp.ones(3), kappa=-1.0), r"kappa must be a non-negative number .*got -1\.0"),
  (lambda: odn.bgn(jnp.ones(3), kappa=_NAN), r"kappa must be .*\[0, inf\).*got nan"),
  (lambda: odn.bgn(jnp.ones(3), kappa=_INF), r"kappa must be .*finite.*got inf"),
  (lambda: odn.bgn(jnp.ones(3), kappa=jnp.array(-2.0)), r"kappa must be .*got Array\(-2\."),
  (lambda: odn.bgn(jnp.ones(3), kappa=lambda s: -1.0), r"kappa\(x\.shape\) for shape \(3,\)"),
  (lambda: odn.bgn(jnp.ones(3), eps=_NAN), r"eps must be a non-negative .*got nan"),
  (lambda: odn.bgn(jnp.ones(3), eps=-1e-12), r"eps must be a non-negative"),
  (lambda: odn.with_bgn(jax.nn.relu, kappa=-1.0), r"kappa must be a non-negative"),
  (lambda: odn.with_bgn(jax.nn.relu, eps=_INF), r"eps must be .*got inf"),
  (lambda: odn.depth_decay(_INF), r"gamma must be a non-negative number \(finite.*got inf"),
  (lambda: odn.depth_decay(jnp.array(-0.5)), r"gamma must be a non-negative .*got Array\(-0\.5"),
  (
    lambda: odn.depth_decay(jnp.array(2.0), decay="linear"),
    r"gamma must be in \[0, 1\] for decay='linear'.*got Array\(2\.",
  ),
  (lambda: odn.depth_decay(np.float32(1.5), decay="linear"), r"in \[0, 1\] for decay='linear'"),
  (lambda: odn.depth_normalized(_INF), r"gamma must be .*got inf"),
  (lambda: odn.depth_normalized(0.1, eps=_NAN), r"eps must be .*got nan"),
  (lambda: odn.layerwise_normalize(target=jnp.array(-1)), r"target must be a non-negative .*-1"),
  (lambda: odn.layerwise_normalize(target=_INF), r"target must be .*finite.*got inf"),
  (lambda: odn.layerwise_normalize(target=_NAN), r"target must be .*got nan"),
  (lambda: odn.layerwise_normalize(eps=-1.0), r"eps must be a non-negative .*got -1\.0"),
  (lambda: odn.layerwise_normalize(eps=np.float64(_NAN)), r"eps must be .*nan"),
]


@pytest.mark.parametrize("make, match", _STATIC_ERRORS)
def test_static_value_out_of_range_is_a_value_error(make, match):
  with pytest.raises(ValueError, match=match):
    make()


_NOT_SCALAR = [
  lambda: odn.bgn(jnp.ones(3), kappa=jnp.ones(3)),
  lambda: odn.bgn(jnp.ones(3), kappa=lambda shape: np.ones(shape)),
  lambda: odn.depth_decay(jnp.array([0.1, 0.2, 0.3])),
  lambda: odn.depth_decay(np.array([0.1, 0.2, 0.3]), decay="linear"),
  lambda: odn.layerwise_normalize(target=jnp.ones(2)),
  lambda: odn.layerwise_normalize(eps=np.full(2, 1e-8)),
]


@pytest.mark.parametrize("make", _NOT_SCALAR)
def test_a_vector_hyperparameter_is_an_error(make):
  with pytest.raises(ValueError, match=r"must be a scalar \(shape \(\)\), got an array of shape"):
    make()


def test_a_vector_gamma_is_an_error_when_traced_too():
  injected = optax.inject_hyperparams(odn.depth_decay)(gamma=0.1)
  state = injected.init(PARAMS)
  state.hyperparams["gamma"] = jnp.full(3, 0.1)
  with pytest.raises(ValueError, match=r"gamma must be a scalar \(shape \(\)\)"):
    jax.jit(injected.update)(PARAMS, state, PARAMS)
  schedule = lambda count: jnp.full(3, 0.1)  # a schedule of vectors
  with pytest.raises(ValueError, match=r"gamma must be a scalar \(shape \(\)\)"):
    _apply(odn.depth_decay(schedule))


# ----------------------------------------------------------------------------- messages


_TYPE_ERRORS = [
  (
    lambda: odn.depth_decay(gamma=None),
    r"gamma must be a number, a scalar array or an optax schedule \(a callable of the step "
    r"count\), got None",
  ),
  (lambda: odn.depth_decay("0.1"), r"gamma must be a number.*got '0\.1'"),
  (lambda: odn.depth_decay(jnp.array(0.1j)), r"gamma must be a number"),
  (lambda: odn.layerwise_normalize(target=None), r"target must be a number, a scalar array, one"),
  (lambda: odn.layerwise_normalize(eps=None), r"eps must be a number or a scalar array, got None"),
  (lambda: odn.bgn(jnp.ones(3), kappa="2"), r"kappa must be None, a number, a scalar array"),
  (lambda: odn.bgn(None), r"bgn: x must be a floating array .*got None"),
  (lambda: odn.bgn([1.0, 2.0]), r"x must be a floating array .*got a list"),
  (lambda: odn.bgn(jnp.ones(3, jnp.int32)), r"x must be a floating array .*got an int32 array"),
]


@pytest.mark.parametrize("make, match", _TYPE_ERRORS)
def test_wrong_type_is_a_type_error_saying_what_is_expected(make, match):
  with pytest.raises(TypeError, match=match):
    make()


_DECAY_SAYS = (
  r"decay\(gamma, d\) must return the factor of every depth: an array of d's shape \(3,\)"
)


@pytest.mark.parametrize(
  "decay, error, got",
  [
    (lambda g, d: [1.0, 1.0, 1.0], TypeError, r"got \[1\.0, 1\.0, 1\.0\]"),
    (lambda g, d: None, TypeError, "got None"),
    (lambda g, d: d > 0, TypeError, "got a bool array of shape"),
    (lambda g, d: d[:2], ValueError, r"got a float32 array of shape \(2,\)"),
    (lambda g, d: jnp.ones((3, 1)), ValueError, r"got a float32 array of shape \(3, 1\)"),
  ],
)
def test_decay_callable_must_return_one_factor_per_depth(decay, error, got):
  tx = odn.depth_decay(0.5, decay=decay)
  for use_jit in (True, False):
    with pytest.raises(error, match=f"{_DECAY_SAYS}.*{got}"):
      _apply(tx, use_jit=use_jit)


def test_decay_callable_may_return_one_number_for_every_layer():
  for decay in (lambda g, d: 0.5, lambda g, d: jnp.float32(0.5), lambda g, d: 1 - g):
    assert _firsts(_apply(odn.depth_decay(0.5, decay=decay))) == [1.5, 1.5, 1.5]


# ----------------------------------------------------------------------------- defined results


def test_kappa_zero_is_a_zero_gradient():
  x, g = jnp.ones((2, 4)), jnp.arange(8.0).reshape(2, 4)
  np.testing.assert_array_equal(_cotangent(x, g, kappa=0.0), np.zeros((2, 4)))
  np.testing.assert_array_equal(_cotangent(x, g, kappa=0, per_example=True), np.zeros((2, 4)))


def test_traced_kappa_is_clipped_to_non_negative_and_nan_shows():
  x, g = jnp.ones((2, 4)), jnp.arange(8.0).reshape(2, 4)
  grad = jax.jit(lambda k: _cotangent(x, g, kappa=k))
  np.testing.assert_array_equal(grad(-1.0), np.zeros((2, 4)))  # clipped to 0
  assert_close(jnp.linalg.norm(grad(2.0)), 2.0)
  assert np.isnan(np.asarray(grad(jnp.nan))).all()
  assert np.isfinite(np.asarray(grad(jnp.inf))).all()  # the largest float32, then rounding


@pytest.mark.parametrize("eps", [0.0, 1e-40, 1e-45, TINY32])
def test_zero_or_subnormal_eps_acts_as_the_smallest_normal(eps):
  """XLA flushes a subnormal float32 to zero; eps never goes below the smallest normal."""
  g = jnp.array([3.0, 4.0])
  for use_jit in (True, False):
    out = _apply(odn.layerwise_normalize(eps=eps), WITH_ZERO, use_jit)
    np.testing.assert_array_equal(out["layer_0"]["w"], [0.0, 0.0])
    assert_close(out["layer_1"]["w"], [0.6, 0.8])
  zero = _cotangent(jnp.ones(2), jnp.zeros(2), eps=eps)
  np.testing.assert_array_equal(zero, [0.0, 0.0])
  assert_close(_cotangent(jnp.ones(2), g, eps=eps, kappa=1.0), [0.6, 0.8])


@pytest.mark.parametrize("eps", [0.0, 1e-40])
def test_traced_subnormal_eps_acts_as_the_smallest_normal(eps):
  injected = optax.inject_hyperparams(odn.layerwise_normalize)(eps=1e-8)
  out = _changed(injected, WITH_ZERO, eps=eps)
  np.testing.assert_array_equal(out["layer_0"]["w"], [0.0, 0.0])
  assert_close(out["layer_1"]["w"], [0.6, 0.8])
  zero = jax.jit(lambda e: _cotangent(jnp.ones(2), jnp.zeros(2), eps=e))(eps)
  np.testing.assert_array_equal(zero, [0.0, 0.0])


def test_traced_eps_out_of_range_is_clipped_and_nan_shows():
  injected = optax.inject_hyperparams(odn.layerwise_normalize)(eps=1e-8)
  clipped = _changed(injected, WITH_ZERO, eps=-1.0)  # as the smallest normal
  np.testing.assert_array_equal(clipped["layer_0"]["w"], [0.0, 0.0])
  assert_close(clipped["layer_1"]["w"], [0.6, 0.8])
  assert np.isnan(np.asarray(_changed(injected, WITH_ZERO, eps=jnp.nan)["layer_1"]["w"])).all()


@pytest.mark.parametrize(
  "decay, gamma, firsts",
  [
    ("linear", 2.0, [3.0, 0.0, 0.0]),  # clipped to 1: (1 - 1)^d
    ("linear", -1.0, [3.0, 3.0, 3.0]),  # clipped to 0
    ("exponential", -1.0, [3.0, 3.0, 3.0]),
    ("exponential", math.inf, [3.0, 0.0, 0.0]),  # the largest float32: e^0 = 1, then 0
  ],
)
def test_traced_gamma_is_clipped_into_its_range(decay, gamma, firsts):
  injected = optax.inject_hyperparams(odn.depth_decay, static_args=("decay",))(
    gamma=0.5, decay=decay
  )
  assert _firsts(_changed(injected, PARAMS, gamma=gamma)) == firsts


def test_traced_nan_gamma_shows():
  injected = optax.inject_hyperparams(odn.depth_decay)(gamma=0.5)
  assert np.isnan(_firsts(_changed(injected, PARAMS, gamma=jnp.nan))).all()  # depth 0 too


def test_schedule_values_are_clipped_at_use():
  up = optax.linear_schedule(2.0, 0.0, 4)  # starts above 1: clipped for linear decay
  tx = odn.depth_decay(up, decay="linear")
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  for _ in range(3):  # gamma 2.0, 1.5, 1.0: all act as 1, (1 - 1)^d
    out, state = update(PARAMS, state)
    assert _firsts(out) == [3.0, 0.0, 0.0]
  negative = odn.depth_decay(lambda count: -0.5 + 0.0 * count)  # clipped to 0
  assert _firsts(_apply(negative)) == [3.0, 3.0, 3.0]
  unclipped = odn.depth_decay(lambda count: 0.5 + 0.0 * count, decay="linear")
  assert_close(_firsts(_apply(unclipped, use_jit=False)), [3.0, 1.5, 0.75])


def test_traced_or_callable_target_is_clipped_to_non_negative():
  injected = optax.inject_hyperparams(odn.layerwise_normalize)(target=1.0)
  out = _changed(injected, PARAMS, target=-1.0)
  assert _firsts(out) == [0.0, 0.0, 0.0]
  assert np.isnan(_firsts(_changed(injected, PARAMS, target=jnp.nan))).all()
  negative = odn.layerwise_normalize(target=lambda updates, params: -1.0)
  assert _firsts(_apply(negative)) == [0.0, 0.0, 0.0]
  two = odn.layerwise_normalize(target=lambda updates, params: jnp.asarray(2, jnp.int32))
  assert_close(_firsts(_apply(two)), [1.2, 1.2, 1.2])
  vector = odn.layerwise_normalize(target=lambda updates, params: jnp.ones(2))
  with pytest.raises(ValueError, match=r"target\(updates, params\) must be a scalar"):
    _apply(vector)


def test_concrete_jax_hyperparameters_in_range_are_used_as_given():
  tx = odn.depth_decay(jnp.array(0.5), decay="linear")
  assert _firsts(_apply(tx, use_jit=False)) == [3.0, 1.5, 0.75]
  tx = odn.layerwise_normalize(target=np.float32(2.0), eps=jnp.array(1e-8))
  assert_close(_firsts(_apply(tx)), [1.2, 1.2, 1.2])
  x, g = jnp.ones(2), jnp.array([3.0, 4.0])
  assert_close(_cotangent(x, g, kappa=jnp.array(5.0)), [3.0, 4.0])


# ----------------------------------------------------------------------------- float64


def _decay_reference(gamma, depths, decay, reverse, normalize):
  d = np.asarray(depths, np.float64)
  top = d.max()
  d = top - d if reverse else d
  d = d / max(top, 1.0) if normalize else d
  return (1.0 - gamma) ** d if decay == "linear" else np.exp(-gamma * d)


@pytest.mark.parametrize("decay", ["linear", "exponential"])
@pytest.mark.parametrize("reverse, normalize", [(False, False), (True, True), (False, True)])
def test_float64_leaves_get_float64_factors(decay, reverse, normalize):
  rng = np.random.default_rng(0)
  g = [rng.normal(size=(3, 2)) for _ in range(5)]
  gamma = 0.3123456789012345
  expected = _decay_reference(gamma, range(5), decay, reverse, normalize)
  with jax.enable_x64(True):
    grads = {f"layer_{i}": {"w": jnp.asarray(x, jnp.float64)} for i, x in enumerate(g)}
    tx = odn.depth_decay(gamma, decay=decay, reverse=reverse, normalize_depth=normalize)
    for use_jit in (True, False):
      out = _apply(tx, grads, use_jit)
      for i, x in enumerate(g):
        w = out[f"layer_{i}"]["w"]
        assert w.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(w), x * expected[i], rtol=1e-12)
    injected = optax.inject_hyperparams(odn.depth_decay, static_args=("decay",))(
      gamma=gamma, decay=decay, reverse=reverse, normalize_depth=normalize
    )
    out = jax.jit(injected.update)(grads, injected.init(grads), grads)[0]
    np.testing.assert_allclose(np.asarray(out["layer_4"]["w"]), g[4] * expected[4], rtol=1e-12)


def test_float32_leaves_next_to_float64_ones_keep_float32():
  with jax.enable_x64(True):
    grads = {
      "layer_0": {"w": jnp.ones(2, jnp.float64)},
      "layer_1": {"w": jnp.ones(2, jnp.float32)},
      "layer_2": {"w": jnp.ones(2, jnp.bfloat16)},
    }
    out = _apply(odn.depth_decay(0.3), grads)
    assert [out[f"layer_{i}"]["w"].dtype for i in range(3)] == [
      jnp.float64,
      jnp.float32,
      jnp.bfloat16,
    ]
    np.testing.assert_allclose(np.asarray(out["layer_1"]["w"]), np.exp(-0.3), rtol=RTOL)
    np.testing.assert_allclose(np.asarray(out["layer_2"]["w"], np.float64), np.exp(-0.6), rtol=1e-2)


def test_float64_bgn_keeps_kappa_in_float64():
  with jax.enable_x64(True):
    g = np.random.default_rng(1).normal(size=(4, 3))
    out = _cotangent(jnp.ones((4, 3), jnp.float64), jnp.asarray(g), kappa=math.pi)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(out), g * math.pi / np.linalg.norm(g), rtol=1e-12)


# ----------------------------------------------------------------------------- last-layer targets


@pytest.mark.parametrize("target", ["last_layer", "last_layer_weights"])
def test_a_zero_final_layer_falls_back_to_target_one(target):
  # A frozen head (zero gradient) or a zero-initialized head (zero weights): the paper's
  # N = 0 would zero every update forever; N is 1 instead, so training moves.
  params = {"hidden": {"kernel": jnp.ones((2, 2))}, "head": {"kernel": jnp.zeros((2, 1))}}
  grads = {"hidden": {"kernel": jnp.full((2, 2), 3.0)}, "head": {"kernel": jnp.zeros((2, 1))}}
  tx = odn.layerwise_normalize(target=target, depths={"hidden": 0, "head": 1})
  for update in (tx.update, jax.jit(tx.update)):
    updates, _ = update(grads, tx.init(params), params)
    np.testing.assert_allclose(
      np.linalg.norm(np.float64(updates["hidden"]["kernel"])), 1.0, rtol=1e-6
    )
    np.testing.assert_array_equal(updates["head"]["kernel"], 0.0)


def test_a_nonzero_final_layer_keeps_the_papers_target():
  params = {"hidden": {"kernel": jnp.ones((2, 2))}, "head": {"kernel": jnp.full((2, 1), 2.0)}}
  grads = {"hidden": {"kernel": jnp.ones((2, 2))}, "head": {"kernel": jnp.full((2, 1), 0.5)}}
  tx = odn.layerwise_normalize(target="last_layer_weights", depths={"hidden": 0, "head": 1})
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(
    np.linalg.norm(np.float64(updates["hidden"]["kernel"])), np.sqrt(8.0), rtol=1e-6
  )
