"""Tests of `layer_depths`, `depth_table` and `DepthOrderWarning`.

Models are built with the real frameworks (Flax linen and NNX, Equinox) so the
paths are the ones users see; expected depths are written out by hand.
"""

from __future__ import annotations

import re
import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_depthnorm as odn

FIX_WORDS = r"depths follow sorted names.*`depths=odn\.layer_depths\(variables\['params'\]\)`"
F32 = np.float32


def by_path(tree):
  """``{'a/b/c': leaf}`` for every leaf, without the trailing ``value`` of NNX."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    out[name.removesuffix("/value")] = leaf
  return out


def table_rows(table):
  """``[(depth, path), ...]`` read from a `depth_table` string."""
  return [tuple(line.split()[:2]) for line in table.splitlines()[1:]]


def dense(n_in, n_out):
  return {"kernel": np.zeros((n_in, n_out), F32), "bias": np.zeros((n_out,), F32)}


@pytest.fixture(autouse=True)
def _depth_warnings_are_errors():
  with warnings.catch_warnings():
    warnings.simplefilter("error", odn.DepthOrderWarning)
    yield


# --------------------------------------------------------------------------- Flax linen


class MLP(nn.Module):
  n_layers: int = 12

  @nn.compact
  def __call__(self, x):
    for _ in range(self.n_layers - 1):
      x = nn.relu(nn.Dense(3)(x))
    return nn.Dense(2)(x)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = nn.Conv(2, (3, 3))(x)
    y = nn.BatchNorm(use_running_average=True)(y)
    y = nn.relu(y)
    y = nn.Conv(2, (3, 3))(y)
    y = nn.BatchNorm(use_running_average=True)(y)
    return nn.relu(x + y)


class ResNet(nn.Module):
  n_blocks: int = 3

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(2, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    for _ in range(self.n_blocks):
      x = Block()(x)
    return nn.Dense(2)(x.mean(axis=(1, 2)))


RESNET_ORDER = [
  "Conv_0",
  "BatchNorm_0",
  *(
    f"Block_{b}/{name}"
    for b in range(3)
    for name in ("Conv_0", "BatchNorm_0", "Conv_1", "BatchNorm_1")
  ),
  "Dense_0",
]
MLP_X = np.ones((1, 4), F32)
RESNET_X = np.ones((1, 4, 4, 1), F32)


@pytest.fixture(scope="module")
def mlp_params():
  return MLP().init(jax.random.key(0), MLP_X)["params"]


@pytest.fixture(scope="module")
def resnet_variables():
  return ResNet().init(jax.random.key(0), RESNET_X)


def layer_depth_map(depths):
  """``{layer path: depth}``, checking that all leaves of a layer share it."""
  layers = {}
  for name, d in by_path(depths).items():
    layer = name.rsplit("/", 1)[0]
    assert layers.setdefault(layer, d) == d, f"leaves of {layer} differ"
  return layers


def test_linen_mlp_depth_is_dense_index(mlp_params):
  assert list(mlp_params) == [f"Dense_{i}" for i in range(12)]
  depths = odn.layer_depths(mlp_params)
  for i in range(12):
    assert depths[f"Dense_{i}"] == {"kernel": i, "bias": i}
  assert depths["Dense_10"]["kernel"] == depths["Dense_9"]["kernel"] + 1
  assert all(type(d) is int for d in jax.tree.leaves(depths))


def test_linen_mlp_reverse(mlp_params):
  depths = odn.layer_depths(mlp_params, reverse=True)
  assert depths["Dense_11"] == {"kernel": 0, "bias": 0}
  assert depths["Dense_10"]["bias"] == 1
  assert depths["Dense_0"]["kernel"] == 11
  assert layer_depth_map(depths) == {f"Dense_{i}": 11 - i for i in range(12)}


def test_linen_mlp_sorted_copy_gets_the_same_depths(mlp_params):
  # One auto-named class: names alone tell the order, so no warning.
  copy = jax.tree.map(lambda x: x, mlp_params)
  assert list(copy) != list(mlp_params)  # jax sorted Dense_10 before Dense_2
  assert odn.layer_depths(copy) == odn.layer_depths(mlp_params)


def test_linen_sequential_skips_activation_indices():
  model = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(3), nn.relu, nn.Dense(2)])
  params = model.init(jax.random.key(0), MLP_X)["params"]
  assert set(params) == {"layers_0", "layers_2", "layers_4"}
  assert layer_depth_map(odn.layer_depths(params)) == {"layers_0": 0, "layers_2": 1, "layers_4": 2}
  assert layer_depth_map(odn.layer_depths(params, reverse=True)) == {
    "layers_0": 2,
    "layers_2": 1,
    "layers_4": 0,
  }


def test_resnet_init_dict_keeps_creation_order(resnet_variables):
  params = resnet_variables["params"]
  assert list(params) == ["Conv_0", "BatchNorm_0", "Block_0", "Block_1", "Block_2", "Dense_0"]
  assert list(params["Block_0"]) == ["Conv_0", "BatchNorm_0", "Conv_1", "BatchNorm_1"]
  layers = layer_depth_map(odn.layer_depths(params))  # no warning: errors by fixture
  assert layers == {name: i for i, name in enumerate(RESNET_ORDER)}
  assert layers["Block_0/Conv_0"] < layers["Block_0/BatchNorm_0"] < layers["Block_0/Conv_1"]
  assert layers["Block_0/Conv_1"] < layers["Block_0/BatchNorm_1"]
  assert layers["BatchNorm_0"] < layers["Block_0/Conv_0"]
  assert layers["Block_1/Conv_1"] < layers["Block_2/Conv_0"]
  assert layers["Dense_0"] == max(layers.values())


def test_resnet_reverse_puts_head_at_zero(resnet_variables):
  layers = layer_depth_map(odn.layer_depths(resnet_variables["params"], reverse=True))
  assert layers == {name: len(RESNET_ORDER) - 1 - i for i, name in enumerate(RESNET_ORDER)}


def _sorted_copy(variables, how):
  params = variables["params"]
  if how == "tree_map":
    return jax.tree.map(lambda x: x, params)
  if how == "grad":

    def loss(p):
      out = ResNet().apply({"params": p, "batch_stats": variables["batch_stats"]}, RESNET_X)
      return jnp.sum(out)

    return jax.grad(loss)(params)
  return jax.eval_shape(lambda: params)


@pytest.mark.parametrize("how", ["tree_map", "grad", "eval_shape"])
def test_sorted_resnet_tree_warns_with_the_fix(resnet_variables, how):
  tree = _sorted_copy(resnet_variables, how)
  # jax really sorts the keys of dicts it rebuilds.
  assert list(tree) == ["BatchNorm_0", "Block_0", "Block_1", "Block_2", "Conv_0", "Dense_0"]
  assert list(tree["Block_1"]) == ["BatchNorm_0", "BatchNorm_1", "Conv_0", "Conv_1"]
  with pytest.warns(odn.DepthOrderWarning, match=FIX_WORDS) as record:
    depths = odn.layer_depths(tree)
  messages = [str(w.message) for w in record if w.category is odn.DepthOrderWarning]
  root = "'<root>': BatchNorm_0, Block_0, Block_1, Block_2, Conv_0, Dense_0"
  assert any(root in m for m in messages)
  for block in ("Block_0", "Block_1", "Block_2"):
    assert any(f"'{block}': BatchNorm_0, BatchNorm_1, Conv_0, Conv_1" in m for m in messages)
  assert all("depth_table" in m and "infer_depths" in m for m in messages)
  # What the warning is about: the names alone put BatchNorm_0 before Conv_0.
  layers = layer_depth_map(depths)
  assert layers["BatchNorm_0"] < layers["Conv_0"]
  assert layers["Block_0/BatchNorm_1"] < layers["Block_0/Conv_0"]


def test_depth_table_warns_on_sorted_tree(resnet_variables):
  grads = _sorted_copy(resnet_variables, "grad")
  with pytest.warns(odn.DepthOrderWarning, match=FIX_WORDS):
    odn.depth_table(grads)


@pytest.mark.parametrize("how", ["tree_map", "grad", "eval_shape"])
def test_init_depths_label_sorted_tree_in_creation_order(resnet_variables, how):
  depths = odn.layer_depths(resnet_variables["params"])
  tree = _sorted_copy(resnet_variables, how)
  table = odn.depth_table(tree, depths)  # a depths pytree: no warning
  rows = table_rows(table)
  assert [p.rsplit("/", 1)[0] for _, p in rows[::2]] == RESNET_ORDER
  assert [int(d) for d, _ in rows] == [i for i in range(len(RESNET_ORDER)) for _ in range(2)]
  assert table == odn.depth_table(resnet_variables["params"])


def test_order_warning_points_at_the_caller(resnet_variables):
  tree = _sorted_copy(resnet_variables, "tree_map")
  with pytest.warns(odn.DepthOrderWarning) as record:
    odn.layer_depths(tree)
  assert {w.filename for w in record} == {__file__}


def test_order_warning_from_depth_table_points_at_the_caller(resnet_variables):
  tree = _sorted_copy(resnet_variables, "tree_map")
  with pytest.warns(odn.DepthOrderWarning) as record:
    odn.depth_table(tree)
  assert {w.filename for w in record} == {__file__}


def test_order_warning_can_be_silenced(resnet_variables):
  tree = _sorted_copy(resnet_variables, "tree_map")
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("ignore", odn.DepthOrderWarning)
    depths = odn.layer_depths(tree)
  assert record == []
  assert len(set(jax.tree.leaves(depths))) == len(RESNET_ORDER)


def test_auto_class_beside_user_names_keeps_creation_order():
  params = {
    "embed": dense(2, 2),
    "Dense_0": dense(2, 2),
    "Dense_1": dense(2, 2),
    "head": dense(2, 1),
  }
  # Not the sorted key order: creation order, whatever the names, and no warning.
  assert layer_depth_map(odn.layer_depths(params)) == {
    "embed": 0,
    "Dense_0": 1,
    "Dense_1": 2,
    "head": 3,
  }
  # A sorted copy no longer tells where `embed` and `head` go: sorted names, with a warning.
  with pytest.warns(odn.DepthOrderWarning, match=r"'<root>': Dense_0, Dense_1, embed, head"):
    depths = odn.layer_depths(jax.tree.map(lambda x: x, params))
  assert layer_depth_map(depths) == {"Dense_0": 0, "Dense_1": 1, "embed": 2, "head": 3}


# --------------------------------------------------------------------------- plain trees


def test_nested_dict_integer_parts_compare_as_numbers():
  params = {"layers": {str(i): dense(2, 2) for i in (12, 3, 7, 100)}}
  # As built, the dict is not in sorted key order: creation order.
  assert layer_depth_map(odn.layer_depths(params)) == {
    "layers/12": 0,
    "layers/3": 1,
    "layers/7": 2,
    "layers/100": 3,
  }
  # Sorted by jax ('100' < '12' < '3' < '7'), the numbers decide, without a warning.
  sorted_params = jax.tree.map(lambda x: x, params)
  assert list(sorted_params["layers"]) == ["100", "12", "3", "7"]
  assert layer_depth_map(odn.layer_depths(sorted_params)) == {
    "layers/3": 0,
    "layers/7": 1,
    "layers/12": 2,
    "layers/100": 3,
  }
  named = {f"layers_{i}": dense(2, 2) for i in (12, 3, 20, 2)}
  assert layer_depth_map(odn.layer_depths(named)) == {
    "layers_12": 0,
    "layers_3": 1,
    "layers_20": 2,
    "layers_2": 3,
  }
  assert layer_depth_map(odn.layer_depths(jax.tree.map(lambda x: x, named))) == {
    "layers_2": 0,
    "layers_3": 1,
    "layers_12": 2,
    "layers_20": 3,
  }


def test_integer_dict_keys_are_each_a_layer():
  params = {"layers": {12: np.ones((2,), F32), 3: np.ones((2,), F32), 7: np.ones((2,), F32)}}
  assert odn.layer_depths(params) == {"layers": {12: 0, 3: 1, 7: 2}}  # creation order
  sorted_params = jax.tree.map(lambda x: x, params)
  assert list(sorted_params["layers"]) == [3, 7, 12]
  assert odn.layer_depths(sorted_params) == {"layers": {3: 0, 7: 1, 12: 2}}


@pytest.mark.parametrize("container", [list, tuple])
def test_sequence_of_arrays_is_one_layer_per_element(container):
  weights = container(np.full((2, 2), i, F32) for i in range(12))
  depths = odn.layer_depths(weights)
  assert type(depths) is container
  assert list(depths) == list(range(12))
  assert odn.layer_depths({"w": weights}) == {"w": container(range(12))}
  assert list(odn.layer_depths(weights, reverse=True)) == list(range(11, -1, -1))


def test_list_of_dicts_is_one_layer_per_dict():
  params = [dense(2, 2) for _ in range(11)]
  depths = odn.layer_depths(params)
  assert depths == [{"kernel": i, "bias": i} for i in range(11)]


def test_root_level_leaves_are_each_a_layer():
  params = {f"w{i}": np.ones((2,), F32) for i in (10, 0, 2, 1)}
  assert odn.layer_depths(params) == {"w10": 0, "w0": 1, "w2": 2, "w1": 3}  # creation order
  sorted_params = jax.tree.map(lambda x: x, params)
  assert odn.layer_depths(sorted_params) == {"w0": 0, "w1": 1, "w2": 2, "w10": 3}
  mixed = {"Dense_0": dense(2, 2), "scale": np.ones((), F32), "Dense_1": dense(2, 2)}
  assert odn.layer_depths(mixed) == {
    "Dense_0": {"kernel": 0, "bias": 0},
    "scale": 1,
    "Dense_1": {"kernel": 2, "bias": 2},
  }
  with pytest.warns(odn.DepthOrderWarning, match=r"'<root>': Dense_0, Dense_1, scale"):
    sorted_mixed = odn.layer_depths(jax.tree.map(lambda x: x, mixed))
  assert sorted_mixed == {
    "Dense_0": {"kernel": 0, "bias": 0},
    "Dense_1": {"kernel": 1, "bias": 1},
    "scale": 2,
  }


def test_single_array():
  x = np.ones((3, 2), F32)
  assert odn.layer_depths(x) == 0
  assert odn.layer_depths(x, reverse=True) == 0
  assert odn.layer_depths(np.ones((3,), np.int32)) == -1
  assert odn.depth_table(x) == "depth  path    shape   dtype\n0      <root>  (3, 2)  float32"


def test_empty_trees():
  assert odn.layer_depths({}) == {}
  assert odn.layer_depths([]) == []
  assert odn.layer_depths(None) is None
  assert odn.layer_depths({}, reverse=True) == {}


# --------------------------------------------------------------------------- Flax NNX


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(2, 2, rngs=rngs) for _ in range(12)])
    self.out = nnx.Linear(2, 1, rngs=rngs)


@pytest.fixture(scope="module")
def nnx_model():
  return NNXNet(nnx.Rngs(0))


@pytest.fixture(scope="module")
def nnx_state(nnx_model):
  return nnx.state(nnx_model, nnx.Param)


NNX_LAYERS = {f"layers/{i}": i for i in range(12)} | {"out": 12}
# An nnx.State (and its pure dict) holds sorted keys: `layers` and `out` carry no
# running number, so their order is ambiguous there.
NNX_AMBIGUOUS = r"'<root>': layers, out"


def test_nnx_state_and_pure_dict_get_the_same_labels(nnx_model, nnx_state):
  first_path = jax.tree_util.tree_flatten_with_path(nnx_state)[0][0][0]
  assert first_path[-1] == jax.tree_util.GetAttrKey("value")
  pure = nnx.to_pure_dict(nnx_state)
  from_model = by_path(odn.layer_depths(nnx_model))  # definition order: no warning
  with pytest.warns(odn.DepthOrderWarning, match=NNX_AMBIGUOUS):
    from_state = by_path(odn.layer_depths(nnx_state))
  with pytest.warns(odn.DepthOrderWarning, match=NNX_AMBIGUOUS):
    from_pure = by_path(odn.layer_depths(pure))
  assert from_state == from_pure == from_model
  assert layer_depth_map(odn.layer_depths(nnx_model)) == NNX_LAYERS
  assert from_model["layers/10/kernel"] == 10
  assert from_model["out/bias"] == 12


def test_nnx_depth_tables_agree_across_state_and_pure_dict(nnx_model, nnx_state):
  pure = nnx.to_pure_dict(nnx_state)
  depths = odn.layer_depths(nnx_model)
  table = odn.depth_table(pure, depths)
  assert odn.depth_table(nnx_state, depths) == table
  assert odn.depth_table(nnx_state, nnx_model) == table
  with pytest.warns(odn.DepthOrderWarning, match=NNX_AMBIGUOUS):
    assert odn.depth_table(nnx_state) == table
  with pytest.warns(odn.DepthOrderWarning, match=NNX_AMBIGUOUS):
    assert odn.depth_table(pure, odn.layer_depths(nnx_state)) == table
  with pytest.warns(odn.DepthOrderWarning, match=NNX_AMBIGUOUS):
    assert odn.depth_table(nnx_state, odn.layer_depths(pure)) == table
  assert "10     layers/10/kernel" in table


def test_nnx_reverse(nnx_model, nnx_state):
  layers = layer_depth_map(odn.layer_depths(nnx_model, reverse=True))
  assert layers["out"] == 0
  assert layers["layers/11"] == 1
  assert layers["layers/0"] == 12
  with pytest.warns(odn.DepthOrderWarning, match=NNX_AMBIGUOUS):
    assert layer_depth_map(odn.layer_depths(nnx_state, reverse=True)) == layers


class NNXHeadFirst(nnx.Module):
  """Attributes defined in an order that sorted names do not give."""

  def __init__(self, rngs):
    self.stem = nnx.Linear(2, 2, rngs=rngs)
    self.body = nnx.Linear(2, 2, rngs=rngs)
    self.head = nnx.Linear(2, 1, rngs=rngs)


def test_nnx_module_is_read_in_definition_order():
  model = NNXHeadFirst(nnx.Rngs(0))
  assert layer_depth_map(odn.layer_depths(model)) == {"stem": 0, "body": 1, "head": 2}
  with pytest.warns(odn.DepthOrderWarning, match=r"'<root>': body, head, stem"):
    by_names = layer_depth_map(odn.layer_depths(nnx.state(model, nnx.Param)))
  assert by_names == {"body": 0, "head": 1, "stem": 2}


# --------------------------------------------------------------------------- Equinox


@pytest.fixture(scope="module")
def eqx_mlp():
  return eqx.nn.MLP(2, 2, width_size=3, depth=11, key=jax.random.key(0))


@pytest.mark.parametrize("filtered", [False, True])
def test_equinox_mlp_layers_in_order(eqx_mlp, filtered):
  model = eqx.filter(eqx_mlp, eqx.is_inexact_array) if filtered else eqx_mlp
  depths = odn.layer_depths(model)
  assert isinstance(depths, eqx.nn.MLP)
  assert len(depths.layers) == 12
  assert [layer.weight for layer in depths.layers] == list(range(12))
  assert [layer.bias for layer in depths.layers] == list(range(12))
  others = {k: v for k, v in by_path(depths).items() if not k.startswith("layers/")}
  assert all(v == -1 for v in others.values())  # functions are no layers
  if filtered:
    assert depths.activation is None
  reverse = odn.layer_depths(model, reverse=True)
  assert [layer.weight for layer in reverse.layers] == list(range(11, -1, -1))


def test_equinox_depths_module_is_a_depths_tree_not_a_rule(eqx_mlp):
  # An Equinox module is callable: it must still be read as a pytree of depths.
  depths = odn.layer_depths(eqx_mlp)
  assert callable(depths)
  table = odn.depth_table(eqx_mlp, depths)
  assert table == odn.depth_table(eqx_mlp)
  assert ("10", "layers/10/weight") in table_rows(table)


# --------------------------------------------------------------------------- rules


def block_tree():
  return {
    "enc": {"block_12": dense(2, 2), "block_1": dense(2, 2)},
    "dec": {"block_30": dense(2, 2), "block_4": {"w": np.ones((2,), F32)}},
  }


BLOCK_DEPTHS = {"enc/block_1": 0, "dec/block_4": 1, "enc/block_12": 2, "dec/block_30": 3}


@pytest.mark.parametrize("rule", [r"block_(\d+)", re.compile(r"block_(\d+)")])
def test_regex_rule_ranks_indices(rule):
  depths = by_path(odn.layer_depths(block_tree(), rule))
  assert depths == {
    "enc/block_12/kernel": 2,
    "enc/block_12/bias": 2,
    "enc/block_1/kernel": 0,
    "enc/block_1/bias": 0,
    "dec/block_30/kernel": 3,
    "dec/block_30/bias": 3,
    "dec/block_4/w": 1,
  }
  reverse = by_path(odn.layer_depths(block_tree(), rule, reverse=True))
  assert reverse["dec/block_30/bias"] == 0
  assert reverse["enc/block_1/kernel"] == 3
  assert layer_depth_map(odn.layer_depths(block_tree(), rule)) == BLOCK_DEPTHS


def test_regex_rule_keeps_flags_and_uses_first_group():
  rule = re.compile(r"BLOCK_(\d+)(/\w+)?", re.IGNORECASE)
  assert layer_depth_map(odn.layer_depths(block_tree(), rule)) == BLOCK_DEPTHS


def test_regex_rule_in_depth_table():
  table = odn.depth_table(block_tree(), r"block_(\d+)")
  assert table_rows(table) == [
    ("0", "enc/block_1/bias"),
    ("0", "enc/block_1/kernel"),
    ("1", "dec/block_4/w"),
    ("2", "enc/block_12/bias"),
    ("2", "enc/block_12/kernel"),
    ("3", "dec/block_30/bias"),
    ("3", "dec/block_30/kernel"),
  ]


def test_mapping_rule_longest_prefix_wins():
  tree = {
    "embed": np.ones((2,), F32),
    "enc": {"block_0": dense(2, 2), "block_1": dense(2, 2)},
    "encoder": {"w": np.ones((2,), F32)},
    "head": dense(2, 1),
  }
  rule = {"": 7, "enc": 1, "enc/block_1/": 2, "/head/kernel": 3}
  assert odn.layer_depths(tree, rule) == {
    "embed": 7,
    "enc": {"block_0": {"kernel": 1, "bias": 1}, "block_1": {"kernel": 2, "bias": 2}},
    "encoder": {"w": 7},  # 'enc' is a prefix of the path's parts, not of its string
    "head": {"kernel": 3, "bias": 7},
  }
  assert odn.layer_depths(tree, rule, reverse=True)["head"] == {"kernel": 4, "bias": 0}
  assert by_path(odn.layer_depths(tree, rule)) == {
    p: int(d) for d, p in table_rows(odn.depth_table(tree, rule))
  }


def test_mapping_rule_accepts_numpy_ints():
  depths = odn.layer_depths({"a": np.ones((2,), F32)}, {"": np.int64(4)})
  assert depths == {"a": 4}
  assert type(depths["a"]) is int


def test_callable_rule_gets_path_and_leaf():
  tree = {
    "Dense_0": dense(3, 2),
    "layers": [np.ones((2,), F32), np.ones((2,), F32)],
    "step": np.zeros((), np.int32),
    "none": None,
  }
  calls = []

  def rule(path, leaf):
    calls.append((path, leaf))
    return leaf.ndim + np.int32(1)

  depths = odn.layer_depths(tree, rule)
  assert [path for path, _ in calls] == [
    "Dense_0/bias",
    "Dense_0/kernel",
    "layers/0",
    "layers/1",
  ]
  assert calls[0][1] is tree["Dense_0"]["bias"]
  assert calls[1][1] is tree["Dense_0"]["kernel"]
  assert calls[3][1] is tree["layers"][1]
  assert depths == {
    "Dense_0": {"kernel": 3, "bias": 2},
    "layers": [2, 2],
    "step": -1,
    "none": None,
  }
  assert all(type(d) is int for d in jax.tree.leaves(depths))


def test_callable_rule_sees_stripped_nnx_paths(nnx_state):
  paths = []
  odn.layer_depths(nnx_state, lambda path, leaf: paths.append(path) or 0)
  assert "layers/10/kernel" in paths
  assert not any(p.endswith("value") for p in paths)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("rule", [r"block_\d+", re.compile(r"block_\d+"), "(?:block)_1"])
def test_regex_without_group_raises(rule):
  with pytest.raises(ValueError, match=r"has no group.*first group must capture"):
    odn.layer_depths(block_tree(), rule)


def test_regex_not_matching_names_the_path():
  tree = {"block_1": dense(2, 2), "head": {"w": np.ones((2,), F32)}}
  with pytest.raises(ValueError, match=r"cannot place the leaf at 'head/w'"):
    odn.layer_depths(tree, r"block_(\d+)")


def test_regex_group_without_digits_names_the_path():
  with pytest.raises(ValueError, match=r"'dec/block_30/bias'.*capture the layer index"):
    odn.layer_depths(block_tree(), r"(block)_\d+")
  with pytest.raises(ValueError, match=r"'dec/block_30/bias'"):
    odn.layer_depths(block_tree(), r"(x\d)?block_\d+")


def test_mapping_without_prefix_names_the_path():
  tree = {"enc": dense(2, 2), "head": {"kernel": np.ones((2, 2), F32)}}
  with pytest.raises(ValueError, match=r"no path prefix for the leaf at 'head/kernel'.*'head'"):
    odn.layer_depths(tree, {"enc": 0, "encoder": 1})
  with pytest.raises(ValueError, match=r"no path prefix"):
    odn.depth_table(tree, {"enc": 0})


BAD_DEPTHS = [
  pytest.param(-1, id="negative"),
  pytest.param(1.5, id="float"),
  pytest.param(2.0, id="whole-float"),
  pytest.param(True, id="bool"),
  pytest.param("2", id="str"),
  pytest.param(None, id="none"),
  pytest.param(np.float32(1.0), id="np-float"),
  pytest.param(np.asarray(1.5), id="np-float-array"),
  pytest.param(jnp.asarray(1.5), id="jnp-float-array"),
]


@pytest.mark.parametrize("bad", BAD_DEPTHS)
def test_callable_returning_a_bad_depth_raises(bad):
  tree = {"a": dense(2, 2)}
  with pytest.raises(ValueError, match=r"depth .* for the leaf at 'a/bias'.*non-negative integers"):
    odn.layer_depths(tree, lambda path, leaf: bad)


@pytest.mark.parametrize("bad", [-2, 0.5, False])
def test_mapping_with_a_bad_depth_raises(bad):
  with pytest.raises(ValueError, match=r"non-negative integers"):
    odn.layer_depths({"a": dense(2, 2)}, {"": 0, "a": bad})


@pytest.mark.parametrize("rule", [3, 2.5, [r"block_(\d+)"], (0, 1), b"block_(\\d+)"])
def test_rule_of_a_wrong_type_raises(rule):
  with pytest.raises(TypeError, match=r"rule must be None, a regex.*mapping.*callable"):
    odn.layer_depths(block_tree(), rule)


def test_depths_missing_a_path_raises(mlp_params):
  depths = odn.layer_depths(mlp_params)
  del depths["Dense_11"]
  with pytest.raises(ValueError, match=r"no entry for the leaf at 'Dense_11/bias'.*layer_depths"):
    odn.depth_table(mlp_params, depths)
  partial = {"Dense_0": {"kernel": 0}}
  with pytest.raises(ValueError, match=r"no entry for the leaf at 'Dense_0/bias'"):
    odn.depth_table({"Dense_0": dense(2, 2)}, partial)


def test_transform_with_depths_missing_a_path_raises(mlp_params):
  depths = odn.layer_depths(mlp_params)
  del depths["Dense_3"]
  tx = odn.depth_decay(0.1, depths=depths)
  # Depths are resolved once, at `init`: that is where the missing path is found.
  with pytest.raises(ValueError, match=r"no entry for the leaf at 'Dense_3/bias'"):
    tx.init(mlp_params)


@pytest.mark.parametrize("bad", [b for b in BAD_DEPTHS if b.id not in ("negative", "none")])
def test_depths_holding_non_ints_raise(bad):
  tree = {"a": dense(2, 2)}
  with pytest.raises(TypeError, match=r"depths must hold Python ints.*'a/(bias|kernel)'"):
    odn.depth_table(tree, {"a": {"kernel": bad, "bias": 0}})


def test_traced_depths_raise():
  tree = {"a": dense(2, 2)}

  def table_length(depths):
    return len(odn.depth_table(tree, depths))

  with pytest.raises(TypeError, match=r"Python ints \(static labels\).*outside jit"):
    jax.jit(table_length)({"a": {"kernel": 0, "bias": 0}})


# --------------------------------------------------------------------------- leaves


def test_non_float_leaves_get_minus_one_and_none_stays():
  tree = {
    "Dense_0": dense(2, 3),
    "counts": {"idx": np.arange(3, dtype=np.int32), "flag": np.ones((2,), bool)},
    "Dense_1": {"kernel": np.zeros((3, 2), jnp.bfloat16), "bias": None},
    "empty": np.zeros((0, 3), F32),
    "step": 3,
    "none": None,
  }
  expected = {
    "Dense_0": {"kernel": 0, "bias": 0},
    "counts": {"idx": -1, "flag": -1},
    "Dense_1": {"kernel": 1, "bias": None},
    "empty": -1,
    "step": -1,
    "none": None,
  }
  assert odn.layer_depths(tree) == expected
  reverse = odn.layer_depths(tree, reverse=True)
  assert reverse["Dense_0"] == {"kernel": 1, "bias": 1}
  assert reverse["Dense_1"] == {"kernel": 0, "bias": None}
  assert reverse["counts"] == {"idx": -1, "flag": -1}
  assert reverse["empty"] == -1
  rows = table_rows(odn.depth_table(tree))
  assert rows[:3] == [("0", "Dense_0/bias"), ("0", "Dense_0/kernel"), ("1", "Dense_1/kernel")]
  assert rows[3:] == [
    ("-", "counts/flag"),
    ("-", "counts/idx"),
    ("-", "empty"),
    ("-", "step"),
  ]


def test_only_non_float_leaves():
  tree = {"a": np.ones((2,), np.int32), "b": np.zeros((0,), F32)}
  assert odn.layer_depths(tree) == {"a": -1, "b": -1}
  assert odn.layer_depths(tree, reverse=True) == {"a": -1, "b": -1}


def test_masked_nodes_keep_paths_and_depths():
  params = {f"Dense_{i}": dense(2, 2) for i in range(3)}
  mask = {
    "Dense_0": {"kernel": True, "bias": False},
    "Dense_1": {"kernel": False, "bias": False},
    "Dense_2": {"kernel": False, "bias": True},
  }
  seen = []

  def init_fn(p):
    seen.append((p, odn.layer_depths(p)))
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    seen.append((updates, odn.layer_depths(updates, reverse=True)))
    return updates, state

  tx = optax.masked(optax.GradientTransformation(init_fn, update_fn), mask)
  tx.update(params, tx.init(params), params)
  (masked, depths), (_, reverse) = seen
  assert isinstance(masked["Dense_1"]["kernel"], optax.MaskedNode)
  assert isinstance(masked["Dense_0"]["bias"], optax.MaskedNode)
  assert depths == {f"Dense_{i}": {"kernel": i, "bias": i} for i in range(3)}
  assert reverse == {f"Dense_{i}": {"kernel": 2 - i, "bias": 2 - i} for i in range(3)}
  assert odn.depth_table(masked, odn.layer_depths(params)) == odn.depth_table(masked)
  assert odn.depth_table(masked).splitlines()[1:4] == [
    "0      Dense_0/bias    ()      masked",
    "0      Dense_0/kernel  (2, 2)  float32",
    "1      Dense_1/bias    ()      masked",
  ]


def test_shape_dtype_structs_are_labelled_without_values(mlp_params):
  abstract = jax.eval_shape(MLP().init, jax.random.key(0), MLP_X)["params"]
  assert isinstance(abstract["Dense_0"]["kernel"], jax.ShapeDtypeStruct)
  assert odn.layer_depths(abstract) == odn.layer_depths(mlp_params)
  assert odn.layer_depths(abstract, reverse=True) == odn.layer_depths(mlp_params, reverse=True)
  assert odn.depth_table(abstract) == odn.depth_table(mlp_params)
  shapes = odn.layer_depths(abstract, lambda path, leaf: len(leaf.shape))
  assert shapes["Dense_4"] == {"kernel": 2, "bias": 1}
  odd = {
    "w": jax.ShapeDtypeStruct((2, 2), jnp.float32),
    "empty": jax.ShapeDtypeStruct((0, 2), jnp.float32),
    "idx": jax.ShapeDtypeStruct((2,), jnp.int32),
  }
  assert odn.layer_depths(odd) == {"w": 0, "empty": -1, "idx": -1}


# --------------------------------------------------------------------------- depth_table


def test_depth_table_exact_string():
  tree = {
    "Dense_1": {"kernel": np.zeros((4, 2), F32), "bias": np.zeros((2,), F32)},
    "Dense_0": {"kernel": np.zeros((3, 4), F32), "bias": np.zeros((4,), F32)},
    "step": np.zeros((), np.int32),
  }
  # Dense_1 was created first (the key order is not the sorted one): depth 0, listed first.
  assert odn.depth_table(tree) == (
    "depth  path            shape   dtype\n"
    "0      Dense_1/bias    (2,)    float32\n"
    "0      Dense_1/kernel  (4, 2)  float32\n"
    "1      Dense_0/bias    (4,)    float32\n"
    "1      Dense_0/kernel  (3, 4)  float32\n"
    "-      step            ()      int32"
  )
  assert odn.depth_table(tree, odn.layer_depths(tree, reverse=True)) == (
    "depth  path            shape   dtype\n"
    "0      Dense_0/bias    (4,)    float32\n"
    "0      Dense_0/kernel  (3, 4)  float32\n"
    "1      Dense_1/bias    (2,)    float32\n"
    "1      Dense_1/kernel  (4, 2)  float32\n"
    "-      step            ()      int32"
  )


def test_depth_table_rows_are_ordered_by_numeric_depth(mlp_params):
  rows = table_rows(odn.depth_table(mlp_params))
  assert len(rows) == 24
  depths = [int(d) for d, _ in rows]
  assert depths == sorted(depths) == [i for i in range(12) for _ in range(2)]
  assert rows[18:22] == [
    ("9", "Dense_9/bias"),
    ("9", "Dense_9/kernel"),
    ("10", "Dense_10/bias"),
    ("10", "Dense_10/kernel"),
  ]


def test_depth_table_accepts_rules_and_depth_trees(mlp_params):
  by_rule = odn.depth_table(mlp_params, r"Dense_(\d+)")
  assert by_rule == odn.depth_table(mlp_params)
  assert by_rule == odn.depth_table(mlp_params, odn.layer_depths(mlp_params))
  flat = odn.depth_table(mlp_params, {"Dense_0": 0, "": 1})
  assert [d for d, _ in table_rows(flat)] == ["0", "0"] + ["1"] * 22


# --------------------------------------------------------------------------- property


@st.composite
def indexed_trees(draw):
  """A nested dict of ``Layer_{i}`` modules, inserted in random order."""
  nest = draw(st.integers(1, 2))
  index = st.integers(0, 300)
  keys = draw(
    st.lists(st.tuples(*[index] * nest), min_size=1, max_size=10, unique=True).flatmap(
      st.permutations
    )
  )
  wrap = draw(st.sampled_from([(), ("model",), ("model", "encoder")]))
  leaf = np.zeros((2,), F32)
  tree = {}
  for key in keys:
    node = tree
    for part in (*wrap, *(f"Layer_{i}" for i in key)):
      node = node.setdefault(part, {})
    node.update(kernel=leaf, bias=leaf)
  return tree, keys, wrap


def creation_ranks(tree, keys, wrap):
  """Rank of each key in the order the dicts tell: insertion order unless it is the sorted one."""

  def children(node):
    names = list(node)
    if names == sorted(names):  # indistinguishable from a tree jax rebuilt: numbers decide
      return sorted(names, key=lambda n: int(n.removeprefix("Layer_")))
    return names

  def position(key):
    node, out = tree, []
    for part in wrap:
      node = node[part]
    for i in key:
      out.append(children(node).index(f"Layer_{i}"))
      node = node[f"Layer_{i}"]
    return tuple(out)

  return {key: i for i, key in enumerate(sorted(keys, key=position))}


@settings(max_examples=60, deadline=None)
@given(indexed_trees())
def test_depths_are_the_rank_of_integer_indices(case):
  tree, keys, wrap = case
  deepest = len(keys) - 1

  def check(tree, rank):
    depths = by_path(odn.layer_depths(tree))
    reverse = by_path(odn.layer_depths(tree, reverse=True))
    assert len(depths) == 2 * len(keys)
    for key in keys:
      prefix = "/".join((*wrap, *(f"Layer_{i}" for i in key)))
      for name in ("kernel", "bias"):
        assert depths[f"{prefix}/{name}"] == rank[key]
        assert reverse[f"{prefix}/{name}"] == deepest - rank[key]
    return depths

  # Sorted by jax, one stem with running numbers: the indices decide, without a warning.
  by_index = check(jax.tree.map(lambda x: x, tree), {key: i for i, key in enumerate(sorted(keys))})
  # As built (keys inserted in random order): creation order where the dicts keep it.
  check(tree, creation_ranks(tree, keys, wrap))
  if len(keys[0]) == 1:
    assert by_path(odn.layer_depths(tree, r"Layer_(\d+)")) == by_index
