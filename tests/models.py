"""Small models shaped like real model code, with the layer order each one computes.

The depth the library gives a layer should follow the order the forward pass
uses the layers in, whatever the parameter tree's own key order is (Flax NNX and
`jax.jit` sort keys, Linen numbers each class on its own: ``Conv_0, BatchNorm_0,
Conv_1``). These fixtures rebuild the module names, nesting, creation order and
init style of well-known model code at toy sizes (widths 4-16, two blocks), so a
test can compare the library's depths with the true order. Once JAX has compiled
their ops in a process (seconds, once per new op shape: Linen inits unjitted),
each one builds and runs in a small fraction of a second on CPU.

Each factory takes no required argument and returns a `Fixture`:

* ``params``: for Linen the ``["params"]`` dict of an unjitted ``model.init``
  (which keeps creation order), for NNX ``nnx.state(model, nnx.Param)``, for
  Equinox ``eqx.filter(model, eqx.is_inexact_array)``.
* ``apply(params, x)``: pure, jittable and differentiable in ``params``; models
  with batch statistics or dropout run in eval mode.
* ``order``: every parameter-holding layer once, in the order the forward pass
  first uses it, input side first. A layer is the ``'/'``-joined path of a leaf
  without its last key (``"Transformer/encoder_norm"`` for
  ``Transformer/encoder_norm/scale``); a leaf straight under the root is its own
  layer (big_vision's ``cls`` and ``pos_embedding``). `layer_names` computes the
  set from a tree.

What each fixture follows (module names, nesting, creation order, inits):

* `linen_stem_body_head`: three named Dense layers, names sorting against order.
* `linen_cnn`: google/flax ``examples/imagenet/models.py`` layer style (bias-free
  Conv, BatchNorm momentum 0.9 / eps 1e-5, max-pool stem, mean-pool, Dense),
  plain rather than residual, with Linen's auto-names.
* `nnx_list_head`: an ``nnx.List`` of ``nnx.Linear`` and then a ``head``.
* `linen_vit`: google-research/big_vision ``big_vision/models/vit.py``.
* `linen_encoder_decoder`: google/flax ``examples/wmt/models.py`` with shared
  embeddings and logits through ``attend``.
* `equinox_bert`: patrick-kidger/equinox ``docs/examples/bert.ipynb``.
* `nnx_gemma`: google/flax ``examples/gemma/`` (``transformer.py``,
  ``modules.py``, ``layers.py``), the recent NNX version (``nnx.Einsum``
  kernels, ``ScaledEmbed``), Gemma-2 style with post-norms and GQA.
* `linen_vae`: google/flax ``examples/vae/models.py``.

Not in `ALL` (`BLOCKS`, for ``tests/test_blocks.py``), three blocks each:

* `linen_vit_scan`: big_vision's ViT with ``scan=True`` (``nn.scan`` of ``nn.remat``
  of the block: one ``Transformer/encoderblock`` whose leaves stack the blocks).
* `nnx_vit`: the NNX ViT of the JAX AI stack tutorial (jax-ml/jax-ai-stack,
  ``docs/source/JAX_Vision_transformer.md``).
* `linen_resnet`: google/flax ``examples/imagenet/models.py`` ``ResNet`` with
  ``ResNetBlock``, batch statistics closed over.

The code is written for these tests; only the structure follows the originals.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Fixture(NamedTuple):
  """One model, its parameters, a pure apply, an input and its true layer order."""

  name: str
  model: Any
  params: Any
  apply: Callable[[Any, Any], Any]
  x: Any
  order: list[str]
  extra: dict[str, Any]


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def layer_name(path: Any) -> str:
  """The layer a leaf belongs to: its path less the last key (and NNX's ``value``)."""
  parts = [_key_name(k) for k in path]
  if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value":
    parts = parts[:-1]
  return "/".join(parts if len(parts) <= 1 else parts[:-1])


def layer_names(params: Any) -> list[str]:
  """The distinct layers of a tree's array leaves, in flatten order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  return list(dict.fromkeys(layer_name(p) for p, _ in leaves))


XAVIER = nn.initializers.xavier_uniform()
TINY_NORMAL = nn.initializers.normal(stddev=1e-6)  # the bias init of both MLP blocks


def _normal(seed: int, *shape: int) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _tokens(seed: int, shape: tuple[int, ...], vocab: int) -> jax.Array:
  # ids from 1: 0 is padding in the masks of the WMT and BERT models
  return jax.random.randint(jax.random.key(seed), shape, 1, vocab, jnp.int32)


def _linen_fixture(name, model, x, order, *, seed, **extra):
  """A Linen model whose only collection is ``params``; a tuple ``x`` is several args."""
  args = x if isinstance(x, tuple) else (x,)
  variables = model.init(jax.random.key(seed), *args)

  def apply(params, x):
    return model.apply({"params": params}, *(x if isinstance(x, tuple) else (x,)))

  extra = {"variables": variables, **extra}
  return Fixture(name, model, variables["params"], apply, x, order, extra)


# ----------------------------------------------------------------------------- 1. stem/body/head


class StemBodyHead(nn.Module):
  """Three explicitly named Dense layers; alphabetical order is body, head, stem."""

  width: int = 8
  num_classes: int = 3

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.width, name="stem")(x))
    x = nn.relu(nn.Dense(self.width, name="body")(x))
    return nn.Dense(self.num_classes, name="head")(x)


def linen_stem_body_head(seed: int = 0) -> Fixture:
  return _linen_fixture(
    "linen_stem_body_head",
    StemBodyHead(),
    _normal(seed + 1, 2, 4),
    ["stem", "body", "head"],
    seed=seed,
  )


# ----------------------------------------------------------------------------- 2. plain CNN


class CNN(nn.Module):
  """A plain Conv/BatchNorm stack in the imagenet ResNet's layer style, auto-named."""

  num_classes: int = 5
  num_filters: int = 4

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5
    )
    x = conv(self.num_filters, (3, 3), (2, 2), padding=[(1, 1), (1, 1)])(x)  # Conv_0
    x = nn.relu(norm()(x))  # BatchNorm_0
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    x = nn.relu(norm()(conv(self.num_filters * 2, (3, 3))(x)))  # Conv_1, BatchNorm_1
    x = nn.relu(norm()(conv(self.num_filters * 2, (3, 3))(x)))  # Conv_2, BatchNorm_2
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)  # Dense_0


