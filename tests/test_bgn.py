"""`bgn`: the backward rule against float64 NumPy, seed 003 eq. (5)-(11), sharding."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

import optax_depthnorm as odn
from tests.tolerance import RTOL, assert_close


def _cotangent(x, g, use_jit=True, **kwargs):
  """The cotangent bgn sends back for the incoming cotangent g."""
  f = lambda x: odn.bgn(x, **kwargs)
  if use_jit:
    f = jax.jit(f)
  _, vjp = jax.vjp(f, x)
  return vjp(g)[0]


def _reference(g, kappa=None, per_example=False, eps=1e-12):
  g = np.asarray(g, np.float64)
  d = g[0].size  # the leading axis is the batch, also for 1-D tensors
  kappa = math.sqrt(d) if kappa is None else kappa
  if per_example:
    norms = np.sqrt(np.sum(g.reshape(len(g), -1) ** 2, axis=1))
    return g * (kappa / np.maximum(norms, eps)).reshape((-1,) + (1,) * (g.ndim - 1))
  return g * kappa / max(np.sqrt(np.sum(g * g)), eps)


@pytest.mark.parametrize("shape", [(7,), (4, 5), (3, 4, 4, 2)])
@pytest.mark.parametrize("kappa", [None, 2.5, lambda shape: float(shape[-1])])
@pytest.mark.parametrize("per_example", [False, True])
@pytest.mark.parametrize("use_jit", [True, False])
def test_cotangent_matches_reference(shape, kappa, per_example, use_jit):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  g = jnp.asarray(rng.normal(size=shape) * 1e3, jnp.float32)
  got = _cotangent(x, g, use_jit, kappa=kappa, per_example=per_example)
  k = kappa(shape) if callable(kappa) else kappa
  np.testing.assert_allclose(np.asarray(got), _reference(g, k, per_example), rtol=1e-5)


def test_default_kappa_is_sqrt_of_size_without_batch():
  g = _cotangent(jnp.ones((16, 3, 5)), jnp.ones((16, 3, 5)))
  np.testing.assert_allclose(float(jnp.linalg.norm(g)), math.sqrt(15), rtol=RTOL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_forward_is_identity_bit_for_bit(dtype):
  x = jax.random.normal(jax.random.key(0), (8, 33), dtype)
  for f in (odn.bgn, jax.jit(odn.bgn), odn.with_bgn(lambda v: v)):
    y = f(x)
    assert y.dtype == dtype and np.array_equal(np.asarray(y), np.asarray(x))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_norm_in_float32(dtype):
  # 64 x 64 entries of 300: the sum of squares (3.7e8) overflows float16 but not
  # float32; the cotangent comes back in g's dtype with norm kappa = 8.
  x = jnp.ones((64, 64), dtype)
  g = jnp.full((64, 64), 300.0, dtype)
  with jax.numpy_dtype_promotion("strict"):
    out = _cotangent(x, g)
  assert out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), 8 / 64, rtol=1e-2)


def test_zero_cotangent_gives_zero_and_nan_shows():
  zero = _cotangent(jnp.ones((2, 3)), jnp.zeros((2, 3)))
  assert np.all(np.asarray(zero) == 0)
  zero_each = _cotangent(jnp.ones((2, 3)), jnp.zeros((2, 3)), per_example=True)
  assert np.all(np.asarray(zero_each) == 0)
  nan = _cotangent(jnp.ones((2, 3)), jnp.array([[1.0, jnp.nan, 0.0], [1.0, 2.0, 3.0]]))
  assert np.isnan(np.asarray(nan)).any()
  inf = _cotangent(jnp.ones(3), jnp.array([1.0, jnp.inf, 0.0]))
  assert not np.isfinite(np.asarray(inf)).all()


def test_grad_through_bgn_twice():
  x = jnp.arange(1.0, 7.0).reshape(2, 3)
  w = jnp.full((3, 3), 0.5)

  def f(x):
    h = odn.bgn(x, kappa=2.0) @ w
    return jnp.sum(jnp.sin(odn.bgn(h, kappa=3.0)))

  got = jax.grad(f)(x)
  g_h = np.cos(np.asarray(x, np.float64) @ np.asarray(w, np.float64))
  g_h = 3.0 * g_h / np.linalg.norm(g_h)
  g_x = g_h @ np.asarray(w, np.float64).T
  np.testing.assert_allclose(np.asarray(got), 2.0 * g_x / np.linalg.norm(g_x), rtol=1e-5)
  assert_close(jax.jit(jax.grad(f))(x), got)  # jit vs eager: reductions in another order


def _mlp_pre_activation_grads(use_bgn, depth=12, width=16, batch=32):
  """Weight gradients and pre-activation gradients (via zero perturbations)."""
  keys = jax.random.split(jax.random.key(0), depth + 1)
  ws = [jax.random.normal(k, (width, width)) / math.sqrt(width) for k in keys[:depth]]
  x = jax.random.normal(keys[-1], (batch, width))

  def loss(ws, perturbations):
    h = x
    for w, p in zip(ws, perturbations):
      z = h @ w + p
      h = jax.nn.sigmoid(odn.bgn(z) if use_bgn else z)
    return jnp.mean(jnp.square(h - 0.3))

  zeros = [jnp.zeros((batch, width)) for _ in ws]
  return jax.grad(loss, argnums=(0, 1))(ws, zeros)


def test_weight_gradients_parallel_and_pre_activation_norm_kappa():
  """Seed 003 eq. (9)-(11): parallel weight gradients; ||delta_BGN^(K)|| = kappa."""
  plain_w, plain_delta = _mlp_pre_activation_grads(use_bgn=False)
  bgn_w, bgn_delta = _mlp_pre_activation_grads(use_bgn=True)
  for a, b in zip(plain_w, bgn_w):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert cosine == pytest.approx(1.0, abs=1e-5)
  norms = [float(jnp.linalg.norm(d)) for d in bgn_delta]
  np.testing.assert_allclose(norms, math.sqrt(16), rtol=1e-5)
  plain_norms = [float(jnp.linalg.norm(d)) for d in plain_delta]
  assert plain_norms[0] < 1e-3 * plain_norms[-1]  # without BGN: vanishing


def test_shard_map_over_8_devices_equals_whole_batch():
  assert jax.device_count() >= 8, "conftest sets 8 fake CPU devices"
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  x = jax.random.normal(jax.random.key(1), (32, 5))
  g = jax.random.normal(jax.random.key(2), (32, 5))

  def local_vjp(x, g):
    return jax.vjp(lambda v: odn.bgn(v, axis_name="data"), x)[1](g)[0]

  sharded = jax.jit(
    jax.shard_map(
      local_vjp, mesh=mesh, in_specs=PartitionSpec("data"), out_specs=PartitionSpec("data")
    )
  )(x, g)
  assert_close(sharded, _cotangent(x, g))  # per-shard sums, then across devices


def test_jit_with_sharded_arrays_gives_global_norm():
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharding = jax.NamedSharding(mesh, PartitionSpec("data"))
  x = jax.device_put(jax.random.normal(jax.random.key(1), (32, 5)), sharding)
  g = jax.device_put(jax.random.normal(jax.random.key(2), (32, 5)), sharding)
  got = _cotangent(x, g)
  np.testing.assert_allclose(np.asarray(got), _reference(np.asarray(g)), rtol=1e-5)


def test_vmap_normalizes_each_example_unless_axis_is_named():
  x = jax.random.normal(jax.random.key(1), (6, 5))
  g = jax.random.normal(jax.random.key(2), (6, 5))
  each = jax.vmap(lambda x, g: jax.vjp(lambda v: odn.bgn(v, kappa=2.0), x)[1](g)[0])(x, g)
  np.testing.assert_allclose(np.asarray(each), _reference(g, 2.0, per_example=True), rtol=1e-5)
  whole = jax.vmap(
    lambda x, g: jax.vjp(lambda v: odn.bgn(v, kappa=2.0, axis_name="b"), x)[1](g)[0],
    axis_name="b",
  )(x, g)
  np.testing.assert_allclose(np.asarray(whole), _reference(g, 2.0), rtol=1e-5)


def test_linen_layer_and_with_bgn_match_function():
  x = jax.random.normal(jax.random.key(0), (4, 3))

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(5)(x)
      x = odn.BGN()(x)
      return odn.with_bgn(nn.tanh)(nn.Dense(2)(nn.relu(x)))

  def by_hand(params, x):
    z = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"][None]
    z = nn.relu(odn.bgn(z))
    z = z @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"][None]
    return nn.tanh(odn.bgn(z))

  params = Net().init(jax.random.key(1), x)["params"]
  assert set(params) == {"Dense_0", "Dense_1"}
  loss = lambda f: lambda p: jnp.sum(f(p, x) ** 2)
  got = jax.grad(loss(lambda p, x: Net().apply({"params": p}, x)))(params)
  want = jax.grad(loss(by_hand))(params)
  assert_close(got, want)


def test_nnx_layer_matches_function():
  rngs = nnx.Rngs(0)
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), odn.nnx.BGN(kappa=1.5), nnx.relu)
  x = jax.random.normal(jax.random.key(0), (5, 3))

  def loss(model):
    return jnp.sum(model(x) ** 2)

  grads = nnx.grad(loss)(model)
  lin = model.layers[0]

  def by_hand(kernel, bias):
    return jnp.sum(nnx.relu(odn.bgn(x @ kernel + bias[None], kappa=1.5)) ** 2)

  want = jax.grad(by_hand, argnums=(0, 1))(lin.kernel[...], lin.bias[...])
  assert_close(grads.layers[0].kernel[...], want[0])
  assert_close(grads.layers[0].bias[...], want[1])


def test_with_bgn_passes_options_and_keeps_name():
  f = odn.with_bgn(jax.nn.relu, kappa=3.0, per_example=True)
  assert f.__name__ == "relu_bgn"
  x = jnp.ones((2, 4))
  g = jax.grad(lambda x: jnp.sum(f(x) * jnp.array([[1.0], [5.0]])))(x)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(g), axis=1), 3.0, rtol=RTOL)


def test_forward_mode_is_refused_as_documented():
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(odn.bgn, (jnp.ones((2, 2)),), (jnp.ones((2, 2)),))
