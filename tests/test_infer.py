"""`infer_depths`: depths from the computation graph, on a small model zoo."""

from __future__ import annotations

import pathlib
import re
import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_depthnorm as odn
from tests.tolerance import RTOL

ROOT = pathlib.Path(__file__).resolve().parents[1]
X = jax.ShapeDtypeStruct((1, 6), jnp.float32)


def linen_depths(model, x, **kwargs):
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **kwargs), x)["params"]
  apply = lambda p, x: model.apply({"params": p}, x, **kwargs)
  return odn.infer_depths(apply, params, x), params


def kernels(depths):
  """{module path: depth of its kernel (or of its only leaf)}."""
  out = {}
  for path, d in jax.tree_util.tree_flatten_with_path(depths)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if names[-1] in ("kernel", "embedding", "weight"):
      out["/".join(names[:-1])] = d
  return out


# ----------------------------------------------------------------------------- zoo


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for _ in range(11):
      x = nn.sigmoid(nn.Dense(8)(x))
    return nn.Dense(2)(x)


class ResNetBlock(nn.Module):
  """Conv-BN-relu-Conv-BN plus a projection shortcut (1x1 conv + BN), then a head."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = lambda name: nn.BatchNorm(use_running_average=not train, name=name)
    h = nn.relu(norm("bn0")(nn.Conv(8, (3, 3), name="conv0")(x)))
    h = norm("bn1")(nn.Conv(8, (3, 3), name="conv1")(h))
    shortcut = norm("proj_bn")(nn.Conv(8, (1, 1), name="proj")(x))
    y = nn.relu(h + shortcut)
    return nn.Dense(3, name="head")(jnp.mean(y, axis=(1, 2)))


class Block(nn.Module):
  """A pre-LN transformer block: attention (q, k, v, out) and a two-layer MLP."""

  dim: int = 8

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln_1")(x)
    q, k, v = (nn.Dense(self.dim, name=n)(h) for n in ("q", "k", "v"))
    att = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(self.dim), axis=-1)
    x = x + nn.Dense(self.dim, name="attn_out")(jnp.einsum("bts,bsd->btd", att, v))
    h = nn.gelu(nn.Dense(2 * self.dim, name="mlp_fc")(nn.LayerNorm(name="ln_2")(x)))
    return x + nn.Dense(self.dim, name="mlp_proj")(h)


class GPT(nn.Module):
  """GPT-2 names: sorted, they read h_0, h_1, h_2, lm_head, ln_f, wte (embedding last)."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(16, 8, name="wte")(tokens)
    for i in range(3):
      x = Block(name=f"h_{i}")(x)
    return nn.Dense(16, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


class ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return jnp.tanh(nn.Dense(8, name="fc")(x)), None


class ScanMLP(nn.Module):
  layers: int = 5

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, name="stem")(x)
    stack = nn.scan(
      ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers
    )
    x, _ = stack(name="blocks")(x, None)
    return nn.Dense(2, name="head")(x)


