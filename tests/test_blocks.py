"""Block granularity of `odn.infer_depths` and `odn.layer_depths` (issue 13): acceptance tests.

With ``granularity="block"`` every leaf inside one repeated block shares one id:
leaves before the first block get 0, block ``k`` (0-based, the k-th in order)
gets ``k + 1``, leaves after the last block get ``L + 1`` (``L`` blocks), and a
leaf that stacks the blocks (``nn.scan``) gets ``StackedDepth((1, ..., L), 0)``.
Then ``optax.chain(optax.adamw(lr), odn.depth_decay(-log(0.75), reverse=True,
depths=depths))`` is layer-wise learning-rate decay: each leaf's update is plain
AdamW's times ``0.75 ** (L + 1 - id)``.

The expected ids are not taken from the library: they are computed from the
parameter names by hand-written ports of the published rules.

* MAE, facebookresearch/mae ``util/lr_decay.py``: ``get_layer_id_for_vit`` (which
  follows BEiT's ``optim_factory.py``): ``cls_token``, ``pos_embed`` and
  ``patch_embed.*`` get 0, ``blocks.{i}.*`` gets ``i + 1``, everything else
  (``norm``, ``head``) ``num_layers = len(model.blocks) + 1 = L + 1``; and
  ``param_groups_lrd``'s ``lr_scale = layer_decay ** (num_layers - layer_id)``.
  Ported for the ViTs (big_vision's Linen ViT, with and without ``scan``; the NNX
  ViT of the JAX AI stack tutorial) and for Flax's imagenet ResNet (stem as
  ``patch_embed``, ``ResNetBlock_{i}`` as ``blocks.{i}``, the Dense head as
  ``head``), after renaming Flax/NNX paths to timm's names (``embedding`` to
  ``patch_embed.proj``, ``encoderblock_{i}`` or ``encoder/layers/{i}`` to
  ``blocks.{i}``, ...). Every path must match a rename, so no leaf falls into
  MAE's catch-all by accident.
* ELECTRA, google-research/electra ``model/optimization.py``: ``_get_layer_lrs``
  (keys ``/embeddings/`` and ``/embeddings_project/`` at 0,
  ``encoder/layer_{i}/`` at ``i + 1``, ``task_specific/`` at ``n_layers + 2``) and
  ``AdamWeightDecayOptimizer.apply_gradients`` (a variable takes the rate of each
  key that is a substring of its name; none is an error), with
  ``lr * layer_decay ** (n_layers + 2 - depth)``. Ported for the Equinox BERT after
  renaming its paths to ELECTRA's TF variable names. ELECTRA's head sits at
  ``n_layers + 2``, one above MAE's ``L + 1``: see `electra_spec_id`.

Covered: big_vision ViT (loop blocks ``Transformer/encoderblock_{i}``), its
``scan=True`` version (stacked ``Transformer/encoderblock``), the NNX ViT (a list,
``encoder/layers/{i}``, through ``infer_depths(apply, state, x)`` and
``infer_depths(model, x)``), the Equinox BERT (``encoder/layers/{i}``), the Flax
ResNet (``ResNetBlock_{i}``, batch statistics closed over); ``layer_depths`` where
the tree tells the order (a Linen init dict, an NNX module, an Equinox module);
``blocks=`` on MXNet-style flat names (``stage1_unit2_conv1``) and on ``h_{i}``;
pre-norms joining their block; the automatic stems on small hand-built trees;
and that ``granularity="layer"`` is the default.
"""

from __future__ import annotations

import collections
import functools
import math
import re
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

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

LAYER_DECAY = 0.75
GAMMA = -math.log(LAYER_DECAY)  # depth_decay's exponential decay: exp(-GAMMA d) = 0.75 ** d
LR = 1e-3


# ----------------------------------------------------------------------------- the MAE rule


def get_layer_id_for_vit(name: str, num_layers: int) -> int:
  """facebookresearch/mae ``util/lr_decay.py``, as published (BEiT's rule).

  ``name`` is a PyTorch parameter name (``blocks.3.attn.qkv.weight``) and
  ``num_layers`` is ``len(model.blocks) + 1``.
  """
  if name in ["cls_token", "pos_embed"]:  # noqa: SIM114 (kept as published)
    return 0
  elif name.startswith("patch_embed"):
    return 0
  elif name.startswith("blocks"):
    return int(name.split(".")[1]) + 1
  else:
    return num_layers


