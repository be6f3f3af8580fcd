"""`infer_depths` on real-code shapes: dead code, closures, nested scans, module scopes,
model entry points, `granularity="block"` and every error it raises."""

from __future__ import annotations

import math

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_depthnorm as odn
from tests import models
from tests.tolerance import assert_close

X = jnp.ones((1, 3))


def kernel_depths(depths):
  """{'/'-joined module path: depth of its kernel}."""
  out = {}
  for path, d in jax.tree_util.tree_flatten_with_path(depths)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    if names[-1] in ("kernel", "weight"):
      out["/".join(names[:-1])] = d
  return out


# ----------------------------------------------------------------------------- dead code


def test_a_discarded_result_is_not_counted():
  params = {"a": jnp.ones((3, 3)), "b": jnp.ones((3, 3)), "head": jnp.ones((3, 3))}

  def f(p, x):
    return (x @ p["head"], jnp.tanh(jnp.tanh(x @ p["a"]) @ p["b"]) @ p["head"])[1]

  assert odn.infer_depths(f, params, X) == {"a": 0, "b": 1, "head": 2}


class MAPHead(nn.Module):
  """big_vision's multihead attention pooling (vit.py `MAPHead`)."""

  mlp_dim: int = 16
  num_heads: int = 2

  @nn.compact
  def __call__(self, x):
    n, _, d = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), x.dtype)
    probe = jnp.tile(probe, [n, 1, 1])
    x = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(probe, x)
    y = nn.LayerNorm()(x)
    x = x + models.MlpBlock(mlp_dim=self.mlp_dim, name="MlpBlock_0")(y)
    return x[:, 0]


class MAPViT(nn.Module):
  """A ViT with a MAP head that also applies `head` to every token, then drops it."""

  @nn.compact
  def __call__(self, image):
    x = nn.Conv(8, (4, 4), strides=(4, 4), padding="VALID", name="embedding")(image)
    x = jnp.reshape(x, [x.shape[0], -1, 8])
    x = models.ViTEncoder(2, 16, 2, name="Transformer")(x)
    head = nn.Dense(5, name="head")
    out = {"per_token_logits": head(x)}  # computed, then not returned
    out["logits"] = head(MAPHead(name="MAPHead_0")(x))
    return out["logits"]


def test_map_head_vit_classifier_is_after_the_map_head():
  model, image = MAPViT(), jnp.ones((1, 8, 8, 3))
  params = model.init(jax.random.key(0), image)["params"]
  depths = odn.infer_depths(lambda p, x: model.apply({"params": p}, x), params, image)
  k = kernel_depths(depths)
  pool = [d for name, d in k.items() if name.startswith("MAPHead_0")]
  last_block = k["Transformer/encoderblock_1/MlpBlock_0/Dense_1"]
  assert k["head"] == max(k.values()) > max(pool) > last_block
  blocks = odn.infer_depths(
    lambda p, x: model.apply({"params": p}, x), params, image, granularity="block"
  )
  k = kernel_depths(blocks)  # MAE: everything after the last block is L + 1
  assert {k["head"], *(d for n, d in k.items() if n.startswith("MAPHead_0"))} == {3}
  assert blocks["MAPHead_0"]["probe"] == 3


# ----------------------------------------------------------------------------- inputs


def test_closing_over_the_input_is_the_same_as_passing_it():
  f = models.linen_vit()
  x = f.x
  with_arg = odn.infer_depths(f.apply, f.params, x)
  closed = odn.infer_depths(lambda p: f.apply(p, x), f.params)
  assert closed == with_arg
  assert odn.NOT_A_LAYER not in jax.tree.leaves(closed)


def test_with_an_argument_closed_over_arrays_stay_constants():
  # A constant mask on a weight does not hide the weight's use by the layer.
  mask = jnp.tril(jnp.ones((3, 3)))
  params = {"a": jnp.ones((3, 3)), "b": jnp.ones((3, 3))}
  f = lambda p, x: jnp.tanh(x @ (p["a"] * mask)) @ p["b"]
  assert odn.infer_depths(f, params, X) == {"a": 0, "b": 1}


