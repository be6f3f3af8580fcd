"""`gradient_flow`, `track_gradient_flow`, `diagnose`, `activation_gradient_norms`."""

from __future__ import annotations

import functools
import itertools

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_depthnorm as odn
from tests import trees
from tests.tolerance import RTOL

TREE_NAMES = list(trees.TREES)


def random_like(tree, seed=0):
  """Random float32 'gradients' from NumPy (eager jax.random compiles per leaf shape).

  Dicts keep `tree`'s key order (`trees.keep_order`), as the creation order.
  """
  rng = np.random.default_rng(seed)
  new = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)
  return trees.keep_order(tree, new)


def reference_flow(grads, params=None):
  """Float64 NumPy statistics per depth group, depths from the test's own regexes."""
  depths = trees.expected_depths(grads)
  g = trees.to_numpy(grads)
  p = None if params is None else trees.to_numpy(params)
  out = {k: [] for k in ("norm", "mean_abs", "max_abs", "rms", "param_norm", "ratio")}
  for d in sorted(set(depths)):
    v = np.concatenate([g[i].ravel() for i, e in enumerate(depths) if e == d])
    out["norm"].append(np.sqrt(np.sum(v * v)))
    out["mean_abs"].append(np.mean(np.abs(v)))
    out["max_abs"].append(np.max(np.abs(v)))
    out["rms"].append(np.sqrt(np.mean(v * v)))
    if p is not None:
      w = np.concatenate([p[i].ravel() for i, e in enumerate(depths) if e == d])
      out["param_norm"].append(np.sqrt(np.sum(w * w)))
      out["ratio"].append(out["norm"][-1] / out["param_norm"][-1])
  return {k: np.array(v) for k, v in out.items() if v}


def assert_report_matches(report, expected, rtol=RTOL):
  for field, values in expected.items():
    np.testing.assert_allclose(np.asarray(getattr(report, field)), values, rtol=rtol, err_msg=field)


# ----------------------------------------------------------------------------- gradient_flow


@pytest.mark.parametrize("tree_name", TREE_NAMES)
@pytest.mark.parametrize("use_jit", [True, False])
def test_statistics_match_numpy(tree_name, use_jit):
  params = trees.TREES[tree_name]()
  grads = random_like(params, seed=4)
  flow = odn.gradient_flow
  if use_jit:  # jit sorts dict keys: labels resolved once from the params, closed over
    flow = jax.jit(functools.partial(odn.gradient_flow, depths=odn.layer_depths(params)))
  report = flow(grads, params)
  assert isinstance(report, odn.FlowReport)
  assert report.depths == tuple(sorted(set(trees.expected_depths(grads))))
  assert report.norm.dtype == jnp.float32
  assert_report_matches(report, reference_flow(grads, params))
  if tree_name == "dict":
    without = flow(grads)
    assert_report_matches(without, reference_flow(grads))
    assert without.param_norm is None and without.ratio is None


def test_paths_sizes_and_table():
  params = trees.linen_params()
  report = odn.gradient_flow(random_like(params), params)
  assert report.paths == tuple(f"Dense_{i}" for i in range(12))
  assert report.sizes[0] == 3 * 5 + 5 and report.sizes[-1] == 4 * 3 + 3
  lines = str(report).splitlines()
  assert lines[0].split() == [
    "depth", "path", "size", "norm", "mean|g|", "max|g|", "rms", "norm(w)", "norm/norm(w)"
  ]  # fmt: skip
  assert lines[3].split()[:3] == ["2", "Dense_2", "20"]
  assert odn.gradient_flow(trees.nnx_state()).paths == (
    "layers/0",
    "layers/1",
    "layers/2",
    "layers/3",
  )
  assert odn.gradient_flow(trees.dict_params()).paths == (  # the dict's creation order
    "stem/0",
    "encoder/block_2",
    "encoder/block_10",
  )


def test_a_rule_can_merge_modules_into_one_layer():
  grads = {f"block_{i}": {"w": jnp.full(2, float(i + 1))} for i in range(5)}
  report = odn.gradient_flow(grads, depths={"block_0": 0, "": 1})
  assert report.paths == ("block_0", "block_1+3 more")
  assert odn.gradient_flow(grads, depths={"block_0": 0, "block_4": 2, "": 1}).paths[1] == (
    "block_1+block_2+block_3"
  )
  np.testing.assert_allclose(report.norm[1], np.sqrt(2 * (4 + 9 + 16 + 25)), rtol=RTOL)