def mae_lr_scale(layer_id: int, num_blocks: int, layer_decay: float = LAYER_DECAY) -> float:
  """MAE's ``param_groups_lrd``: ``layer_scales[layer_id]`` with ``num_layers = L + 1``."""
  num_layers = num_blocks + 1
  layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
  return layer_scales[layer_id]


Rename = list[tuple[str, str]]

# big_vision ViT paths -> timm/MAE names (a '/'-joined path; "{i}": the slice of a stack).
BIG_VISION_TO_TIMM: Rename = [
  (r"^embedding/(.*)$", r"patch_embed.proj.\1"),
  (r"^pos_embedding$", "pos_embed"),
  (r"^cls$", "cls_token"),
  (r"^Transformer/encoderblock_(\d+)/(.*)$", r"blocks.\1.\2"),
  (r"^Transformer/encoder_norm/(.*)$", r"norm.\1"),
  (r"^head/(.*)$", r"head.\1"),
]
# With scan=True one `encoderblock` holds every block: slice i is timm's blocks.i.
BIG_VISION_SCAN_TO_TIMM: Rename = [
  (r"^Transformer/encoderblock/(.*)$", r"blocks.{i}.\1"),
  *(r for r in BIG_VISION_TO_TIMM if "encoderblock" not in r[0]),
]
# The NNX tutorial ViT -> timm/MAE names.
NNX_VIT_TO_TIMM: Rename = [
  (r"^patch_embeddings/(.*)$", r"patch_embed.proj.\1"),
  (r"^position_embeddings$", "pos_embed"),
  (r"^cls_token$", "cls_token"),
  (r"^encoder/layers/(\d+)/(.*)$", r"blocks.\1.\2"),
  (r"^final_norm/(.*)$", r"norm.\1"),
  (r"^classifier/(.*)$", r"head.\1"),
]
# Flax's imagenet ResNet in MAE's terms: the stem is the patch embedding, a block a block.
RESNET_TO_MAE: Rename = [
  (r"^(conv_init|bn_init)/(.*)$", r"patch_embed.\1.\2"),
  (r"^ResNetBlock_(\d+)/(.*)$", r"blocks.\1.\2"),
  (r"^Dense_0/(.*)$", r"head.\1"),
]


def renamed(path: str, renames: Rename, i: int | None = None) -> str:
  """`path` under the first rename that matches it; an unmatched path is an error."""
  for pattern, template in renames:
    match = re.match(pattern, path)
    if match is not None:
      return match.expand(template.replace("{i}", str(i)))
  raise AssertionError(f"no rename for {path!r}: the port would guess its id")


def mae_rule(renames: Rename, num_blocks: int, stacked: str | None = None) -> Callable:
  """Expected id of a '/'-joined path by MAE's rule; a `StackedDepth` under `stacked`."""

  def rule(path: str):
    if stacked is not None and path.startswith(stacked + "/"):
      ids = [
        get_layer_id_for_vit(renamed(path, renames, i), num_blocks + 1) for i in range(num_blocks)
      ]
      return odn.StackedDepth(ids, axis=0)
    return get_layer_id_for_vit(renamed(path, renames), num_blocks + 1)

  return rule


# ----------------------------------------------------------------------------- the ELECTRA rule


def electra_key_to_depths(n_layers: int) -> collections.OrderedDict:
  """google-research/electra ``model/optimization.py`` ``_get_layer_lrs``: its table."""
  key_to_depths = collections.OrderedDict(
    {"/embeddings/": 0, "/embeddings_project/": 0, "task_specific/": n_layers + 2}
  )
  for layer in range(n_layers):
    key_to_depths["encoder/layer_" + str(layer) + "/"] = layer + 1
  return key_to_depths


