"""`scale_normalize` against float64 NumPy references (seed 004, eq. 1-3).

The references below share no code with the package: matrices come from
`np.transpose`/`reshape`, scales from `np.linalg.svd` and explicit norms.
Data mode needs layer inputs, which the contract suite cannot supply, so its
contract properties (jit, inject_hyperparams, MultiSteps, masked, dtypes) are
checked here.
"""

import pathlib
import re
import zlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_depthnorm as odn
from tests.tolerance import assert_close

ROOT = pathlib.Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(autouse=True)
def _fresh_rng(request):
  """Reseeds RNG for each test from its name, so that a test draws the same data whatever
  ran before it on its worker (pytest-xdist spreads the tests differently from run to run)."""
  global RNG
  RNG = np.random.default_rng(zlib.crc32(request.node.name.encode()))


# ----------------------------------------------------------------------------- references


def ref_matrix(w, fan_in_axes):
  w = np.asarray(w, np.float64)
  rest = [a for a in range(w.ndim) if a not in fan_in_axes]
  fan_in = int(np.prod([w.shape[a] for a in fan_in_axes]))
  return np.transpose(w, [*fan_in_axes, *rest]).reshape(fan_in, -1)


def ref_log_pdet_mean(m):
  """Mean log of the nonzero singular values (numpy's rank tolerance, float32)."""
  s = np.linalg.svd(np.asarray(m, np.float64), compute_uv=False)
  nonzero = s > s.max() * max(m.shape) * EPS32
  return float(np.mean(np.log(s[nonzero]))) if nonzero.any() else -np.inf


def ref_mean_scale(m, x):
  """Mean over nonzero rows x_b of ||m^T x_b|| / ||x_b|| (eq. 2-3)."""
  x = np.asarray(x, np.float64).reshape(-1, m.shape[0])
  x = x[np.linalg.norm(x, axis=1) > 0]
  if not len(x):
    return 0.0
  return float(np.mean(np.linalg.norm(x @ m, axis=1) / np.linalg.norm(x, axis=1)))


def ref_update(w, u, c, eps=1e-8):
  """u' with w + u' = (w + u) / c; u itself where c <= eps."""
  w, u = np.asarray(w, np.float64), np.asarray(u, np.float64)
  return u if c <= eps else (w + u) / c - w


def normal(*shape, scale=1.0):
  return jnp.asarray(scale * RNG.standard_normal(shape), jnp.float32)


def with_singular_values(m, n, s):
  """A dense float32 (m, n) matrix H_m [diag(s); 0] H_n, H Householder reflections."""
  core = np.zeros((m, n))
  core[np.arange(len(s)), np.arange(len(s))] = s
  v = RNG.standard_normal(m)
  core -= np.outer(v, 2 * (v @ core) / (v @ v))  # H_m core, O(mn)
  v = RNG.standard_normal(n)
  core -= np.outer(2 * (core @ v) / (v @ v), v)  # core H_n
  return jnp.asarray(core, jnp.float32)


def run(tx, updates, params, use_jit=True, **extra):
  update = jax.jit(tx.update) if use_jit else tx.update
  return update(updates, tx.init(params), params, **extra)


# ----------------------------------------------------------------------------- determinant

LAYOUTS = {"flax": lambda nd: tuple(range(nd - 1)), "equinox": lambda nd: tuple(range(1, nd))}


