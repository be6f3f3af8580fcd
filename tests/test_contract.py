"""One contract that every transform of the library passes.

Modelled on the battery in optax's ``contrib/_common_test.py`` (extra args,
jitted ``lax.scan`` training, ``inject_hyperparams``, dtypes, ``MultiSteps``,
state stability, no recompiles), plus what this library promises on top:
strict dtype promotion, Flax serialization, abstract ``init``, ``masked`` and
``partition``, sharded params, and linen / NNX / Equinox / plain-dict trees.

A new transform joins the whole suite with one `Entry` in ``_ENTRIES``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import chex
import equinox as eqx
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_depthnorm as odn
from tests.tolerance import ATOL, RTOL, assert_close
from tests.trees import keep_order


@dataclasses.dataclass(frozen=True)
class Entry:
  """A transform under test.

  `factory(**hparams)` builds it; `factory` takes the hyperparameters as
  keywords so that `optax.inject_hyperparams(factory)(**hparams)` wraps it.
  `changed` holds new values of numeric hyperparameters that visibly change the
  updates (empty when the only hyperparameter is a schedule). `after_optimizer`
  marks a projection of the optimizer's updates (`scale_normalize`): it is
  chained after SGD, and a zero update is not its fixed point.
  """

  name: str
  factory: Callable[..., optax.GradientTransformation]
  hparams: dict[str, Any]
  changed: dict[str, Any] = dataclasses.field(default_factory=dict)
  after_optimizer: bool = False
  static_args: tuple[str, ...] = ()  # callables bound in `factory`, not schedules

  def make(self, **overrides: Any) -> optax.GradientTransformation:
    return self.factory(**{**self.hparams, **overrides})

  def inject(self) -> optax.GradientTransformationExtraArgs:
    return optax.inject_hyperparams(self.factory, static_args=self.static_args)(**self.hparams)

  def with_sgd(self, tx: optax.GradientTransformation, lr: float = 0.05):
    """`tx` and SGD chained in the order the transform is used in."""
    return (
      optax.chain(optax.sgd(lr), tx) if self.after_optimizer else optax.chain(tx, optax.sgd(lr))
    )


_partial = functools.partial
_ENTRIES = [
  Entry("normalize", odn.layerwise_normalize, {"target": 1.0}, {"target": 2.5}),
  Entry(
    "normalize_layer_last",
    _partial(odn.layerwise_normalize, group="layer", target="last_layer"),
    {"eps": 1e-8},
    {"eps": 100.0},
  ),
  Entry(
    "normalize_last_weights",
    _partial(odn.layerwise_normalize, target="last_layer_weights"),
    {"eps": 1e-8},
    {"eps": 100.0},
  ),
  # Every matrix taken as a stack of layers along axis 0: the per-slice (vectorized) path.
  Entry(
    "normalize_stacked",
    _partial(odn.layerwise_normalize, stack_axis=lambda path, leaf: 0 if leaf.ndim >= 2 else None),
    {"target": 1.0},
    {"target": 2.5},
    static_args=("stack_axis",),
  ),
  Entry("decay", odn.depth_decay, {"gamma": 0.1}, {"gamma": 0.7}),
  Entry(
    "decay_linear_rev",
    _partial(odn.depth_decay, decay="linear", normalize_depth=True, reverse=True),
    {"gamma": 0.3},
    {"gamma": 0.9},
  ),
  Entry("decay_schedule", odn.depth_decay, {"gamma": optax.linear_schedule(0.0, 0.5, 10)}),
  Entry("depth_normalized", odn.depth_normalized, {"gamma": 0.01}, {"gamma": 0.5}),
  # Passes updates unchanged; `history` is a shape, not an injectable hyperparameter.
  Entry(
    "track_flow",
    lambda depths=None: odn.track_gradient_flow(history=3, depths=depths, stats="all"),
    {},
  ),
  Entry(
    "scale_det", _partial(odn.scale_normalize, "determinant"), {"eps": 1e-8}, {"eps": 1e3}, True
  ),
  Entry(
    "scale_probe",
    _partial(odn.scale_normalize, "probe"),
    {"first_n_steps": 9},
    {"first_n_steps": 0},
    True,
  ),
]
TRANSFORMS = [pytest.param(e, id=e.name) for e in _ENTRIES]
# A projection after the optimizer maps a zero update to the projected params (test_scale.py).
GRADIENT_TRANSFORMS = [pytest.param(e, id=e.name) for e in _ENTRIES if not e.after_optimizer]


# ----------------------------------------------------------------------------- trees

# Data and params come from NumPy or one jitted init: eager jax.random would
# compile once per shape, which dominates the run time of this suite.
_RNG = np.random.default_rng(0)
X = jnp.asarray(_RNG.standard_normal((16, 3), np.float32))
Y = jnp.asarray(np.sin(np.asarray(X) @ np.array([1.0, -2.0, 0.5], np.float32))[:, None])


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(8)(x))
    x = jnp.tanh(nn.Dense(8)(x))
    return nn.Dense(1)(x)


class NnxMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.layers = nnx.List(
      [nnx.Linear(3, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 1, rngs=rngs)]
    )

  def __call__(self, x):
    x = jnp.tanh(self.layers[0](x))
    x = jnp.tanh(self.layers[1](x))
    return self.layers[2](x)


@dataclasses.dataclass(frozen=True)
class Problem:
  """A params tree and a loss on it; `grads` has the structure of `params`."""

  params: Any
  loss: Callable[[Any], jax.Array]
  grads: Callable[[Any], Any]


def _linen() -> Problem:
  model = LinenMLP()
  params = jax.jit(model.init)(jax.random.key(1), X)["params"]
  loss = lambda p: jnp.mean((model.apply({"params": p}, X) - Y) ** 2)
  return Problem(params, loss, jax.grad(loss))


@nnx.jit
def new_nnx_model() -> NnxMLP:
  return NnxMLP(nnx.Rngs(2))


def _nnx() -> Problem:
  graphdef, params = nnx.split(new_nnx_model(), nnx.Param)
  loss = lambda p: jnp.mean((nnx.merge(graphdef, p)(X) - Y) ** 2)
  return Problem(params, loss, jax.grad(loss))


def _equinox() -> Problem:
  new = eqx.filter_jit(lambda key: eqx.nn.MLP(3, 1, 8, 2, activation=jnp.tanh, key=key))
  model = new(jax.random.key(3))
  params = eqx.filter(model, eqx.is_inexact_array)  # as users do: non-arrays become None
  static = eqx.filter(model, eqx.is_inexact_array, inverse=True)
  loss = lambda p: jnp.mean((jax.vmap(eqx.combine(p, static))(X) - Y) ** 2)
  return Problem(params, loss, jax.grad(loss))


def _dict() -> Problem:
  """Nested dicts and a list, an int leaf (a counter) and a None."""
  normal = lambda *shape: jnp.asarray(_RNG.standard_normal(shape, np.float32))
  params = {
    "embed": {"table": normal(8, 3)},
    "blocks": [
      {"w": normal(3, 8), "b": jnp.zeros(8)},
      {"w": normal(8, 8), "b": jnp.ones(8)},
    ],
    "head": {"kernel": normal(8, 1), "bias": jnp.zeros(1)},
    "step": jnp.array(7, jnp.int32),
    "frozen": None,
  }

  def loss(p):
    return sum(jnp.sum((x - 0.5) ** 2) for x in jax.tree.leaves(p) if _is_float(x))

  def grads(p):
    return jax.tree.map(lambda x: 2 * (x - 0.5) if _is_float(x) else jnp.zeros_like(x), p)

  return Problem(params, loss, grads)


PROBLEMS = {"linen": _linen, "nnx": _nnx, "equinox": _equinox, "dict": _dict}
TREES = list(PROBLEMS)


@functools.cache
def problem(tree: str) -> Problem:
  return PROBLEMS[tree]()


def _is_float(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def cast(tree: Any, dtype: Any) -> Any:
  """Float leaves cast on the host (no per-shape compilation); others kept, dict order too."""
  cast_tree = jax.tree.map(
    lambda x: jnp.asarray(np.asarray(x).astype(dtype)) if _is_float(x) else x, tree
  )
  return keep_order(tree, cast_tree)


def random_like(tree: Any, seed: int) -> Any:
  """Random normal 'gradients' for the float leaves; other leaves copied."""
  rng = np.random.default_rng(seed)  # NumPy: no compilation per leaf shape
  leaves, treedef = jax.tree.flatten(tree)
  out = [
    jnp.asarray(rng.standard_normal(x.shape, np.float32).astype(x.dtype)) if _is_float(x) else x
    for x in leaves
  ]
  return keep_order(tree, jax.tree.unflatten(treedef, out))


def assert_non_floats_untouched(updates: Any, grads: Any) -> None:
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    if not _is_float(g):
      assert u.dtype == g.dtype
      np.testing.assert_array_equal(u, g)


def assert_updates_close(actual: Any, expected: Any, rtol: float = RTOL, atol: float = ATOL):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  chex.assert_trees_all_equal_shapes_and_dtypes(actual, expected)
  chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


def float_leaves(tree: Any) -> list[jax.Array]:
  return [x for x in jax.tree.leaves(tree) if _is_float(x)]


def mixed_dtype_params() -> Any:
  """The dict tree with one layer per float dtype (and its int leaf and None)."""
  p = problem("dict").params
  blocks = [cast(p["blocks"][0], jnp.bfloat16), cast(p["blocks"][1], jnp.float16)]
  return {**p, "blocks": blocks, "head": cast(p["head"], jnp.bfloat16)}


TOLERANCE = {jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 2e-3}


def assert_close_to_float32(updates: Any, reference: Any, tol: float | None = None) -> None:
  """Low-precision updates equal the float32 ones up to their own rounding."""
  for u, r in zip(jax.tree.leaves(updates), jax.tree.leaves(reference), strict=True):
    t = tol or TOLERANCE.get(u.dtype, 1e-5)
    np.testing.assert_allclose(np.asarray(u, np.float32), r, rtol=t, atol=t)


# ----------------------------------------------------------------------------- (a) dtypes


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("entry", TRANSFORMS)
def test_dtype_kept_under_strict_promotion(entry, tree, dtype):
  params = cast(problem(tree).params, dtype)
  grads = random_like(params, 0)
  tx = entry.make()
  with jax.numpy_dtype_promotion("strict"):
    state = tx.init(params)
    updates, new_state = tx.update(grads, state, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, grads)
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
  assert_non_floats_untouched(updates, grads)
  assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in float_leaves(updates))
  # Norms are taken in float32: low-precision updates are the rounded float32 ones.
  reference, _ = tx.update(cast(grads, jnp.float32), tx.init(params), cast(params, jnp.float32))
  assert_close_to_float32(updates, reference)


@pytest.mark.parametrize("entry", TRANSFORMS)
def test_dtype_kept_under_jit_and_strict_promotion_mixed_tree(entry):
  params = mixed_dtype_params()
  grads = random_like(params, 1)
  tx = entry.make()
  with jax.numpy_dtype_promotion("strict"):
    updates, new_state = jax.jit(tx.update)(grads, tx.init(params), params)
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, grads)
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, tx.init(params))
  assert_non_floats_untouched(updates, grads)
  assert updates["frozen"] is None
  reference, _ = tx.update(cast(grads, jnp.float32), tx.init(params), cast(params, jnp.float32))
  assert_close_to_float32(updates, reference)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("entry", GRADIENT_TRANSFORMS)
def test_zero_gradient_stays_zero(entry, dtype):
  """A zero gradient is a fixed point, never NaN, also under `inject_hyperparams`.

  `inject_hyperparams` casts numeric hyperparameters to the params dtype, so in
  float16 the default ``eps=1e-8`` of the normalizing transforms arrives as 0.
  """
  params = cast(problem("linen").params, dtype)
  grads = jax.tree.map(jnp.zeros_like, params)
  for tx in (entry.make(), entry.inject()):
    updates, _ = tx.update(grads, tx.init(params), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, grads)
    chex.assert_trees_all_equal(updates, grads)


def test_update_accepts_extra_args():
  params = problem("linen").params
  grads = random_like(params, 1)
  for entry in _ENTRIES:
    tx = entry.make()
    updates, _ = tx.update(grads, tx.init(params), params, unexpected_extra_arg=1)
    expected, _ = tx.update(grads, tx.init(params), params)
    chex.assert_trees_all_equal(updates, expected)


# ----------------------------------------------------------------------------- (b) training


@pytest.mark.parametrize("entry", TRANSFORMS)
def test_chain_with_sgd_trains_in_jitted_scan(entry):
  """A linen MLP regression trains (NNX: `test_nnx_optimizer`)."""
  prob = problem("linen")
  opt = entry.with_sgd(entry.make())

  @jax.jit
  def train(params):
    def step(carry, _):
      params, state = carry
      updates, state = opt.update(prob.grads(params), state, params)
      return (optax.apply_updates(params, updates), state), prob.loss(params)

    (params, state), losses = jax.lax.scan(step, (params, opt.init(params)), length=1000)
    return params, state, losses

  params, state, losses = train(prob.params)
  final = float(prob.loss(params))
  # a long run: 1,000 steps, every loss and the whole state finite at the end
  assert np.all(np.isfinite(np.asarray(losses)))
  floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in floats)
  assert final < 0.7 * float(losses[0]), (float(losses[0]), final)


# ----------------------------------------------------------------------------- (c) inject


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("entry", TRANSFORMS)
def test_inject_hyperparams_matches_plain(entry, tree):
  params = problem(tree).params
  plain, injected = entry.make(), entry.inject()
  plain_state, inject_state = plain.init(params), injected.init(params)
  for i in range(3):  # several steps, so that a schedule moves
    grads = random_like(params, i)
    expected, plain_state = plain.update(grads, plain_state, params)
    updates, inject_state = injected.update(grads, inject_state, params)
    assert_updates_close(updates, expected)
    assert_non_floats_untouched(updates, grads)
  chex.assert_trees_all_equal(inject_state.inner_state, plain_state)


@pytest.mark.parametrize("entry", TRANSFORMS)
def test_inject_hyperparams_can_be_changed_in_state(entry):
  params = problem("linen").params
  grads = random_like(params, 5)
  injected = entry.inject()
  state = injected.init(params)
  if not entry.changed:  # schedules (or none): the state shows their value at each step
    for i in range(3):
      _, state = injected.update(grads, state, params)
      for name, schedule in entry.hparams.items():
        np.testing.assert_allclose(state.hyperparams[name], schedule(i), rtol=1e-6)
    return
  for name, value in entry.changed.items():
    state.hyperparams[name] = jnp.asarray(value, state.hyperparams[name].dtype)
  updates, new_state = jax.jit(injected.update)(grads, state, params)
  changed = entry.make(**entry.changed)
  expected, _ = changed.update(grads, changed.init(params), params)
  assert_updates_close(updates, expected)
  original, _ = entry.inject().update(grads, entry.inject().init(params), params)
  assert not all(np.allclose(u, o) for u, o in zip(*map(jax.tree.leaves, (updates, original))))
  for name, value in entry.changed.items():
    np.testing.assert_allclose(new_state.hyperparams[name], value, rtol=1e-6)


def _custom_decay(gamma, d):
  return 1.0 / (1.0 + gamma * d)


def test_inject_hyperparams_needs_static_callables():
  params = problem("linen").params
  grads = random_like(params, 6)
  plain = odn.depth_decay(0.1, decay=_custom_decay)
  expected, _ = plain.update(grads, plain.init(params), params)
  leaves = zip(jax.tree.leaves(expected), jax.tree.leaves(grads))
  factors = [float(jnp.mean(e / g)) for e, g in leaves]
  # Dense_0/{bias,kernel} at depth 0, Dense_1 at 1, Dense_2 at 2: 1 / (1 + 0.1 d).
  np.testing.assert_allclose(factors, [1, 1, 1 / 1.1, 1 / 1.1, 1 / 1.2, 1 / 1.2], rtol=RTOL)

  injected = optax.inject_hyperparams(odn.depth_decay, static_args=("decay",))(
    gamma=0.1, decay=_custom_decay
  )
  updates, state = jax.jit(injected.update)(grads, injected.init(params), params)
  assert_updates_close(updates, expected)
  assert set(state.hyperparams) == {"gamma"}

  # Without static_args, inject_hyperparams takes any callable hyperparameter for
  # a schedule of the step count: `init` evaluates `_custom_decay(count)`, which
  # lacks its second argument, so the wrapper fails with a TypeError before the
  # transform ever runs. (A string decay such as "linear" is static by itself.)
  unwrapped = optax.inject_hyperparams(odn.depth_decay)(gamma=0.1, decay=_custom_decay)
  with pytest.raises(TypeError, match="missing 1 required positional argument"):
    unwrapped.init(params)


# ----------------------------------------------------------------------------- (d) MultiSteps


@pytest.mark.parametrize("entry", TRANSFORMS)
def test_inside_multisteps(entry):
  """Params of bf16, f16 and f32 layers, an int leaf and a None, under jit."""
  params = mixed_dtype_params()
  multi = optax.MultiSteps(entry.make(), every_k_schedule=3)
  update = jax.jit(multi.update)
  state = multi.init(params)
  grads = [random_like(params, i) for i in range(3)]
  for g in grads[:2]:
    updates, state = update(g, state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    for u in float_leaves(updates):
      np.testing.assert_array_equal(u, jnp.zeros_like(u))
  updates, state = update(grads[2], state, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
  assert int(state.gradient_step) == 1

  tx = entry.make()
  grads32 = [cast(g, jnp.float32) for g in grads]
  mean = jax.tree.map(lambda a, b, c: (a + b + c) / 3 if _is_float(a) else a, *grads32)
  expected, expected_state = tx.update(mean, tx.init(params), cast(params, jnp.float32))
  # MultiSteps averages in each leaf's dtype, and a target taken from the
  # (bfloat16) last layer carries that rounding into every layer.
  assert_close_to_float32(float_leaves(updates), float_leaves(expected), tol=2e-2)
  # Measurements in state (`track_flow`) carry that rounding too; counts are exact.
  chex.assert_trees_all_close(state.inner_opt_state, expected_state, rtol=2e-2)


# ----------------------------------------------------------------------------- (e), (f) state


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("wrap", ["plain", "inject"])
@pytest.mark.parametrize("entry", TRANSFORMS)
def test_state_structure_shapes_dtypes_stable(entry, wrap, dtype):
  tx = entry.make() if wrap == "plain" else entry.inject()
  opt = entry.with_sgd(tx)
  params = cast(problem("linen").params, dtype)
  state0 = opt.init(params)
  state = state0
  for i in range(3):
    updates, state = opt.update(random_like(params, i), state, params)
    chex.assert_trees_all_equal_structs(state, state0)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
    params = optax.apply_updates(params, updates)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(dtype)}


def _jitted_step(opt: optax.GradientTransformation, traces: list | None = None):
  @jax.jit
  def step(params, state, grads):
    if traces is not None:
      traces.append(1)  # runs once per trace, never per call
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


@pytest.mark.parametrize("wrap", ["plain", "inject"])
@pytest.mark.parametrize("entry", TRANSFORMS)
def test_no_recompilation_across_steps(entry, wrap):
  tx = entry.make() if wrap == "plain" else entry.inject()
  opt = entry.with_sgd(tx)
  traces: list = []  # counted by tracing, not by jax's cache (which other tests may clear)
  step = _jitted_step(opt, traces)
  params = problem("linen").params
  state = opt.init(params)
  for i in range(5):
    params, state = step(params, state, random_like(params, i))
  assert len(traces) == 1


# ----------------------------------------------------------------------------- (g) serialization


@pytest.mark.parametrize("wrap", ["plain", "inject"])
@pytest.mark.parametrize("entry", TRANSFORMS)
def test_state_survives_flax_serialization(entry, wrap):
  tx = entry.make() if wrap == "plain" else entry.inject()
  opt = entry.with_sgd(tx)
  update = jax.jit(opt.update)  # one compile; eager dispatch of 7 steps is the slow part

  def step(params, state, i):
    updates, state = update(random_like(params, i), state, params)
    return optax.apply_updates(params, updates), state

  params0 = problem("linen").params
  params, state = params0, opt.init(params0)
  for i in range(3):
    params, state = step(params, state, i)

  state_dict = flax.serialization.to_state_dict(state)
  assert all(isinstance(x, (np.ndarray, jax.Array)) for x in jax.tree.leaves(state_dict))
  from_dict = flax.serialization.from_state_dict(opt.init(params0), state_dict)
  chex.assert_trees_all_equal(from_dict, state)
  data = flax.serialization.to_bytes(state)
  restored = flax.serialization.from_bytes(opt.init(params0), data)
  chex.assert_trees_all_equal_structs(restored, state)
  chex.assert_trees_all_equal(restored, state)

  params_a, state_a, params_b, state_b = params, state, params, restored
  for i in range(3, 7):
    params_a, state_a = step(params_a, state_a, i)
    params_b, state_b = step(params_b, state_b, i)
  chex.assert_trees_all_equal(params_b, params_a)  # bit for bit
  chex.assert_trees_all_equal(state_b, state_a)
  assert not all(np.array_equal(a, b) for a, b in zip(*map(jax.tree.leaves, (params_a, params))))


def test_states_survive_an_orbax_checkpoint(tmp_path):
  """Every transform's state (after 3 steps), saved in one orbax checkpoint and restored."""
  import orbax.checkpoint as ocp

  params0 = problem("linen").params
  opts = {e.name: e.with_sgd(e.make()) for e in _ENTRIES}
  states, params, updaters = {}, {}, {}
  for name, opt in opts.items():
    update = updaters[name] = jax.jit(opt.update)
    p, state = params0, opt.init(params0)
    for i in range(3):
      updates, state = update(random_like(p, i), state, p)
      p = optax.apply_updates(p, updates)
    states[name], params[name] = state, p
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "states", states)
    checkpointer.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, states)
    restored = checkpointer.restore(tmp_path / "states", target)
  chex.assert_trees_all_equal_structs(restored, states)
  chex.assert_trees_all_equal(restored, states)
  for name, update in updaters.items():
    grads = random_like(params[name], 3)
    expected, _ = update(grads, states[name], params[name])
    got, _ = update(grads, restored[name], params[name])
    chex.assert_trees_all_equal(got, expected)