def electra_depth(var_name: str, n_layers: int) -> int:
  """The depth ELECTRA's ``AdamWeightDecayOptimizer.apply_gradients`` gives a variable.

  It updates a variable once with the rate of every key that is a substring of
  the variable's name and raises ``ValueError("No learning rate specified for
  variable", var)`` if there is none. The names here match exactly one key.
  """
  depths = [d for key, d in electra_key_to_depths(n_layers).items() if key in var_name]
  if not depths:
    raise ValueError("No learning rate specified for variable", var_name)
  assert len(depths) == 1, (var_name, depths)
  return depths[0]


def electra_lr_scale(depth: int, n_layers: int, layer_decay: float = LAYER_DECAY) -> float:
  """``_get_layer_lrs``: ``learning_rate * layer_decay ** (n_layers + 2 - depth)``."""
  return layer_decay ** (n_layers + 2 - depth)


# The Equinox BERT's paths -> ELECTRA's TF variable names (``scope/.../leaf:0``). Only
# the scopes matter to `_get_layer_lrs`; the leaf names stay Equinox's.
EQX_BERT_TO_ELECTRA: Rename = [
  (r"^encoder/embedder_block/token_embedder/weight$", "electra/embeddings/word_embeddings:0"),
  (
    r"^encoder/embedder_block/segment_embedder/weight$",
    "electra/embeddings/token_type_embeddings:0",
  ),
  (
    r"^encoder/embedder_block/position_embedder/weight$",
    "electra/embeddings/position_embeddings:0",
  ),
  (r"^encoder/embedder_block/layernorm/(\w+)$", r"electra/embeddings/LayerNorm/\1:0"),
  (
    r"^encoder/layers/(\d+)/attention_block/attention/(query|key|value)_proj/(\w+)$",
    r"electra/encoder/layer_\1/attention/self/\2/\3:0",
  ),
  (
    r"^encoder/layers/(\d+)/attention_block/attention/output_proj/(\w+)$",
    r"electra/encoder/layer_\1/attention/output/dense/\2:0",
  ),
  (
    r"^encoder/layers/(\d+)/attention_block/layernorm/(\w+)$",
    r"electra/encoder/layer_\1/attention/output/LayerNorm/\2:0",
  ),
  (
    r"^encoder/layers/(\d+)/ff_block/mlp/(\w+)$",
    r"electra/encoder/layer_\1/intermediate/dense/\2:0",
  ),
  (r"^encoder/layers/(\d+)/ff_block/output/(\w+)$", r"electra/encoder/layer_\1/output/dense/\2:0"),
  (
    r"^encoder/layers/(\d+)/ff_block/layernorm/(\w+)$",
    r"electra/encoder/layer_\1/output/LayerNorm/\2:0",
  ),
  # ELECTRA has no pooler: its `get_pooled_output` is `sequence_output[:, 0]`, and a
  # BERT pooler variable (`bert/pooler/dense`) matches none of its keys, which
  # `apply_gradients` rejects. The Equinox BERT's pooler only feeds the classifier,
  # so it goes with the head, under the scope ELECTRA builds every task head in
  # (`run_finetuning.py`: `tf.variable_scope("task_specific/" + task.name)`).
  (r"^encoder/pooler/(\w+)$", r"task_specific/cls/pooler/\1:0"),
  (r"^classifier_head/(\w+)$", r"task_specific/cls/dense/\1:0"),
]


def electra_spec_id(path: str, n_layers: int) -> int:
  """The spec's block id of an Equinox BERT path, from ELECTRA's depth.

  ELECTRA and the spec (MAE, BEiT) agree on the embeddings (0) and on layer i
  (i + 1). They differ on the head: ELECTRA puts ``task_specific/`` at
  ``n_layers + 2`` and no variable at ``n_layers + 1``, so its head learns at the
  full rate and the last layer at ``decay ** 2``; MAE puts the head at
  ``num_layers = L + 1``, right after the last block, so the last block gets
  ``decay ** 1``. Every non-head rate of ELECTRA is MAE's times one more
  ``decay``. The spec is MAE's: the head gets ``L + 1``.
  """
  depth = electra_depth(renamed(path, EQX_BERT_TO_ELECTRA), n_layers)
  return n_layers + 1 if depth == n_layers + 2 else depth


# ----------------------------------------------------------------------------- cases