@pytest.mark.parametrize("use_jit", [True, False])
@pytest.mark.parametrize("layout", ["flax", "equinox"])
@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4), (3, 3, 4, 6)])
def test_determinant_matches_reference(shape, layout, use_jit):
  params = {"layer": {"w": normal(*shape), "b": normal(shape[-1])}, "scale": normal(3)}
  updates = jax.tree.map(lambda x: 0.1 * normal(*x.shape), params)
  # Sorted sibling names tell no order: give the depths (a prefix rule).
  tx = odn.scale_normalize("determinant", kernel_layout=layout, depths={"layer": 0, "scale": 1})
  out, state = run(tx, updates, params, use_jit)
  axes = LAYOUTS[layout](len(shape))
  w, u = params["layer"]["w"], updates["layer"]["w"]
  c = np.exp(ref_log_pdet_mean(ref_matrix(np.float64(w) + np.float64(u), axes)))
  np.testing.assert_allclose(out["layer"]["w"], ref_update(w, u, c), rtol=1e-5, atol=1e-6)
  new = np.float64(w) + np.float64(out["layer"]["w"])
  assert abs(ref_log_pdet_mean(ref_matrix(new, axes))) < 1e-5  # pseudo-determinant 1
  np.testing.assert_array_equal(out["layer"]["b"], updates["layer"]["b"])  # 1-D: untouched
  np.testing.assert_array_equal(out["scale"], updates["scale"])
  assert int(state.count) == 1


def test_determinant_1000x1000_where_the_product_underflows():
  s = np.linspace(0.01, 0.95, 1000)  # mean log -1.6: prod = e^-1600
  assert np.prod(s.astype(np.float32)) == 0 and np.prod(s) == 0  # float32 and float64
  w = with_singular_values(1000, 1000, s)
  assert np.linalg.det(np.asarray(w)) == 0.0  # the naive determinant underflows (sec. 3.2)
  out, _ = run(odn.scale_normalize("determinant"), {"w": jnp.zeros_like(w)}, {"w": w})
  new = np.float64(w) + np.float64(out["w"])
  sign, logdet = np.linalg.slogdet(new)  # square and full rank: pdet = |det|
  assert sign != 0 and abs(logdet / 1000) < 1e-5
  c = np.exp(np.mean(np.log(s)))
  np.testing.assert_allclose(new, np.float64(w) / c, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
  "kind, sigma",
  [
    ("rank 2 of 5", [3.0, 0.5, 0, 0, 0]),  # pseudo-determinant: SVD
    ("cond 1e3", np.geomspace(2.0, 2e-3, 30)),  # every singular value counts: QR
    ("cond 1e6", np.geomspace(1.0, 1e-6, 30)),  # 4 below numpy's tolerance: SVD
  ],
)
def test_determinant_counts_nonzero_singular_values(kind, sigma):
  w = with_singular_values(40, len(sigma), np.asarray(sigma))
  c = np.exp(ref_log_pdet_mean(w))
  for use_jit in (True, False):
    out, _ = run(odn.scale_normalize("determinant"), {"w": jnp.zeros_like(w)}, {"w": w}, use_jit)
    new = np.float64(w) + np.float64(out["w"])
    np.testing.assert_allclose(new, np.float64(w) / c, rtol=1e-4, atol=1e-7)
    assert abs(ref_log_pdet_mean(new)) < 1e-4
  if kind.startswith("rank"):
    np.testing.assert_allclose(c, np.sqrt(1.5), rtol=1e-5)
    s = np.linalg.svd(new, compute_uv=False)
    np.testing.assert_allclose(s[:2], [3 / c, 0.5 / c], rtol=1e-5)  # zeros stay zero


def test_float64_leaves_stay_float64():
  with jax.enable_x64(True):
    w = RNG.standard_normal((7, 4))
    params, updates = {"w": jnp.asarray(w)}, {"w": jnp.zeros((7, 4), jnp.float64)}
    out, _ = run(odn.scale_normalize("determinant"), updates, params)
    assert out["w"].dtype == jnp.float64
    c = np.exp(np.mean(np.log(np.linalg.svd(w, compute_uv=False))))
    np.testing.assert_allclose(np.asarray(out["w"]), w / c - w, rtol=1e-10)


# ----------------------------------------------------------------------------- data and probe


