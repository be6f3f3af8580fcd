"""Time of `odn.infer_depths` on a ResNet-50 Flax (linen) model, on this machine.

`infer_depths` traces the forward pass to a jaxpr (`jax.make_jaxpr`, shapes
only: no FLOPs run) and walks it once. Both steps are timed separately, on a
linen ResNet-50 (stem, bottleneck stages [3, 4, 6, 3] with projection
shortcuts, BatchNorm, Dense head: 25,557,032 parameters in 161 leaves) whose
parameters are `jax.ShapeDtypeStruct`s from `jax.eval_shape(model.init)`, so
nothing of the model's size is ever allocated. Target: under 2 s on CPU.

  python3 benchmarks/infer_time.py            # 5 timed repeats after one warm-up
  python3 benchmarks/infer_time.py --quick    # 1 repeat, no warm-up (smoke test)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from _harness import machine_facts, print_machine

import optax_depthnorm as odn
from optax_depthnorm import _infer


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 convs with BatchNorm; a 1x1 projection where the shape changes."""

  width: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = partial(nn.BatchNorm, use_running_average=not train)
    conv = partial(nn.Conv, use_bias=False)
    h = nn.relu(norm()(conv(self.width, (1, 1))(x)))
    h = nn.relu(norm()(conv(self.width, (3, 3), (self.stride, self.stride))(h)))
    h = norm()(conv(4 * self.width, (1, 1))(h))
    if x.shape[-1] != 4 * self.width or self.stride != 1:
      x = norm()(conv(4 * self.width, (1, 1), (self.stride, self.stride))(x))
    return nn.relu(h + x)


class ResNet50(nn.Module):
  classes: int = 1000

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(64, (7, 7), (2, 2), use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="stem_bn")(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
      for i in range(blocks):
        x = Bottleneck(width, 2 if i == 0 and stage > 0 else 1, name=f"stage{stage}_{i}")(x, train)
    return nn.Dense(self.classes, name="head")(jnp.mean(x, axis=(1, 2)))


def _stats(values: list[float]) -> dict[str, float]:
  return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
  parser.add_argument("--quick", action="store_true", help="1 repeat, no warm-up")
  parser.add_argument("--json", help="also write the numbers to this file")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  facts = machine_facts()
  print_machine(facts)

  model = ResNet50()
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  params = variables["params"]
  # Batch statistics are closed over (small: one vector per BatchNorm), not passed as
  # inputs: every input counts as data at depth 0.
  stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["batch_stats"])

  def apply(p, x):
    return model.apply({"params": p, "batch_stats": stats}, x)

  leaves = jax.tree.leaves(params)
  size = sum(math.prod(p.shape) for p in leaves)
  print(f"\n## ResNet-50 (linen): {size:,} params in {len(leaves)} leaves\n")
  if not args.quick:
    odn.infer_depths(apply, params, x)  # warm-up: first-call caches of jax and flax
  trace_s, walk_s, total_s = [], [], []
  for _ in range(1 if args.quick else args.repeats):
    start = time.perf_counter()
    traced = _infer.trace(apply, params, x)
    middle = time.perf_counter()
    depths = _infer.label(params, traced)
    end = time.perf_counter()
    trace_s.append(middle - start)
    walk_s.append(end - middle)
    start = time.perf_counter()
    odn.infer_depths(apply, params, x)
    total_s.append(time.perf_counter() - start)
  eqns = len(traced.jaxpr.jaxpr.eqns)
  deepest = max(jax.tree.leaves(depths))
  result = {
    "setup": {"model": "ResNet-50 (linen)", "input": list(x.shape), "repeats": len(total_s)},
    "machine": facts,
    "params": size,
    "leaves": len(leaves),
    "top_level_eqns": eqns,
    "depths": {
      "stem": depths["stem"]["kernel"],
      "stem_bn": depths["stem_bn"]["scale"],
      "head": depths["head"]["kernel"],
      "max": deepest,
    },
    "trace_s": _stats(trace_s),
    "walk_s": _stats(walk_s),
    "total_s": _stats(total_s),
  }
  print("| step | median s | min | max |\n|---|---:|---:|---:|")
  for key, name in (("trace_s", "trace (make_jaxpr)"), ("walk_s", "walk"), ("total_s", "total")):
    r = result[key]
    print(f"| {name} | {r['median']:.3f} | {r['min']:.3f} | {r['max']:.3f} |")
  print(f"\ndepths: stem conv {result['depths']['stem']}, head {result['depths']['head']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2, default=str)
  return result


if __name__ == "__main__":
  main()
