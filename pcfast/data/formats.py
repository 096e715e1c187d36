"""Readers for the on-disk dataset formats: IDX (MNIST, Fashion-MNIST) and CIFAR-10 (binary and python).

This module owns parsing and validating raw files into NumPy arrays. It knows nothing about splits,
scaling or download; every malformed input raises :class:`~pcfast.data.errors.DatasetError` naming
the file and what is wrong with it.

Resource bounds: a reader never allocates more than the size a valid file of the expected dataset
could declare. Declared sizes (IDX dimensions, CIFAR record counts) are checked against the caller's
expectations and a byte cap *before* anything is allocated; decompression streams in chunks and stops
one byte past the declared payload, so a small compressed file cannot expand into a large allocation.

IDX layout (big-endian): two zero bytes, one type byte, one byte ``ndim``, then ``ndim`` uint32
dimensions, then the values in C order. Files may be gzip-compressed.

CIFAR-10 binary layout (``cifar-10-batches-bin/*.bin``): records of one label byte followed by 3,072
pixel bytes (R plane, G plane, B plane), 10,000 records per file. No unpickling is involved.

CIFAR-10 python layout (``cifar-10-batches-py/*``): pickled dicts. They are read by a restricted
unpickler that only rebuilds plain containers and NumPy arrays of plain dtypes, within an operation
and byte budget; any other global, opcode or oversized allocation is refused before it happens.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import DatasetError

__all__ = [
    "CIFAR_BATCH_RECORDS",
    "CIFAR_FEATURES",
    "CIFAR_PICKLE_MAX_BYTES",
    "IDX_MAX_BYTES",
    "read_cifar_batch",
    "read_cifar_binary",
    "read_idx",
]

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
_CHUNK = 1 << 20

IDX_MAX_BYTES = 64 << 20
"""Default cap on an IDX payload (bytes); the largest MNIST-family file, train images, holds 47,040,000."""

CIFAR_FEATURES = 3 * 32 * 32
CIFAR_BATCH_RECORDS = 10_000
"""Images in one official CIFAR-10 batch file; no batch, binary or python, may declare more."""
_CIFAR_RECORD = 1 + CIFAR_FEATURES

CIFAR_PICKLE_MAX_BYTES = 32 << 20
"""Cap on a CIFAR-10 python batch file (the official ones hold about 31.0 MB)."""
_PICKLE_MAX_OPS = 200_000  # an official batch takes about 30,000 opcodes (10,000 labels and file names)


# --- IDX ---------------------------------------------------------------------------------------------


def _open_maybe_gzip(path: Path) -> tuple[IO[bytes], bool]:
    """The file opened for streaming reads, through a gzip decoder when it starts with the gzip magic."""
    try:
        with path.open("rb") as probe:
            compressed = probe.read(2) == _GZIP_MAGIC
        return (gzip.GzipFile(path, "rb") if compressed else path.open("rb")), compressed
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from exc


def _read_at_most(stream: IO[bytes], size: int) -> bytes:
    """Up to ``size`` bytes (fewer only at the end of the stream); never buffers more than asked."""
    parts, remaining = [], size
    while remaining > 0:
        part = stream.read(min(remaining, _CHUNK))
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def _fill(stream: IO[bytes], buffer: memoryview) -> int:
    """Read into ``buffer`` chunk by chunk until it is full or the stream ends; return the bytes read."""
    filled = 0
    while filled < len(buffer):
        count = stream.readinto(buffer[filled : filled + _CHUNK])
        if not count:
            break
        filled += count
    return filled


def _check_idx_shape(
    path: Path,
    shape: tuple[int, ...],
    dtype: np.dtype,
    *,
    expect_item_shape: tuple[int, ...] | None,
    max_count: int | None,
    max_bytes: int,
) -> int:
    """Validate the declared shape against the expectations; return the payload size in bytes."""
    header = f"IDX header declares shape {shape} of {dtype.newbyteorder('=').name}"
    if expect_item_shape is not None and shape[1:] != tuple(expect_item_shape):
        expected = "(" + ", ".join(["N", *map(str, expect_item_shape)]) + ("" if expect_item_shape else ",") + ")"
        raise DatasetError(f"{path}: {header}; expected shape {expected}, items of shape {tuple(expect_item_shape)}")
    if max_count is not None and shape and shape[0] > max_count:
        raise DatasetError(f"{path}: {header}: {shape[0]} items, more than the {max_count} this dataset holds")
    payload = math.prod(shape) * dtype.itemsize  # Python ints: no overflow, unlike np.prod
    if payload > max_bytes:
        raise DatasetError(
            f"{path}: {header}, {payload} bytes in all, more than the cap of {max_bytes} bytes "
            f"(max_bytes=) for this file"
        )
    return payload


def read_idx(
    path: str | os.PathLike[str],
    *,
    expect_ndim: int | None = None,
    expect_item_shape: tuple[int, ...] | None = None,
    expect_dtype: np.dtype | str | None = None,
    max_count: int | None = None,
    max_bytes: int = IDX_MAX_BYTES,
) -> np.ndarray:
    """Parse one IDX file (raw or gzip) into a native-endian array of its declared shape.

    The header is validated before any allocation: the declared shape must match the expectations and
    its payload (computed in exact integers) must fit ``max_bytes``. The payload is then streamed into
    an array of exactly that size, and the file must end right after it, so memory never exceeds the
    declared, checked size however the file was crafted (a gzip bomb is cut one byte past the payload).

    Args:
        path: the file.
        expect_ndim: when given, a file with another number of dimensions is rejected (an images file
            of MNIST has 3, a labels file 1), which catches swapped file names.
        expect_item_shape: when given, the dimensions after the first must equal it (``(28, 28)`` for
            MNIST images, ``()`` for labels); implies ``expect_ndim = 1 + len(expect_item_shape)``.
        expect_dtype: when given, the type byte must denote this dtype (e.g. ``np.uint8``).
        max_count: when given, the first dimension (the number of items) may not exceed it.
        max_bytes: cap on the payload in bytes (default :data:`IDX_MAX_BYTES`, 64 MiB).

    Raises:
        DatasetError: bad magic number, unknown or unexpected type byte, wrong dimensionality or item
            shape, too many items or bytes declared, a corrupt gzip stream, or a payload whose length
            does not match the header (truncated or padded file).
    """
    path = Path(path)
    if expect_item_shape is not None:
        expect_item_shape = tuple(int(d) for d in expect_item_shape)
        if expect_ndim is not None and expect_ndim != 1 + len(expect_item_shape):
            raise ValueError(f"expect_ndim={expect_ndim} contradicts expect_item_shape={expect_item_shape}")
        expect_ndim = 1 + len(expect_item_shape)
    stream, compressed = _open_maybe_gzip(path)
    try:
        with stream:
            return _parse_idx(path, stream, compressed, expect_ndim, expect_item_shape, expect_dtype,
                              max_count, max_bytes)
    except (OSError, EOFError, zlib.error) as exc:
        what = "corrupt or truncated gzip stream" if compressed else "cannot read"
        raise DatasetError(f"{path}: {what} ({exc})") from exc


def _parse_idx(
    path: Path,
    stream: IO[bytes],
    compressed: bool,
    expect_ndim: int | None,
    expect_item_shape: tuple[int, ...] | None,
    expect_dtype: np.dtype | str | None,
    max_count: int | None,
    max_bytes: int,
) -> np.ndarray:
    magic = _read_at_most(stream, 4)
    if len(magic) < 4:
        raise DatasetError(f"{path}: too short for an IDX header ({len(magic)} bytes)")
    if magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
        raise DatasetError(
            f"{path}: bad IDX magic number 0x{magic.hex()} "
            f"(expected 0x0000TTNN with type byte TT in {sorted(hex(t) for t in _IDX_DTYPES)})"
        )
    dtype = _IDX_DTYPES[magic[2]]
    ndim = magic[3]
    if expect_ndim is not None and ndim != expect_ndim:
        raise DatasetError(f"{path}: IDX file has {ndim} dimensions, expected {expect_ndim}")
    if expect_dtype is not None and dtype.newbyteorder("=") != np.dtype(expect_dtype):
        raise DatasetError(
            f"{path}: IDX type byte 0x{magic[2]:02x} means {dtype.newbyteorder('=').name}, "
            f"expected {np.dtype(expect_dtype).name}"
        )
    header_len = 4 + 4 * ndim
    dims = _read_at_most(stream, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise DatasetError(f"{path}: truncated IDX header ({4 + len(dims)} bytes, need {header_len})")
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    payload = _check_idx_shape(path, shape, dtype, expect_item_shape=expect_item_shape,
                               max_count=max_count, max_bytes=max_bytes)
    expected = header_len + payload
    if not compressed:  # the size on disk is known: compare before allocating
        size = os.fstat(stream.fileno()).st_size
        if size != expected:
            kind = "truncated" if size < expected else "has trailing bytes"
            raise DatasetError(
                f"{path}: IDX payload {kind}: header says shape {shape} ({expected} bytes in all), "
                f"file holds {size} bytes"
            )
    array = np.empty(math.prod(shape), dtype=dtype)
    filled = _fill(stream, memoryview(array).cast("B")) if payload else 0
    if filled < payload:
        raise DatasetError(
            f"{path}: IDX payload truncated: header says shape {shape} ({expected} bytes in all), "
            f"file holds {header_len + filled} bytes"
        )
    if stream.read(1):
        raise DatasetError(
            f"{path}: IDX payload has trailing bytes: header says shape {shape} ({expected} bytes in all), "
            f"file holds more"
        )
    if not dtype.isnative:  # swap in place: no second copy of the payload
        array.byteswap(inplace=True)
        array = array.view(dtype.newbyteorder("="))
    return array.reshape(shape)


# --- CIFAR-10 binary ---------------------------------------------------------------------------------


def read_cifar_binary(
    path: str | os.PathLike[str], *, max_records: int = CIFAR_BATCH_RECORDS
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 binary batch (``data_batch_k.bin`` or ``test_batch.bin``).

    Each record is one label byte then 3,072 pixel bytes. The record count comes from the file size,
    checked against ``max_records`` before anything is read.

    Returns:
        ``(images, labels)``: uint8 ``(N, 3072)`` in channel-major order, and int64 ``(N,)``.

    Raises:
        DatasetError: a size that is not a whole number of records, no records, or more than
            ``max_records`` of them.
    """
    path = Path(path)
    try:
        with path.open("rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            count, leftover = divmod(size, _CIFAR_RECORD)
            if leftover or count == 0:
                raise DatasetError(
                    f"{path}: {size} bytes is not a positive whole number of {_CIFAR_RECORD}-byte CIFAR-10 "
                    f"records (1 label byte + {CIFAR_FEATURES} pixel bytes); truncated or not a CIFAR-10 batch"
                )
            if count > max_records:
                raise DatasetError(f"{path}: {size} bytes holds {count} records, more than the {max_records} "
                                   f"of a CIFAR-10 batch")
            records = np.empty((count, _CIFAR_RECORD), dtype=np.uint8)
            filled = _fill(stream, memoryview(records).cast("B"))
            if filled != size or stream.read(1):
                raise DatasetError(f"{path}: file changed size while being read ({filled} of {size} bytes)")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from exc
    return np.ascontiguousarray(records[:, 1:]), records[:, 0].astype(np.int64)


# --- CIFAR-10 python (restricted unpickling) ---------------------------------------------------------

_PLAIN_DTYPES = frozenset({"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f4", "f8", "bool", "uint8"})


class _Budget:
    """Bytes a pickle may make the unpickler allocate beyond its own size, and opcodes it may run."""

    def __init__(self, path: Path, max_bytes: int, max_ops: int) -> None:
        self.path, self.bytes_left, self.ops_left = path, max_bytes, max_ops

    def charge(self, nbytes: int, what: str) -> None:
        self.bytes_left -= nbytes
        if self.bytes_left < 0:
            raise pickle.UnpicklingError(f"{what} of {nbytes} bytes exceeds the allocation budget of a CIFAR-10 batch")


def _plain_dtype(value: Any, what: str) -> np.dtype:
    if not isinstance(value, np.dtype) or value.hasobject or value.subdtype is not None or value.names is not None:
        raise pickle.UnpicklingError(f"{what}: dtype {value!r} is not allowed (only plain numeric dtypes)")
    return value


def _exact_shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(d) is int and d >= 0 for d in value):
        raise pickle.UnpicklingError(f"{what}: shape must be a tuple of non-negative ints, got {value!r}")
    return value


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler: every opcode is ours to vet
    """Unpickler that rebuilds plain containers and NumPy arrays of plain dtypes, and nothing else.

    - Globals resolve to validating stand-ins (``numpy.dtype``, ``_reconstruct``, ``_frombuffer``,
      ``_codecs.encode``); ``numpy.ndarray`` may be named but not called. Anything else is refused.
    - Opcodes that build arbitrary objects (``INST``, ``OBJ``, ``NEWOBJ``, extensions, persistent ids,
      out-of-band buffers) are refused; the rest count against an operation budget.
    - Every array and byte string built from the pickle is charged to a byte budget, checked before the
      allocation, so repeating a memoized object cannot multiply memory.
    """

    _REFUSED_OPCODES = {
        getattr(pickle, name)[0]: name
        for name in ("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID",
                     "NEXT_BUFFER")
    }

    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data), encoding="latin1")
        self._budget = _Budget(path, max_bytes=2 * len(data), max_ops=_PICKLE_MAX_OPS)
        self._callables: dict[tuple[str, str], Callable[..., Any]] = {
            ("numpy", "dtype"): self._dtype,
            ("numpy.core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy.core.numeric", "_frombuffer"): self._frombuffer,
            ("numpy._core.numeric", "_frombuffer"): self._frombuffer,
            ("_codecs", "encode"): self._encode,
        }
        budget = self._budget
        base = pickle._Unpickler.dispatch

        def counted(load: Callable[[pickle._Unpickler], None]) -> Callable[[pickle._Unpickler], None]:
            def run(unpickler: pickle._Unpickler) -> None:
                budget.ops_left -= 1
                if budget.ops_left < 0:
                    raise pickle.UnpicklingError(f"more than {_PICKLE_MAX_OPS} pickle operations")
                load(unpickler)

            return run

        overrides = {pickle.REDUCE[0]: type(self)._load_reduce, pickle.BUILD[0]: type(self)._load_build}
        def refuse(name: str) -> Callable[[pickle._Unpickler], None]:
            def run(unpickler: pickle._Unpickler) -> None:
                raise pickle.UnpicklingError(f"pickle opcode {name} is not allowed in a dataset file")

            return run

        self.dispatch = {code: counted(overrides.get(code, load)) for code, load in base.items()}
        self.dispatch.update({code: refuse(name) for code, name in self._REFUSED_OPCODES.items()})

    # Globals -----------------------------------------------------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray  # an argument of _reconstruct; _load_reduce refuses to call it
        if (module, name) in self._callables:
            return self._callables[(module, name)]
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dataset file")

    def _dtype(self, spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
        if not isinstance(spec, str) or spec not in _PLAIN_DTYPES:
            raise pickle.UnpicklingError(f"numpy.dtype({spec!r}) is not allowed (only plain numeric dtypes)")
        return np.dtype(spec, bool(align), bool(copy))

    def _reconstruct(self, cls: Any, shape: Any, typecode: Any) -> np.ndarray:
        if cls is not np.ndarray or shape != (0,) or typecode not in (b"b", "b"):
            raise pickle.UnpicklingError(f"_reconstruct{(cls, shape, typecode)!r} is not how NumPy pickles an array")
        return np.ndarray((0,), np.int8)

    def _frombuffer(self, buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
        dtype = _plain_dtype(dtype, "_frombuffer")
        shape = _exact_shape(shape, "_frombuffer")
        if not isinstance(buffer, (bytes, bytearray)) or len(buffer) != math.prod(shape) * dtype.itemsize:
            raise pickle.UnpicklingError(f"_frombuffer: buffer does not hold shape {shape} of {dtype}")
        if order not in ("C", "F"):
            raise pickle.UnpicklingError(f"_frombuffer: order must be 'C' or 'F', got {order!r}")
        self._budget.charge(len(buffer), "an array")
        return np.frombuffer(buffer, dtype).reshape(shape, order=order)

    def _encode(self, text: Any, encoding: Any = "utf-8") -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise pickle.UnpicklingError(f"_codecs.encode: only str to latin1 is allowed, got {type(text).__name__} "
                                         f"to {encoding!r}")
        self._budget.charge(len(text), "a byte string")
        return text.encode("latin1")

    # Opcodes that call or mutate ---------------------------------------------------------------------

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not isinstance(args, tuple) or not any(func is allowed for allowed in self._callables.values()):
            raise pickle.UnpicklingError(f"calling {func!r} is not allowed in a dataset file")
        self.stack[-1] = func(*args)

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.dtype):
            if not (isinstance(state, tuple) and len(state) >= 8 and state[2:5] == (None, None, None)):
                raise pickle.UnpicklingError(f"dtype state {state!r} is not a plain numeric dtype")
        elif type(inst) is np.ndarray:
            if not (isinstance(state, tuple) and len(state) in (4, 5)):
                raise pickle.UnpicklingError("ndarray state must be (version, shape, dtype, fortran, data)")
            shape, dtype, _, data = state[-4:]
            shape = _exact_shape(shape, "ndarray state")
            dtype = _plain_dtype(dtype, "ndarray state")
            if not isinstance(data, (bytes, str)) or len(data) != math.prod(shape) * dtype.itemsize:
                raise pickle.UnpicklingError(f"ndarray state: data does not hold shape {shape} of {dtype}")
            self._budget.charge(len(data), "an array")
        else:
            raise pickle.UnpicklingError(f"restoring the state of a {type(inst).__name__} is not allowed")
        inst.__setstate__(state)


def _field(batch: dict, key: str) -> Any:
    """``batch[key]`` whether the pickle stored str or bytes keys (Python 3 vs Python 2 writers)."""
    for candidate in (key, key.encode()):
        if candidate in batch:
            return batch[candidate]
    raise KeyError(key)


def read_cifar_batch(
    path: str | os.PathLike[str], *, max_records: int = CIFAR_BATCH_RECORDS
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch (``data_batch_k`` or ``test_batch``) without running pickled code.

    The file may be at most :data:`CIFAR_PICKLE_MAX_BYTES` long; it is unpickled by a restricted
    unpickler (plain containers and NumPy arrays of plain dtypes only, within an operation budget and
    a byte budget of twice the file size), so neither code execution nor a memory blow-up can be
    smuggled in. Prefer the binary version (:func:`read_cifar_binary`), which needs no unpickling.

    Returns:
        ``(images, labels)``: uint8 ``(N, 3072)`` in the file's channel-major order, and int64 ``(N,)``.

    Raises:
        DatasetError: too large, not a pickle of the expected dict, wrong shapes or dtypes, more than
            ``max_records`` images, or a disallowed global, opcode or allocation.
    """
    path = Path(path)
    try:
        with path.open("rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            if size > CIFAR_PICKLE_MAX_BYTES:
                raise DatasetError(f"{path}: {size} bytes, more than the {CIFAR_PICKLE_MAX_BYTES} bytes a CIFAR-10 "
                                   f"python batch can take")
            data = _read_at_most(stream, CIFAR_PICKLE_MAX_BYTES)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from exc
    try:
        batch = _RestrictedUnpickler(data, path).load()
    except Exception as exc:  # unpickling corrupt bytes can raise almost anything
        raise DatasetError(f"{path}: not a valid CIFAR-10 python batch ({type(exc).__name__}: {exc})") from exc
    finally:
        del data
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: expected a pickled dict, found {type(batch).__name__}")
    try:
        images, labels = _field(batch, "data"), _field(batch, "labels")
    except KeyError as exc:
        raise DatasetError(f"{path}: CIFAR-10 batch lacks the {exc.args[0]!r} entry") from exc
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 \
            or images.shape[1] != CIFAR_FEATURES:
        raise DatasetError(
            f"{path}: 'data' must be uint8 of shape (N, {CIFAR_FEATURES}), "
            f"found {getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}"
        )
    if images.shape[0] > max_records:
        raise DatasetError(f"{path}: {images.shape[0]} images, more than the {max_records} of a CIFAR-10 batch")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != images.shape[0]:
        raise DatasetError(f"{path}: 'labels' must be {images.shape[0]} integers, found "
                           f"{type(labels).__name__} of length {len(labels) if hasattr(labels, '__len__') else '?'}")
    if isinstance(labels, list) and not all(type(v) is int for v in labels):
        raise DatasetError(f"{path}: 'labels' must be {images.shape[0]} integers, found other values")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer)):
        raise DatasetError(
            f"{path}: 'labels' must be {images.shape[0]} integers, found {labels.dtype} {labels.shape}"
        )
    return images, labels.astype(np.int64)