@pytest.mark.parametrize("use_jit", [True, False])
@pytest.mark.parametrize("layout", ["flax", "equinox"])
def test_data_mode_matches_reference(layout, use_jit):
  w_in_out = normal(6, 4)
  w = w_in_out if layout == "flax" else w_in_out.T  # Equinox / torch: (out, in)
  params = {"Dense_0": {"kernel": w, "bias": normal(4)}}
  updates = jax.tree.map(lambda x: 0.1 * normal(*x.shape), params)
  x = np.array(normal(3, 5, 6))  # any leading axes
  x[0, 0] = 0.0  # a zero row carries no direction: left out of the mean
  sown = {"Dense_0": {"inputs": (jnp.asarray(x), normal(2, 6))}}  # as `sow` stores two calls
  tx = odn.scale_normalize("data", kernel_layout=layout)
  out, _ = run(tx, updates, params, use_jit, layer_inputs=sown)
  rows = np.concatenate([x.reshape(-1, 6), np.asarray(sown["Dense_0"]["inputs"][1])])
  m = ref_matrix(np.float64(w) + np.float64(updates["Dense_0"]["kernel"]), LAYOUTS[layout](2))
  c = ref_mean_scale(m, rows)
  expected = ref_update(w, updates["Dense_0"]["kernel"], c)
  np.testing.assert_allclose(out["Dense_0"]["kernel"], expected, rtol=1e-5, atol=1e-6)
  new = np.float64(w) + np.float64(out["Dense_0"]["kernel"])
  np.testing.assert_allclose(ref_mean_scale(ref_matrix(new, LAYOUTS[layout](2)), rows), 1, 1e-5)
  np.testing.assert_array_equal(out["Dense_0"]["bias"], updates["Dense_0"]["bias"])


def test_data_mode_finds_inputs_by_weight_or_layer_path():
  params = {"a": {"kernel": normal(3, 2)}, "b": {"kernel": normal(2, 2)}, "c": [normal(2, 2)]}
  updates = jax.tree.map(jnp.zeros_like, params)
  x3, x2 = normal(4, 3), normal(4, 2)
  by_layer = {"a": x3, "b": x2, "c": [x2]}
  by_weight = {"a/kernel": x3, "b": {"kernel": x2}, "c/0": x2}
  tx = odn.scale_normalize("data", depths={"a": 0, "b": 1, "c": 2})  # sorted names: explicit
  first, _ = run(tx, updates, params, layer_inputs=by_layer)
  second, _ = run(tx, updates, params, layer_inputs=by_weight)
  chex.assert_trees_all_equal(first, second)
  m = ref_matrix(params["a"]["kernel"], (0,))
  np.testing.assert_allclose(
    first["a"]["kernel"], ref_update(m, 0 * m, ref_mean_scale(m, x3)), 1e-5
  )


def test_probe_mode_measured_scale_is_one():
  w = with_singular_values(50, 30, np.linspace(0.2, 3.0, 30))
  params, updates = {"w": w}, {"w": 0.01 * normal(50, 30)}
  out, state = run(odn.scale_normalize("probe", num_probes=4096, key=3), updates, params)
  new = np.float64(w) + np.float64(out["w"])
  probes = RNG.standard_normal((20000, 50))  # fresh probes: the expectation is 1
  np.testing.assert_allclose(ref_mean_scale(new, probes), 1.0, rtol=0.02)
  before = np.float64(w) + np.float64(updates["w"])
  np.testing.assert_allclose(new * ref_mean_scale(before, probes), before, rtol=0.03, atol=1e-3)
  assert state.key.dtype == jnp.uint32


def test_probes_follow_the_key_and_change_every_step():
  params = {"w": normal(8, 5)}
  updates = {"w": 0.1 * normal(8, 5)}
  tx = odn.scale_normalize("probe", num_probes=4)
  step = jax.jit(tx.update)
  first, state = step(updates, tx.init(params), params)
  second, state = step(updates, state, params)
  again, _ = step(updates, tx.init(params), params)
  chex.assert_trees_all_equal(first, again)  # same key, same probes
  assert not np.allclose(first["w"], second["w"])  # the key moved
  typed = odn.scale_normalize("probe", num_probes=4, key=jax.random.key(0))
  chex.assert_trees_all_equal(typed.init(params), tx.init(params))
  other, _ = run(odn.scale_normalize("probe", num_probes=4, key=1), updates, params)
  assert not np.allclose(first["w"], other["w"])


