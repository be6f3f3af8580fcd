"""Parameter trees of the frameworks users train with, and their depths.

The expected depth of each leaf is read here with a regex over the path, an
independent check of the library's labelling.
"""

from __future__ import annotations

import re

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class LinenMLP(nn.Module):
  widths: tuple[int, ...] = (5, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 3)

  @nn.compact
  def __call__(self, x):
    for w in self.widths[:-1]:
      x = nn.tanh(nn.Dense(w)(x))
    return nn.Dense(self.widths[-1])(x)


class NNXMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, n: int = 4):
    self.layers = nnx.List([nnx.Linear(3, 3, rngs=rngs) for _ in range(n)])

  def __call__(self, x):
    for layer in self.layers:
      x = jnp.tanh(layer(x))
    return x


def linen_params():
  return LinenMLP().init(jax.random.key(0), jnp.ones((1, 3)))["params"]


def nnx_state():
  return nnx.state(NNXMLP(nnx.Rngs(0)), nnx.Param)


def equinox_params():
  model = eqx.nn.MLP(3, 2, width_size=4, depth=3, key=jax.random.key(1))
  return eqx.filter(model, eqx.is_inexact_array)


def dict_params():
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {  # creation order, as a hand-built dict keeps it: stem first
    "stem": [f(4, 3)],
    "encoder": {"block_2": {"w": f(3, 3)}, "block_10": {"w": f(3, 2), "b": f(2)}},
  }


# path regex -> how to turn the match into a depth
_DEPTH_PATTERNS = [
  (r"^Dense_(\d+)/", lambda m: int(m.group(1))),
  (r"^layers/(\d+)/", lambda m: int(m.group(1))),
  (r"^stem/0$", lambda m: 0),  # the dict's own (creation) order, though "encoder" < "stem"
  (r"^encoder/block_2/", lambda m: 1),
  (r"^encoder/block_10/", lambda m: 2),
]


def path_str(path) -> str:
  names = []
  for k in path:
    name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
    names.append(str(name))
  if names and names[-1] == "value":
    names.pop()
  return "/".join(names)


def expected_depths(tree) -> list[int]:
  """Depth of each flattened leaf, by the regexes above."""
  out = []
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = path_str(path)
    for pattern, depth in _DEPTH_PATTERNS:
      m = re.search(pattern, name)
      if m:
        out.append(depth(m))
        break
    else:
      raise AssertionError(f"no expected depth for {name}")
  return out


TREES = {
  "linen": linen_params,
  "nnx": nnx_state,
  "equinox": equinox_params,
  "dict": dict_params,
}


def random_like(tree, seed: int = 0):
  """Random float32 'gradients' with the structure of `tree` (dicts keep their key order)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return keep_order(tree, jax.tree_util.tree_unflatten(treedef, new))


def keep_order(like, tree):
  """`tree` (same paths as `like`) with the dicts rebuilt in `like`'s key order."""
  if isinstance(like, dict) and isinstance(tree, dict):
    return {k: keep_order(like[k], tree[k]) for k in like}
  if isinstance(like, list) and isinstance(tree, list):
    return [keep_order(a, b) for a, b in zip(like, tree)]
  return tree


def to_numpy(tree) -> list[np.ndarray]:
  return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]
