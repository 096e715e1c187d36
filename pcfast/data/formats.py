"""Readers for the on-disk dataset formats: IDX (MNIST, Fashion-MNIST) and CIFAR-10 python batches.

This module owns parsing and validating raw files into NumPy arrays. It knows nothing about splits,
scaling or download; every malformed input raises :class:`~pcfast.data.errors.DatasetError` naming
the file and what is wrong with it.

IDX layout (big-endian): two zero bytes, one type byte, one byte ``ndim``, then ``ndim`` uint32
dimensions, then the values in C order. Files may be gzip-compressed.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DatasetError

__all__ = ["CIFAR_FEATURES", "read_cifar_batch", "read_idx"]

# IDX type byte -> big-endian NumPy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

CIFAR_FEATURES = 3 * 32 * 32


def _read_bytes(path: Path) -> bytes:
    """The file's contents, gunzipped when it starts with the gzip magic."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from exc
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc


def read_idx(path: str | os.PathLike[str], *, expect_ndim: int | None = None) -> np.ndarray:
    """Parse one IDX file (raw or gzip) into a native-endian array of its declared shape.

    Args:
        path: the file.
        expect_ndim: when given, a file with another number of dimensions is rejected (an images file
            of MNIST has 3, a labels file 1), which catches swapped file names.

    Raises:
        DatasetError: bad magic number, unknown type byte, wrong dimensionality, or a payload whose
            length does not match the header (truncated or padded file).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()} "
            f"(expected 0x0000TTNN with type byte TT in {sorted(hex(t) for t in _IDX_DTYPES)})"
        )
    dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    if expect_ndim is not None and ndim != expect_ndim:
        raise DatasetError(f"{path}: IDX file has {ndim} dimensions, expected {expect_ndim}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(f"{path}: truncated IDX header ({len(data)} bytes, need {header_len})")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header_len + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "has trailing bytes"
        raise DatasetError(
            f"{path}: IDX payload {kind}: header says shape {shape} ({expected} bytes in all), "
            f"file holds {len(data)} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds NumPy arrays and plain containers, and refuses every other global.

    CIFAR-10 ships as pickles; refusing arbitrary globals keeps a tampered file from running code.
    """

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),  # how Python 3 protocol-2 pickles spell bytes
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dataset file")
        # Pickles written under NumPy 1 name numpy.core, which NumPy 2 renamed numpy._core.
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core.") :]
        return super().find_class(module, name)


def _field(batch: dict, key: str) -> Any:
    """``batch[key]`` whether the pickle stored str or bytes keys (Python 3 vs Python 2 writers)."""
    for candidate in (key, key.encode()):
        if candidate in batch:
            return batch[candidate]
    raise KeyError(key)


def read_cifar_batch(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch (``data_batch_k`` or ``test_batch``).

    Returns:
        ``(images, labels)``: uint8 ``(N, 3072)`` in the file's channel-major order, and int64 ``(N,)``.

    Raises:
        DatasetError: not a pickle of the expected dict, wrong shapes or dtypes, or a disallowed global.
    """
    path = Path(path)
    try:
        with path.open("rb") as stream:
            batch = _NumpyOnlyUnpickler(stream, encoding="latin1").load()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from exc
    except Exception as exc:  # unpickling corrupt bytes can raise almost anything
        raise DatasetError(f"{path}: not a valid CIFAR-10 python batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: expected a pickled dict, found {type(batch).__name__}")
    try:
        images = np.asarray(_field(batch, "data"))
        labels = np.asarray(_field(batch, "labels"))
    except KeyError as exc:
        raise DatasetError(f"{path}: CIFAR-10 batch lacks the {exc.args[0]!r} entry") from exc
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != CIFAR_FEATURES:
        raise DatasetError(
            f"{path}: 'data' must be uint8 of shape (N, {CIFAR_FEATURES}), "
            f"found {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{path}: 'labels' must be {images.shape[0]} integers, found {labels.dtype} {labels.shape}"
        )
    return images, labels.astype(np.int64)