# ----------------------------------------------------------------------------- conv kernels


def test_conv_kernels_hwio_and_oihw_read_as_the_same_matrix():
  hwio = normal(3, 3, 4, 6)
  oihw = jnp.transpose(hwio, (3, 2, 0, 1))
  du = 0.1 * normal(3, 3, 4, 6)
  for mode in ("determinant", "probe"):
    flax_tx = odn.scale_normalize(mode, fan_in_axes={"conv": (2, 0, 1)})  # (I, H, W) rows
    eqx_tx = odn.scale_normalize(mode, kernel_layout="equinox")  # OIHW: (I, H, W) rows
    a, _ = run(flax_tx, {"conv": du}, {"conv": hwio})
    b, _ = run(eqx_tx, {"conv": jnp.transpose(du, (3, 2, 0, 1))}, {"conv": oihw})
    np.testing.assert_allclose(jnp.transpose(a["conv"], (3, 2, 0, 1)), b["conv"], rtol=2e-5)
  # The default Flax reading (H, W, I) rows has the same singular values.
  a, _ = run(odn.scale_normalize("determinant"), {"conv": du}, {"conv": hwio})
  c = np.exp(ref_log_pdet_mean(ref_matrix(np.float64(hwio) + np.float64(du), (0, 1, 2))))
  np.testing.assert_allclose(a["conv"], ref_update(hwio, du, c), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["flax", "equinox"])
def test_conv_data_mode_with_patches(layout):
  """`conv_general_dilated_patches` rows are (I, H, W): the matching fan-in order."""
  x = normal(2, 6, 6, 4)
  hwio = normal(3, 3, 4, 5)
  dims = ("NHWC", "HWIO", "NHWC")
  patches = jax.lax.conv_general_dilated_patches(x, (3, 3), (1, 1), "VALID", dimension_numbers=dims)
  if layout == "flax":
    params, tx = {"conv": hwio}, odn.scale_normalize("data", fan_in_axes={"conv": (2, 0, 1)})
  else:
    oihw = jnp.transpose(hwio, (3, 2, 0, 1))
    params, tx = {"conv": oihw}, odn.scale_normalize("data", kernel_layout="equinox")
  updates = jax.tree.map(jnp.zeros_like, params)
  with pytest.raises(ValueError, match=r"have shape \(2, 6, 6, 4\), but the weight has fan_in 36"):
    run(tx, updates, params, layer_inputs={"conv": x})
  out, _ = run(tx, updates, params, layer_inputs={"conv": patches})
  # Reference: the conv's own outputs over patch norms taken by slicing in NumPy.
  y = np.asarray(jax.lax.conv_general_dilated(x, hwio, (1, 1), "VALID", dimension_numbers=dims))
  xs = np.asarray(x, np.float64)
  norms = [
    np.linalg.norm(xs[n, i : i + 3, j : j + 3])
    for n in range(2)
    for i in range(4)
    for j in range(4)
  ]
  c = np.mean(np.linalg.norm(y.reshape(-1, 5), axis=1) / np.asarray(norms))
  np.testing.assert_allclose(out["conv"], ref_update(params["conv"], 0 * params["conv"], c), 1e-5)


# ----------------------------------------------------------------------------- options