def test_no_input_array_is_a_clear_error():
  with pytest.raises(ValueError, match="reads no input array"):
    odn.infer_depths(lambda p: jnp.sum(p["w"]), {"w": jnp.ones(3)})


def test_params_missing_is_a_clear_error():
  with pytest.raises(TypeError, match="got no params"):
    odn.infer_depths(lambda p, x: x)


# ----------------------------------------------------------------------------- scans


class Body(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.tanh(nn.Dense(3)(x))


class RematScan(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(3, name="stem")(x)
    x = nn.remat_scan(Body, lengths=(2, 3))()(x)
    return nn.Dense(2, name="head")(x)


def test_remat_scan_gives_one_depth_per_layer():
  params = RematScan().init(jax.random.key(0), X)["params"]
  apply = lambda p, x: RematScan().apply({"params": p}, x)
  depths = odn.infer_depths(apply, params, X)
  stack = depths["Remat_scanBody_0"]["Dense_0"]
  assert stack["kernel"] == odn.StackedDepth([[1, 2, 3], [4, 5, 6]], axis=(0, 1))
  assert stack["bias"] == stack["kernel"]
  assert depths["stem"]["kernel"] == 0 and depths["head"]["kernel"] == 7
  blocks = odn.infer_depths(apply, params, X, granularity="block")
  assert blocks["Remat_scanBody_0"]["Dense_0"]["kernel"].flat == (1, 2, 3, 4, 5, 6)
  assert blocks["head"]["kernel"] == 7 and blocks["stem"]["kernel"] == 0
  # Every transform treats the six slices as six layers: (1 - gamma)^d per slice.
  grads = jax.tree.map(jnp.ones_like, params)
  tx = odn.depth_decay(0.5, decay="linear", depths=depths)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params))
  kernel = np.asarray(updates["Remat_scanBody_0"]["Dense_0"]["kernel"])
  assert_close(kernel[:, :, 0, 0], 0.5 ** np.arange(1, 7, dtype=np.float64).reshape(2, 3))


# ----------------------------------------------------------------------------- module scope


def test_elementwise_params_join_their_module_scope():
  f = models.linen_vit()
  depths = odn.infer_depths(f.apply, f.params, f.x)
  t = depths["Transformer"]
  for i in range(2):
    b = t[f"encoderblock_{i}"]
    attn = b["MultiHeadDotProductAttention_0"]
    assert b["LayerNorm_0"]["scale"] == attn["query"]["kernel"]  # pre-LN opens its block
    assert attn["query"]["bias"] == attn["query"]["kernel"]  # a bias joins its kernel
    assert b["MlpBlock_0"]["Dense_1"]["bias"] == b["MlpBlock_0"]["Dense_1"]["kernel"]
  assert depths["pos_embedding"] == depths["embedding"]["kernel"] == 0
  # Post-LN (the Equinox BERT): the norm after a sublayer joins that sublayer.
  bert = models.equinox_bert()
  d = odn.infer_depths(bert.apply, bert.params, bert.x)
  block = d.encoder.layers[0].attention_block
  assert block.layernorm.weight == block.attention.output_proj.weight


# ----------------------------------------------------------------------------- entry points


def test_an_nnx_module_is_its_own_entry_point():
  f = models.nnx_list_head()
  by_model = odn.infer_depths(f.model, f.x)
  by_apply = odn.infer_depths(f.apply, f.params, f.x)
  assert by_model == nnx.State(by_apply).to_pure_dict()
  assert jax.tree.structure(by_model) == jax.tree.structure(
    nnx.state(f.model, nnx.Param).to_pure_dict()
  )
  tx = odn.depth_decay(0.5, depths=by_model)  # matches nnx.Optimizer's State by path
  state = tx.init(nnx.state(f.model, nnx.Param))
  assert set(state.depths) == set(odn._layers.resolve(f.params, by_apply))