class Case(NamedTuple):
  factory: Callable[[], models.Fixture]
  num_blocks: int
  rule: Callable[[str], Any]  # '/'-joined param path -> expected id (int or StackedDepth)
  table: dict[str, Any]  # the same ids, by layer prefix, written out


CASES = {
  "linen_vit": Case(
    models.linen_vit,
    2,
    mae_rule(BIG_VISION_TO_TIMM, 2),
    {
      "embedding": 0,
      "pos_embedding": 0,
      "cls": 0,
      "Transformer/encoderblock_0": 1,
      "Transformer/encoderblock_1": 2,
      "Transformer/encoder_norm": 3,
      "head": 3,
    },
  ),
  "linen_vit_scan": Case(
    models.linen_vit_scan,
    3,
    mae_rule(BIG_VISION_SCAN_TO_TIMM, 3, stacked="Transformer/encoderblock"),
    {
      "embedding": 0,
      "pos_embedding": 0,
      "cls": 0,
      "Transformer/encoderblock": odn.StackedDepth((1, 2, 3), axis=0),
      "Transformer/encoder_norm": 4,
      "head": 4,
    },
  ),
  "nnx_vit": Case(
    models.nnx_vit,
    3,
    mae_rule(NNX_VIT_TO_TIMM, 3),
    {
      "patch_embeddings": 0,
      "position_embeddings": 0,
      "cls_token": 0,
      "encoder/layers/0": 1,
      "encoder/layers/1": 2,
      "encoder/layers/2": 3,
      "final_norm": 4,
      "classifier": 4,
    },
  ),
  "equinox_bert": Case(
    models.equinox_bert,
    2,
    lambda path: electra_spec_id(path, 2),
    {
      "encoder/embedder_block": 0,
      "encoder/layers/0": 1,
      "encoder/layers/1": 2,
      "encoder/pooler": 3,
      "classifier_head": 3,
    },
  ),
  "linen_resnet": Case(
    models.linen_resnet,
    3,
    mae_rule(RESNET_TO_MAE, 3),
    {
      "conv_init": 0,
      "bn_init": 0,
      "ResNetBlock_0": 1,
      "ResNetBlock_1": 2,
      "ResNetBlock_2": 3,
      "Dense_0": 4,
    },
  ),
}


@functools.cache
def fixture(name: str) -> models.Fixture:
  """Each fixture once per test module (the scanned ViT's eager init compiles its scan)."""
  return CASES[name].factory()


def path_name(path: Any) -> str:
  """A leaf's '/'-joined path, without NNX's trailing ``value``."""
  parts = [models._key_name(k) for k in path]
  return "/".join(parts[:-1] if len(parts) > 1 and parts[-1] == "value" else parts)