def test_fan_in_axes_mapping_and_callable_override_and_exclude():
  params = {"embed": {"table": normal(10, 4)}, "qkv": {"kernel": normal(4, 2, 3)}}
  updates = jax.tree.map(lambda x: 0.1 * normal(*x.shape), params)
  mapping = {"embed": None, "qkv/kernel": 0}
  picked = lambda path, leaf: None if path.startswith("embed") else (0,) if "qkv" in path else ...
  for spec in (mapping, picked):
    tx = odn.scale_normalize("determinant", fan_in_axes=spec, depths={"embed": 0, "qkv": 1})
    out, _ = run(tx, updates, params)
    np.testing.assert_array_equal(out["embed"]["table"], updates["embed"]["table"])
    w, u = params["qkv"]["kernel"], updates["qkv"]["kernel"]
    c = np.exp(ref_log_pdet_mean(ref_matrix(np.float64(w) + np.float64(u), (0,))))
    np.testing.assert_allclose(out["qkv"]["kernel"], ref_update(w, u, c), rtol=1e-5, atol=1e-6)


def test_every_k_steps_and_first_n_steps():
  params = {"w": normal(5, 3)}
  updates = {"w": 0.1 * normal(5, 3)}
  tx = odn.scale_normalize("determinant", every_k_steps=3, first_n_steps=5)
  traces = []  # one trace for all 8 steps: the schedule is data, not Python control flow
  step = jax.jit(lambda u, s, p: (traces.append(1), tx.update(u, s, p))[1])
  state = tx.init(params)
  c = np.exp(ref_log_pdet_mean(np.float64(params["w"]) + np.float64(updates["w"])))
  for count in range(8):
    out, state = step(updates, state, params)
    if count in (0, 3):  # every 3rd step, and only before step 5
      np.testing.assert_allclose(out["w"], ref_update(params["w"], updates["w"], c), rtol=1e-5)
    else:  # skipped: the optimizer's updates, bit for bit
      np.testing.assert_array_equal(out["w"], updates["w"])
  assert int(state.count) == 8
  assert len(traces) == 1


def test_zero_matrix_and_zero_inputs_are_left_alone():
  w = normal(4, 3)
  params, updates = {"w": w}, {"w": -w}  # W* = 0
  x = normal(5, 4)
  for mode, extra in [("determinant", {}), ("probe", {}), ("data", {"layer_inputs": {"w": x}})]:
    out, _ = run(odn.scale_normalize(mode), updates, params, **extra)
    np.testing.assert_array_equal(out["w"], updates["w"])
  zeros = {"w": jnp.zeros((5, 4))}  # no direction: scale 0, left alone, no NaN
  out, _ = run(odn.scale_normalize("data"), {"w": 0.1 * w}, params, layer_inputs=zeros)
  np.testing.assert_array_equal(out["w"], 0.1 * w)
  nan = {"w": w.at[0, 0].set(jnp.nan)}  # a NaN shows
  out, _ = run(odn.scale_normalize("determinant"), nan, params)
  assert np.isnan(np.asarray(out["w"])).any()


@pytest.mark.parametrize("mode", ["determinant", "data"])
def test_zero_update_gives_the_projection_then_a_fixed_point(mode):
  """The contract's zero-gradient test, for a projection after the optimizer."""
  params = {"Dense_0": {"kernel": normal(6, 4), "bias": normal(4)}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  extra = {"layer_inputs": {"Dense_0": normal(16, 6)}} if mode == "data" else {}
  tx = odn.scale_normalize(mode)
  out, _ = run(tx, zeros, params, **extra)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(out))
  projected = optax.apply_updates(params, out)
  again, _ = run(tx, zeros, projected, **extra)
  kernel = projected["Dense_0"]["kernel"]
  np.testing.assert_allclose(
    again["Dense_0"]["kernel"], 0, atol=1e-6 * float(jnp.max(jnp.abs(kernel)))
  )
  np.testing.assert_array_equal(again["Dense_0"]["bias"], 0)


