"""Independent float64 NumPy versions of seed 000's equations, for the tests.

Layers are given explicitly as depths per leaf (not via the library's labelling),
so these functions share no code with the package.
"""

from __future__ import annotations

import numpy as np


def block_norm(arrays: list[np.ndarray], norm: str = "l2") -> float:
  v = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
  if norm == "l2":
    return float(np.sqrt(np.sum(v * v)))
  if norm == "l1":
    return float(np.sum(np.abs(v)))
  if norm == "max":
    return float(np.max(np.abs(v)))
  if norm == "rms":
    return float(np.sqrt(np.mean(v * v)))
  raise ValueError(norm)


def decay_factor(gamma: float, d: float, decay: str) -> float:
  """D_gamma(d): eq. (2) linear (1 - gamma)^d, eq. (3) exponential exp(-gamma d)."""
  if decay == "linear":
    return (1.0 - gamma) ** d
  return float(np.exp(-gamma * d))


def normalize(grads, depths, target=1.0, norm="l2", eps=1e-8, group="leaf"):
  """g_b * N / max(||g_b||, eps) per leaf or per depth group; lists in, lists out."""
  grads = [np.asarray(g, np.float64) for g in grads]
  if group == "leaf":
    blocks = [[i] for i in range(len(grads))]
  else:
    blocks = [[i for i, d in enumerate(depths) if d == k] for k in sorted(set(depths))]
  out = list(grads)
  for block in blocks:
    n = block_norm([grads[i] for i in block], norm)
    for i in block:
      out[i] = grads[i] * target / max(n, eps)
  return out


def decay(grads, depths, gamma, decay="exponential", reverse=False, normalize_depth=False):
  """u_d * D_gamma(d) with d the depth (from the output if reverse, / max if normalized)."""
  deepest = max(depths)
  out = []
  for g, d in zip(grads, depths):
    d = deepest - d if reverse else d
    if normalize_depth and deepest > 0:
      d = d / deepest
    out.append(np.asarray(g, np.float64) * decay_factor(gamma, d, decay))
  return out


def eq1_sgd_step(params, grads, depths, lr, gamma, decay_kind, target=1.0):
  """Eq. (1): w_d <- w_d - lr N D_gamma(d) g_d / ||g_d||, per leaf block."""
  normed = normalize(grads, depths, target=target)
  decayed = decay(normed, depths, gamma, decay_kind)
  return [np.asarray(p, np.float64) - lr * u for p, u in zip(params, decayed)]
