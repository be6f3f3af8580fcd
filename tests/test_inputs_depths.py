"""Bad or unusual depth inputs (issue 15): each gets a clear error or a defined result."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_depthnorm as odn
from tests.tolerance import assert_close


def tutorial_params():
  """The JAX tutorials' MLP params: a list of (W, b) tuples."""
  sizes = [3, 4, 2]
  keys = jax.random.split(jax.random.key(0), len(sizes) - 1)
  return [
    (jax.random.normal(k, (n, m)), jnp.zeros(n)) for k, m, n in zip(keys, sizes[:-1], sizes[1:])
  ]


def test_a_weight_bias_tuple_is_one_layer():
  params = tutorial_params()
  assert odn.layer_depths(params) == [(0, 0), (1, 1)]
  assert odn.layer_depths(params, reverse=True) == [(1, 1), (0, 0)]
  # A list of arrays stays one layer per array; a tuple of two matrices is two layers.
  assert odn.layer_depths([jnp.ones((3, 4)), jnp.ones(4)]) == [0, 1]
  assert odn.layer_depths((jnp.ones((3, 4)), jnp.ones((4, 2)))) == (0, 1)
  # The transforms see one layer per tuple: a joint norm over W and b.
  grads = jax.tree.map(jnp.ones_like, params)
  tx = odn.layerwise_normalize(group="layer")
  updates, _ = tx.update(grads, tx.init(params))
  w, b = updates[0]
  norm = np.sqrt(np.sum(np.float64(w) ** 2) + np.sum(np.float64(b) ** 2))
  assert_close(norm, 1.0)


def test_depths_below_minus_one_are_an_error():
  params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 2))}}
  depths = {"a": {"kernel": 0}, "b": {"kernel": -3}}
  with pytest.raises(ValueError, match=r"depths gives -3 for the leaf at 'b/kernel'; a depth is"):
    odn.depth_decay(0.5, depths=depths).init(params)


def test_depths_with_extra_entries_are_an_error():
  params = {"a": {"kernel": jnp.ones((2, 2))}}
  depths = {"a": {"kernel": 0}, "gone": {"kernel": 1}}
  with pytest.raises(
    ValueError, match=r"entries for paths the tree does not have: \['gone/kernel'\]"
  ):
    odn.depth_decay(0.5, depths=depths).init(params)


def test_masked_subtrees_keep_working_with_full_depths():
  params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 2))}}
  depths = {"a": {"kernel": 0}, "b": {"kernel": 1}}
  tx = optax.masked(odn.depth_decay(0.5, decay="linear", depths=depths), {"a": True, "b": False})
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params))
  assert_close(updates["a"]["kernel"], np.ones((2, 2)))


def test_extra_entries_at_minus_one_are_what_a_filter_dropped():
  # infer_depths(eqx_model) labels non-array fields -1; eqx.filter(model, eqx.is_array)
  # turns them into None, which the transformed tree then lacks.
  params = {"w": jnp.ones((2, 2)), "p": None}
  tx = odn.depth_decay(0.5, depths={"w": 0, "p": odn.NOT_A_LAYER, "gone": {"flag": -1}})
  assert tx.init(params).depths.keys() == {"w"}
