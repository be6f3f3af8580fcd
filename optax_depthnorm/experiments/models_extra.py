"""More models of the experiments (Flax linen): a small DenseNet and a stacked row-by-row LSTM.

As in `models`, every model takes ``(x, train)`` and names its layers in
creation order with zero-padded numbers (``conv_00``, ``bn_01``, ...), so that
`index_depths` can count weight layers from the input.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from optax_depthnorm.experiments.models import _Namer

he = nn.initializers.he_normal()


class DenseNet(nn.Module):
  """A small DenseNet (Huang et al. 2017) for 1-channel images.

  A 3x3 stem conv of ``2 * growth`` channels, then `blocks` dense blocks of
  `layers` BN-ReLU-Conv3x3(`growth`) layers, each layer's output concatenated
  to its input (a block maps C channels to ``C + layers * growth``); between
  blocks a transition BN-ReLU-Conv1x1 to ``int(compression * C)`` channels
  and a 2x2 average pool; after the last block BN-ReLU, global average pooling
  and a Dense head. He-normal init, no conv biases; BatchNorm momentum 0.9
  (PyTorch's default 0.1 in its convention; Flax's 0.99 leaves the running
  statistics stale for the first few hundred steps). Each block's output is
  sown as ``intermediates/block_{b}`` (``mutable=["intermediates"]`` reads it).

  Attributes:
    blocks: dense blocks.
    layers: conv layers per block.
    growth: channels each layer adds.
    compression: channel factor of the transitions (0.5 is DenseNet-BC's).
    num_classes: outputs.
    bn_momentum: decay of BatchNorm's running statistics.
  """

  blocks: int = 3
  layers: int = 4
  growth: int = 8
  compression: float = 0.5
  num_classes: int = 10
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    name = _Namer()

    def bn_relu(x: jax.Array) -> jax.Array:
      return nn.relu(nn.BatchNorm(not train, momentum=self.bn_momentum, name=name("bn"))(x))

    def conv(x: jax.Array, channels: int, size: int) -> jax.Array:
      return nn.Conv(channels, (size, size), use_bias=False, kernel_init=he, name=name("conv"))(x)

    x = x[..., None] if x.ndim == 3 else x
    x = conv(x, 2 * self.growth, 3)
    for b in range(self.blocks):
      for _ in range(self.layers):
        x = jnp.concatenate([x, conv(bn_relu(x), self.growth, 3)], axis=-1)
      self.sow("intermediates", f"block_{b}", x)
      if b < self.blocks - 1:
        x = conv(bn_relu(x), max(1, int(self.compression * x.shape[-1])), 1)
        x = nn.avg_pool(x, (2, 2), (2, 2))
    x = jnp.mean(bn_relu(x), axis=(1, 2))
    return nn.Dense(self.num_classes, name=name("dense"))(x)


class LSTMLayer(nn.Module):
  """One LSTM layer over a (batch, time, features) sequence, laid out as PyTorch's.

  Three leaves: ``w_ih`` (features, 4 hidden), ``w_hh`` (hidden, 4 hidden)
  and ``bias`` (4 hidden), gates in PyTorch's order i, f, g, o, all drawn
  uniform in +-1/sqrt(hidden) (PyTorch's init; its two biases are one here).
  The input projection of every step is one matmul; `jax.lax.scan` runs the
  recurrence. Returns the hidden states, (batch, time, hidden).
  """

  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h, bound = self.hidden, self.hidden**-0.5
    init = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    w_ih = self.param("w_ih", init, (x.shape[-1], 4 * h))
    w_hh = self.param("w_hh", init, (h, 4 * h))
    bias = self.param("bias", init, (4 * h,))
    gates_x = jnp.einsum("btf,fg->tbg", x, w_ih) + bias[None, None]

    def step(carry: tuple[jax.Array, jax.Array], gx: jax.Array):
      h_prev, c_prev = carry
      i, f, g, o = jnp.split(gx + h_prev @ w_hh, 4, axis=-1)
      c = nn.sigmoid(f) * c_prev + nn.sigmoid(i) * jnp.tanh(g)
      h_new = nn.sigmoid(o) * jnp.tanh(c)
      return (h_new, c), h_new

    zeros = jnp.zeros((x.shape[0], h), x.dtype)
    _, hs = jax.lax.scan(step, (zeros, zeros), gates_x)
    return jnp.swapaxes(hs, 0, 1)


class RowLSTM(nn.Module):
  """A stack of `layers` LSTM layers reading an image row by row, and a Dense head.

  An (N, H, W) image is a sequence of H steps of W pixels; the head reads the
  last layer's final hidden state.

  Attributes:
    hidden: units per LSTM layer.
    layers: stacked LSTM layers.
    num_classes: outputs.
  """

  hidden: int = 64
  layers: int = 1
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    name = _Namer()
    x = x.reshape(x.shape[0], x.shape[1], -1)
    for _ in range(self.layers):
      x = LSTMLayer(self.hidden, name=name("lstm"))(x)
    return nn.Dense(self.num_classes, name=name("dense"))(x[:, -1])


def index_depths(params: dict[str, Any]) -> dict[str, Any]:
  """Depths by layer index: the d-th weight layer (conv, lstm, dense) has depth d.

  For the models here, whose top-level names number layers in creation order.
  A BatchNorm (``bn_*``) takes the depth of the weight layer it feeds (the
  next one: these nets are pre-activation, BN-ReLU-Conv), and the final BN
  that of the head. Returns a pytree of ints shaped like `params`, for the
  ``depths=`` argument of every transform.
  """
  keys = sorted(params, key=lambda k: int(k.rsplit("_", 1)[1]))
  weights = [k for k in keys if not k.startswith("bn_")]
  of, pending = {}, []
  for key in keys:
    if key.startswith("bn_"):
      pending.append(key)
      continue
    of[key] = weights.index(key)
    for bn in pending:
      of[bn] = of[key]
    pending = []
  for bn in pending:  # a BN after the last weight layer (none here): the deepest depth
    of[bn] = len(weights) - 1
  return {k: jax.tree.map(lambda _, d=of[k]: d, v) for k, v in params.items()}