def test_vanished_gradient_norm_does_not_underflow():
  """Squares of 1e-25 underflow float32; the norm is still right."""
  grads = {"layer_0": {"w": jnp.full((4,), 3e-25)}, "layer_1": {"w": jnp.full((4,), 1e30)}}
  report = jax.jit(odn.gradient_flow)(grads)
  np.testing.assert_allclose(report.norm, [6e-25, 2e30], rtol=RTOL)  # no atol: tiny values
  np.testing.assert_allclose(report.rms, [3e-25, 1e30], rtol=RTOL)


def test_low_precision_leaves_are_measured_in_float32():
  params = trees.linen_params()
  grads = random_like(params, seed=2)
  low = jax.tree.map(lambda x: x.astype(jnp.bfloat16), grads)
  with jax.numpy_dtype_promotion("strict"):
    report = jax.jit(odn.gradient_flow)(low, jax.tree.map(lambda x: x.astype(jnp.float16), params))
  assert report.norm.dtype == jnp.float32
  assert_report_matches(report, reference_flow(low), rtol=1e-5)


def test_ratio_of_zero_weights_is_inf_and_zero_over_zero_is_zero():
  grads = {f"layer_{i}": {"w": jnp.full(2, g)} for i, g in enumerate([1.0, 0.0, 1.0])}
  params = {f"layer_{i}": {"w": jnp.full(2, w)} for i, w in enumerate([0.0, 0.0, 2.0])}
  report = odn.gradient_flow(grads, params)
  np.testing.assert_array_equal(report.ratio, [np.inf, 0.0, 0.5])


def test_params_must_have_the_gradients_paths():
  grads = {"layer_0": {"w": jnp.ones(2)}, "layer_1": {"w": jnp.ones(2)}}
  with pytest.raises(
    ValueError,
    match=r"params must have the paths and shapes of grads, but they have no leaf "
    r"'layer_1/w' \(which grads have\)",
  ):
    odn.gradient_flow(grads, {"layer_0": {"w": jnp.ones(2)}})


def test_masked_layers_keep_their_place_with_size_zero():
  grads = {f"Dense_{i}": {"kernel": jnp.full(3, i + 1.0)} for i in range(3)}
  mask = {"Dense_0": {"kernel": False}, "Dense_1": {"kernel": True}, "Dense_2": {"kernel": True}}
  tx = optax.masked(odn.track_gradient_flow(), mask)
  state = tx.init(grads)
  _, state = tx.update(grads, state, grads)
  report = odn.flow_from_state(state)
  np.testing.assert_allclose(report.norm, [0.0, 2 * np.sqrt(3), 3 * np.sqrt(3)], rtol=RTOL)
  hidden = {**grads, "Dense_0": {"kernel": optax.MaskedNode()}}
  assert odn.gradient_flow(hidden).sizes == (0, 3, 3)
  assert odn.diagnose(odn.gradient_flow(hidden)) == []


def test_report_is_a_pytree_that_scan_stacks():
  params = {f"Dense_{i}": {"kernel": jnp.ones(3)} for i in range(3)}

  def step(scale, _):
    return scale * 2, odn.gradient_flow(jax.tree.map(lambda p: scale * p, params))

  _, stacked = jax.jit(lambda: jax.lax.scan(step, jnp.float32(1.0), length=4))()
  assert stacked.norm.shape == (4, 3) and stacked.paths == ("Dense_0", "Dense_1", "Dense_2")
  np.testing.assert_allclose(stacked.max_abs[:, 0], [1, 2, 4, 8])
  with pytest.raises(ValueError, match=r"holds arrays of shape \(4, 3\) \(stacked steps\)"):
    stacked.table()
  assert "FlowReport(" in str(stacked)  # no table for a history: the repr
  last = jax.tree.map(lambda x: x[-1], stacked)
  assert last.table().splitlines()[1].split()[1] == "Dense_0"


def test_table_inside_jit_says_to_return_the_report():
  def f(g):
    odn.gradient_flow(g).table()

  with pytest.raises(TypeError, match=r"FlowReport.table\(\) needs concrete values"):
    jax.jit(f)({"w": jnp.ones(2)})