def flat(tree: Any) -> dict[str, Any]:
  """``{path: leaf}`` of a pytree (`StackedDepth` is a leaf)."""
  return {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def is_param(x: Any) -> bool:
  return hasattr(x, "shape") and jnp.issubdtype(x.dtype, jnp.inexact)


def expected(name: str, reference: Any) -> dict[str, Any]:
  """Expected id of every leaf of `reference`: the port's id, -1 for a non-array leaf."""
  rule = CASES[name].rule
  return {path: rule(path) if is_param(x) else -1 for path, x in flat(reference).items()}


def longest_prefix(table: dict[str, Any], path: str) -> str:
  hits = [k for k in table if path == k or path.startswith(k + "/")]
  assert hits, f"the table has no prefix of {path!r}"
  return max(hits, key=len)


def _nnx_pure(fx: models.Fixture) -> dict:
  return nnx.state(fx.model, nnx.Param).to_pure_dict()


def _example(fx: models.Fixture) -> Any:
  """One example for the model itself: the Equinox BERT's __call__ takes one sequence."""
  return {k: v[0] for k, v in fx.x.items()}


class Source(NamedTuple):
  """How a test gets block depths for a fixture, and the tree they must mirror."""

  depths: Callable[..., Any]  # (fx, **kwargs) -> depth pytree
  reference: Callable[[models.Fixture], Any]  # the tree whose paths the depths carry
  same_structure: bool  # whether the depths have the reference's exact treedef


def sorted_inside_blocks(fn: Callable[[], Any]) -> Any:
  """``fn()`` with `odn.DepthOrderWarning` ignored, for trees sorted inside their blocks.

  ``nn.scan`` hands its block's params back through ``lax.scan``, so their keys
  come sorted (as in big_vision's ``scan=True`` checkpoints), and hand-built GPT
  blocks hold sorted siblings (``c_attn, c_proj``): the tree does not tell the
  order inside a block. Per layer that makes `layer_depths` warn; per block it
  changes no id. Whether it warns is not what these tests check.
  """
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", odn.DepthOrderWarning)
    return fn()


def _layer_depths(fx: models.Fixture, **kw) -> Any:
  tree = fx.model if fx.name == "nnx_vit" else fx.params
  stack_axis = fx.extra.get("stack_axis")
  if stack_axis is None:
    return odn.layer_depths(tree, **kw)
  return sorted_inside_blocks(lambda: odn.layer_depths(tree, stack_axis=stack_axis, **kw))


SOURCES = {
  # infer_depths(apply, params, x): every fixture.
  "infer": Source(
    lambda fx, **kw: odn.infer_depths(fx.apply, fx.params, fx.x, **kw),
    lambda fx: fx.params,
    True,
  ),
  # layer_depths on the tree that tells the order: a Linen init dict (creation
  # order, with the scan's stack axis), the NNX module, the Equinox module.
  "layer_depths": Source(_layer_depths, lambda fx: fx.params, False),
  # infer_depths(model, x): an NNX module gives a pure dict like its Param state's.
  "nnx_model": Source(
    lambda fx, **kw: odn.infer_depths(fx.model, fx.x, **kw),
    _nnx_pure,
    True,
  ),
  # infer_depths(model, x): an Equinox module is the param tree; non-arrays get -1.
  "eqx_model": Source(
    lambda fx, **kw: odn.infer_depths(fx.model, _example(fx), enable_dropout=False, **kw),
    lambda fx: fx.model,
    True,
  ),
}

RUNS = [
  ("linen_vit", "infer"),
  ("linen_vit", "layer_depths"),
  ("linen_vit_scan", "infer"),
  ("linen_vit_scan", "layer_depths"),
  ("nnx_vit", "infer"),
  ("nnx_vit", "nnx_model"),
  ("nnx_vit", "layer_depths"),
  ("equinox_bert", "infer"),
  ("equinox_bert", "eqx_model"),
  ("equinox_bert", "layer_depths"),
  ("linen_resnet", "infer"),
  ("linen_resnet", "layer_depths"),
]
RUN_IDS = [f"{f}-{s}" for f, s in RUNS]


def block_depths(name: str, source: str) -> tuple[Any, Any]:
  fx = fixture(name)
  src = SOURCES[source]
  return src.depths(fx, granularity="block"), src.reference(fx)


# ----------------------------------------------------------------------------- fixtures and ports
# These run without block granularity: they check the fixtures and the ports alone.


@pytest.mark.parametrize("name", ["linen_vit_scan", "nnx_vit", "linen_resnet"])
def test_new_fixtures_build_run_and_trace(name):
  fx = fixture(name)
  assert fx.apply(fx.params, fx.x).shape == (2, 5)
  assert set(models.layer_names(fx.params)) == set(fx.order)
  depths = odn.infer_depths(fx.apply, fx.params, fx.x)  # traces, every leaf used
  assert all(d != odn.NOT_A_LAYER for d in flat(depths).values())
  if name == "linen_vit_scan":
    stacked = flat(fx.params["Transformer"]["encoderblock"])
    assert {x.shape[0] for x in stacked.values()} == {3}
    assert all(isinstance(d, odn.StackedDepth) for p, d in flat(depths).items() if "block/" in p)


@pytest.mark.parametrize("name", list(CASES))
def test_rule_ports_give_the_published_ids(name):
  """Every leaf's id from the port equals the written-out table of its layer."""
  case = CASES[name]
  ids = expected(name, fixture(name).params)
  assert ids == {path: case.table[longest_prefix(case.table, path)] for path in ids}
  assert set(case.table) <= {longest_prefix(case.table, p) for p in ids}  # no stale row
  values = {v for v in case.table.values() if isinstance(v, int)}
  assert min(values) == 0 and max(values) == case.num_blocks + 1


def test_mae_port_on_timm_names():
  """The MAE function on the names it was written for (timm's ViT-B, 12 blocks)."""
  names = {
    "cls_token": 0,
    "pos_embed": 0,
    "patch_embed.proj.weight": 0,
    "blocks.0.norm1.weight": 1,
    "blocks.11.mlp.fc2.bias": 12,
    "fc_norm.weight": 13,
    "head.weight": 13,
  }
  assert {n: get_layer_id_for_vit(n, 12 + 1) for n in names} == names
  assert mae_lr_scale(13, 12) == 1.0 and mae_lr_scale(12, 12) == 0.75
  assert mae_lr_scale(0, 12) == pytest.approx(0.75**13)


def test_electra_port_and_how_its_head_differs():
  """ELECTRA's table on its own TF names, and its rates against the spec's on the BERT."""
  n = 12
  assert electra_depth("electra/embeddings/word_embeddings:0", n) == 0
  assert electra_depth("electra/embeddings_project/kernel:0", n) == 0
  assert electra_depth("electra/encoder/layer_1/output/dense/kernel:0", n) == 2
  assert electra_depth("electra/encoder/layer_11/attention/self/query/bias:0", n) == 12
  assert electra_depth("task_specific/mnli/dense/kernel:0", n) == 14
  with pytest.raises(ValueError, match="No learning rate"):
    electra_depth("bert/pooler/dense/kernel:0", n)  # ELECTRA has no pooler
  # On the Equinox BERT (2 layers): the same ids but the head's (4 -> L + 1 = 3), so
  # ELECTRA's rate is the spec's everywhere but the head times one more 0.75.
  for path in flat(fixture("equinox_bert").params):
    depth = electra_depth(renamed(path, EQX_BERT_TO_ELECTRA), 2)
    spec = electra_spec_id(path, 2)
    head = path.startswith(("encoder/pooler", "classifier_head"))
    assert (depth, spec) == ((4, 3) if head else (spec, spec)), path
    ratio = electra_lr_scale(depth, 2) / mae_lr_scale(spec, 2)
    assert ratio == pytest.approx(1.0 if head else LAYER_DECAY), path


# ----------------------------------------------------------------------------- block ids


@pytest.mark.parametrize(("name", "source"), RUNS, ids=RUN_IDS)
def test_block_ids_follow_the_published_rule(name, source):
  depths, reference = block_depths(name, source)
  assert flat(depths) == expected(name, reference)
  if SOURCES[source].same_structure:
    assert jax.tree.structure(depths) == jax.tree.structure(reference)


def _norm_leaves(depths: dict[str, Any]) -> dict[str, Any]:
  """The LayerNorm leaves (``LayerNorm_0``, ``encoder_norm``, ``norm1``, ``final_norm``)."""
  return {p: d for p, d in depths.items() if "norm" in p.lower()}


@pytest.mark.parametrize(
  ("name", "source"),
  [("linen_vit", "infer"), ("linen_vit_scan", "infer"), ("nnx_vit", "infer")],
  ids=["linen_vit", "linen_vit_scan", "nnx_vit"],
)
def test_pre_layernorm_joins_its_block(name, source):
  """A block's pre-norm acts on the previous block's output (block 0's on the embedding),
  so per layer it sits before the block; per block it is the block's."""
  depths = flat(block_depths(name, source)[0])
  norms = _norm_leaves(depths)
  L = CASES[name].num_blocks
  if name == "linen_vit":
    want = {f"Transformer/encoderblock_{i}/LayerNorm_{j}": i + 1 for i in range(L) for j in (0, 1)}
    want["Transformer/encoder_norm"] = L + 1
  elif name == "linen_vit_scan":
    stack = odn.StackedDepth(range(1, L + 1), axis=0)
    want = {f"Transformer/encoderblock/LayerNorm_{j}": stack for j in (0, 1)}
    want["Transformer/encoder_norm"] = L + 1
  else:
    want = {f"encoder/layers/{i}/norm{j}": i + 1 for i in range(L) for j in (1, 2)}
    want["final_norm"] = L + 1
  assert norms == {f"{layer}/{leaf}": d for layer, d in want.items() for leaf in ("scale", "bias")}


# ----------------------------------------------------------------------------- LLRD step


def random_like(tree: Any, seed: int = 0) -> Any:
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
    treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  )


