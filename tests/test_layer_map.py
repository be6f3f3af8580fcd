"""Depths on real-model-shaped trees: resolved once at `init`, right at every step.

Every fixture of `tests/models.py` (big_vision ViT, WMT encoder-decoder, Flax
CNN, NNX Gemma, Equinox BERT, ...) is labelled from the tree that keeps its
creation order, warns where the tree does not tell the order, and keeps every
leaf's depth through training steps whose gradients come back with sorted keys.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_depthnorm as odn
from tests import models
from tests.tolerance import RTOL, assert_close

FIXTURES = {f.__name__: f for f in models.ALL}
NNX = ("nnx_list_head", "nnx_gemma")


@pytest.fixture(scope="module", params=list(FIXTURES))
def fx(request):
  return FIXTURES[request.param]()


def _labels(fx):
  """What the user passes: depths from the NNX module, else the init tree itself."""
  return odn.layer_depths(fx.model) if fx.name in NNX else None


def _path(path) -> str:
  parts = [models._key_name(k) for k in path]
  return "/".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def _layer_depths(tree, depths) -> dict[str, int]:
  """The depth of each layer (fixture naming), from a depth pytree for `tree`."""
  by_path = {_path(p): d for p, d in jax.tree_util.tree_flatten_with_path(depths)[0]}
  table: dict[str, set] = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    table.setdefault(models.layer_name(path), set()).add(by_path[_path(path)])
  assert all(len(v) == 1 for v in table.values()), table
  return {k: v.pop() for k, v in table.items()}


def _expected(fx) -> dict[str, int]:
  """The rank of each layer in the order a path labeller can see: creation order.

  It is the call order everywhere but in Gemma's attention, which creates
  `attn_vec_einsum` before `q_einsum` and `kv_einsum` (`odn.infer_depths` reads
  the call order from the computation).
  """
  order = list(fx.order)
  for i, name in enumerate(order):
    if name.endswith("attn/attn_vec_einsum"):
      order.insert(i - 2, order.pop(i))
  return {name: i for i, name in enumerate(order)}


def _leaf_expected(tree, fx) -> dict[str, int]:
  """Expected depth of each leaf, by its '/'-joined path (the state's keys)."""
  rank = _expected(fx)
  return {
    _path(p): rank[models.layer_name(p)] for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def test_default_depths_follow_the_computation(fx):
  with warnings.catch_warnings():
    warnings.simplefilter("error", odn.DepthOrderWarning)
    depths = odn.layer_depths(fx.model if fx.name in NNX else fx.params)
  assert _layer_depths(fx.params, depths) == _expected(fx)


def test_sorted_keys_warn_and_name_the_siblings(fx):
  if fx.name == "equinox_bert":
    pytest.skip("an Equinox module keeps its field order through jax.jit and jax.grad")
  tree = fx.params if fx.name in NNX else jax.jit(lambda p: p)(fx.params)
  with pytest.warns(odn.DepthOrderWarning, match="depths follow sorted names") as caught:
    odn.layer_depths(tree)
  assert caught[0].filename == __file__
  assert "odn.layer_depths(model)" in str(caught[0].message)


def _loss(fx):
  def loss(params):
    out = fx.apply(params, fx.x)
    return sum(jnp.mean(jnp.square(o.astype(jnp.float32))) for o in jax.tree.leaves(out))

  return loss


def test_three_training_steps_keep_every_depth(fx):
  gamma = 0.3
  tx = optax.chain(
    odn.track_gradient_flow(history=2, depths=_labels(fx)),
    odn.depth_decay(gamma, reverse=True, depths=_labels(fx)),
  )
  params = fx.params
  state = tx.init(params)
  expected = _leaf_expected(params, fx)
  top = max(expected.values())
  assert {k: int(v) for k, v in state[1].depths.items()} == expected

  @jax.jit
  def step(params, state):
    grads = jax.grad(_loss(fx))(params)
    updates, state = tx.update(grads, state, params)
    return grads, updates, state, optax.apply_updates(params, jax.tree.map(lambda u: -u, updates))

  for _ in range(3):
    grads, updates, state, params = step(params, state)
    flat_g = _by_path(grads)
    for path, u in _by_path(updates).items():
      factor = math.exp(-gamma * (top - expected[path]))
      np.testing.assert_allclose(u, flat_g[path] * factor, rtol=RTOL, atol=1e-30)
    assert {k: int(v) for k, v in state[1].depths.items()} == expected
    report = odn.flow_from_state(state, fx.params)
    assert report.depths == tuple(range(len(fx.order)))
    rank = _expected(fx)
    assert [n.split("+")[0] for n in report.paths] == sorted(rank, key=rank.get)


def _by_path(tree) -> dict[str, np.ndarray]:
  return {
    _path(p): np.asarray(x, np.float64) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


# ----------------------------------------------------------------------------- the cases


def test_readme_llrd_line_gives_the_head_the_full_rate():
  fx = models.linen_stem_body_head()
  llrd = optax.chain(optax.adamw(1e-4), odn.depth_decay(0.1, reverse=True))
  state = llrd.init(fx.params)  # the unjitted init dict: creation order
  grads = jax.grad(_loss(fx))(fx.params)
  plain, _ = optax.adamw(1e-4).update(grads, optax.adamw(1e-4).init(fx.params), fx.params)
  updates, _ = jax.jit(llrd.update)(grads, state, fx.params)
  for name, k in (("stem", 2), ("body", 1), ("head", 0)):
    assert_close(updates[name]["kernel"], plain[name]["kernel"] * math.exp(-0.1 * k))


def test_cnn_keeps_creation_order_with_sorted_gradients():
  fx = models.linen_cnn()
  tx = odn.depth_decay(1.0)
  state = tx.init(fx.params)
  assert list(fx.params) == fx.order
  grads = jax.grad(_loss(fx))(fx.params)
  assert list(grads) == sorted(fx.order)  # jax.grad sorts the keys
  updates, state = jax.jit(tx.update)(grads, state)
  for depth, name in enumerate(fx.order):
    for leaf in updates[name]:
      assert_close(updates[name][leaf], grads[name][leaf] * math.exp(-depth))


def test_flow_from_state_names_each_row_beside_its_own_values():
  fx = models.linen_cnn()
  tx = optax.chain(odn.track_gradient_flow(), optax.sgd(0.1))
  state = tx.init(fx.params)
  grads = jax.grad(_loss(fx))(fx.params)
  _, state = jax.jit(tx.update)(grads, state, fx.params)
  for params in (fx.params, jax.tree.map(lambda x: x, fx.params), None):
    report = odn.flow_from_state(state, params)
    assert report.paths == tuple(fx.order)
    for name, norm in zip(report.paths, np.asarray(report.norm)):
      by_hand = np.sqrt(
        sum(np.sum(np.square(np.asarray(g, np.float64))) for g in grads[name].values())
      )
      np.testing.assert_allclose(norm, by_hand, rtol=RTOL)
      if params is not None:
        size = sum(x.size for x in fx.params[name].values())
        assert report.sizes[report.paths.index(name)] == size


def test_gradient_flow_and_depth_table_name_the_same_layer():
  fx = models.linen_cnn()
  depths = odn.layer_depths(fx.params)
  grads = jax.grad(_loss(fx))(fx.params)
  report = odn.gradient_flow(grads, depths=depths)
  table = odn.depth_table(fx.params, depths).splitlines()[1:]
  rows = [line.split()[1].rsplit("/", 1)[0] for line in table]
  assert list(dict.fromkeys(rows)) == list(report.paths) == fx.order
  for name, norm in zip(report.paths, np.asarray(report.norm)):
    by_hand = np.sqrt(
      sum(np.sum(np.square(np.asarray(g, np.float64))) for g in grads[name].values())
    )
    np.testing.assert_allclose(norm, by_hand, rtol=RTOL)


def test_nnx_list_and_head_from_the_module():
  fx = models.nnx_list_head()
  depths = odn.layer_depths(fx.model)
  assert depths["head"]["kernel"] == 3 and depths["layers"][0]["kernel"] == 0
  assert list(odn.layer_depths(fx.model, reverse=True)["head"].values()) == [0, 0]


def test_nnx_optimizer_with_module_depths_and_without():
  fx = models.nnx_list_head()
  model = fx.model
  tx = optax.chain(
    optax.adamw(1e-3), odn.depth_decay(0.1, reverse=True, depths=odn.layer_depths(model))
  )
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  state = opt.opt_state[1].depths
  assert int(state["head/kernel"][...]) == 3 and int(state["layers/0/kernel"][...]) == 0
  with pytest.warns(odn.DepthOrderWarning, match="'<root>': head, layers") as caught:
    nnx.Optimizer(model, odn.depth_decay(0.1), wrt=nnx.Param)
  assert caught[0].filename == __file__


def test_update_on_another_tree_is_a_clear_error():
  params = {"Dense_0": {"kernel": jnp.ones(2)}, "Dense_1": {"kernel": jnp.ones(2)}}
  for tx in (odn.depth_decay(0.1), odn.layerwise_normalize(), odn.track_gradient_flow()):
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"not the one given to `init`.*c/kernel"):
      tx.update({"Dense_0": {"kernel": jnp.ones(2)}, "c": {"kernel": jnp.ones(2)}}, state, params)


def test_scanned_block_slices_interleave():
  tree = {
    "blocks": {
      "Dense_0": {"kernel": jnp.ones((3, 8, 8))},
      "Dense_1": {"kernel": jnp.ones((3, 8, 8))},
    }
  }
  depths = odn.layer_depths(tree, stack_axis={"blocks": 0})["blocks"]
  assert depths["Dense_0"]["kernel"].depths == (0, 2, 4)
  assert depths["Dense_1"]["kernel"].depths == (1, 3, 5)
  callable_axis = odn.layer_depths(tree, stack_axis=lambda path, leaf: 0)["blocks"]
  assert callable_axis["Dense_1"]["kernel"].depths == (1, 3, 5)


def test_sharded_stack_and_feature_axes_give_the_single_device_result():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("stack", "model"))
  rng = np.random.default_rng(0)
  tree = {
    "embed": {"kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)},
    "blocks": {
      "Dense_0": {"kernel": jnp.asarray(rng.normal(size=(4, 16, 16)), jnp.float32)},
      "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(4, 16, 16)), jnp.float32)},
    },
  }
  spec = {
    "embed": {"kernel": jax.sharding.PartitionSpec(None, "model")},
    "blocks": {
      k: {"kernel": jax.sharding.PartitionSpec("stack", None, "model")}
      for k in ("Dense_0", "Dense_1")
    },
  }
  sharded = jax.tree.map(
    lambda x, s: jax.device_put(x, jax.sharding.NamedSharding(mesh, s)), tree, spec
  )
  for tx in (
    odn.layerwise_normalize(group="layer", stack_axis={"blocks": 0}),
    odn.depth_decay(0.2, stack_axis={"blocks": 0}),
    odn.track_gradient_flow(stack_axis={"blocks": 0}),
  ):
    state = tx.init(tree)
    expected = tx.update(tree, state, tree)
    got = jax.jit(tx.update)(sharded, state, sharded)
    assert_close(got, expected)