def test_low_precision_leaves_keep_dtype_under_strict_promotion():
  params = {"a": {"w": normal(6, 4).astype(jnp.bfloat16)}, "b": {"w": normal(4, 3)}}
  params["b"]["w"] = params["b"]["w"].astype(jnp.float16)
  params["step"] = jnp.array(3, jnp.int32)
  updates = jax.tree.map(lambda x: 0.1 * x if x.dtype != jnp.int32 else x, params)
  inputs = {"a": normal(8, 6), "b": normal(8, 4).astype(jnp.bfloat16)}
  for mode in ("determinant", "probe", "data"):
    tx = odn.scale_normalize(mode, eps=1e-8, depths={"a": 0, "b": 1})  # sorted names: explicit
    with jax.numpy_dtype_promotion("strict"):
      out, _ = run(tx, updates, params, layer_inputs=inputs)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, updates)
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(out))
    float32 = jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype != jnp.int32 else x, updates)
    reference, _ = run(tx, float32, params, layer_inputs=inputs)  # scales taken in float32
    for low, ref in zip(jax.tree.leaves(out), jax.tree.leaves(reference)):
      np.testing.assert_allclose(np.float32(low), np.float32(ref), rtol=1e-2, atol=1e-2)
    assert int(out["step"]) == 3


# ----------------------------------------------------------------------------- data mode contract


def test_data_mode_under_jit_inject_multisteps_masked_and_chain():
  params = {
    "Dense_0": {"kernel": normal(5, 4), "bias": normal(4)},
    "Dense_1": {"kernel": normal(4, 2)},
  }
  inputs = {"Dense_0": normal(8, 5), "Dense_1": normal(8, 4)}
  grads = [jax.tree.map(lambda x: normal(*x.shape), params) for _ in range(2)]
  tx = odn.scale_normalize("data")
  expected, _ = run(tx, grads[0], params, use_jit=False, layer_inputs=inputs)
  jitted, _ = run(tx, grads[0], params, layer_inputs=inputs)
  injected = optax.inject_hyperparams(odn.scale_normalize)(mode="data", eps=1e-8)
  inj, inj_state = run(injected, grads[0], params, layer_inputs=inputs)
  assert_close(jitted, expected)
  assert_close(inj, expected)
  assert int(inj_state.inner_state.count) == 1

  multi = optax.MultiSteps(tx, every_k_schedule=2)
  step, state = jax.jit(multi.update), multi.init(params)
  zero, state = step(grads[0], state, params, layer_inputs=inputs)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(zero))
  out, state = step(grads[1], state, params, layer_inputs=inputs)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  chex.assert_trees_all_close(out, run(tx, mean, params, layer_inputs=inputs)[0], rtol=1e-5)

  mask = {"Dense_0": {"kernel": False, "bias": True}, "Dense_1": {"kernel": True}}
  masked, _ = run(
    optax.masked(tx, mask), grads[0], params, layer_inputs={"Dense_1": inputs["Dense_1"]}
  )
  np.testing.assert_array_equal(masked["Dense_0"]["kernel"], grads[0]["Dense_0"]["kernel"])
  assert_close(masked["Dense_1"]["kernel"], expected["Dense_1"]["kernel"])

  chained = optax.chain(optax.sgd(0.1), tx)
  out, _ = run(chained, grads[0], params, layer_inputs=inputs)
  sgd = jax.tree.map(lambda g: -0.1 * g, grads[0])
  assert_close(out, run(tx, sgd, params, layer_inputs=inputs)[0])


# ----------------------------------------------------------------------------- training


class MLP(nn.Module):
  widths: tuple[int, ...] = (32, 32, 4)

  @nn.compact
  def __call__(self, x):
    for w in self.widths[:-1]:
      x = nn.relu(nn.Dense(w)(x))
    return nn.Dense(self.widths[-1])(x)


def sow_dense_inputs(next_fun, args, kwargs, context):
  """A linen method interceptor: every Dense sows its input, no model change."""
  if context.method_name == "__call__" and isinstance(context.module, nn.Dense):
    context.module.sow("layer_inputs", "inputs", args[0])
  return next_fun(*args, **kwargs)