def lr_scale(label: Any, num_blocks: int, ndim: int) -> np.ndarray | float:
  """MAE's scale of an id; per slice (along axis 0, broadcastable) for a stack."""
  if isinstance(label, odn.StackedDepth):
    assert label.axis == 0
    scales = [mae_lr_scale(d, num_blocks) for d in label.depths]
    return np.asarray(scales, np.float32).reshape((-1,) + (1,) * (ndim - 1))
  return mae_lr_scale(label, num_blocks)


@pytest.mark.parametrize(("name", "source"), RUNS, ids=RUN_IDS)
def test_one_adamw_step_is_scaled_by_mae_layer_decay(name, source):
  depths, _ = block_depths(name, source)
  fx = fixture(name)
  params = fx.params
  grads = random_like(params)
  plain = optax.adamw(LR)
  llrd = optax.chain(optax.adamw(LR), odn.depth_decay(GAMMA, reverse=True, depths=depths))
  u_plain = flat(plain.update(grads, plain.init(params), params)[0])
  u_llrd = flat(llrd.update(grads, llrd.init(params), params)[0])
  ids = expected(name, params)
  assert set(u_llrd) == set(u_plain) == set(ids)
  for path, u in u_llrd.items():
    scale = lr_scale(ids[path], CASES[name].num_blocks, u.ndim)
    assert_close(np.asarray(u), scale * np.asarray(u_plain[path]))