# ----------------------------------------------------------------------------- tracker


def _linen_problem(depth=3, width=8, seed=0):
  model = trees.LinenMLP(widths=(width,) * depth + (1,))
  x = jnp.asarray(np.random.default_rng(seed).standard_normal((16, 3)), jnp.float32)
  params = model.init(jax.random.key(seed), x)["params"]
  loss = lambda p: jnp.mean((model.apply({"params": p}, x) - 1.0) ** 2)
  return params, loss


def test_tracker_passes_updates_and_records_the_flow_in_a_jitted_scan():
  params, loss = _linen_problem()
  opt = optax.chain(odn.track_gradient_flow(history=4, stats="all"), optax.sgd(0.1))

  @jax.jit
  def train(params):
    def step(carry, _):
      params, state = carry
      grads = jax.grad(loss)(params)
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), (grads, params)

    return jax.lax.scan(step, (params, opt.init(params)), length=6)

  (_, state), history = train(params)
  all_grads, all_params = jax.tree.map(np.asarray, history)  # slicing in NumPy: no compiles
  latest = odn.flow_from_state(state, params)
  grads5 = jax.tree.map(lambda x: x[5], all_grads)
  assert_report_matches(latest, reference_flow(grads5, jax.tree.map(lambda x: x[5], all_params)))
  assert int(latest.step) == 5 and latest.paths[0] == "Dense_0"
  past = odn.flow_from_state(state, params, history=True)
  np.testing.assert_array_equal(past.step, [2, 3, 4, 5])
  for row, t in enumerate(past.step):
    expected = reference_flow(jax.tree.map(lambda x, t=t: x[t], all_grads))
    np.testing.assert_allclose(past.norm[row], expected["norm"], rtol=1e-5)
  plain_updates, _ = optax.sgd(0.1).update(grads5, optax.sgd(0.1).init(params))
  updates, _ = jax.jit(opt.update)(grads5, state, params)
  jax.tree.map(np.testing.assert_array_equal, updates, plain_updates)


def test_history_before_the_ring_is_full_and_without_params():
  tx = odn.track_gradient_flow(history=3)
  grads = {"a": {"w": jnp.ones(2)}}
  state = tx.init(grads)
  assert odn.flow_from_state(state, history=True).norm.shape == (0, 1)
  assert int(odn.flow_from_state(state).step) == -1
  _, state = tx.update(grads, state)  # no params: weight statistics are NaN
  report = odn.flow_from_state(state)
  assert report.paths == ("a",) and report.sizes == (-1,)  # named from the state's paths
  assert np.isnan(report.param_norm).all() and "norm(w)" not in report.table()
  assert odn.flow_from_state(state, history=True).norm.shape == (1, 1)


def test_tracker_found_in_nested_states_and_by_optax_tree_get():
  params = trees.dict_params()
  grads = random_like(params, seed=1)
  inner = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.inject_hyperparams(odn.track_gradient_flow, static_args=("history",))(
      history=2,
      depths=odn.layer_depths(params),  # partition passes sorted copies to init
    ),
    optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
  )
  opt = optax.MultiSteps(
    optax.partition({"a": inner, "b": optax.sgd(0.1)}, jax.tree.map(lambda _: "a", params)),
    every_k_schedule=1,
  )
  state = opt.init(params)
  _, state = jax.jit(opt.update)(grads, state, params)
  report = odn.flow_from_state(state, params)
  clipped = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())[0]
  np.testing.assert_allclose(report.norm, reference_flow(clipped)["norm"], rtol=1e-5)
  np.testing.assert_array_equal(optax.tree.get(state, "flow").norm, report.norm)


def test_tracker_state_read_from_an_nnx_optimizer():
  model = trees.NNXMLP(nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.chain(odn.track_gradient_flow(), optax.sgd(0.1)), wrt=nnx.Param)
  x = jnp.ones((4, 3))
  loss = lambda m: jnp.mean(m(x) ** 2)

  @nnx.jit
  def step(model, opt):
    grads = nnx.grad(loss)(model)
    opt.update(model, grads)
    return grads

  grads = nnx.to_pure_dict(step(model, opt))
  report = odn.flow_from_state(opt.opt_state, nnx.state(model, nnx.Param))
  assert report.paths == ("layers/0", "layers/1", "layers/2", "layers/3")
  assert type(report.norm) is type(jnp.zeros(1))  # not an nnx.OptArray
  np.testing.assert_allclose(report.norm, reference_flow(grads)["norm"], rtol=1e-5)