def linen_cnn(seed: int = 0) -> Fixture:
  model = CNN()
  x = _normal(seed + 1, 2, 8, 8, 3)
  variables = model.init(jax.random.key(seed), x, train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]

  def apply(params, x):
    return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

  def apply_train(params, batch_stats, x):
    """Training mode: returns ``(logits, new_batch_stats)``."""
    out, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return out, updates["batch_stats"]

  order = ["Conv_0", "BatchNorm_0", "Conv_1", "BatchNorm_1", "Conv_2", "BatchNorm_2", "Dense_0"]
  extra = {"variables": variables, "batch_stats": batch_stats, "apply_train": apply_train}
  return Fixture("linen_cnn", model, params, apply, x, order, extra)


# ----------------------------------------------------------------------------- NNX plumbing


def _nnx_fixture(name, model, x, order, call=None, **extra):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  call = call or (lambda m, x: m(x))

  def apply(params, x):
    return call(nnx.merge(graphdef, params, rest), x)

  extra = {"graphdef": graphdef, "rest": rest, **extra}
  return Fixture(name, model, params, apply, x, order, extra)


# ----------------------------------------------------------------------------- 3. NNX list + head


class ListHead(nnx.Module):
  """``layers`` (an ``nnx.List``) then ``head``: NNX sorts ``head`` first."""

  def __init__(self, rngs: nnx.Rngs, din: int = 4, width: int = 8, dout: int = 3):
    dims = [din, width, width, width]
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(dims)])
    self.head = nnx.Linear(width, dout, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return self.head(x)


def nnx_list_head(seed: int = 0) -> Fixture:
  order = ["layers/0", "layers/1", "layers/2", "head"]
  return _nnx_fixture("nnx_list_head", ListHead(nnx.Rngs(seed)), _normal(seed + 1, 2, 4), order)


# ----------------------------------------------------------------------------- 4. big_vision ViT


class MlpBlock(nn.Module):
  """The transformer MLP of big_vision's vit.py and of WMT: Dense, activation, Dense.

  One class for both, as Linen auto-names a submodule after its class
  (``MlpBlock_0``): big_vision uses gelu and a default width of 4x the input, WMT
  uses relu and ``config.mlp_dim``; both init kernels xavier-uniform and biases
  normal(1e-6).
  """

  mlp_dim: int | None = None
  act: Callable = nn.gelu
  kernel_init: Callable = XAVIER
  bias_init: Callable = TINY_NORMAL

  @nn.compact
  def __call__(self, x):
    inits = {"kernel_init": self.kernel_init, "bias_init": self.bias_init}
    d = x.shape[-1]
    x = self.act(nn.Dense(self.mlp_dim or 4 * d, **inits)(x))
    return nn.Dense(d, **inits)(x)


class ViTEncoder1DBlock(nn.Module):
  """big_vision ``Encoder1DBlock``: pre-norm self-attention, then pre-norm MLP."""

  mlp_dim: int | None = None
  num_heads: int = 2

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform(), deterministic=True
    )(y, y)
    x = x + y
    y = MlpBlock(mlp_dim=self.mlp_dim)(nn.LayerNorm()(x))
    return x + y


class ViTEncoder(nn.Module):
  """big_vision ``Encoder`` (unscanned): ``encoderblock_{i}``, then ``encoder_norm``."""

  depth: int
  mlp_dim: int | None = None
  num_heads: int = 2

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = ViTEncoder1DBlock(self.mlp_dim, self.num_heads, name=f"encoderblock_{i}")(x)
    return nn.LayerNorm(name="encoder_norm")(x)


class ViT(nn.Module):
  """big_vision ``_Model`` with a learned posemb and the ``tok`` pool (so a ``cls``).

  As in vit.py, ``pos_embedding`` lives on this module (not in ``Transformer``)
  and is created and added before ``cls`` is concatenated.
  """

  num_classes: int = 5
  patch_size: tuple[int, int] = (4, 4)
  width: int = 8
  depth: int = 2
  mlp_dim: int | None = 16
  num_heads: int = 2
  head_zeroinit: bool = True
  scan: bool = False

  @nn.compact
  def __call__(self, image):
    x = nn.Conv(
      self.width, self.patch_size, strides=self.patch_size, padding="VALID", name="embedding"
    )(image)
    n, h, w, c = x.shape
    x = jnp.reshape(x, [n, h * w, c])
    posemb = self.param(
      "pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(c)), (1, h * w, c), x.dtype
    )
    x = x + posemb
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c), x.dtype)
    x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]), x], axis=1)
    if self.scan:  # vit.py's scan=True: one `encoderblock` whose params stack
      x, _ = ScanViTEncoder(self.depth, self.mlp_dim, self.num_heads, name="Transformer")(x)
    else:
      x = ViTEncoder(self.depth, self.mlp_dim, self.num_heads, name="Transformer")(x)
    x = x[:, 0]
    kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
    return nn.Dense(self.num_classes, name="head", **kw)(x)


def _attention(prefix: str) -> list[str]:
  return [f"{prefix}/{k}" for k in ("query", "key", "value", "out")]


def linen_vit(seed: int = 0, head_zeroinit: bool = True) -> Fixture:
  """big_vision ViT; ``head_zeroinit=False`` gives gradients beyond the zero head."""
  model = ViT(head_zeroinit=head_zeroinit)
  order = ["embedding", "pos_embedding", "cls"]
  for i in range(model.depth):
    b = f"Transformer/encoderblock_{i}"
    order += [f"{b}/LayerNorm_0", *_attention(f"{b}/MultiHeadDotProductAttention_0")]
    order += [f"{b}/LayerNorm_1", f"{b}/MlpBlock_0/Dense_0", f"{b}/MlpBlock_0/Dense_1"]
  order += ["Transformer/encoder_norm", "head"]
  return _linen_fixture("linen_vit", model, _normal(seed + 1, 2, 8, 8, 3), order, seed=seed)


# ----------------------------------------------------------------------------- 5. WMT enc-dec


@dataclasses.dataclass(frozen=True)
class WMTConfig:
  """The WMT ``TransformerConfig`` fields these modules read (eval mode, no dropout)."""

  vocab_size: int = 16
  output_vocab_size: int = 16
  share_embeddings: bool = True
  logits_via_embedding: bool = True
  emb_dim: int = 8
  num_heads: int = 2
  num_layers: int = 2
  qkv_dim: int = 8
  mlp_dim: int = 16
  max_len: int = 16
  kernel_init: Callable = XAVIER
  bias_init: Callable = TINY_NORMAL