class Shared(nn.Module):
  """One Dense applied twice, then a head."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(6, name="inp")(x)
    shared = nn.Dense(6, name="shared")
    x = shared(jnp.tanh(shared(x)))
    return nn.Dense(2, name="out")(x)


# ----------------------------------------------------------------------------- tests


def test_linen_mlp_matches_path_labels():
  depths, params = linen_depths(MLP(), X)
  assert depths == odn.layer_depths(params)
  assert depths["Dense_11"]["bias"] == 11


def test_resnet_block_shortcut_at_the_block_depth():
  model, x = ResNetBlock(), jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  # Batch statistics are closed over (zeros of their shapes): inputs would count as data.
  stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["batch_stats"])

  def apply(p, x, train=False):
    v = {"params": p, "batch_stats": stats}
    return model.apply(v, x, train=train, mutable=["batch_stats"] if train else False)

  depths = odn.infer_depths(apply, variables["params"], x)
  assert kernels(depths) == {"conv0": 0, "conv1": 1, "proj": 0, "head": 2}
  # BatchNorm joins the conv whose output it normalizes; biases their kernels.
  assert depths["bn0"] == {"scale": 0, "bias": 0}
  assert depths["bn1"] == {"scale": 1, "bias": 1}
  assert depths["proj_bn"] == {"scale": 0, "bias": 0}
  assert depths["conv1"]["bias"] == 1
  # train=True (batch statistics) gives the same labels.
  assert odn.infer_depths(apply, variables["params"], x, train=True) == depths


def test_transformer_embedding_first_head_last_blocks_in_order():
  tokens = jax.ShapeDtypeStruct((1, 5), jnp.int32)
  depths, params = linen_depths(GPT(), tokens)
  k = kernels(depths)
  assert k["wte"] == 0
  assert k["lm_head"] == max(odn.NOT_A_LAYER, *k.values()) == 13
  for i in range(3):
    base = 1 + 4 * i  # q, k, v share a depth; out, fc, proj follow
    assert [k[f"h_{i}/{n}"] for n in ("q", "k", "v", "attn_out", "mlp_fc", "mlp_proj")] == [
      base,
      base,
      base,
      base + 1,
      base + 2,
      base + 3,
    ]
    # pre-LN: a LayerNorm joins the block it opens (its own module scope), not the
    # previous block's last layer whose output it normalizes.
    assert depths[f"h_{i}"]["ln_1"]["scale"] == base
  assert depths["ln_f"]["scale"] == 12
  # Path labels on the sorted tree `eval_shape` returns get this model wrong (the
  # embedding sorts last) and say so.
  with pytest.warns(odn.DepthOrderWarning, match=r"'<root>': h_0, h_1, h_2, lm_head, ln_f, wte"):
    by_names = odn.layer_depths(params)
  assert by_names["wte"]["embedding"] == max(jax.tree.leaves(by_names))
  # The dict an unjitted `init` returns keeps creation order: embedding first, head last.
  created = GPT().init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))["params"]
  in_order = kernels(odn.layer_depths(created))
  assert in_order["wte"] == 0
  assert in_order["lm_head"] == max(in_order.values())


def test_layerwise_lr_decay_on_the_transformer():
  tokens = jnp.zeros((1, 5), jnp.int32)
  model = GPT()
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
  depths = odn.infer_depths(lambda p, t: model.apply({"params": p}, t), params, tokens)
  tx = optax.chain(
    optax.sgd(1.0), odn.depth_decay(0.5, decay="linear", depths=depths, reverse=True)
  )
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(ones, tx.init(params), params)
  assert float(updates["lm_head"]["kernel"][0, 0]) == -1.0
  # float32 jnp.power against float64: no atol, the values are small.
  np.testing.assert_allclose(updates["wte"]["embedding"][0, 0], -(0.5**13), rtol=RTOL)
  np.testing.assert_allclose(updates["h_2"]["mlp_proj"]["kernel"][0, 0], -(0.5**1), rtol=RTOL)
  np.testing.assert_allclose(updates["h_0"]["q"]["bias"][0], -(0.5**12), rtol=RTOL)


def test_nn_scan_stack_gets_one_depth_per_slice():
  depths, params = linen_depths(ScanMLP(), X)
  stacked = odn.StackedDepth(range(1, 6), axis=0)
  assert depths["blocks"]["fc"] == {"kernel": stacked, "bias": stacked}
  assert depths["stem"]["kernel"] == 0 and depths["head"]["kernel"] == 6
  table = odn.depth_table(params, depths)
  assert "1..5" in table and "(5, 8, 8)@0" in table


@pytest.mark.parametrize("reverse", [False, True])
def test_lax_scan_over_stacked_weights_long_and_reversed(reverse):
  n = 300  # walked a few times, then extrapolated

  def apply(p, x):
    def step(h, w):
      h = jnp.tanh(h @ w["a"])
      return jnp.tanh(h @ w["b"]), None

    h, _ = jax.lax.scan(step, x @ p["inp"], p["stack"], reverse=reverse)
    return h @ p["out"]

  params = {
    "inp": jnp.zeros((6, 4)),
    "stack": {"a": jnp.zeros((n, 4, 4)), "b": jnp.zeros((n, 4, 4))},
    "out": jnp.zeros((4, 2)),
  }
  depths = odn.infer_depths(apply, params, X)
  order = np.arange(n)[::-1] if reverse else np.arange(n)
  a = np.empty(n, int)
  a[order] = 1 + 2 * np.arange(n)
  assert depths["stack"]["a"] == odn.StackedDepth(a.tolist(), 0)
  assert depths["stack"]["b"] == odn.StackedDepth((a + 1).tolist(), 0)
  assert depths["out"] == 2 * n + 1


def test_rnn_weight_shared_by_every_step():
  def apply(p, xs):
    h, _ = jax.lax.scan(lambda h, x: (jnp.tanh(h @ p["rec"] + x @ p["inp"]), None), xs[0], xs)
    return h @ p["out"]

  params = {"rec": jnp.zeros((6, 6)), "inp": jnp.zeros((6, 6)), "out": jnp.zeros((6, 1))}
  depths = odn.infer_depths(apply, params, jax.ShapeDtypeStruct((50, 6), jnp.float32))
  assert depths == {"rec": 0, "inp": 0, "out": 50}


def test_weight_used_twice_gets_its_first_use():
  depths, _ = linen_depths(Shared(), X)
  assert kernels(depths) == {"inp": 0, "shared": 1, "out": 3}


def test_tied_embedding_takes_the_lookup_depth():
  class Tied(nn.Module):
    @nn.compact
    def __call__(self, t):
      embed = nn.Embed(10, 4, name="embed")
      return embed.attend(nn.Dense(4, name="mid")(embed(t)))

  depths, _ = linen_depths(Tied(), jax.ShapeDtypeStruct((1, 3), jnp.int32))
  assert depths == {"embed": {"embedding": 0}, "mid": {"kernel": 1, "bias": 1}}


def test_equinox_mlp_and_its_transforms():
  model = eqx.nn.MLP(6, 2, 8, depth=3, key=jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  x = jax.ShapeDtypeStruct((6,), jnp.float32)
  depths = odn.infer_depths(lambda p, x: eqx.combine(p, static)(x), params, x)
  assert [(layer.weight, layer.bias) for layer in depths.layers] == [(i, i) for i in range(4)]
  assert depths == odn.layer_depths(params)
  # The whole model works too: non-array leaves are held fixed.
  whole = odn.infer_depths(lambda m, x: m(x), model, x)
  assert [layer.weight for layer in whole.layers] == [0, 1, 2, 3]
  grads = jax.tree.map(jnp.ones_like, params)
  tx = odn.depth_decay(0.5, decay="linear", depths=depths)
  updates, _ = tx.update(grads, tx.init(params))
  assert float(updates.layers[3].bias[0]) == 0.125


def test_nested_jaxprs_are_followed():
  @jax.jit
  def dense(w, x):
    return x @ w

  @jax.checkpoint
  def remat_layer(w, x):
    return jnp.tanh(x @ w)

  def apply(p, x):
    h = dense(p["jit"], x)
    h = remat_layer(p["remat"], h)
    h = odn.bgn(h)  # custom_vjp
    h = jax.nn.relu(h)  # custom_jvp
    h = jax.lax.cond(jnp.sum(h) > 0, lambda h: h @ p["cond_a"], lambda h: jnp.tanh(h), h)
    h = jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ p["loop"], c[1] + 1), (h, 0))[0]
    return h @ p["out"]

  params = {k: jnp.zeros((6, 6)) for k in ("jit", "remat", "cond_a", "loop", "out")}
  depths = odn.infer_depths(apply, params, X)
  assert depths == {"jit": 0, "remat": 1, "cond_a": 2, "loop": 3, "out": 4}


def test_stack_used_whole_gets_one_depth():
  def apply(p, x):
    return jnp.einsum("bi,lio->blo", x, p["stack"]).sum(1) @ p["out"]

  params = {"stack": jnp.zeros((3, 6, 6)), "out": jnp.zeros((6, 1))}
  assert odn.infer_depths(apply, params, X) == {"stack": 0, "out": 1}


def test_unused_leaves_are_marked_and_left_alone():
  params = {
    "used": jnp.ones((6, 2)),
    "unused": {"w": jnp.ones(3)},
    "step": jnp.zeros((), jnp.int32),
  }
  with pytest.warns(odn.UnusedParamWarning, match=r"never uses 1 parameter leaf\(s\): unused/w"):
    depths = odn.infer_depths(lambda p, x: x @ p["used"], params, X)
  assert depths == {"used": 0, "unused": {"w": odn.NOT_A_LAYER}, "step": odn.NOT_A_LAYER}
  grads = jax.tree.map(lambda x: jnp.full(x.shape, 2.0) if x.dtype != jnp.int32 else x, params)
  for tx in (
    odn.depth_decay(0.5, depths=depths),
    odn.layerwise_normalize(depths=depths, group="layer"),
  ):
    updates, _ = tx.update(grads, tx.init(params))
    np.testing.assert_array_equal(updates["unused"]["w"], 2.0)
  assert odn.depth_table(params, depths).splitlines()[-1].split()[0] == "-"


def test_many_unused_leaves_are_summarized():
  params = {f"p{i}": jnp.ones(2) for i in range(9)}
  with pytest.warns(odn.UnusedParamWarning, match="p5 and 3 more"):
    odn.infer_depths(lambda p, x: x, params, X)


def test_kwargs_and_static_args():
  def apply(p, x, *, scale, train):
    return (x @ p["a"]) * scale if train else x

  params = {"a": jnp.ones((6, 2))}
  assert odn.infer_depths(apply, params, X, scale=2.0, train=True) == {"a": 0}
  with pytest.warns(odn.UnusedParamWarning):
    odn.infer_depths(apply, params, X, scale=2.0, train=False)


def test_every_transform_accepts_inferred_depths():
  model = ScanMLP(layers=3)
  x = jnp.ones((2, 6))
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  depths = odn.infer_depths(lambda p, x: model.apply({"params": p}, x), params, x)
  grads = jax.tree.map(jnp.ones_like, params)
  for tx in (  # depth_normalized is a chain of the first two
    odn.layerwise_normalize(depths=depths, group="layer", target="last_layer"),
    odn.depth_decay(0.1, depths=depths),
    optax.chain(optax.sgd(0.1), odn.scale_normalize("determinant", depths=depths)),
    odn.track_gradient_flow(depths=depths),
  ):
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
  report = odn.gradient_flow(grads, params, depths)
  assert report.depths == tuple(range(5))
  assert report.paths[1:4] == ("blocks/fc[0]", "blocks/fc[1]", "blocks/fc[2]")


def test_docs_example_runs(capsys):
  text = (ROOT / "docs" / "depth_labels.md").read_text()
  blocks = re.findall(r"<!-- runs in tests -->\n```python\n(.*?)```", text, re.S)
  assert len(blocks) >= 2
  namespace: dict = {}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    exec(compile("\n".join(blocks), "docs/depth_labels.md", "exec"), namespace)
  out = capsys.readouterr().out
  assert "wte/embedding" in out and namespace["ratio"] == pytest.approx(0.9**13, rel=1e-5)


def test_infer_time_benchmark_runs(monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
  import infer_time

  result = infer_time.main(["--quick", "--repeats", "1"])
  assert result["leaves"] == 161 and result["depths"]["head"] == result["depths"]["max"] == 49
  assert result["depths"]["stem"] == result["depths"]["stem_bn"] == 0
  assert result["trace_s"]["median"] > 0 and result["walk_s"]["median"] > 0


def test_nnx_state_matches_path_labels():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(6, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])

    def __call__(self, x):
      return self.layers[1](jnp.tanh(self.layers[0](x)))

  graph, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
  depths = odn.infer_depths(lambda s, x: nnx.merge(graph, s)(x), state, X)
  assert odn.depth_table(state, depths) == odn.depth_table(state)
  assert "1      layers/1/kernel" in odn.depth_table(state, depths)