def test_tracker_under_inject_hyperparams_needs_history_static():
  with pytest.raises(ValueError, match=r"history must be a positive Python int.*static_args"):
    optax.inject_hyperparams(odn.track_gradient_flow)().init({"w": jnp.ones(2)})
  with pytest.raises(ValueError, match="history must be a positive Python int"):
    odn.track_gradient_flow(history=0)


def test_tracker_state_checkpoints_and_restores():
  params, loss = _linen_problem()
  opt = optax.chain(odn.track_gradient_flow(history=3), optax.adam(1e-2))
  step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p))
  state = opt.init(params)
  for _ in range(4):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  restored = flax.serialization.from_bytes(opt.init(params), flax.serialization.to_bytes(state))
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  a, b = state, restored
  for _ in range(2):
    _, a = step(params, a)
    _, b = step(params, b)
  history = odn.flow_from_state(b, params, history=True)
  np.testing.assert_array_equal(history.norm, odn.flow_from_state(a, params, history=True).norm)
  np.testing.assert_array_equal(history.step, [3, 4, 5])


def test_init_reads_shapes_only():
  params, _ = _linen_problem()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  state = odn.track_gradient_flow(history=5).init(abstract)
  assert state.flow_history.norm.shape == (5, 4) and state.flow.rms.shape == (4,)


def test_tracker_errors():
  tx = odn.track_gradient_flow()
  state = tx.init({"a": {"w": jnp.ones(2)}})
  mismatch = r"not the one given to `init`: 1 leaves it has no depth for \(\['b/w'\]\)"
  with pytest.raises(ValueError, match=mismatch):
    tx.update({"a": {"w": jnp.ones(2)}, "b": {"w": jnp.ones(2)}}, state)
  with pytest.raises(ValueError, match="opt_state holds no `track_gradient_flow` state"):
    odn.flow_from_state(optax.adam(1e-3).init({"w": jnp.ones(2)}))
  two = optax.chain(odn.track_gradient_flow(), odn.track_gradient_flow())
  both = two.init({"w": jnp.ones(2)})
  with pytest.raises(
    ValueError, match="holds 2 `track_gradient_flow` states; pick one with `index=`"
  ):
    odn.flow_from_state(both)
  assert odn.flow_from_state(both, index=1).norm.shape == (1,)
  with pytest.raises(ValueError, match=r"they have a leaf 'b/w' that the params at `init` lack"):
    odn.flow_from_state(state, {"a": {"w": jnp.ones(2)}, "b": {"w": jnp.ones(2)}})
  with pytest.raises(TypeError, match=r"flow_from_state\(\.\.\., history=True\) needs concrete"):
    jax.jit(lambda s: odn.flow_from_state(s, history=True).norm)(state)


# ----------------------------------------------------------------------------- diagnose


class MLP(nn.Module):
  depth: int
  activation: object
  width: int = 32

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = self.activation(nn.Dense(self.width)(x))
    return nn.Dense(10)(x)


def mlp_params(model, gain=1.0, seed=0, inputs=16):
  """Normal(0, gain / fan_in) kernels and zero biases: 1 is LeCun (flax's default), 2 is He.

  Built in NumPy: an eager `model.init` of 40 layers takes seconds.
  """
  rng = np.random.default_rng(seed)
  sizes = [inputs] + [model.width] * model.depth + [10]
  return {
    f"Dense_{i}": {
      "kernel": jnp.asarray(rng.standard_normal((m, n)) * np.sqrt(gain / m), jnp.float32),
      "bias": jnp.zeros(n),
    }
    for i, (m, n) in enumerate(itertools.pairwise(sizes))
  }


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 64))
  return x, lambda out: optax.softmax_cross_entropy_with_integer_labels(out, y).mean()


def _init_flow(model, gain=1.0, seed=0):
  x, xent = _batch(seed)
  loss = lambda p: xent(model.apply({"params": p}, x))
  return jax.jit(lambda p: odn.gradient_flow(jax.grad(loss)(p), p))(mlp_params(model, gain, seed))