# ----------------------------------------------------------------------------- (h) abstract init


def _shapes(tree: Any) -> Any:
  return jax.tree.map(lambda x: (tuple(jnp.shape(x)), jnp.dtype(x.dtype)), tree)


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("entry", TRANSFORMS)
def test_init_does_not_read_values(entry, tree):
  params = problem(tree).params
  abstract = keep_order(
    params, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  )
  tx = entry.make()
  state = tx.init(params)
  assert _shapes(tx.init(abstract)) == _shapes(state)
  # Wrapped: inject_hyperparams and adam read dtypes / build zeros, so only
  # abstract evaluation applies to them.
  for t in (tx, entry.inject(), optax.chain(tx, optax.adam(1e-3))):
    state = t.init(params)
    # eval_shape rebuilds dicts with sorted keys: init on them in creation order.
    init = lambda p, t=t: t.init(keep_order(params, p))
    assert _shapes(jax.eval_shape(init, params)) == _shapes(state)
    assert _shapes(jax.eval_shape(init, abstract)) == _shapes(state)
    chex.assert_trees_all_equal(optax.tree.map_params(t, lambda v: v, state), state)


# ------------------------------------------------------------------------ (i) masked, partition


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("entry", TRANSFORMS)
def test_inside_masked_and_partition(entry, tree):
  """Masking out the first layer leaves the other layers' updates as they were."""
  params = problem(tree).params
  grads = random_like(params, 7)
  mask = jax.tree.map(lambda d: d != 0, odn.layer_depths(params))  # int leaf: depth -1
  labels = jax.tree.map(lambda m: "odn" if m else "frozen", mask)
  if tree == "equinox":
    # An Equinox module is callable, and optax takes a callable mask or labels
    # for a function of the params: pass the trees behind a function.
    mask, labels = (lambda tree: lambda _: tree)(mask), (lambda tree: lambda _: tree)(labels)
  # `optax.masked` and `optax.partition` init the inner transform on a tree rebuilt
  # with sorted keys: a dict tree's creation order is lost there, so resolve the
  # depths once from the original dict and pass them.
  stack_axis = getattr(entry.factory, "keywords", {}).get("stack_axis")
  extra = {"depths": odn.layer_depths(params, stack_axis=stack_axis)} if tree == "dict" else {}
  tx = entry.make()
  full, _ = tx.update(grads, tx.init(params), params)
  masked = optax.masked(entry.make(**extra), mask)
  m_updates, _ = masked.update(grads, masked.init(params), params)
  part = optax.partition({"odn": entry.make(**extra), "frozen": optax.set_to_zero()}, labels)
  p_updates, _ = part.update(grads, part.init(params), params)

  flat_mask = jax.tree.leaves(mask(params) if callable(mask) else mask)
  assert flat_mask.count(False) >= 1 and flat_mask.count(True) >= 2
  leaves = map(jax.tree.leaves, (grads, full, m_updates, p_updates))
  for m, g, f, mu, pu in zip(flat_mask, *leaves, strict=True):
    if not _is_float(g):
      np.testing.assert_array_equal(mu, g)
    elif m:  # depths, blocks and the last layer come from paths: as if unmasked
      assert_close(mu, f)
      assert_close(pu, f)
    else:
      np.testing.assert_array_equal(mu, g)  # masked out: passed through
      np.testing.assert_array_equal(pu, jnp.zeros_like(g))