def _sinusoid(max_len: int, d: int, min_scale: float = 1.0, max_scale: float = 10000.0):
  position = np.arange(max_len)[:, None]
  scale = -np.log(max_scale / min_scale) / (d // 2 - 1)
  div = min_scale * np.exp(np.arange(d // 2) * scale)
  pe = np.zeros((max_len, d), np.float32)
  pe[:, : d // 2] = np.sin(position * div)
  pe[:, d // 2 : 2 * (d // 2)] = np.cos(position * div)
  return jnp.asarray(pe[None])


class AddPositionEmbs(nn.Module):
  """Fixed sinusoidal position embeddings (WMT's default ``posemb_init=None``): no params."""

  config: WMTConfig

  @nn.compact
  def __call__(self, inputs):
    pe = _sinusoid(self.config.max_len, inputs.shape[-1])
    return inputs + pe[:, : inputs.shape[1], :]


def _wmt_mlp(cfg: WMTConfig) -> MlpBlock:
  return MlpBlock(cfg.mlp_dim, nn.relu, cfg.kernel_init, cfg.bias_init)


def _wmt_attention(cfg: WMTConfig) -> nn.MultiHeadDotProductAttention:
  return nn.MultiHeadDotProductAttention(
    num_heads=cfg.num_heads,
    qkv_features=cfg.qkv_dim,
    kernel_init=cfg.kernel_init,
    bias_init=cfg.bias_init,
    use_bias=False,
    broadcast_dropout=False,
    deterministic=True,
  )


class Encoder1DBlock(nn.Module):
  """WMT encoder layer: LayerNorm_0, self-attention, LayerNorm_1, MlpBlock_0."""

  config: WMTConfig

  @nn.compact
  def __call__(self, inputs, encoder_mask=None):
    x = nn.LayerNorm()(inputs)
    x = _wmt_attention(self.config)(x, mask=encoder_mask) + inputs
    return x + _wmt_mlp(self.config)(nn.LayerNorm()(x))


class EncoderDecoder1DBlock(nn.Module):
  """WMT decoder layer: self-attention, cross-attention, MLP, each pre-normed."""

  config: WMTConfig

  @nn.compact
  def __call__(self, targets, encoded, decoder_mask=None, encoder_decoder_mask=None):
    x = nn.LayerNorm()(targets)
    x = _wmt_attention(self.config)(x, mask=decoder_mask) + targets
    y = nn.LayerNorm()(x)
    y = _wmt_attention(self.config)(y, encoded, mask=encoder_decoder_mask) + x
    return y + _wmt_mlp(self.config)(nn.LayerNorm()(y))


class WMTEncoder(nn.Module):
  config: WMTConfig
  shared_embedding: Any = None

  @nn.compact
  def __call__(self, inputs, encoder_mask=None):
    x = self.shared_embedding(inputs.astype("int32"))
    x = AddPositionEmbs(self.config, name="posembed_input")(x)
    for i in range(self.config.num_layers):
      x = Encoder1DBlock(self.config, name=f"encoderblock_{i}")(x, encoder_mask)
    return nn.LayerNorm(name="encoder_norm")(x)


def shift_right(x):
  return jnp.pad(x, [(0, 0), (1, 0)])[:, :-1]


class WMTDecoder(nn.Module):
  config: WMTConfig
  shared_embedding: Any = None

  @nn.compact
  def __call__(self, encoded, targets, decoder_mask=None, encoder_decoder_mask=None):
    y = self.shared_embedding(shift_right(targets.astype("int32")))
    y = AddPositionEmbs(self.config, name="posembed_output")(y)
    for i in range(self.config.num_layers):
      y = EncoderDecoder1DBlock(self.config, name=f"encoderdecoderblock_{i}")(
        y, encoded, decoder_mask=decoder_mask, encoder_decoder_mask=encoder_decoder_mask
      )
    y = nn.LayerNorm(name="encoderdecoder_norm")(y)
    return self.shared_embedding.attend(y) / jnp.sqrt(y.shape[-1])


class WMTTransformer(nn.Module):
  """WMT ``Transformer``: ``shared_embedding`` made in setup, passed to both halves."""

  config: WMTConfig = WMTConfig()

  def setup(self):
    cfg = self.config
    self.shared_embedding = nn.Embed(
      num_embeddings=cfg.vocab_size,
      features=cfg.emb_dim,
      embedding_init=nn.initializers.normal(stddev=1.0),
    )
    self.encoder = WMTEncoder(cfg, shared_embedding=self.shared_embedding)
    self.decoder = WMTDecoder(cfg, shared_embedding=self.shared_embedding)

  def __call__(self, inputs, targets):
    encoded = self.encoder(inputs, encoder_mask=nn.make_attention_mask(inputs > 0, inputs > 0))
    decoder_mask = nn.combine_masks(
      nn.make_attention_mask(targets > 0, targets > 0), nn.make_causal_mask(targets)
    )
    return self.decoder(
      encoded,
      targets,
      decoder_mask=decoder_mask,
      encoder_decoder_mask=nn.make_attention_mask(targets > 0, inputs > 0),
    )


def linen_encoder_decoder(seed: int = 0) -> Fixture:
  """WMT Transformer; ``x`` is ``(inputs, targets)``, int token ids."""
  model = WMTTransformer()
  cfg = model.config
  x = (_tokens(seed + 1, (2, 6), cfg.vocab_size), _tokens(seed + 2, (2, 5), cfg.vocab_size))
  order = ["shared_embedding"]
  for i in range(cfg.num_layers):
    b = f"encoder/encoderblock_{i}"
    order += [f"{b}/LayerNorm_0", *_attention(f"{b}/MultiHeadDotProductAttention_0")]
    order += [f"{b}/LayerNorm_1", f"{b}/MlpBlock_0/Dense_0", f"{b}/MlpBlock_0/Dense_1"]
  order += ["encoder/encoder_norm"]
  for i in range(cfg.num_layers):
    b = f"decoder/encoderdecoderblock_{i}"
    order += [f"{b}/LayerNorm_0", *_attention(f"{b}/MultiHeadDotProductAttention_0")]
    order += [f"{b}/LayerNorm_1", *_attention(f"{b}/MultiHeadDotProductAttention_1")]
    order += [f"{b}/LayerNorm_2", f"{b}/MlpBlock_0/Dense_0", f"{b}/MlpBlock_0/Dense_1"]
  order += ["decoder/encoderdecoder_norm"]
  return _linen_fixture("linen_encoder_decoder", model, x, order, seed=seed)


# ----------------------------------------------------------------------------- 6. Equinox BERT


class EmbedderBlock(eqx.Module):
  token_embedder: eqx.nn.Embedding
  segment_embedder: eqx.nn.Embedding
  position_embedder: eqx.nn.Embedding
  layernorm: eqx.nn.LayerNorm
  dropout: eqx.nn.Dropout

  def __init__(
    self, vocab_size, max_length, type_vocab_size, embedding_size, hidden_size, dropout_rate, key
  ):
    token_key, segment_key, position_key = jax.random.split(key, 3)
    self.token_embedder = eqx.nn.Embedding(vocab_size, embedding_size, key=token_key)
    self.segment_embedder = eqx.nn.Embedding(type_vocab_size, embedding_size, key=segment_key)
    self.position_embedder = eqx.nn.Embedding(max_length, embedding_size, key=position_key)
    self.layernorm = eqx.nn.LayerNorm(shape=hidden_size)
    self.dropout = eqx.nn.Dropout(dropout_rate)

  def __call__(self, token_ids, position_ids, segment_ids, enable_dropout=False, key=None):
    x = (
      jax.vmap(self.token_embedder)(token_ids)
      + jax.vmap(self.segment_embedder)(segment_ids)
      + jax.vmap(self.position_embedder)(position_ids)
    )
    x = jax.vmap(self.layernorm)(x)
    return self.dropout(x, inference=not enable_dropout, key=key)


class FeedForwardBlock(eqx.Module):
  """Per token: ``mlp``, gelu, ``output``, residual, then ``layernorm`` (post-norm)."""

  mlp: eqx.nn.Linear
  output: eqx.nn.Linear
  layernorm: eqx.nn.LayerNorm
  dropout: eqx.nn.Dropout

  def __init__(self, hidden_size, intermediate_size, dropout_rate, key):
    mlp_key, output_key = jax.random.split(key)
    self.mlp = eqx.nn.Linear(hidden_size, intermediate_size, key=mlp_key)
    self.output = eqx.nn.Linear(intermediate_size, hidden_size, key=output_key)
    self.layernorm = eqx.nn.LayerNorm(shape=hidden_size)
    self.dropout = eqx.nn.Dropout(dropout_rate)

  def __call__(self, inputs, enable_dropout=True, key=None):
    hidden = jax.nn.gelu(self.mlp(inputs))
    output = self.dropout(self.output(hidden), inference=not enable_dropout, key=key)
    return self.layernorm(output + inputs)


class AttentionBlock(eqx.Module):
  """Self-attention (biased q/k/v/out projections), residual, then ``layernorm``."""

  attention: eqx.nn.MultiheadAttention
  layernorm: eqx.nn.LayerNorm
  dropout: eqx.nn.Dropout
  num_heads: int = eqx.field(static=True)

  def __init__(self, hidden_size, num_heads, dropout_rate, attention_dropout_rate, key):
    self.num_heads = num_heads
    self.attention = eqx.nn.MultiheadAttention(
      num_heads=num_heads,
      query_size=hidden_size,
      use_query_bias=True,
      use_key_bias=True,
      use_value_bias=True,
      use_output_bias=True,
      dropout_p=attention_dropout_rate,
      key=key,
    )
    self.layernorm = eqx.nn.LayerNorm(shape=hidden_size)
    self.dropout = eqx.nn.Dropout(dropout_rate)

  def __call__(self, inputs, mask, enable_dropout=False, key=None):
    if mask is not None:
      mask = jnp.expand_dims(mask, -1) * jnp.expand_dims(mask, -2)
      mask = jnp.repeat(mask[None], self.num_heads, axis=0).astype(bool)
    attention_key, dropout_key = (None, None) if key is None else jax.random.split(key)
    result = self.attention(
      inputs, inputs, inputs, mask=mask, inference=not enable_dropout, key=attention_key
    )
    result = self.dropout(result, inference=not enable_dropout, key=dropout_key)
    return jax.vmap(self.layernorm)(result + inputs)


class TransformerLayer(eqx.Module):
  attention_block: AttentionBlock
  ff_block: FeedForwardBlock

  def __init__(
    self, hidden_size, intermediate_size, num_heads, dropout_rate, attention_dropout_rate, key
  ):
    attention_key, ff_key = jax.random.split(key)
    self.attention_block = AttentionBlock(
      hidden_size, num_heads, dropout_rate, attention_dropout_rate, attention_key
    )
    self.ff_block = FeedForwardBlock(hidden_size, intermediate_size, dropout_rate, ff_key)

  def __call__(self, inputs, mask=None, *, enable_dropout=False, key=None):
    attn_key, ff_key = (None, None) if key is None else jax.random.split(key)
    x = self.attention_block(inputs, mask, enable_dropout=enable_dropout, key=attn_key)
    ff_keys = None if ff_key is None else jax.random.split(ff_key, x.shape[0])
    return jax.vmap(self.ff_block, in_axes=(0, None, 0))(x, enable_dropout, ff_keys)


class BertEncoder(eqx.Module):
  """The notebook's ``Encoder``: ``embedder_block``, ``layers`` (a list), ``pooler``."""

  embedder_block: EmbedderBlock
  layers: list[TransformerLayer]
  pooler: eqx.nn.Linear

  def __init__(
    self,
    vocab_size,
    max_length,
    type_vocab_size,
    embedding_size,
    hidden_size,
    intermediate_size,
    num_layers,
    num_heads,
    dropout_rate,
    attention_dropout_rate,
    key,
  ):
    embedder_key, layer_key, pooler_key = jax.random.split(key, 3)
    self.embedder_block = EmbedderBlock(
      vocab_size,
      max_length,
      type_vocab_size,
      embedding_size,
      hidden_size,
      dropout_rate,
      embedder_key,
    )
    self.layers = [
      TransformerLayer(
        hidden_size, intermediate_size, num_heads, dropout_rate, attention_dropout_rate, k
      )
      for k in jax.random.split(layer_key, num_layers)
    ]
    self.pooler = eqx.nn.Linear(hidden_size, hidden_size, key=pooler_key)

  def __call__(self, token_ids, position_ids, segment_ids, *, enable_dropout=False, key=None):
    emb_key, l_key = (None, None) if key is None else jax.random.split(key)
    x = self.embedder_block(token_ids, position_ids, segment_ids, enable_dropout, emb_key)
    mask = jnp.asarray(token_ids != 0, dtype=jnp.int32)
    for layer in self.layers:
      cl_key, l_key = (None, None) if l_key is None else jax.random.split(l_key)
      x = layer(x, mask, enable_dropout=enable_dropout, key=cl_key)
    return {"pooled": jnp.tanh(self.pooler(x[..., 0, :]))}


class BertClassifier(eqx.Module):
  encoder: BertEncoder
  classifier_head: eqx.nn.Linear
  dropout: eqx.nn.Dropout

  def __init__(self, config, num_classes, key):
    encoder_key, head_key = jax.random.split(key)
    self.encoder = BertEncoder(
      vocab_size=config["vocab_size"],
      max_length=config["max_position_embeddings"],
      type_vocab_size=config["type_vocab_size"],
      embedding_size=config["hidden_size"],
      hidden_size=config["hidden_size"],
      intermediate_size=config["intermediate_size"],
      num_layers=config["num_hidden_layers"],
      num_heads=config["num_attention_heads"],
      dropout_rate=config["hidden_dropout_prob"],
      attention_dropout_rate=config["attention_probs_dropout_prob"],
      key=encoder_key,
    )
    self.classifier_head = eqx.nn.Linear(config["hidden_size"], num_classes, key=head_key)
    self.dropout = eqx.nn.Dropout(config["hidden_dropout_prob"])

  def __call__(self, inputs, enable_dropout=True, key=None):
    position_ids = jnp.arange(inputs["token_ids"].shape[-1])
    e_key, d_key = (None, None) if key is None else jax.random.split(key)
    pooled = self.encoder(
      inputs["token_ids"],
      position_ids,
      inputs["segment_ids"],
      enable_dropout=enable_dropout,
      key=e_key,
    )["pooled"]
    pooled = self.dropout(pooled, inference=not enable_dropout, key=d_key)
    return self.classifier_head(pooled)


BERT_CONFIG = {
  "vocab_size": 16,
  "hidden_size": 8,
  "num_hidden_layers": 2,
  "num_attention_heads": 2,
  "intermediate_size": 16,
  "hidden_dropout_prob": 0.1,
  "attention_probs_dropout_prob": 0.1,
  "max_position_embeddings": 8,
  "type_vocab_size": 2,
}


def equinox_bert(seed: int = 0) -> Fixture:
  """Tiny BERT classifier; ``x`` is a batch dict of ``token_ids`` and ``segment_ids``."""
  model = BertClassifier(BERT_CONFIG, num_classes=2, key=jax.random.key(seed))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  x = {
    "token_ids": _tokens(seed + 1, (2, 6), BERT_CONFIG["vocab_size"]),
    "segment_ids": jnp.asarray([[0, 0, 0, 1, 1, 1]] * 2, jnp.int32),
  }

  def apply(params, x):
    m = eqx.combine(params, static)
    return jax.vmap(lambda inputs: m(inputs, enable_dropout=False))(x)

  e = "encoder/embedder_block"
  order = [f"{e}/token_embedder", f"{e}/segment_embedder", f"{e}/position_embedder"]
  order += [f"{e}/layernorm"]
  for i in range(BERT_CONFIG["num_hidden_layers"]):
    a, f = f"encoder/layers/{i}/attention_block", f"encoder/layers/{i}/ff_block"
    order += [f"{a}/attention/{p}_proj" for p in ("query", "key", "value", "output")]
    order += [f"{a}/layernorm", f"{f}/mlp", f"{f}/output", f"{f}/layernorm"]
  order += ["encoder/pooler", "classifier_head"]
  return Fixture("equinox_bert", model, params, apply, x, order, {"static": static})


# ----------------------------------------------------------------------------- 7. NNX Gemma


class AttentionType(enum.Enum):
  GLOBAL = 1
  LOCAL_SLIDING = 2


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """The Gemma ``TransformerConfig`` fields these modules read (Gemma-2 style)."""

  num_layers: int = 2
  num_embed: int = 16
  embed_dim: int = 8
  hidden_dim: int = 16
  num_heads: int = 2
  head_dim: int = 4
  num_kv_heads: int = 1
  final_logit_softcap: float | None = 30.0
  use_post_attn_norm: bool = True
  use_post_ffw_norm: bool = True
  attention_types: tuple[AttentionType, ...] = (AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL)
  attn_logits_soft_cap: float | None = 50.0
  sliding_window_size: int | None = 3

  def query_pre_attn_scalar(self) -> float:
    return self.head_dim**-0.5


class ScaledEmbed(nnx.Embed):
  """Gemma's embedder: ``nnx.Embed`` scaled by sqrt(dim); logits come from ``attend``."""

  def __call__(self, x):
    x = super().__call__(x)
    return x * jnp.sqrt(x.shape[-1]).astype(x.dtype)


class RMSNorm(nnx.Module):
  """Gemma RMSNorm: a zero-initialised ``scale``, applied as ``1 + scale``."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.scale = nnx.Param(nnx.initializers.zeros_init()(rngs.params(), (dim,)))

  def __call__(self, x):
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    scale = jnp.reshape(self.scale[...], (1,) * (x.ndim - 1) + (-1,))
    return x * jax.lax.rsqrt(var + 1e-6) * (1 + scale)


def apply_rope(x, positions, max_wavelength: int = 10_000):
  """Rotary embedding of ``x`` [B, T, N, H] at ``positions`` [B, T]."""
  half = x.shape[-1] // 2
  timescale = max_wavelength ** (2 * jnp.arange(half, dtype=jnp.float32) / x.shape[-1])
  angle = positions[..., None, None].astype(jnp.float32) / timescale[None, None, None, :]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  first, second = x[..., :half], x[..., half:]
  return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


class GemmaAttention(nnx.Module):
  """Gemma ``Attention``: ``attn_vec_einsum`` is created first but used last."""

  def __init__(self, config: GemmaConfig, attn_type: AttentionType, *, rngs: nnx.Rngs):
    n, k, d, h = config.num_heads, config.num_kv_heads, config.embed_dim, config.head_dim
    init = nnx.initializers.normal()
    self.query_pre_attn_scalar = config.query_pre_attn_scalar()
    self.attn_type = attn_type
    self.sliding_window_size = config.sliding_window_size
    self.attn_logits_soft_cap = config.attn_logits_soft_cap
    self.attn_vec_einsum = nnx.Einsum("BTNH,NHD->BTD", (n, h, d), kernel_init=init, rngs=rngs)
    if n == k:
      self.qkv_einsum = nnx.Einsum("BTD,SNDH->SBTNH", (3, n, d, h), kernel_init=init, rngs=rngs)
    else:
      self.q_einsum = nnx.Einsum("BTD,NDH->BTNH", (n, d, h), kernel_init=init, rngs=rngs)
      self.kv_einsum = nnx.Einsum("BTD,CKDH->CBTKH", (2, k, d, h), kernel_init=init, rngs=rngs)
    self.num_heads, self.num_kv_heads = n, k

  def __call__(self, x, segment_pos, cache, attn_mask):
    if self.num_heads == self.num_kv_heads:
      q, k, v = self.qkv_einsum(x)
    else:
      q = self.q_einsum(x)
      k, v = self.kv_einsum(x)
    q = apply_rope(q, segment_pos) * self.query_pre_attn_scalar
    k = apply_rope(k, segment_pos)
    b, t, _, h = q.shape
    groups = self.num_heads // self.num_kv_heads
    q = q.reshape(b, t, self.num_kv_heads, groups, h)
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", q, k).reshape(b, t, self.num_heads, -1)
    if self.attn_logits_soft_cap is not None:
      logits = jnp.tanh(logits / self.attn_logits_soft_cap) * self.attn_logits_soft_cap
    if self.attn_type == AttentionType.LOCAL_SLIDING:
      ones = jnp.ones(attn_mask.shape, attn_mask.dtype)
      window = self.sliding_window_size
      attn_mask = attn_mask * jnp.triu(ones, 1 - window) * jnp.tril(ones, window - 1)
    logits = jnp.where(attn_mask[:, :, None, :].astype(bool), logits, -2.3819763e38)
    probs = jax.nn.softmax(logits, axis=-1).reshape(b, t, self.num_kv_heads, groups, -1)
    encoded = jnp.einsum("BTKGS,BSKH->BTKGH", probs, v).reshape(b, t, self.num_heads, h)
    return cache, self.attn_vec_einsum(encoded)


class GemmaFeedForward(nnx.Module):
  """Gated GELU MLP: ``gate_proj`` and ``up_proj`` in parallel, then ``down_proj``."""

  def __init__(self, features: int, hidden_dim: int, *, rngs: nnx.Rngs):
    kw = {"use_bias": False, "kernel_init": nnx.initializers.normal(), "rngs": rngs}
    self.gate_proj = nnx.Linear(features, hidden_dim, **kw)
    self.up_proj = nnx.Linear(features, hidden_dim, **kw)
    self.down_proj = nnx.Linear(hidden_dim, features, **kw)

  def __call__(self, x):
    return self.down_proj(nnx.gelu(self.gate_proj(x)) * self.up_proj(x))


class GemmaBlock(nnx.Module):
  def __init__(self, config: GemmaConfig, attn_type: AttentionType, *, rngs: nnx.Rngs):
    d = config.embed_dim
    self.pre_attention_norm = RMSNorm(d, rngs=rngs)
    self.attn = GemmaAttention(config, attn_type, rngs=rngs)
    self.post_attention_norm = RMSNorm(d, rngs=rngs) if config.use_post_attn_norm else None
    self.pre_ffw_norm = RMSNorm(d, rngs=rngs)
    self.mlp = GemmaFeedForward(d, config.hidden_dim, rngs=rngs)
    self.post_ffw_norm = RMSNorm(d, rngs=rngs) if config.use_post_ffw_norm else None

  def __call__(self, x, segment_pos, cache, attn_mask):
    cache, attn_output = self.attn(self.pre_attention_norm(x), segment_pos, cache, attn_mask)
    if self.post_attention_norm is not None:
      attn_output = self.post_attention_norm(attn_output)
    x = x + attn_output
    ffw_outputs = self.mlp(self.pre_ffw_norm(x))
    if self.post_ffw_norm is not None:
      ffw_outputs = self.post_ffw_norm(ffw_outputs)
    return cache, x + ffw_outputs


class GemmaTransformer(nnx.Module):
  """Gemma ``Transformer``: ``embedder``, ``layers`` (``nnx.List``), ``final_norm``."""

  def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
    self.embedder = ScaledEmbed(config.num_embed, config.embed_dim, rngs=rngs)
    self.layers = nnx.List(
      [
        GemmaBlock(config, attn_type, rngs=rngs)
        for _, attn_type in zip(range(config.num_layers), config.attention_types)
      ]
    )
    self.final_norm = RMSNorm(config.embed_dim, rngs=rngs)
    self.final_logits_softcap = config.final_logit_softcap

  def __call__(self, last_tokens, positions, cache, attention_mask):
    x = self.embedder(last_tokens)
    for layer in self.layers:
      _, x = layer(x, positions, None, attention_mask)
    logits = self.embedder.attend(self.final_norm(x))
    if self.final_logits_softcap is not None:
      logits = jnp.tanh(logits / self.final_logits_softcap) * self.final_logits_softcap
    return logits, cache


def make_causal_attn_mask(input_mask):
  seq_len = input_mask.shape[-1]
  causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=jnp.bool_))
  return input_mask[..., None, :] & causal[None]


def _gemma_call(model, tokens):
  input_mask = tokens != 0
  positions = jnp.cumsum(input_mask, axis=-1)
  positions = positions - (positions >= 1)
  return model(tokens, positions, None, make_causal_attn_mask(input_mask))[0]


def nnx_gemma(seed: int = 0) -> Fixture:
  """Tiny Gemma-2-like decoder; ``x`` is int tokens [B, L], the output logits."""
  config = GemmaConfig()
  model = GemmaTransformer(config, rngs=nnx.Rngs(seed))
  order = ["embedder"]
  for i in range(config.num_layers):
    b = f"layers/{i}"
    order += [f"{b}/pre_attention_norm", f"{b}/attn/q_einsum", f"{b}/attn/kv_einsum"]
    order += [f"{b}/attn/attn_vec_einsum", f"{b}/post_attention_norm", f"{b}/pre_ffw_norm"]
    order += [f"{b}/mlp/gate_proj", f"{b}/mlp/up_proj", f"{b}/mlp/down_proj", f"{b}/post_ffw_norm"]
  order += ["final_norm"]
  x = _tokens(seed + 1, (2, 6), config.num_embed)
  return _nnx_fixture("nnx_gemma", model, x, order, call=_gemma_call, config=config)


# ----------------------------------------------------------------------------- 8. VAE


class VAEEncoder(nn.Module):
  latents: int
  hidden: int = 8

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
    mean_x = nn.Dense(self.latents, name="fc2_mean")(x)
    logvar_x = nn.Dense(self.latents, name="fc2_logvar")(x)
    return mean_x, logvar_x


class VAEDecoder(nn.Module):
  hidden: int = 8
  out: int = 12

  @nn.compact
  def __call__(self, z):
    z = nn.relu(nn.Dense(self.hidden, name="fc1")(z))
    return nn.Dense(self.out, name="fc2")(z)


def reparameterize(rng, mean, logvar):
  return mean + jax.random.normal(rng, logvar.shape) * jnp.exp(0.5 * logvar)


class VAE(nn.Module):
  latents: int = 4

  def setup(self):
    self.encoder = VAEEncoder(self.latents)
    self.decoder = VAEDecoder()

  def __call__(self, x, z_rng):
    mean, logvar = self.encoder(x)
    recon_x = self.decoder(reparameterize(z_rng, mean, logvar))
    return recon_x, mean, logvar


def linen_vae(seed: int = 0) -> Fixture:
  """The VAE; ``apply`` returns ``recon_x`` (its gradient reaches every layer).

  ``z_rng`` is fixed, so ``apply`` is pure; ``extra["apply_all"]`` returns the
  model's ``(recon_x, mean, logvar)``.
  """
  model = VAE()
  x = _normal(seed + 1, 2, 12)
  z_rng = jax.random.key(seed + 2)
  params = model.init(jax.random.key(seed), x, z_rng)["params"]

  def apply_all(params, x):
    return model.apply({"params": params}, x, z_rng)

  def apply(params, x):
    return apply_all(params, x)[0]

  order = ["encoder/fc1", "encoder/fc2_mean", "encoder/fc2_logvar", "decoder/fc1", "decoder/fc2"]
  extra = {"z_rng": z_rng, "apply_all": apply_all}
  return Fixture("linen_vae", model, params, apply, x, order, extra)


ALL = (
  linen_stem_body_head,
  linen_cnn,
  nnx_list_head,
  linen_vit,
  linen_encoder_decoder,
  equinox_bert,
  nnx_gemma,
  linen_vae,
)


# ----------------------------------------------------------------------------- block fixtures
#
# Not in `ALL`: the checks of `test_layer_map` that run on every fixture of `ALL`
# (creation order is the call order, one int per leaf, the NNX names it lists)
# do not all hold for these. `tests/test_blocks.py` uses them.


class ScanViTEncoder1DBlock(nn.Module):
  """big_vision ``Encoder1DBlock`` as ``scan=True`` runs it: returns ``(x, out)``.

  Same body (and so the same submodule names) as `ViTEncoder1DBlock`, with the
  ``deterministic`` argument and the dropouts of vit.py (rate 0 here).
  """

  mlp_dim: int | None = None
  num_heads: int = 2
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic=True):
    out = {}
    y = nn.LayerNorm()(x)
    y = out["sa"] = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      kernel_init=nn.initializers.xavier_uniform(),
      deterministic=deterministic,
    )(y, y)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = out["+sa"] = x + y
    y = nn.LayerNorm()(x)
    y = out["mlp"] = MlpBlock(mlp_dim=self.mlp_dim)(y)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = out["+mlp"] = x + y
    return x, out


class ScanViTEncoder(nn.Module):
  """big_vision ``Encoder`` with ``scan=True``: one ``encoderblock`` whose params stack.

  As in vit.py: ``nn.remat`` of the block (``static_argnums=(2,)``: 0 is self,
  2 ``deterministic``), then ``nn.scan`` with ``variable_axes={"params": 0}``, the
  input broadcast, ``length=depth``, named ``encoderblock``.
  """

  depth: int
  mlp_dim: int | None = None
  num_heads: int = 2
  dropout: float = 0.0
  remat_policy: str = "nothing_saveable"

  @nn.compact
  def __call__(self, x, deterministic=True):
    out = {}
    block = nn.remat(
      ScanViTEncoder1DBlock,
      prevent_cse=False,
      static_argnums=(2,),
      policy=getattr(jax.checkpoint_policies, self.remat_policy, None),
    )
    x, scan_out = nn.scan(
      block,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=nn.broadcast,
      length=self.depth,
    )(
      name="encoderblock", mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout
    )(x, deterministic)
    for lyr in range(self.depth):
      out[f"block{lyr:02d}"] = jax.tree.map(lambda o, lyr=lyr: o[lyr], scan_out)
    return nn.LayerNorm(name="encoder_norm")(x), out


def linen_vit_scan(seed: int = 0, head_zeroinit: bool = True) -> Fixture:
  """big_vision ViT with ``scan=True``, depth 3: ``Transformer/encoderblock`` leaves are
  ``(3, ...)`` stacks, one slice per block; ``apply`` returns the logits."""
  model = ViT(depth=3, head_zeroinit=head_zeroinit, scan=True)
  x = _normal(seed + 1, 2, 8, 8, 3)
  variables = model.init(jax.random.key(seed), x)

  def apply(params, x):
    return model.apply({"params": params}, x)

  b = "Transformer/encoderblock"
  order = ["embedding", "pos_embedding", "cls"]
  order += [f"{b}/LayerNorm_0", *_attention(f"{b}/MultiHeadDotProductAttention_0")]
  order += [f"{b}/LayerNorm_1", f"{b}/MlpBlock_0/Dense_0", f"{b}/MlpBlock_0/Dense_1"]
  order += ["Transformer/encoder_norm", "head"]
  extra = {"variables": variables, "stack_axis": {b: 0}}
  return Fixture("linen_vit_scan", model, variables["params"], apply, x, order, extra)


class ViTTransformerEncoder(nnx.Module):
  """The tutorial's ``TransformerEncoder``: ``norm1``, ``attn``, ``norm2``, ``mlp``.

  Pre-norm: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``; ``mlp`` is an
  ``nnx.Sequential`` (Linear, gelu, Dropout, Linear, Dropout), so its Linears
  sit at ``mlp/layers/0`` and ``mlp/layers/3``.
  """

  def __init__(self, hidden_size, mlp_dim, num_heads, dropout_rate=0.0, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(hidden_size, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      num_heads=num_heads,
      in_features=hidden_size,
      dropout_rate=dropout_rate,
      broadcast_dropout=False,
      decode=False,
      deterministic=False,
      rngs=rngs,
    )
    self.norm2 = nnx.LayerNorm(hidden_size, rngs=rngs)
    self.mlp = nnx.Sequential(
      nnx.Linear(hidden_size, mlp_dim, rngs=rngs),
      nnx.gelu,
      nnx.Dropout(dropout_rate, rngs=rngs),
      nnx.Linear(mlp_dim, hidden_size, rngs=rngs),
      nnx.Dropout(dropout_rate, rngs=rngs),
    )

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class NNXVisionTransformer(nnx.Module):
  """The tutorial's ``VisionTransformer``: an ``nnx.Conv`` patch embedding, ``cls_token``
  and ``position_embeddings`` params, ``encoder`` (an ``nnx.Sequential`` of blocks, so
  ``encoder/layers/{i}``), ``final_norm`` and a ``classifier``.

  As in the tutorial, ``position_embeddings`` is created before ``cls_token`` but
  added after the cls token is concatenated (it covers ``n_patches + 1`` tokens).
  """

  def __init__(
    self,
    num_classes: int = 5,
    in_channels: int = 3,
    img_size: int = 8,
    patch_size: int = 4,
    num_layers: int = 3,
    num_heads: int = 2,
    mlp_dim: int = 16,
    hidden_size: int = 8,
    dropout_rate: float = 0.1,
    *,
    rngs: nnx.Rngs,
  ):
    n_patches = (img_size // patch_size) ** 2
    self.patch_embeddings = nnx.Conv(
      in_channels,
      hidden_size,
      kernel_size=(patch_size, patch_size),
      strides=(patch_size, patch_size),
      padding="VALID",
      use_bias=True,
      rngs=rngs,
    )
    initializer = jax.nn.initializers.truncated_normal(stddev=0.02)
    self.position_embeddings = nnx.Param(
      initializer(rngs.params(), (1, n_patches + 1, hidden_size), jnp.float32)
    )
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.cls_token = nnx.Param(jnp.zeros((1, 1, hidden_size)))
    self.encoder = nnx.Sequential(
      *[
        ViTTransformerEncoder(hidden_size, mlp_dim, num_heads, dropout_rate, rngs=rngs)
        for _ in range(num_layers)
      ]
    )
    self.final_norm = nnx.LayerNorm(hidden_size, rngs=rngs)
    self.classifier = nnx.Linear(hidden_size, num_classes, rngs=rngs)

  def __call__(self, x):
    patches = self.patch_embeddings(x)
    batch_size = patches.shape[0]
    patches = patches.reshape(batch_size, -1, patches.shape[-1])
    cls_token = jnp.tile(self.cls_token[...], [batch_size, 1, 1])
    x = jnp.concat([cls_token, patches], axis=1)
    embeddings = self.dropout(x + self.position_embeddings[...])
    x = self.final_norm(self.encoder(embeddings))
    return self.classifier(x[:, 0])


def nnx_vit(seed: int = 0) -> Fixture:
  """The NNX ViT of the JAX AI stack tutorial (jax-ml/jax-ai-stack,
  ``docs/source/JAX_Vision_transformer.md``), 3 blocks, in eval mode (``model.eval()``:
  dropout and attention dropout off); ``x`` is images [B, 8, 8, 3]."""
  model = NNXVisionTransformer(rngs=nnx.Rngs(seed))
  model.eval()
  order = ["patch_embeddings", "cls_token", "position_embeddings"]
  for i in range(3):
    b = f"encoder/layers/{i}"
    order += [f"{b}/norm1", *_attention(f"{b}/attn"), f"{b}/norm2"]
    order += [f"{b}/mlp/layers/0", f"{b}/mlp/layers/3"]
  order += ["final_norm", "classifier"]
  return _nnx_fixture("nnx_vit", model, _normal(seed + 1, 2, 8, 8, 3), order)


class ResNetBlock(nn.Module):
  """google/flax ``examples/imagenet/models.py`` ``ResNetBlock`` (basic block).

  ``Conv_0, BatchNorm_0, Conv_1, BatchNorm_1`` (the last norm zero-scaled), then
  ``conv_proj`` and ``norm_proj`` on the shortcut where the shape changes.
  """

  filters: int
  conv: Any
  norm: Any
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  """google/flax ``examples/imagenet/models.py`` ``ResNet`` (V1): ``conv_init``,
  ``bn_init``, max-pool, ``ResNetBlock_{i}`` (auto-named, numbered across stages),
  mean-pool, ``Dense_0``."""

  stage_sizes: tuple[int, ...] = (1, 1, 1)
  block_cls: Any = ResNetBlock
  num_classes: int = 5
  num_filters: int = 4
  dtype: Any = jnp.float32
  act: Callable = nn.relu
  conv: Any = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype
    )
    x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
    x = norm(name="bn_init")(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(
          self.num_filters * 2**i, strides=strides, conv=conv, norm=norm, act=self.act
        )(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return jnp.asarray(x, self.dtype)


def linen_resnet(seed: int = 0) -> Fixture:
  """The imagenet ResNet, ``stage_sizes=(1, 1, 1)``, 4 filters; ``x`` is [2, 16, 16, 3].

  ``apply`` runs in eval mode on the init batch statistics (closed over, so only
  ``x`` is data); ``ResNetBlock_0`` keeps its shape (no projection), blocks 1 and 2
  halve the resolution and double the width (``conv_proj``, ``norm_proj``).
  """
  model = ResNet()
  x = _normal(seed + 1, 2, 16, 16, 3)
  variables = model.init(jax.random.key(seed), x, train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]

  def apply(params, x):
    return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

  order = ["conv_init", "bn_init"]
  for i in range(len(model.stage_sizes)):
    b = f"ResNetBlock_{i}"
    order += [f"{b}/Conv_0", f"{b}/BatchNorm_0", f"{b}/Conv_1", f"{b}/BatchNorm_1"]
    order += [f"{b}/conv_proj", f"{b}/norm_proj"] if i > 0 else []
  order += ["Dense_0"]
  extra = {"variables": variables, "batch_stats": batch_stats}
  return Fixture("linen_resnet", model, params, apply, x, order, extra)


BLOCKS = (linen_vit_scan, nnx_vit, linen_resnet)
"""The fixtures added for block granularity (`tests/test_blocks.py`), not in `ALL`."""