def test_diagnose_flags_a_deep_sigmoid_mlp_at_init_as_vanishing():
  flags = odn.diagnose(_init_flow(MLP(40, nn.sigmoid)))
  assert flags and {f.kind for f in flags} == {"vanishing"}
  assert [f.depth for f in flags] == list(range(len(flags)))  # the lowest layers
  assert flags[0].path == "Dense_0" and len(flags) > 30
  assert "below the floor" in flags[0].reason and "\n" not in str(flags[0])


def test_diagnose_finds_a_well_initialized_relu_mlp_healthy():
  for seed in range(2):
    assert odn.diagnose(_init_flow(MLP(4, nn.relu), gain=2.0, seed=seed)) == []


def test_diagnose_flags_exploding_gradients_of_an_overscaled_relu_mlp():
  """Weights 2x too large: pre-activation gradients double at every layer down.

  The weight gradients stay level across depth (growing deltas meet shrinking
  inputs, seed 003 sec. 3.1) but are huge: above the ceiling everywhere.
  """
  model = MLP(12, nn.relu)
  flags = odn.diagnose(_init_flow(model, gain=8.0))
  assert [f.kind for f in flags] == ["exploding"] * 13
  assert all("above the ceiling 1e+01" in f.reason for f in flags)
  x, xent = _batch()
  variables = {"params": mlp_params(model, gain=8.0)}
  deltas = jax.jit(lambda v: odn.activation_gradient_norms(model, v, x, loss_fn=xent))(variables)
  flags = odn.diagnose(deltas)
  assert flags and {f.kind for f in flags} == {"exploding"} and flags[0].depth == 0
  assert "x the smallest above it" in flags[0].reason


def test_diagnose_kinds_and_reasons_on_a_hand_made_report():
  stats = [1e-9, 0.0, 2e-7, np.nan, 5e3, 5.0, 1e-3, 1e-3]
  grads = {f"Dense_{i}": {"kernel": jnp.full(4, s, jnp.float32)} for i, s in enumerate(stats)}
  flags = {f.depth: f for f in odn.diagnose(odn.gradient_flow(grads))}
  assert {d: f.kind for d, f in flags.items()} == {
    0: "vanishing",
    1: "dead",
    2: "vanishing",
    3: "nonfinite",
    4: "exploding",
    5: "exploding",
  }
  assert flags[0].reason == "rms 1.00e-09 is below the floor 1e-08"
  assert flags[2].reason == (
    "rms 2.00e-07 is 4.0e-11 x the largest above it (5.00e+03 at depth 4; threshold 1e-03)"
  )
  assert flags[3].reason == "the gradient holds inf or nan (max|g| = nan)"
  assert flags[4].reason == "rms 5.00e+03 is above the ceiling 1e+01"
  assert flags[5].reason.startswith("rms 5.00e+00 is 5.0e+03 x the smallest above it (1.00e-03")
  assert str(flags[1]).startswith(
    "dead at depth 1 (Dense_1): the gradient is exactly zero; common and intended at init"
  )
  # Thresholds are parameters: looser ones clear the relative flags.
  loose = odn.diagnose(odn.gradient_flow(grads), explode_ratio=1e4, vanish_ratio=1e-12)
  assert {f.depth for f in loose} == {0, 1, 3, 4}
  by_norm = odn.diagnose(odn.gradient_flow(grads), stat="norm", floor=1e-12, ceiling=1e5)
  assert by_norm[0].reason.startswith("norm 2.00e-09 is 2.0e-13 x the largest above it")
  assert [f.kind for f in by_norm][4:] == ["exploding", "exploding"]


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"stat": "l2"}, "stat must be one of"),
    ({"floor": 0.0}, "floor must be a positive number, got 0.0"),
    ({"vanish_ratio": 2.0}, "need vanish_ratio < 1 < explode_ratio"),
    ({"floor": 1e4}, "need floor < ceiling"),
  ],
)
def test_diagnose_validates_thresholds(kwargs, match):
  with pytest.raises(ValueError, match=match):
    odn.diagnose(odn.gradient_flow({"w": jnp.ones(2)}), **kwargs)


def test_diagnose_needs_one_concrete_step():
  report = odn.gradient_flow({"w": jnp.ones(2)})
  stacked = jax.tree.map(lambda x: jnp.stack([x, x]), report)
  with pytest.raises(ValueError, match=r"diagnose reads one step, .* shape \(2, 1\)"):
    odn.diagnose(stacked)
  with pytest.raises(TypeError, match="diagnose needs concrete values"):
    jax.jit(lambda g: len(odn.diagnose(odn.gradient_flow(g))))({"w": jnp.ones(2)})