def test_an_equinox_module_is_its_own_entry_point():
  model = eqx.nn.MLP(3, 2, 4, 2, key=jax.random.key(0))
  x = jnp.ones(3)
  by_model = odn.infer_depths(model, x)
  assert by_model == odn.infer_depths(lambda m, x: m(x), model, x)
  assert [layer.weight for layer in by_model.layers] == [0, 1, 2]
  # An eqx.Partial of a function holds no params: it is an apply_fn.
  apply = eqx.Partial(lambda p, x: x @ p["w"])
  assert odn.infer_depths(apply, {"w": jnp.ones((3, 2))}, X) == {"w": 0}


# ----------------------------------------------------------------------------- blocks


def test_block_ids_give_maes_learning_rate_scales_on_vit_b_depth():
  model = models.ViT(depth=12)
  image = jnp.ones((1, 8, 8, 3))
  params = model.init(jax.random.key(0), image)["params"]
  apply = lambda p, x: model.apply({"params": p}, x)
  fine = odn.infer_depths(apply, params, image)
  blocks = odn.infer_depths(apply, params, image, granularity="block")
  tx = optax.chain(optax.sgd(1.0), odn.depth_decay(-math.log(0.75), reverse=True, depths=blocks))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params))
  # MAE: the patch embedding's scale is 0.75 ** 13, block i's 0.75 ** (12 - i).
  assert_close(-updates["embedding"]["kernel"][0, 0, 0, 0], 0.75**13)
  for i in range(12):
    b = updates["Transformer"][f"encoderblock_{i}"]
    assert_close(-b["LayerNorm_0"]["scale"][0], 0.75 ** (12 - i))
    assert_close(-b["MlpBlock_0"]["Dense_1"]["kernel"][0, 0], 0.75 ** (12 - i))
  assert_close(-updates["head"]["kernel"][0, 0], 1.0)
  # One matmul per depth instead would put the patch embedding ~0.75 ** 61 below the head.
  assert max(jax.tree.leaves(fine)) > 4 * 12


def test_interleaved_flat_siblings_zip_into_blocks():
  class Flat(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(4, name="stem")(x)
      for i in range(3):
        x = x + nn.Dense(4, name=f"block_{i}")(nn.LayerNorm(name=f"ln_{i}")(x))
      for i in range(2):
        x = nn.Dense(4, name=f"neck_{i}")(x)
      return nn.Dense(2, name="head")(x)

  params = Flat().init(jax.random.key(0), X)["params"]
  d = odn.infer_depths(lambda p, x: Flat().apply({"params": p}, x), params, X, granularity="block")
  ids = {name: leaf.get("kernel", leaf.get("scale")) for name, leaf in d.items()}
  assert ids == {
    "stem": 0,
    **{f"block_{i}": i + 1 for i in range(3)},
    **{f"ln_{i}": i + 1 for i in range(3)},
    "neck_0": 4,
    "neck_1": 5,  # a second group runs after the first: numbered on
    "head": 6,
  }
  assert odn.layer_depths(params, granularity="block") == d  # creation order says the same


def test_blocks_regex_names_blocks_without_a_running_index():
  params = {
    "stem": {"kernel": jnp.ones((3, 3))},
    "stage1_unit1": {"kernel": jnp.ones((3, 3))},
    "stage1_unit2": {"kernel": jnp.ones((3, 3))},
    "stage2_unit1": {"kernel": jnp.ones((3, 3))},
    "head": {"kernel": jnp.ones((3, 2))},
  }

  def f(p, x):
    for name in ("stem", "stage1_unit1", "stage1_unit2", "stage2_unit1", "head"):
      x = jnp.tanh(x @ p[name]["kernel"])
    return x

  d = odn.infer_depths(f, params, X, granularity="block", blocks=r"stage(\d+)_")
  assert kernel_depths(d) == {
    "stem": 0,
    "stage1_unit1": 1,
    "stage1_unit2": 1,
    "stage2_unit1": 2,
    "head": 3,
  }


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"granularity": "blocks"}, ValueError, r"granularity must be one of \('layer', 'block'\)"),
    ({"blocks": r"b(\d+)"}, ValueError, 'pass granularity="block"'),
    ({"granularity": "block", "blocks": 3}, TypeError, "blocks must be a regex"),
    ({"granularity": "block", "blocks": r"b\d+"}, ValueError, "has no group"),
    ({"granularity": "block", "blocks": r"zz(\d+)"}, ValueError, "matches no parameter path"),
    ({"granularity": "block", "blocks": r"(a)"}, ValueError, "captures no block index"),
    ({"granularity": "block"}, ValueError, "found no repeated blocks"),
  ],
)
def test_granularity_errors(kwargs, error, match):
  params = {"b": jnp.ones((3, 3)), "a": jnp.ones((3, 3))}  # creation order: b, a
  f = lambda p, x: x @ p["b"] @ p["a"]
  with pytest.raises(error, match=match):
    odn.infer_depths(f, params, X, **kwargs)
  with pytest.raises(error, match=match):
    odn.layer_depths(params, **kwargs)