# ----------------------------------------------------------------------------- (j) sharding


@pytest.mark.parametrize("entry", TRANSFORMS)
def test_sharded_params_give_the_unsharded_updates(entry):
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rows = NamedSharding(mesh, P("data", None))
  replicated = NamedSharding(mesh, P())
  k = jax.random.split(jax.random.key(8), 2)
  params = {
    "Dense_0": {"kernel": jax.random.normal(k[0], (16, 4)), "bias": jnp.ones(4)},
    "Dense_1": {"kernel": jax.random.normal(k[1], (4, 3)), "bias": jnp.zeros(3)},
  }
  grads = random_like(params, 9)
  shardings = jax.tree.map(lambda x: rows if x.shape == (16, 4) else replicated, params)
  tx = entry.make()
  expected, expected_state = tx.update(grads, tx.init(params), params)
  s_grads, s_params = jax.device_put((grads, params), (shardings, shardings))
  assert s_params["Dense_0"]["kernel"].sharding == rows
  updates, state = jax.jit(tx.update)(s_grads, tx.init(s_params), s_params)
  assert_close(updates, expected)  # sums per shard and in another order
  chex.assert_trees_all_close(state, expected_state, rtol=RTOL)
  kernel = updates["Dense_0"]["kernel"]
  assert kernel.sharding.is_equivalent_to(rows, kernel.ndim)


# ----------------------------------------------------------------------------- (k) nnx.Optimizer


@pytest.mark.parametrize("entry", TRANSFORMS)
def test_nnx_optimizer(entry):
  """`nnx.Optimizer` inits on an `nnx.State` but updates pure trees: same result."""
  model = new_nnx_model()
  opt = nnx.Optimizer(model, entry.with_sgd(entry.make()), wrt=nnx.Param)
  loss = lambda m: jnp.mean((m(X) - Y) ** 2)

  params = nnx.state(model, nnx.Param)
  tx = entry.with_sgd(entry.make())
  updates, _ = tx.update(nnx.grad(loss)(model), tx.init(params), params)
  expected = nnx.to_pure_dict(optax.apply_updates(params, updates))

  @nnx.jit
  def train_step(model, opt):
    value, grads = nnx.value_and_grad(loss)(model)
    opt.update(model, grads)
    return value

  first = float(train_step(model, opt))
  actual = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert_close(actual, expected)  # jitted train step vs eager update
  for _ in range(30):
    last = float(train_step(model, opt))
  assert last < 0.8 * first, (first, last)