# ----------------------------------------------------------------------------- default granularity


@pytest.mark.parametrize(("name", "source"), RUNS, ids=RUN_IDS)
def test_layer_granularity_is_the_default(name, source):
  fx = fixture(name)
  depths = SOURCES[source].depths
  layer, default = depths(fx, granularity="layer"), depths(fx)
  assert flat(layer) == flat(default)
  assert jax.tree.structure(layer) == jax.tree.structure(default)


# ----------------------------------------------------------------------------- blocks=


class MXNetPreActResNet(nn.Module):
  """Flat MXNet-style names: apache/mxnet ``example/image-classification/symbols/
  resnet.py`` (pre-activation ``residual_unit``: ``{name}_bn1``, ``_conv1``, ``_bn2``,
  ``_conv2``, and the shortcut ``_sc`` on the first unit of a stage; ``name =
  "stage%d_unit%d"``; ``bn_data`` (``fix_gamma``), ``conv0``, ``bn0`` before (no
  max-pool at this size), ``bn1``, ``fc1`` after). Every op is a sibling at the
  top, so a block is a name prefix, not a running-index sibling (the automatic
  rule would see ``bn0, bn1`` or ``..._conv1, ..._conv2`` as running indices)."""

  units: tuple[int, ...] = (2, 1)
  filters: tuple[int, ...] = (4, 8)
  num_classes: int = 3

  @nn.compact
  def __call__(self, x):
    bn = functools.partial(nn.BatchNorm, use_running_average=True, momentum=0.9, epsilon=2e-5)
    conv = functools.partial(nn.Conv, use_bias=False)
    x = bn(use_scale=False, name="bn_data")(x)  # fix_gamma=True
    x = nn.relu(bn(name="bn0")(conv(self.filters[0], (3, 3), name="conv0")(x)))
    for i, (units, f) in enumerate(zip(self.units, self.filters)):
      for j in range(units):
        name, stride = f"stage{i + 1}_unit{j + 1}", (2, 2) if i > 0 and j == 0 else (1, 1)
        act1 = nn.relu(bn(name=f"{name}_bn1")(x))
        y = conv(f, (3, 3), stride, name=f"{name}_conv1")(act1)
        y = conv(f, (3, 3), name=f"{name}_conv2")(nn.relu(bn(name=f"{name}_bn2")(y)))
        x = y + (x if j > 0 else conv(f, (1, 1), stride, name=f"{name}_sc")(act1))
    x = jnp.mean(nn.relu(bn(name="bn1")(x)), axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc1")(x)


@functools.cache
def mxnet_resnet():
  model = MXNetPreActResNet()
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  variables = model.init(jax.random.key(0), x)

  def apply(params, x):
    return model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)

  return variables["params"], apply, x


