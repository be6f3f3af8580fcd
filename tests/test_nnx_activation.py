"""`activation_gradient_norms` on Flax NNX models: numbers, names, an unchanged model, errors."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_depthnorm as odn
from tests.tolerance import assert_close


class MLP(nnx.Module):
  """Linear + activation blocks and a linear head: ``z_k = W_k h + b_k``."""

  def __init__(self, sizes, activation, *, rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes[:-1])])
    self.head = nnx.Linear(sizes[-2], sizes[-1], rngs=rngs)
    self.activation = activation

  def __call__(self, x):
    for layer in self.layers:
      x = self.activation(layer(x))
    return self.head(x)


def _batch(n=16, d=3, classes=5, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (n, d))
  y = jax.random.randint(ky, (n,), 0, classes)
  xent = lambda logits: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
  return x, xent


def _snapshot(model):
  """Every state value of `model` by path, as NumPy (RNG keys as their data)."""
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model))
  key = lambda x: jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
  return {
    jax.tree_util.keystr(p): np.array(jax.random.key_data(x) if key(x) else x) for p, x in leaves
  }


def _stats64(deltas):
  """(norm, mean |g|, max |g|) of each delta, in float64."""
  d64 = [np.asarray(d, np.float64) for d in deltas]
  return (
    [np.linalg.norm(d) for d in d64],
    [np.abs(d).mean() for d in d64],
    [np.abs(d).max() for d in d64],
  )


def _check(report, deltas):
  norm, mean_abs, max_abs = _stats64(deltas)
  assert_close(np.asarray(report.norm, np.float64), norm)
  assert_close(np.asarray(report.mean_abs, np.float64), mean_abs)
  assert_close(np.asarray(report.max_abs, np.float64), max_abs)
  assert_close(
    np.asarray(report.rms, np.float64), [n / np.sqrt(d.size) for n, d in zip(norm, deltas)]
  )


@pytest.mark.parametrize("activation", [jax.nn.sigmoid, jnp.tanh], ids=["sigmoid", "tanh"])
def test_pre_activation_gradients_match_a_hand_written_backward_pass(activation):
  sizes = (3, 6, 6, 6, 5)
  model = MLP(sizes, activation, rngs=nnx.Rngs(1))
  x, xent = _batch()
  linears = [*model.layers, model.head]
  weights = [(m.kernel[...], m.bias[...]) for m in linears]

  def by_hand(perturbations):  # z_k = h W_k + b_k + p_k: dL/dp_k = delta^(k)
    h = x
    for k, (kernel, bias) in enumerate(weights):
      z = h @ kernel + bias[None] + perturbations[k]
      h = activation(z) if k < len(weights) - 1 else z
    return xent(h)

  deltas = jax.grad(by_hand)([jnp.zeros((x.shape[0], b)) for b in sizes[1:]])
  f = lambda x: odn.activation_gradient_norms(model, x, loss_fn=xent)
  for report in (
    f(x),
    jax.jit(f)(x),
    nnx.jit(lambda m, x: odn.activation_gradient_norms(m, x, loss_fn=xent))(model, x),
  ):
    assert report.paths == ("layers/0", "layers/1", "layers/2", "head")
    assert report.depths == (0, 1, 2, 3) and report.what == "pre-activation gradient"
    assert report.sizes == tuple(x.shape[0] * b for b in sizes[1:])
    _check(report, deltas)
  # The NNX-only name gives the same report.
  assert_close(odn.nnx.activation_gradient_norms(model, x, loss_fn=xent), f(x))


def test_with_bgn_the_gradient_at_each_linear_has_norm_kappa():
  """Seed 003, fig. 1 (top): BGN after each Linear, sqrt(width) there by default."""
  width, rngs = 16, nnx.Rngs(0)
  blocks = [nnx.Linear(3, width, rngs=rngs), odn.nnx.BGN(), nnx.sigmoid]
  for _ in range(3):
    blocks += [nnx.Linear(width, width, rngs=rngs), odn.nnx.BGN(), nnx.sigmoid]
  model = nnx.Sequential(*blocks, nnx.Linear(width, 1, rngs=rngs))
  x = jnp.ones((4, 3))
  loss_fn = lambda out: jnp.mean(out**2)
  report = jax.jit(lambda x: odn.activation_gradient_norms(model, x, loss_fn=loss_fn))(x)
  assert report.paths == ("layers/0", "layers/3", "layers/6", "layers/9", "layers/12")
  assert_close(report.norm[:-1], np.full(4, np.sqrt(width)))
  kappa = nnx.Sequential(nnx.Linear(3, width, rngs=rngs), odn.nnx.BGN(0.5), nnx.tanh)
  assert_close(odn.activation_gradient_norms(kappa, x, loss_fn=jnp.sum).norm, [0.5])


def test_a_module_called_twice_appears_twice_in_call_order():
  class Shared(nnx.Module):
    def __init__(self, rngs):
      self.head = nnx.Linear(3, 3, rngs=rngs)
      self.out = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
      return self.out(jnp.tanh(self.head(jnp.tanh(self.head(x)))))

  model = Shared(nnx.Rngs(0))
  x, _ = _batch(n=4)
  kernel, bias = model.head.kernel[...], model.head.bias[...]
  out_kernel, out_bias = model.out.kernel[...], model.out.bias[...]

  def by_hand(p):
    z0 = x @ kernel + bias[None] + p[0]
    z1 = jnp.tanh(z0) @ kernel + bias[None] + p[1]
    return jnp.sum(jnp.sin(jnp.tanh(z1) @ out_kernel + out_bias[None] + p[2]))

  deltas = jax.grad(by_hand)([jnp.zeros((4, 3)), jnp.zeros((4, 3)), jnp.zeros((4, 2))])
  loss_fn = lambda out: jnp.sum(jnp.sin(out))
  report = odn.activation_gradient_norms(model, x, loss_fn=loss_fn)
  assert report.paths == ("head", "head[1]", "out")
  _check(report, deltas)
  only_out = odn.activation_gradient_norms(
    model, x, loss_fn=jnp.sum, modules=lambda m: m is model.out
  )
  assert only_out.paths == ("out",)
  assert_close(only_out.norm, [np.sqrt(8.0)])  # d sum / d out = 1 at 4 x 2 outputs


def test_the_model_is_left_exactly_as_it_was():
  """BatchNorm in train mode and Dropout update state on the copy only."""

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 8, rngs=rngs)
      self.norm = nnx.BatchNorm(8, rngs=rngs)
      self.drop = nnx.Dropout(0.5, rngs=rngs)
      self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
      return self.head(self.drop(nnx.relu(self.norm(self.linear(x)))))

  model = Net(nnx.Rngs(0, dropout=1))
  x, xent = _batch(n=8)
  before, structure = _snapshot(model), jax.tree.structure(nnx.state(model))
  mean = np.array(model.norm.mean[...])
  modules = {path: (type(m), sorted(vars(m))) for path, m in nnx.iter_modules(model)}
  graphdef = nnx.graphdef(model)
  first = odn.activation_gradient_norms(model, x, loss_fn=xent)
  jitted = jax.jit(lambda x: odn.activation_gradient_norms(model, x, loss_fn=xent))(x)
  nnx.jit(lambda m, x: odn.activation_gradient_norms(m, x, loss_fn=xent))(model, x)
  assert first.paths == ("linear", "head")
  after = _snapshot(model)
  assert after.keys() == before.keys() and jax.tree.structure(nnx.state(model)) == structure
  for path, value in before.items():
    np.testing.assert_array_equal(after[path], value, err_msg=path)
  assert {path: (type(m), sorted(vars(m))) for path, m in nnx.iter_modules(model)} == modules
  assert nnx.graphdef(model) == graphdef
  assert type(model.linear) is nnx.Linear and type(model.head) is nnx.Linear
  # State unchanged: the same dropout mask again, so the same numbers.
  assert_close(jitted, first)
  assert_close(odn.activation_gradient_norms(model, x, loss_fn=xent), first)
  # Afterwards the model trains as before: its own call updates its batch stats.
  model(x)
  assert not np.array_equal(np.asarray(model.norm.mean[...]), mean)


def test_conv_model_matches_a_hand_written_convolution():
  rngs = nnx.Rngs(2)
  model = nnx.Sequential(
    nnx.Conv(2, 4, (3, 3), rngs=rngs), jnp.tanh, nnx.Conv(4, 3, (3, 3), rngs=rngs)
  )
  x = jax.random.normal(jax.random.key(3), (2, 5, 5, 2))
  convs = [model.layers[0], model.layers[2]]
  weights = [(c.kernel[...], c.bias[...]) for c in convs]
  loss_fn = lambda out: jnp.mean(jnp.sin(out) ** 2)

  def by_hand(p):
    h = x
    for k, (kernel, bias) in enumerate(weights):
      z = jax.lax.conv_general_dilated(
        h, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
      h = z + bias[None, None, None] + p[k]
      h = jnp.tanh(h) if k == 0 else h
    return loss_fn(h)

  deltas = jax.grad(by_hand)([jnp.zeros((2, 5, 5, 4)), jnp.zeros((2, 5, 5, 3))])
  report = jax.jit(lambda x: odn.activation_gradient_norms(model, x, loss_fn=loss_fn))(x)
  assert report.paths == ("layers/0", "layers/2") and report.sizes == (200, 150)
  _check(report, deltas)


def test_the_model_itself_can_be_the_selected_call():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  report = odn.activation_gradient_norms(model, jnp.ones((4, 3)), loss_fn=jnp.sum)
  assert report.paths == ("<root>",)
  assert_close(report.norm, [np.sqrt(8.0)])


def test_nnx_errors():
  x = jnp.ones((2, 3))
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

  class Counts(nnx.Module):
    def __call__(self, x):
      return jnp.argmax(x, axis=-1)

  with pytest.raises(
    ValueError, match=r"no module selected by modules=.* ran in `model\(\*args\)`"
  ):
    odn.activation_gradient_norms(model, x, loss_fn=jnp.sum, modules=(nnx.Conv,))
  with pytest.raises(TypeError, match=r"the output of '<root>' is not a floating array"):
    odn.activation_gradient_norms(Counts(), x, loss_fn=jnp.sum, modules=Counts)
  with pytest.raises(TypeError, match="modules must be an NNX Module class, a tuple of them"):
    odn.activation_gradient_norms(model, x, loss_fn=jnp.sum, modules="Linear")
  with pytest.raises(TypeError, match="model must be a Flax linen Module, got function"):
    odn.activation_gradient_norms(lambda x: x, x, loss_fn=jnp.sum)
  with pytest.raises(TypeError, match="model must be a Flax NNX Module, got Dense"):
    odn.nnx.activation_gradient_norms(nn.Dense(2), x, loss_fn=jnp.sum)


def test_linen_form_takes_variables_positionally_or_by_keyword():
  x = jnp.ones((2, 3))
  model = nn.Dense(2)
  variables = model.init(jax.random.key(0), x)
  report = odn.activation_gradient_norms(model, variables, x, loss_fn=jnp.sum)
  assert report.paths == ("<root>",)
  assert_close(report.norm, [2.0])
  assert_close(
    odn.activation_gradient_norms(model, x, variables=variables, loss_fn=jnp.sum), report
  )
  with pytest.raises(TypeError, match="a linen model needs its variables"):
    odn.activation_gradient_norms(model, loss_fn=jnp.sum)
