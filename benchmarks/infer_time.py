"""Time of `odn.infer_depths` on a ResNet-50 and a ViT-B/16 (Flax linen), on this machine.

`infer_depths` traces the forward pass to a jaxpr (`jax.make_jaxpr`, shapes
only: no FLOPs run) and walks it once. Both steps are timed separately, on two
models whose parameters are `jax.ShapeDtypeStruct`s from
`jax.eval_shape(model.init)`, so nothing of the models' size is ever allocated:

- a linen ResNet-50 (stem, bottleneck stages [3, 4, 6, 3] with projection
  shortcuts, BatchNorm, Dense head: 25,557,032 parameters in 161 leaves);
- a ViT-B/16 written as big_vision's `big_vision/models/vit.py` writes it (the
  test suite's port, `tests/models.py`), with
  its module names (`embedding`, `pos_embedding`, `cls`,
  `Transformer/encoderblock_{i}`, `Transformer/encoder_norm`, `head`): width
  768, 12 blocks, MLP 3072, 12 heads, a `cls` token, 1000 classes:
  86,566,888 parameters in 200 leaves. Its depths are also timed with
  `granularity="block"` (one id per encoder block, as MAE's layer decay counts).

The labels that show the walk is right are checked (a wrong label fails the
run). Target: under 2 s on CPU for a whole `infer_depths` call on either model.

  python3 benchmarks/infer_time.py            # 5 timed repeats after one warm-up
  python3 benchmarks/infer_time.py --quick    # 1 repeat, no warm-up (smoke test)
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
import time
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from _harness import machine_facts, print_machine

import optax_depthnorm as odn
from optax_depthnorm import _infer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tests.models import ViT  # big_vision's vit.py, as the test fixtures port it

VIT_B16 = {"num_classes": 1000, "patch_size": (16, 16), "width": 768, "depth": 12}
VIT_B16 |= {"mlp_dim": 3072, "num_heads": 12}


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


# ViT-B/16 as big_vision's vit.py writes it (learned posemb, "tok" pooling, so a `cls`
# token); the modules are unnamed where vit.py leaves them unnamed, so flax names them as
# in its checkpoints: LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0.


def _stats(values: list[float]) -> dict[str, float]:
  return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _size(params: Any) -> tuple[int, int]:
  leaves = jax.tree.leaves(params)
  return sum(math.prod(p.shape) for p in leaves), len(leaves)


def _time(apply, params, x, repeats: int, warm_up: bool, block: bool) -> dict[str, Any]:
  """Median (min, max) of the trace, the walk and the whole call; with `block`, at both
  granularities. Returns the times and the labels of the last repeat."""
  if warm_up:  # first-call caches of jax and flax
    odn.infer_depths(apply, params, x)
    if block:
      odn.infer_depths(apply, params, x, granularity="block")
  times: dict[str, list[float]] = {"trace_s": [], "walk_s": [], "total_s": []}
  if block:
    times.update(walk_block_s=[], total_block_s=[])
  for _ in range(repeats):
    start = time.perf_counter()
    traced = _infer.trace(apply, params, x)
    middle = time.perf_counter()
    depths = _infer.label(params, traced)
    end = time.perf_counter()
    times["trace_s"].append(middle - start)
    times["walk_s"].append(end - middle)
    if block:
      start = time.perf_counter()
      ids = _infer.label(params, traced, "block")
      times["walk_block_s"].append(time.perf_counter() - start)
    start = time.perf_counter()
    odn.infer_depths(apply, params, x)
    times["total_s"].append(time.perf_counter() - start)
    if block:
      start = time.perf_counter()
      odn.infer_depths(apply, params, x, granularity="block")
      times["total_block_s"].append(time.perf_counter() - start)
  return {
    "times": {key: _stats(v) for key, v in times.items()},
    "eqns": len(traced.jaxpr.jaxpr.eqns),
    "depths": depths,
    "ids": ids if block else None,
  }


_ROWS = (
  ("trace_s", "trace (make_jaxpr)"),
  ("walk_s", "walk"),
  ("total_s", "total"),
  ("walk_block_s", 'walk, granularity="block"'),
  ("total_block_s", 'total, granularity="block"'),
)


def _print_table(times: dict[str, dict[str, float]]) -> None:
  print("| step | median s | min | max |\n|---|---:|---:|---:|")
  for key, name in _ROWS:
    if key in times:
      r = times[key]
      print(f"| {name} | {r['median']:.3f} | {r['min']:.3f} | {r['max']:.3f} |")


def _check(what: str, got: Any, want: Any) -> None:
  """A wrong label is a failed benchmark, not a slow one."""
  values = set(jax.tree.leaves(got))
  if values != {want}:
    raise AssertionError(f"infer_time: {what} labelled {sorted(values)}, expected {want}")


def _resnet(repeats: int, warm_up: bool) -> dict[str, Any]:
  model = ResNet50()
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  params = variables["params"]
  # Batch statistics are closed over (small: one vector per BatchNorm), not passed as
  # inputs: every input counts as data at depth 0.
  stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["batch_stats"])

  def apply(p, x):
    return model.apply({"params": p, "batch_stats": stats}, x)

  size, leaves = _size(params)
  print(f"\n## ResNet-50 (linen): {size:,} params in {leaves} leaves\n")
  run = _time(apply, params, x, repeats, warm_up, block=False)
  depths = run["depths"]
  result = {
    "setup": {"model": "ResNet-50 (linen)", "input": list(x.shape), "repeats": repeats},
    "params": size,
    "leaves": leaves,
    "top_level_eqns": run["eqns"],
    "depths": {
      "stem": depths["stem"]["kernel"],
      "stem_bn": depths["stem_bn"]["scale"],
      "head": depths["head"]["kernel"],
      "max": max(jax.tree.leaves(depths)),
    },
    **run["times"],
  }
  _print_table(run["times"])
  print(f"\ndepths: stem conv {result['depths']['stem']}, head {result['depths']['head']}")
  _check("ResNet-50 stem", depths["stem"], 0)
  _check("ResNet-50 head", depths["head"], 49)  # 50 weight layers on the longest path
  return result


def _vit(repeats: int, warm_up: bool) -> dict[str, Any]:
  model = ViT(**VIT_B16)
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]

  def apply(p, x):
    return model.apply({"params": p}, x)

  size, leaves = _size(params)
  print(f"\n## ViT-B/16 (linen, big_vision's vit.py): {size:,} params in {leaves} leaves\n")
  run = _time(apply, params, x, repeats, warm_up, block=True)
  depths, ids = run["depths"], run["ids"]
  blocks, last = ids["Transformer"], f"encoderblock_{model.depth - 1}"
  result = {
    "setup": {"model": "ViT-B/16 (linen)", "input": list(x.shape), "repeats": repeats},
    "params": size,
    "leaves": leaves,
    "top_level_eqns": run["eqns"],
    "depths": {
      "embedding": depths["embedding"]["kernel"],
      "encoderblock_0_qkv": depths["Transformer"]["encoderblock_0"][
        "MultiHeadDotProductAttention_0"
      ]["query"]["kernel"],
      "head": depths["head"]["kernel"],
      "max": max(jax.tree.leaves(depths)),
    },
    "block_ids": {
      "embedding": ids["embedding"]["kernel"],
      "pos_embedding": ids["pos_embedding"],
      "cls": ids["cls"],
      "encoderblock_0": blocks["encoderblock_0"]["MlpBlock_0"]["Dense_1"]["kernel"],
      last: blocks[last]["MlpBlock_0"]["Dense_1"]["kernel"],
      "encoder_norm": blocks["encoder_norm"]["scale"],
      "head": ids["head"]["kernel"],
    },
    **run["times"],
  }
  _print_table(run["times"])
  d, b = result["depths"], result["block_ids"]
  print(f"\ndepths (layer): embedding {d['embedding']}, head {d['head']}")
  print(
    f"ids (block): embedding {b['embedding']}, pos_embedding {b['pos_embedding']}, "
    f"cls {b['cls']}, encoderblock_0 {b['encoderblock_0']}, {last} {b[last]}, "
    f"encoder_norm {b['encoder_norm']}, head {b['head']}"
  )
  _check("ViT-B/16 embedding (layer)", depths["embedding"], 0)
  for name in ("embedding", "pos_embedding", "cls"):
    _check(f"ViT-B/16 {name} (block)", ids[name], 0)
  for i in range(model.depth):  # every leaf of block i, its LayerNorms included
    _check(f"ViT-B/16 Transformer/encoderblock_{i} (block)", blocks[f"encoderblock_{i}"], i + 1)
  _check("ViT-B/16 Transformer/encoder_norm (block)", blocks["encoder_norm"], model.depth + 1)
  _check("ViT-B/16 head (block)", ids["head"], model.depth + 1)
  return result


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
  repeats = 1 if args.quick else args.repeats
  # The ResNet-50's numbers stay at the top level (their keys predate the ViT's).
  result = {**_resnet(repeats, not args.quick), "machine": facts}
  result["vit"] = _vit(repeats, not args.quick)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2, default=str)
  return result


if __name__ == "__main__":
  main()