def stage_id(path: str) -> int:
  """By hand: the stem before stage 1, stages 1 and 2 are blocks 0 and 1 (ids 1, 2),
  ``bn1`` and ``fc1`` after."""
  top = path.split("/")[0]
  if top in ("bn_data", "conv0", "bn0"):
    return 0
  if top in ("bn1", "fc1"):
    return 3
  return {"stage1": 1, "stage2": 2}[top.split("_")[0]]


@pytest.mark.parametrize("source", ["infer", "layer_depths"])
def test_blocks_regex_on_flat_stage_unit_names(source):
  params, apply, x = mxnet_resnet()
  kw = {"granularity": "block", "blocks": r"^stage(\d+)_"}
  if source == "infer":
    depths = odn.infer_depths(apply, params, x, **kw)
  else:
    depths = odn.layer_depths(params, **kw)
  got = flat(depths)
  assert got == {path: stage_id(path) for path in flat(params)}
  # Stages are numbered from 1: ids are ranks in order (1, 2), not the index + 1.
  assert got["stage1_unit2_conv1/kernel"] == 1 and got["stage2_unit1_sc/kernel"] == 2
  # The pre-activation BN of a unit acts on the previous unit's (or the stem's) output:
  # it belongs to its own stage.
  assert got["stage1_unit1_bn1/scale"] == got["stage1_unit1_bn1/bias"] == 1
  assert got["stage2_unit1_bn1/scale"] == 2


def gpt_tree(n: int = 3) -> dict:
  """nanoGPT / GPT-2 names with Linen-style ``h_{i}`` blocks, in creation order."""
  w = functools.partial(jnp.ones, dtype=jnp.float32)
  block = lambda: {
    "ln_1": {"scale": w(4), "bias": w(4)},
    "attn": {"c_attn": {"kernel": w((4, 12))}, "c_proj": {"kernel": w((4, 4))}},
    "ln_2": {"scale": w(4), "bias": w(4)},
    "mlp": {"c_fc": {"kernel": w((4, 16))}, "c_proj": {"kernel": w((16, 4))}},
  }
  tree = {"wte": {"embedding": w((10, 4))}, "wpe": {"embedding": w((8, 4))}}
  tree.update({f"h_{i}": block() for i in range(n)})
  tree["ln_f"] = {"scale": w(4), "bias": w(4)}
  return tree


def test_blocks_regex_on_h_names():
  depths = sorted_inside_blocks(
    lambda: odn.layer_depths(gpt_tree(), granularity="block", blocks=r"^h_(\d+)/")
  )
  depths = flat(depths)
  want = {"wte": 0, "wpe": 0, "h_0": 1, "h_1": 2, "h_2": 3, "ln_f": 4}
  assert depths == {p: want[p.split("/")[0]] for p in flat(gpt_tree())}


# ----------------------------------------------------------------------------- automatic stems


def _dense(n_in: int, n_out: int) -> dict:
  return {"kernel": jnp.ones((n_in, n_out)), "bias": jnp.ones(n_out)}


def _block() -> dict:
  # a running-index group inside the block: it must not split the block
  return {"LayerNorm_0": {"scale": jnp.ones(4)}, "Dense_0": _dense(4, 8), "Dense_1": _dense(8, 4)}


@pytest.mark.parametrize("stem", ["encoderblock_", "blocks_", "layer_", "ResNetBlock_", "layers/"])
def test_automatic_blocks_on_hand_built_trees(stem):
  if stem == "layers/":
    tree = {"stem": _dense(2, 4), "layers": [_block() for _ in range(3)], "head": _dense(4, 2)}
  else:
    tree = {"stem": _dense(2, 4), **{f"{stem}{i}": _block() for i in range(3)}}
    tree["head"] = _dense(4, 2)
  depths = flat(odn.layer_depths(tree, granularity="block"))
  want = {"stem": 0, f"{stem}0": 1, f"{stem}1": 2, f"{stem}2": 3, "head": 4}
  assert depths == {p: want[longest_prefix(want, p)] for p in flat(tree)}