X = jnp.asarray(RNG.standard_normal((256, 16)), jnp.float32)
LABELS = jnp.asarray(np.argmax(np.asarray(X) @ RNG.standard_normal((16, 4)), axis=1))


def train(opt, steps=60):
  model = MLP()
  params = model.init(jax.random.key(0), X)["params"]

  def loss_fn(params):
    with nn.intercept_methods(sow_dense_inputs):
      logits, cols = model.apply({"params": params}, X, mutable=["layer_inputs"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()
    return loss, cols["layer_inputs"]

  @jax.jit
  def run_all(params):
    def step(carry, _):
      params, state = carry
      (loss, inputs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, state = opt.update(grads, state, params, layer_inputs=inputs)
      return (optax.apply_updates(params, updates), state), loss

    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), length=steps)
    return params, losses

  return run_all(params)


@pytest.mark.parametrize(
  "mode, momentum", [("determinant", 0), ("probe", 0), ("data", 0), ("determinant", 0.9)]
)
def test_linen_mlp_trains(mode, momentum):
  """`chain(sgd, scale_normalize)` trains; the optimizer's momentum is not rescaled."""
  sgd = optax.sgd(0.05, momentum=0.9) if momentum else optax.sgd(0.2)
  params, losses = train(optax.chain(sgd, odn.scale_normalize(mode)))
  assert np.all(np.isfinite(losses))
  assert float(losses[-1]) < 0.6 * float(losses[0]), (float(losses[0]), float(losses[-1]))
  kernel = np.asarray(params["Dense_1"]["kernel"], np.float64)  # after the last normalization
  if mode == "determinant":
    assert abs(ref_log_pdet_mean(kernel)) < 1e-4
  elif mode == "probe":
    np.testing.assert_allclose(ref_mean_scale(kernel, RNG.standard_normal((4000, 32))), 1, 0.05)
  else:  # the inputs of the last step came from slightly different params
    dense = jax.tree.map(np.asarray, params["Dense_0"])
    hidden = np.maximum(np.asarray(X) @ dense["kernel"] + dense["bias"], 0)
    np.testing.assert_allclose(ref_mean_scale(kernel, hidden), 1, 0.1)


def test_docs_example_runs():
  text = (ROOT / "docs" / "methods" / "scale_normalize.md").read_text()
  section = text[text.index("## Data mode in a training step") :]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  namespace: dict = {}
  exec(compile(code, "docs/methods/scale_normalize.md", "exec"), namespace)
  assert float(namespace["loss"]) > 0


# ----------------------------------------------------------------------------- errors


_CONSTRUCTION_ERRORS = [
  (lambda: odn.scale_normalize("svd"), ValueError, "mode must be one of"),
  (lambda: odn.scale_normalize("probe", kernel_layout="jax"), ValueError, "kernel_layout must be"),
  (lambda: odn.scale_normalize("probe", fan_in_axes=3), TypeError, "fan_in_axes must be None"),
  (lambda: odn.scale_normalize("probe", num_probes=0), ValueError, "num_probes must be >= 1"),
  (lambda: odn.scale_normalize("probe", num_probes=2.0), TypeError, "must be a Python int"),
  (lambda: odn.scale_normalize("data", every_k_steps=0), ValueError, "every_k_steps must be >= 1"),
  (lambda: odn.scale_normalize("data", first_n_steps=-1), ValueError, "first_n_steps must be"),
  (lambda: odn.scale_normalize("data", eps=-1.0), ValueError, "eps must be a non-negative"),
]


@pytest.mark.parametrize("make, error, match", _CONSTRUCTION_ERRORS)
def test_construction_errors(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_update_errors():
  params = {"Dense_0": {"kernel": normal(3, 2)}, "Dense_1": {"kernel": normal(2, 2)}}
  updates = jax.tree.map(jnp.zeros_like, params)
  det, data = odn.scale_normalize("determinant"), odn.scale_normalize("data")
  with pytest.raises(ValueError, match="needs `params`"):
    det.update(updates, det.init(params))
  with pytest.raises(ValueError, match=r"needs each layer's inputs: call `update\("):
    data.update(updates, data.init(params), params)
  with pytest.raises(ValueError, match="no inputs for the weight at 'Dense_1/kernel'"):
    data.update(updates, data.init(params), params, layer_inputs={"Dense_0": normal(4, 3)})
  wrong = {"Dense_0": normal(4, 2), "Dense_1": normal(4, 2)}
  with pytest.raises(ValueError, match=r"'Dense_0/kernel' have shape \(4, 2\).*fan_in 3"):
    data.update(updates, data.init(params), params, layer_inputs=wrong)
  other = {"Dense_0": {"kernel": normal(2, 3)}, "Dense_1": {"kernel": normal(2, 2)}}
  with pytest.raises(ValueError, match=r"params at 'Dense_0/kernel' is \(2, 3\).*shape \(3, 2\)"):
    det.update(updates, det.init(params), other)
  for spec, match in [
    ({"Dense_0": (2,)}, r"gave \(2,\) for the weight at 'Dense_0/kernel' of rank 2"),
    ({"Dense_0": (0, -2)}, "repeated axes"),
    ({"Dense_9": 0}, r"names \['Dense_9'\], which are neither"),
  ]:
    tx = odn.scale_normalize("determinant", fan_in_axes=spec)
    with pytest.raises(ValueError, match=match):
      tx.update(updates, tx.init(params), params)
  injected = optax.inject_hyperparams(odn.scale_normalize)(mode="probe", num_probes=4)
  with pytest.raises(TypeError, match="list it in `static_args`"):
    jax.jit(injected.update)(updates, injected.init(params), params)
  static = optax.inject_hyperparams(odn.scale_normalize, static_args="num_probes")
  tx = static(mode="probe", num_probes=4)
  jax.jit(tx.update)(updates, tx.init(params), params)  # fine once static


@pytest.mark.parametrize("row_scale", [1.0, 1e-30, 1e30, 3e38])
def test_mean_scale_over_float32s_range_with_zero_rows(row_scale):
  from optax_depthnorm import _matrices

  m = RNG.standard_normal((9, 4)).astype(np.float32)
  rows = RNG.standard_normal((12, 9)) * np.logspace(-3, 3, 12)[:, None]  # rows of unlike sizes
  rows[::3] = 0  # all-zero rows (a black image border): left out of the mean
  x = (rows / np.abs(rows).max() * row_scale).astype(np.float32)  # largest |entry|: row_scale
  want = ref_mean_scale(m, np.asarray(x, np.float64))
  assert_close(_matrices.mean_scale(m, x), want)
  assert_close(_matrices.mean_scale.__wrapped__(m, x), want)  # without jit
  # The rows' norms are plain sums of the scaled rows: no range check, no careful path.
  assert "cond" not in str(jax.make_jaxpr(_matrices.mean_scale.__wrapped__)(m, x))


def test_probes_are_each_weights_own_draw_in_few_calls():
  from optax_depthnorm import _matrices

  key = jax.random.key(7)
  specs = [
    ("Dense_0/kernel", (16, 784), jnp.float32),
    ("Dense_1/kernel", (16, 100), jnp.float32),
    ("Dense_2/kernel", (16, 100), jnp.float32),
    ("blocks/kernel", (3, 16, 64), jnp.float32),  # a stacked weight
  ]
  got = _matrices.probes(key, specs)
  for (name, shape, dtype), x in zip(specs, got):
    own = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
    np.testing.assert_array_equal(x, jax.random.normal(own, shape, dtype))
    assert x.shape == shape
  # One batched draw per power of two: Dense_1 and Dense_2 (1,600 probes each) share the
  # 2,048 one; three draws for four weights.
  jaxpr = str(jax.make_jaxpr(lambda k: _matrices.probes(k, specs))(key))
  assert jaxpr.count("random_bits") == 3
