"""Data for the experiments: an IDX (MNIST-format) loader and a generated fallback.

The IDX format (LeCun's MNIST files) is a big-endian header followed by raw
data: two zero bytes, a type code (``0x08`` unsigned byte, ...), the number of
dimensions ``n``, then ``n`` 4-byte sizes. A folder in MNIST format holds four
such files, plain or gzipped::

  train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
  t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

MNIST, Fashion-MNIST and KMNIST all come this way. When no such folder is
found, `load_dataset` says how to get one and returns a clearly labelled
generated data set instead, so that a command never fails for want of data.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_DIRS = (
  "/usr/share/datasets/fashion-mnist",
  "/usr/share/datasets/mnist",
)
DATA_ENV = "OPTAX_DEPTHNORM_DATA"
SPLITS = {
  "train": ("train-images", "train-labels"),
  "test": ("t10k-images", "t10k-labels"),
}
_DTYPES = {
  0x08: np.dtype(np.uint8),
  0x09: np.dtype(np.int8),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}
_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _DTYPES.items()}
HOW_TO_GET_DATA = (
  "No MNIST-format data set was found{where}. To run on real data, install Fashion-MNIST "
  "(Debian/Ubuntu: `apt-get install dataset-fashion-mnist`, into "
  "/usr/share/datasets/fashion-mnist/), or put the four IDX files of MNIST or Fashion-MNIST "
  "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
  "t10k-labels-idx1-ubyte.gz) in a folder and pass `--data-dir FOLDER` (or set "
  f"${DATA_ENV}). Using a GENERATED data set instead: its numbers say whether the code runs, "
  "not whether a method works, and are not comparable with any paper."
)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Images as float32 in [0, 1] (N, H, W), labels int32 (N,), and where they came from.

  Attributes:
    name: ``"fashion-mnist"``, ``"mnist"``, the folder's name, or ``"generated"``.
    source: the folder read, or a description of the generator.
    generated: True for the generated fallback.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  name: str
  source: str
  generated: bool = False

  @property
  def num_classes(self) -> int:
    """Number of classes (largest label + 1)."""
    return int(max(self.y_train.max(), self.y_test.max())) + 1

  def describe(self) -> dict[str, object]:
    """A JSON-ready summary: name, source, sizes, and whether it is generated."""
    return {
      "name": self.name,
      "source": self.source,
      "generated": self.generated,
      "train": len(self.y_train),
      "test": len(self.y_test),
      "image_shape": list(self.x_train.shape[1:]),
      "num_classes": self.num_classes,
    }


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads one IDX file (gzipped if its name ends in .gz) into a NumPy array.

  Args:
    path: the file.

  Returns:
    The array, with the file's shape and dtype (native byte order).

  Raises:
    ValueError: the file is not IDX (bad magic number, unknown type code, or
      a size that does not match the header).

  Example:
    >>> import tempfile, pathlib, numpy as np
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "labels-idx1-ubyte.gz"
    >>> write_idx(path, np.array([7, 2, 1], np.uint8))
    >>> read_idx(path)
    array([7, 2, 1], dtype=uint8)
  """
  path = Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
    raise ValueError(
      f"{path} is not an IDX file: it should start with two zero bytes and a type code in "
      f"{sorted(_DTYPES)}, but starts with {raw[:4].hex(' ') or 'nothing'}."
    )
  dtype, ndim = _DTYPES[raw[2]], raw[3]
  header = 4 + 4 * ndim
  shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  expected = header + int(np.prod(shape)) * dtype.itemsize
  if len(raw) != expected:
    raise ValueError(
      f"{path}: the IDX header says shape {shape} ({expected} bytes with the header), but "
      f"the file has {len(raw)} bytes."
    )
  return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes an array as an IDX file (gzipped if the name ends in .gz).

  Args:
    path: the file to write.
    array: uint8, int8, int16, int32, float32 or float64 data.
  """
  array = np.asarray(array)
  code = _CODES.get(array.dtype)
  if code is None:
    raise ValueError(f"IDX cannot hold dtype {array.dtype}; use one of {sorted(map(str, _CODES))}.")
  header = bytes([0, 0, code, array.ndim]) + b"".join(
    int(n).to_bytes(4, "big") for n in array.shape
  )
  body = array.astype(_DTYPES[code]).tobytes()
  opener = gzip.open if Path(path).suffix == ".gz" else open
  with opener(path, "wb") as f:
    f.write(header + body)


def _find(folder: Path, stem: str) -> Path | None:
  """The IDX file of one split: `stem-idx?-ubyte` or `stem.idx?-ubyte`, plain or gz."""
  for pattern in (f"{stem}-idx*-ubyte", f"{stem}.idx*-ubyte"):
    for suffix in ("", ".gz"):
      hits = sorted(folder.glob(pattern + suffix))
      if hits:
        return hits[0]
  return None


def find_idx_files(folder: str | os.PathLike) -> dict[str, Path] | None:
  """The four IDX files of an MNIST-format folder, or None if any is missing."""
  folder = Path(folder)
  if not folder.is_dir():
    return None
  files = {}
  for split, stems in SPLITS.items():
    for stem, part in zip(stems, ("images", "labels")):
      found = _find(folder, stem)
      if found is None:
        return None
      files[f"{split}_{part}"] = found
  return files


def load_idx_folder(folder: str | os.PathLike) -> Dataset:
  """Loads an MNIST-format folder; images scaled to [0, 1].

  Args:
    folder: a folder holding the four IDX files.

  Returns:
    A `Dataset` named after the folder.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: a file is not IDX, or images and labels disagree in number.
  """
  files = find_idx_files(folder)
  if files is None:
    raise FileNotFoundError(f"{folder} does not hold the four MNIST-format IDX files.")
  arrays = {k: read_idx(v) for k, v in files.items()}
  for split in SPLITS:
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if len(images) != len(labels) or images.ndim != 3 or labels.ndim != 1:
      raise ValueError(
        f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match "
        "(expected (N, H, W) and (N,))."
      )
  name = Path(folder).resolve().name

  def scale(x: np.ndarray) -> np.ndarray:
    top = 255.0 if x.dtype == np.uint8 else max(float(np.abs(x).max()), 1.0)
    return (x.astype(np.float32) / top).astype(np.float32)

  return Dataset(
    scale(arrays["train_images"]),
    arrays["train_labels"].astype(np.int32),
    scale(arrays["test_images"]),
    arrays["test_labels"].astype(np.int32),
    name=name,
    source=str(Path(folder).resolve()),
  )


def generated_dataset(
  n_train: int = 6000, n_test: int = 1000, *, size: int = 28, num_classes: int = 10, seed: int = 0
) -> Dataset:
  """A small generated 10-class image data set (the fallback, no download).

  Each class has a fixed random smooth template (a 7x7 pattern upsampled);
  an image is its class's template, randomly shifted by up to 2 pixels, times
  a random contrast, plus Gaussian noise, clipped to [0, 1]. Learnable, not
  trivial; nothing about it is comparable with MNIST.

  Args:
    n_train: training images.
    n_test: test images.
    size: image side.
    num_classes: number of classes.
    seed: the generator's seed.

  Returns:
    A `Dataset` with ``generated=True`` and name ``"generated"``.
  """
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(size=(num_classes, 7, 7))
  reps = -(-size // 7)
  templates = np.kron(coarse, np.ones((reps, reps)))[:, :size, :size]

  def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, num_classes, size=n)
    shifts = rng.integers(-2, 3, size=(n, 2))
    images = np.stack(
      [np.roll(templates[c], tuple(s), axis=(0, 1)) for c, s in zip(labels, shifts)]
    )
    images = images * rng.uniform(0.5, 1.0, size=(n, 1, 1)) + rng.normal(0, 0.35, images.shape)
    return np.clip(images, 0, 1).astype(np.float32), labels.astype(np.int32)

  x_train, y_train = sample(n_train)
  x_test, y_test = sample(n_test)
  source = f"generated: {num_classes} noisy shifted templates, {size}x{size}, seed {seed}"
  return Dataset(x_train, y_train, x_test, y_test, "generated", source, generated=True)


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def load_dataset(data_dir: str | os.PathLike | None = None, *, generated: bool = False) -> Dataset:
  """The experiments' data: `data_dir`, else the default folders, else generated.

  Looks in ``data_dir`` when given, else in ``$OPTAX_DEPTHNORM_DATA`` and the
  Debian folders of Fashion-MNIST and MNIST. When none holds the four IDX
  files, prints how to get a data set and returns `generated_dataset()`.

  Args:
    data_dir: an MNIST-format folder.
    generated: skip the search and use the generated data set.

  Returns:
    A `Dataset`.
  """
  if generated:
    return generated_dataset()
  if data_dir is not None:
    candidates = [Path(data_dir)]
  else:
    env = os.environ.get(DATA_ENV)
    candidates = [Path(p) for p in ([env] if env else []) + list(DEFAULT_DIRS)]
  for folder in candidates:
    if find_idx_files(folder) is not None:
      return load_idx_folder(folder)
  where = " in " + ", ".join(str(c) for c in candidates)
  _log(HOW_TO_GET_DATA.format(where=where))
  return generated_dataset()


def split(
  dataset: Dataset,
  *,
  train_size: int | None,
  val_size: int,
  test_size: int | None = None,
  flatten: bool = False,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Train / validation / test arrays; validation is the end of the training set.

  Args:
    dataset: the data.
    train_size: keep the first `train_size` training examples (None: all the
      rest after the validation set).
    val_size: examples held out from the end of the training set.
    test_size: keep the first `test_size` test examples (None: all).
    flatten: reshape images to vectors.

  Returns:
    ``{"train": (x, y), "val": (x, y), "test": (x, y)}``; "val" may be empty.
  """
  n = len(dataset.y_train)
  val_size = min(val_size, n // 5)
  x, y = dataset.x_train, dataset.y_train
  pool = n - val_size
  stop = pool if train_size is None else min(train_size, pool)
  parts = {
    "train": (x[:stop], y[:stop]),
    "val": (x[pool:], y[pool:]),
    "test": (dataset.x_test[:test_size], dataset.y_test[:test_size]),
  }
  if flatten:
    parts = {k: (a.reshape(len(a), int(np.prod(a.shape[1:]))), b) for k, (a, b) in parts.items()}
  return parts


def pool_images(
  parts: dict[str, tuple[np.ndarray, np.ndarray]], size: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Average-pools (N, H, W) images down to about size x size (28 -> 14: 2x2 blocks).

  Args:
    parts: the output of `split` (unflattened).
    size: target side; images already that small are left as they are.

  Returns:
    The same dict with pooled images.
  """

  def pool(x: np.ndarray) -> np.ndarray:
    f = x.shape[1] // size
    if f <= 1:
      return x
    x = x[:, : size * f, : size * f]
    return x.reshape(len(x), size, f, size, f).mean((2, 4))

  return {k: (pool(x), y) for k, (x, y) in parts.items()}


def split_for(dataset: Dataset, cfg: Any, *, flatten: bool = False) -> dict:
  """`split` with an experiment config's ``train_size`` / ``val_size`` / ``test_size``.

  Sizes of 0 mean "all"; a config with an ``image_size`` also gets its images
  pooled to that size (`pool_images`).
  """
  parts = split(
    dataset,
    train_size=cfg.train_size or None,
    val_size=cfg.val_size,
    test_size=cfg.test_size or None,
    flatten=flatten,
  )
  size = getattr(cfg, "image_size", None)
  return pool_images(parts, size) if size and not flatten else parts
