"""Natural-image sources read from installed packages (no download at run time).

Each source returns its images as uint8 arrays and a fixed train pool / test split:

- Fashion-MNIST: the Debian package `dataset-fashion-mnist` (IDX files, 60k train / 10k test).
- Animal-MNIST: the PyPI package `animal-mnist` (10k images, 10 animal classes, no test split:
  a fixed 2,000 are held out for test). Its loader imports TensorFlow, so the gzipped numpy
  pickles are read directly, with an unpickler that only builds numpy arrays.
- scikit-learn digits: 1,797 8x8 images; the 797 not in the 1,000-example pool are the test set.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from h2t_edge.core.errors import DatasetError

FASHION_MNIST_DIR = Path(os.environ.get("H2T_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "boot")
# Order as the package's README lists them; its label ids are not documented, so names carry the id.
ANIMAL_MNIST_CLASSES = tuple(f"animal{i}" for i in range(10))
_SPLIT_SEED = 20_221_117  # fixed: the held-out test rows never depend on the run's seed


class SourceMissingError(DatasetError):
    """A task's source package is not installed; the message says how to install it."""


@dataclass
class NaturalSource:
    """images: uint8[n, H, W] (or [n, H, W, 3]); labels: int64[n]; `train` / `test` split rows."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    train_pool: np.ndarray  # int64 rows the training examples are sampled from
    test: np.ndarray  # int64 rows of the fixed test set


_FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                  "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def require_fashion_mnist(root: str | os.PathLike | None = None) -> list[Path]:
    """The four IDX files, or SourceMissingError naming the install command."""
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    missing = [n for n in _FASHION_FILES if not (root / n).is_file()]
    if missing:
        raise SourceMissingError(
            f"Fashion-MNIST is not installed ({root / missing[0]} is missing): install it with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or set H2T_FASHION_MNIST_DIR "
            "to a folder holding the four IDX .gz files"
        )
    return [root / n for n in _FASHION_FILES]


def require_animal_mnist() -> list[Path]:
    """The package's two data files, or SourceMissingError naming the install command."""
    spec = importlib.util.find_spec("animal_mnist")
    root = Path(spec.origin).parent / "data" / "Animal_MNIST" if spec and spec.origin else None
    files = [root / "animal_data_version_3.gz", root / "animal_label_version_3.gz"] if root else []
    if not files or not all(f.is_file() for f in files):
        raise SourceMissingError(
            "Animal-MNIST is not installed: install it with `pip install --no-deps animal-mnist` "
            "(or `pip install 'h2t-edge[tasks]'`; its files are read directly, TensorFlow is not needed)"
        )
    return files


def require_sklearn() -> None:
    if importlib.util.find_spec("sklearn") is None:
        raise SourceMissingError(
            "scikit-learn is not installed: install it with `pip install scikit-learn` "
            "(or `pip install 'h2t-edge[tasks]'`)"
        )


def fashion_mnist(root: str | os.PathLike | None = None) -> NaturalSource:
    train_x, train_y, test_x, test_y = (read_idx(f) for f in require_fashion_mnist(root))
    images = np.concatenate([train_x, test_x])
    labels = np.concatenate([train_y, test_y]).astype(np.int64)
    n_train = len(train_x)
    return NaturalSource(images, labels, FASHION_MNIST_CLASSES, np.arange(n_train),
                         np.arange(n_train, len(images)))


def animal_mnist() -> NaturalSource:
    images, labels = (_load_numpy_pickle(f) for f in require_animal_mnist())
    images, labels = np.asarray(images, np.uint8), np.asarray(labels).astype(np.int64)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(images))
    return NaturalSource(images, labels, ANIMAL_MNIST_CLASSES, np.sort(order[2000:]), np.sort(order[:2000]))


def sklearn_digits() -> NaturalSource:
    require_sklearn()
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(images))
    return NaturalSource(images, digits.target.astype(np.int64), tuple(str(i) for i in range(10)),
                         np.sort(order[:1000]), np.sort(order[1000:]))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array: uint8 images [n, H, W] or labels [n]."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays and nothing else: a pickle cannot run code through this loader."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise DatasetError(f"refusing to unpickle {module}.{name}: only numpy arrays are expected")
        if module.startswith("numpy.core"):
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _load_numpy_pickle(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f).load()
