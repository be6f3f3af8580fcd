"""The experiments' models (Flax linen): deep MLPs, ResNet-20 / Plain-20, VGG-style nets.

Every model takes ``(x, train)``: ``train=True`` uses batch statistics in
BatchNorm and updates them (``mutable=["batch_stats"]``). Layers are named in
creation order with zero-padded numbers, so names sort in depth order and
`optax_depthnorm.layer_depths` of the init dict labels them correctly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from optax_depthnorm import _bgn

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "relu": nn.relu,
  "sigmoid": nn.sigmoid,
  "tanh": jnp.tanh,
  "leaky_relu": nn.leaky_relu,  # slope 0.01, PyTorch's default
}
glorot = nn.initializers.glorot_uniform()  # Keras' default for Dense
torch_default = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # PyTorch's default
he = nn.initializers.he_normal()


def _maybe_bgn(x: jax.Array, on: bool) -> jax.Array:
  return _bgn.bgn(x) if on else x


class _DenseBlock(nn.Module):
  """Dense(width) -> [BatchNorm] -> [BGN] -> activation, as one scanned step."""

  width: int
  act: str
  bn: bool
  bgn: bool
  train: bool
  bn_momentum: float = 0.99

  @nn.compact
  def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
    x = nn.Dense(self.width, kernel_init=glorot, name="dense")(x)
    if self.bn:
      x = nn.BatchNorm(use_running_average=not self.train, momentum=self.bn_momentum, name="bn")(x)
    return ACTIVATIONS[self.act](_maybe_bgn(x, self.bgn)), None


class DeepMLP(nn.Module):
  """`depth` hidden Dense layers of `width` units (Cabana & Lago-Fernández, sec. 4).

  Each hidden layer is Dense -> [BatchNorm] -> [BGN] -> activation: BN on the
  pre-activation, BGN "just before every activation function". The 2nd to
  last hidden layers share a shape and run as one `nn.scan` (their parameters
  are stacked in one leaf per kind, axis 0 = layer), so that a 120-layer net
  compiles in seconds. Glorot-uniform kernels (the Keras default), zero biases.

  Attributes:
    depth: number of hidden layers (>= 1).
    width: units per hidden layer.
    act: "relu", "sigmoid", "tanh" or "leaky_relu".
    bn: BatchNorm before each activation.
    bgn: BGN before each activation.
    num_classes: outputs.
    bn_momentum: decay of BatchNorm's running statistics (Keras' default 0.99;
      short runs want less, e.g. 0.9, or evaluation sees stale statistics).
  """

  depth: int
  width: int = 64
  act: str = "relu"
  bn: bool = False
  bgn: bool = False
  num_classes: int = 10
  bn_momentum: float = 0.99

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    block = (self.width, self.act, self.bn, self.bgn, train, self.bn_momentum)
    x, _ = _DenseBlock(*block, name="layer_0")(x, None)
    if self.depth > 1:
      stack = nn.scan(
        _DenseBlock,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True},
        length=self.depth - 1,
      )
      x, _ = stack(*block, name="layer_1_on")(x, None)
    return nn.Dense(self.num_classes, kernel_init=glorot, name="head")(x)


class MLP(nn.Module):
  """A plain ReLU MLP, e.g. 784-100-100-100-10 (Lo, Amaral & Ding), with a chosen kernel init.

  Attributes:
    widths: hidden widths.
    num_classes: outputs.
    initializer: "glorot" (uniform) or "orthogonal".
  """

  widths: tuple[int, ...] = (100, 100, 100)
  num_classes: int = 10
  initializer: str = "glorot"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    kernel_init = {"glorot": glorot, "orthogonal": nn.initializers.orthogonal()}[self.initializer]
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.widths):
      x = nn.relu(nn.Dense(width, kernel_init=kernel_init, name=f"Dense_{i}")(x))
    return nn.Dense(self.num_classes, kernel_init=kernel_init, name=f"Dense_{len(self.widths)}")(x)


class _Namer:
  """Hands out zero-padded layer names in creation order: conv_00, bn_01, ..."""

  def __init__(self) -> None:
    self.count = 0

  def __call__(self, kind: str) -> str:
    self.count += 1
    return f"{kind}_{self.count - 1:02d}"


class ResNet(nn.Module):
  """ResNet-20-style CIFAR network (He et al. 2016, sec. 4.2), or its plain twin.

  A 3x3 conv, three stages of `blocks` basic blocks (two 3x3 convs with BN;
  widths w, 2w, 4w; stride 2 at the start of stages 2 and 3), global average
  pooling and a Dense head: 6 * blocks + 2 layers (20 for blocks=3). With
  ``residual=False`` the shortcuts are dropped (He et al.'s "plain" net).
  Shortcuts that change shape use a strided 1x1 conv with BN. He-normal init.

  Attributes:
    blocks: basic blocks per stage.
    width: channels of the first stage.
    residual: add the shortcuts.
    num_classes: outputs.
  """

  blocks: int = 3
  width: int = 16
  residual: bool = True
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    name = _Namer()

    def conv_bn(x: jax.Array, channels: int, stride: int = 1, size: int = 3) -> jax.Array:
      x = nn.Conv(
        channels, (size, size), (stride, stride), use_bias=False, kernel_init=he, name=name("conv")
      )(x)
      return nn.BatchNorm(use_running_average=not train, name=name("bn"))(x)

    x = x[..., None] if x.ndim == 3 else x
    x = nn.relu(conv_bn(x, self.width))
    for stage in range(3):
      channels = self.width * 2**stage
      for block in range(self.blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        y = conv_bn(nn.relu(conv_bn(x, channels, stride)), channels)
        if self.residual:
          if stride != 1 or x.shape[-1] != channels:
            x = conv_bn(x, channels, stride, 1)
          y = y + x
        x = nn.relu(y)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name=name("dense"))(x)


class VGG(nn.Module):
  """The seed-002 course network: VGG-style stages of `filters` channels.

  An input 3x3 conv, then `stages` times: `blocks` processing blocks (conv ->
  act -> conv -> act, with a residual connection around the pair when ``rc``)
  and a reduction block (conv -> act -> 2x2 average pool -> conv -> act);
  global average pooling and a Dense head. ``blocks=0`` gives VGG08 (7 convs +
  head), ``blocks=5`` VGG38 (37 convs + head). Leaky ReLU, PyTorch-default
  init (uniform, variance 1 / (3 fan_in)) and BatchNorm momentum (0.1 in
  PyTorch's convention, 0.9 in Flax's), as in the course code. ``bn`` puts a
  BatchNorm after every conv (processing and reduction blocks), ``bgn`` a BGN
  before every activation; the residual connection goes from before the
  block's first conv to before its last activation (He et al. fig. 2).

  Attributes:
    blocks: processing blocks per stage.
    stages: number of stages (each ends with a reduction block).
    filters: channels of every conv.
    bn: BatchNorm after each conv.
    rc: residual connections around processing blocks.
    bgn: BGN before each activation.
    num_classes: outputs.
  """

  blocks: int = 0
  stages: int = 3
  filters: int = 32
  bn: bool = False
  rc: bool = False
  bgn: bool = False
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    name = _Namer()

    def conv_act(x: jax.Array, skip: jax.Array | None = None) -> jax.Array:
      y = nn.Conv(self.filters, (3, 3), kernel_init=torch_default, name=name("conv"))(x)
      if self.bn:
        y = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name("bn"))(y)
      if skip is not None:
        y = y + skip
      return nn.leaky_relu(_maybe_bgn(y, self.bgn))

    x = x[..., None] if x.ndim == 3 else x
    x = conv_act(x)
    for _ in range(self.stages):
      for _ in range(self.blocks):
        x = conv_act(conv_act(x), skip=x if self.rc else None)
      x = conv_act(x)
      x = nn.avg_pool(x, (2, 2), (2, 2))
      x = conv_act(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=torch_default, name=name("dense"))(x)


def conv_depths(params: dict[str, Any]) -> dict[str, Any]:
  """Depth labels where each BatchNorm shares the depth of the conv / dense before it.

  For the models here, whose top-level names (``conv_00``, ``bn_01``, ...)
  number layers in creation order: depth d is the d-th conv or dense layer, so
  that ``depth_decay`` and ``gradient_flow`` count weight layers, as the papers
  do. Returns a pytree of ints with the structure of `params`, ready for the
  ``depths=`` argument of every transform.
  """
  depth, of = -1, {}
  for key in sorted(params, key=lambda k: int(k.rsplit("_", 1)[1])):
    if not key.startswith("bn_"):
      depth += 1
    of[key] = max(depth, 0)
  return {k: jax.tree.map(lambda _, d=of[k]: d, v) for k, v in params.items()}


def count_params(params: object) -> int:
  """Number of parameters in a pytree."""
  return int(sum(x.size for x in jax.tree.leaves(params)))