# ----------------------------------------------------------------------------- docs recipe


def mae_layer_id(name: str, num_layers: int) -> int:
  """MAE's `get_layer_id_for_vit` (util/lr_decay.py), ported by hand to '/'-joined paths.

  Its names (`cls_token`, `pos_embed`, `patch_embed`, `blocks.i`) are the NNX
  example's; big_vision's (`cls`, `pos_embedding`, `embedding`,
  `encoderblock_i`) are mapped onto them.
  """
  if name in ("cls_token", "pos_embed", "cls", "pos_embedding"):
    return 0
  if name.startswith(("patch_embed", "embedding/")):
    return 0
  if name.startswith("blocks/"):
    return int(name.split("/")[1]) + 1
  if name.startswith("encoderblock_"):
    return int(name.split("/")[0].split("_")[1]) + 1
  return num_layers


def _scales(tx, plain, grads, params):
  decayed, _ = tx.update(grads, tx.init(params), params)
  base, _ = plain.update(grads, plain.init(params), params)
  return decayed, base


def test_docs_llrd_recipe_gives_maes_scale_to_every_leaf(capsys):
  import pathlib
  import re

  text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "depth_labels.md").read_text()
  blocks = re.findall(r"<!-- runs in tests: llrd -->\n```python\n(.*?)```", text, re.S)
  assert len(blocks) == 2
  ns: dict = {}
  exec(compile("\n".join(blocks), "docs/depth_labels.md", "exec"), ns)
  assert capsys.readouterr().out.splitlines()[-1] == "0 4 5"
  L = 4
  # linen: every leaf's update is AdamW's times 0.75 ** (L + 1 - MAE id).
  params, images, labels = ns["params"], ns["images"], ns["labels"]
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
    ns["apply"](p, images), labels
  ).mean()
  grads = jax.grad(loss)(params)
  decayed, base = _scales(ns["tx"], optax.adamw(1e-3), grads, params)
  flat_ids = odn._depths.depth_lookup(ns["ids"])
  for path, d in jax.tree_util.tree_flatten_with_path(decayed)[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    expected = mae_layer_id(name, L + 1)
    assert flat_ids[name] == expected, name
    b = jax.tree_util.tree_flatten_with_path(base)[0]
    (plain,) = [x for q, x in b if q == path]
    assert_close(d, plain * 0.75 ** (L + 1 - expected))
  # NNX: the same rule on the model's own names.
  vit = ns["vit"]
  state = nnx.state(vit, nnx.Param)
  for name, d in odn._depths.depth_lookup(ns["nnx_ids"]).items():
    assert d == mae_layer_id(name, L + 1), name
  nnx_grads = nnx.grad(lambda m: jnp.mean(m(images) ** 2))(vit)
  decayed, base = _scales(ns["llrd"], optax.adamw(1e-3), nnx_grads, state)
  ids = odn._depths.depth_lookup(ns["nnx_ids"])
  pairs = zip(jax.tree_util.tree_flatten_with_path(decayed)[0], jax.tree.leaves(base))
  for (path, d), plain in pairs:
    name = odn._tree.path_name(path)
    assert_close(d, plain * 0.75 ** (L + 1 - ids[name]))