# ----------------------------------------------------------------------------- activations


def test_activation_gradients_match_a_hand_written_backward_pass():
  depth, width = 3, 6
  model = MLP(depth, nn.sigmoid, width=width)
  x, xent = _batch(1)
  params = mlp_params(model, seed=1)

  def by_hand(perturbations):  # z_k = W_k h + b_k + p_k: dL/dp_k = delta^(k)
    h = x
    for k in range(depth + 1):
      layer = params[f"Dense_{k}"]
      z = h @ layer["kernel"] + layer["bias"][None] + perturbations[k]
      h = jax.nn.sigmoid(z) if k < depth else z
    return xent(h)

  shapes = [(64, width)] * depth + [(64, 10)]
  deltas = jax.jit(jax.grad(by_hand))([jnp.zeros(s) for s in shapes])
  for use_jit in (False, True):
    f = lambda p: odn.activation_gradient_norms(model, {"params": p}, x, loss_fn=xent)
    report = (jax.jit(f) if use_jit else f)(params)
    assert report.paths == tuple(f"Dense_{k}" for k in range(depth + 1))
    assert report.depths == tuple(range(depth + 1)) and report.what == "pre-activation gradient"
    d64 = [np.asarray(d, np.float64) for d in deltas]
    np.testing.assert_allclose(report.norm, [np.linalg.norm(d) for d in d64], rtol=1e-5)
    np.testing.assert_allclose(report.mean_abs, [np.abs(d).mean() for d in d64], rtol=1e-5)
    np.testing.assert_allclose(report.max_abs, [np.abs(d).max() for d in d64], rtol=1e-5)


def test_with_bgn_every_pre_activation_gradient_has_norm_kappa():
  """Seed 003, fig. 1 (top): with BGN the norms are constant, sqrt(width)."""
  width = 16
  layers = [f for _ in range(6) for f in (nn.Dense(width), odn.BGN(), nn.sigmoid)]
  model = nn.Sequential([*layers, nn.Dense(1)])
  x = jnp.ones((4, 3))
  variables = model.init(jax.random.key(0), x)
  loss_fn = lambda o: jnp.mean(o**2)
  report = jax.jit(lambda v: odn.activation_gradient_norms(model, v, x, loss_fn=loss_fn))(variables)
  np.testing.assert_allclose(report.norm[:-1], np.sqrt(width), rtol=1e-5)


def test_activation_gradients_of_a_module_called_twice_and_custom_filters():
  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
      dense = nn.Dense(3)
      return nn.Dense(1)(dense(jnp.tanh(dense(x))))

  x = jnp.ones((2, 3))
  variables = Shared().init(jax.random.key(0), x)
  loss_fn = lambda o: jnp.sum(o)
  report = odn.activation_gradient_norms(Shared(), variables, x, loss_fn=loss_fn)
  assert report.paths == ("Dense_0", "Dense_0[1]", "Dense_1")
  only_last = odn.activation_gradient_norms(
    Shared(), variables, x, loss_fn=loss_fn, modules=lambda m: m.name == "Dense_1"
  )
  assert only_last.paths == ("Dense_1",)
  np.testing.assert_allclose(only_last.norm, [np.sqrt(2.0)], rtol=RTOL)  # d sum / d out = 1


def test_activation_gradient_errors():
  x = jnp.ones((2, 3))
  model = nn.Dense(2)
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="no module selected by modules="):
    odn.activation_gradient_norms(model, variables, x, loss_fn=jnp.sum, modules=(nn.Conv,))
  with pytest.raises(TypeError, match="modules must be a linen Module class"):
    odn.activation_gradient_norms(model, variables, x, loss_fn=jnp.sum, modules="Dense")
  nnx_report = odn.activation_gradient_norms(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), x, loss_fn=jnp.sum)
  assert nnx_report.paths == ("<root>",)  # NNX models work too (tests/test_nnx_activation.py)
  with pytest.raises(TypeError, match="model must be a Flax linen Module, got function"):
    odn.activation_gradient_norms(lambda v, x: x, variables, x, loss_fn=jnp.sum)
