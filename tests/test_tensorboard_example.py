"""examples/tensorboard_flow.py writes every layer's statistics to a TensorBoard event file."""

from __future__ import annotations

import importlib.util
import pathlib
import struct
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_example(monkeypatch):
  spec = importlib.util.spec_from_file_location(
    "tensorboard_flow", ROOT / "examples" / "tensorboard_flow.py"
  )
  module = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, spec.name, module)  # flax's dataclasses look it up
  spec.loader.exec_module(module)
  return module


def read_events(path: pathlib.Path) -> list:
  """The `Event` protos of a TFRecord event file (length, crc, data, crc per record)."""
  from tensorboardX.proto import event_pb2

  data, events, at = path.read_bytes(), [], 0
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at : at + 8])
    record = data[at + 12 : at + 12 + length]
    assert len(record) == length, "truncated record"
    event = event_pb2.Event()
    event.ParseFromString(record)
    events.append(event)
    at += 12 + length + 4
  return events


def test_event_file_holds_every_layers_scalars_and_the_heat_map(tmp_path, capsys, monkeypatch):
  pytest.importorskip("tensorboardX")
  pytest.importorskip("matplotlib")
  example = _load_example(monkeypatch)
  result = example.main(
    [
      "--logdir",
      str(tmp_path),
      "--depth",
      "4",
      "--width",
      "8",
      "--steps",
      "30",
      "--log-every",
      "10",
    ]
  )
  assert result["layers"] == tuple(f"Dense_{i}" for i in range(5))  # 4 hidden and the head
  scalars: dict[str, dict[int, float]] = {}
  images = []
  for event in read_events(result["event_file"]):
    for value in event.summary.value:
      if value.HasField("image"):
        images.append((value.tag, value.image.width, value.image.height))
      else:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  expected = {
    f"grad_flow/{layer}/{stat}"
    for layer in result["layers"]
    for stat in ("norm", "mean_abs", "max_abs", "rms")
  }
  assert expected <= set(scalars)
  assert set(scalars) - expected == {"train/loss"}
  for tag in expected:
    assert sorted(scalars[tag]) == [0, 10, 20], tag  # every_k_steps=10
    assert all(np.isfinite(v) and v > 0 for v in scalars[tag].values()), tag
  for layer in result["layers"]:  # what the file holds is what the tracker measured
    at = {
      stat: scalars[f"grad_flow/{layer}/{stat}"][20] for stat in ("norm", "mean_abs", "max_abs")
    }
    assert at["mean_abs"] <= at["max_abs"] <= at["norm"]
  assert len(images) == 1 and images[0][0] == "grad_flow" and images[0][1] > 100
  assert "final loss" in capsys.readouterr().out
