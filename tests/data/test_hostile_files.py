"""Crafted and broken dataset files: each fails with DatasetError, within bounded memory, running no code.

The memory bound is the acceptance rule for the readers: parsing any crafted file of at most 5 MB may
raise memory by at most 200 MB above the size of the real file it stands in for. It is measured in one
subprocess (clean baseline, and a crash cannot take the test run down) in two ways per file: the peak
of ``tracemalloc`` (NumPy reports its array buffers to it, so this counts what was *asked for*, touched
or not) and the growth of the resident-set high-water mark (``VmHWM``, reset before each file; else
``ru_maxrss``). The subprocess also caps its
address space, so a reader that tries a multi-GB allocation gets a MemoryError, which counts as failure.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pcfast.data import DatasetError, load_dataset, read_idx
from pcfast.data.formats import read_cifar_batch, read_cifar_binary

CRAFTED_MAX_BYTES = 5_000_000
GROWTH_ALLOWANCE = 200_000_000  # bytes above the real file's size
MNIST_TRAIN_IMAGES_BYTES = 16 + 60_000 * 28 * 28  # the real uncompressed train-images-idx3-ubyte
CIFAR_BATCH_BYTES = 10_000 * (1 + 3072)  # a real CIFAR-10 batch (binary; the pickled one is 1% larger)


# --- crafting helpers ---------------------------------------------------------------------------------


def _idx_header(type_byte: int, dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, type_byte, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


@functools.lru_cache(maxsize=1)
def _zeros_member() -> bytes:
    """32 MiB of zeros as one gzip member of 32 kB."""
    return gzip.compress(b"\0" * (32 << 20), compresslevel=9)


def _gzip_bomb(header: bytes, zero_mib: int) -> bytes:
    """``header`` then ``zero_mib`` MiB of zeros, as a multi-member gzip of about zero_mib kB."""
    return gzip.compress(header) + _zeros_member() * (zero_mib // 32)


def _binunicode(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _binint(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _pickle_ndarray_call(count: int) -> bytes:
    """{'data': numpy.ndarray((count, 3072), 'u1'), 'labels': numpy.ndarray((count,), 'i1')} by REDUCE."""
    data = _global("numpy", "ndarray") + _binint(count) + _binint(3072) + b"\x86" + _binunicode("u1") + b"\x86R"
    labels = _global("numpy", "ndarray") + _binint(count) + b"\x85" + _binunicode("i1") + b"\x86R"
    return b"\x80\x02}(" + _binunicode("data") + data + _binunicode("labels") + labels + b"u."


def _pickle_huge_bytes_length(length: int, present: int) -> bytes:
    """A BINBYTES8 opcode claiming ``length`` bytes, followed by only ``present`` of them."""
    return b"\x80\x04\x8e" + struct.pack("<Q", length) + b"\0" * present + b"."


def _pickle_repeated_encode(text_bytes: int, repeats: int) -> bytes:
    """One memoized str, then ``repeats`` calls of _codecs.encode on it: each makes a new bytes object."""
    head = b"\x80\x02" + _global("_codecs", "encode") + b"q\x01" + _binunicode("a" * text_bytes) + b"q\x02"
    head += _binunicode("latin1") + b"q\x03"
    call = b"h\x01h\x02h\x03\x86R"
    return head + b"](" + call * repeats + b"e."


def _pickle_dup_flood(size: int) -> bytes:
    """A list holding the same int ``size`` times, one DUP opcode (one byte) per element."""
    return b"\x80\x02](K\x00" + b"2" * (size - 8) + b"e."


def _write_valid_mnist(directory: Path, make_idx_dataset) -> None:
    make_idx_dataset(directory, gz=True, n_train=3, n_test=2)


def _tiny_mnist(directory: Path) -> None:
    """Four valid gzip IDX files: 3 train and 2 test images."""
    directory.mkdir(parents=True, exist_ok=True)
    for stem, dims in (("train-images-idx3-ubyte", (3, 28, 28)), ("train-labels-idx1-ubyte", (3,)),
                       ("t10k-images-idx3-ubyte", (2, 28, 28)), ("t10k-labels-idx1-ubyte", (2,))):
        (directory / f"{stem}.gz").write_bytes(gzip.compress(_idx_header(0x08, dims) + bytes(int(np.prod(dims)))))


def _tiny_cifar_python(directory: Path) -> None:
    """Six valid pickled CIFAR-10 batches of one image each."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        batch = {"data": np.zeros((1, 3072), np.uint8), "labels": [0]}
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))


# --- the memory bound ---------------------------------------------------------------------------------

_MEASURE = textwrap.dedent(
    """
    import json, resource, sys, tracemalloc
    from pathlib import Path
    from pcfast.data import DatasetError, load_dataset, read_idx
    from pcfast.data.formats import read_cifar_batch

    def status_bytes(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return None

    def reset_rss_peak():
        try:  # Linux: writing 5 resets the VmHWM high-water mark to the current resident size
            Path("/proc/self/clear_refs").write_text("5")
            return status_bytes("VmHWM") is not None
        except OSError:
            return False

    def rss_peak():
        hwm = status_bytes("VmHWM")
        return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    vm = status_bytes("VmSize")
    if vm is not None:  # a reader asking for GBs meets a MemoryError here, not the machine's OOM killer
        resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), resource.RLIM_INFINITY))
    calls = {
        "load_mnist": lambda arg: load_dataset("mnist", root=arg, progress=False),
        "load_cifar10": lambda arg: load_dataset("cifar10", root=arg, progress=False),
        "read_idx": lambda arg: read_idx(arg),
        "read_cifar_batch": lambda arg: read_cifar_batch(arg),
    }
    results = {}
    tracemalloc.start()
    for name, call, arg in json.loads(sys.argv[1]):
        rss_before = status_bytes("VmRSS") if reset_rss_peak() else rss_peak()
        tracemalloc.reset_peak()
        traced_before = tracemalloc.get_traced_memory()[0]
        outcome, memory_error, message = "returned", False, ""
        try:
            calls[call](arg)
        except BaseException as exc:
            outcome, message = type(exc).__name__, str(exc)[:300]
            chain = exc
            while chain is not None:
                memory_error |= isinstance(chain, MemoryError)
                chain = chain.__cause__ or chain.__context__
        peak = tracemalloc.get_traced_memory()[1] - traced_before
        rss_growth = rss_peak() - rss_before
        results[name] = dict(outcome=outcome, memory_error=memory_error, message=message,
                             traced_peak=peak, rss_growth=rss_growth)
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str, int]]:
    """name -> (how it is read, path or root, size of the real file it replaces)."""
    base = tmp_path_factory.mktemp("crafted")
    cases: dict[str, tuple[str, str, int]] = {}
    files: list[Path] = []

    def mnist_root(name: str, stem: str, content: bytes) -> str:
        root = base / name
        _tiny_mnist(root / "mnist")
        (root / "mnist" / f"{stem}.gz").write_bytes(content)
        files.append(root / "mnist" / f"{stem}.gz")
        return str(root)

    def cifar_root(name: str, content: bytes) -> str:
        root = base / name
        _tiny_cifar_python(root / "cifar10" / "cifar-10-batches-py")
        (root / "cifar10" / "cifar-10-batches-py" / "data_batch_1").write_bytes(content)
        files.append(root / "cifar10" / "cifar-10-batches-py" / "data_batch_1")
        return str(root)

    mnist_header = _idx_header(0x08, (60_000, 28, 28))
    cases["idx-gzip-bomb-1GiB"] = ("load_mnist", mnist_root(
        "bomb", "train-images-idx3-ubyte", _gzip_bomb(mnist_header, 1024)), MNIST_TRAIN_IMAGES_BYTES)
    cases["idx-gzip-bomb-read_idx"] = ("read_idx", str(Path(cases["idx-gzip-bomb-1GiB"][1]) / "mnist"
                                                       / "train-images-idx3-ubyte.gz"), MNIST_TRAIN_IMAGES_BYTES)
    cases["idx-float64-declared"] = ("load_mnist", mnist_root(
        "f8", "train-images-idx3-ubyte", _gzip_bomb(_idx_header(0x0E, (60_000, 28, 28)), 384)),
        MNIST_TRAIN_IMAGES_BYTES)
    cases["idx-huge-dims"] = ("load_mnist", mnist_root(
        "dims", "train-images-idx3-ubyte", _gzip_bomb(_idx_header(0x08, (4_000_000_000, 28, 28)), 512)),
        MNIST_TRAIN_IMAGES_BYTES)
    cases["cifar-ndarray-call-500k"] = ("load_cifar10", cifar_root("call", _pickle_ndarray_call(500_000)),
                                        CIFAR_BATCH_BYTES)
    huge = base / "huge_bytes_length"
    huge.write_bytes(_pickle_huge_bytes_length(14_700_000_000, 1_200_000))
    files.append(huge)
    cases["cifar-bytes-length-14.7GB"] = ("read_cifar_batch", str(huge), CIFAR_BATCH_BYTES)
    cases["cifar-repeated-encode-1GiB"] = ("load_cifar10", cifar_root(
        "encode", _pickle_repeated_encode(1 << 20, 1024)), CIFAR_BATCH_BYTES)
    cases["cifar-dup-flood"] = ("load_cifar10", cifar_root("dup", _pickle_dup_flood(CRAFTED_MAX_BYTES)),
                                CIFAR_BATCH_BYTES)
    binary = base / "binary" / "cifar10" / "cifar-10-batches-bin"
    binary.mkdir(parents=True)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        (binary / f"{name}.bin").write_bytes(b"\x01" * (3 * 3073))
    (binary / "data_batch_1.bin").write_bytes(b"\x01" * (CRAFTED_MAX_BYTES - 7))  # not whole records
    files.append(binary / "data_batch_1.bin")
    cases["cifar-binary-partial-record"] = ("load_cifar10", str(base / "binary"), CIFAR_BATCH_BYTES)

    for path in files:
        assert path.stat().st_size <= CRAFTED_MAX_BYTES, (path, path.stat().st_size)
    return cases


@pytest.fixture(scope="module")
def measured(crafted: dict[str, tuple[str, str, int]]) -> dict[str, dict]:
    spec = [[name, call, arg] for name, (call, arg, _) in crafted.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(spec)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


CASES = ["idx-gzip-bomb-1GiB", "idx-gzip-bomb-read_idx", "idx-float64-declared", "idx-huge-dims",
         "cifar-ndarray-call-500k", "cifar-bytes-length-14.7GB", "cifar-repeated-encode-1GiB", "cifar-dup-flood",
         "cifar-binary-partial-record"]


@pytest.mark.parametrize("case", CASES)
def test_crafted_file_fails_within_memory_bound(crafted, measured, case: str) -> None:
    _, arg, real_bytes = crafted[case]
    result = measured[case]
    print(f"{case}: traced peak {result['traced_peak'] / 1e6:.1f} MB, "
          f"resident peak growth {result['rss_growth'] / 1e6:.1f} MB ({result['outcome']})")
    assert not result["memory_error"], f"{case}: tried an allocation beyond the address-space cap: {result}"
    assert result["outcome"] == "DatasetError", result
    bound = real_bytes + GROWTH_ALLOWANCE
    assert result["traced_peak"] <= bound, f"{case}: asked for {result['traced_peak']} bytes, bound {bound}"
    assert result["rss_growth"] <= bound, f"{case}: resident memory grew {result['rss_growth']} bytes, bound {bound}"
    assert Path(arg).name in result["message"] or "cifar" in result["message"], "the message names the file"


# --- IDX header checks --------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_idx_dims_overflowing_int64_name_file_and_header(tmp_path: Path, gz: bool) -> None:
    # 2^31 * 2^31 * 4 = 2^64 wraps to 0 in int64: an empty payload would "match" the header.
    header = _idx_header(0x08, (1 << 31, 1 << 31, 4))
    path = tmp_path / ("x.gz" if gz else "x")
    path.write_bytes(gzip.compress(header) if gz else header)
    with pytest.raises(DatasetError) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert "(2147483648, 2147483648, 4)" in str(info.value)


def test_mnist_images_must_be_28_by_28(tmp_path: Path, make_idx_dataset, make_idx_file) -> None:
    _write_valid_mnist(tmp_path / "mnist", make_idx_dataset)
    path = make_idx_file(tmp_path / "mnist" / "train-images-idx3-ubyte", np.zeros((3, 1, 3), np.uint8), gz=True)
    make_idx_file(tmp_path / "mnist" / "t10k-images-idx3-ubyte", np.zeros((2, 1, 3), np.uint8), gz=True)
    with pytest.raises(DatasetError, match=r"\(3, 1, 3\).*\(28, 28\)") as info:
        load_dataset("mnist", root=tmp_path)
    assert str(path) in str(info.value)


def test_mnist_pixels_must_be_bytes(tmp_path: Path, make_idx_dataset, make_idx_file) -> None:
    _write_valid_mnist(tmp_path / "mnist", make_idx_dataset)
    make_idx_file(tmp_path / "mnist" / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.float32), gz=True,
                  type_byte=0x0D)
    with pytest.raises(DatasetError, match="float32, expected uint8"):
        load_dataset("mnist", root=tmp_path)


def test_idx_more_items_than_the_official_split_are_refused(tmp_path: Path, make_idx_dataset) -> None:
    _write_valid_mnist(tmp_path / "fashion_mnist", make_idx_dataset)
    path = tmp_path / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_header(0x08, (10_001,)) + bytes(10_001)))
    with pytest.raises(DatasetError, match="10001 items, more than the 10000") as info:
        load_dataset("fashion_mnist", root=tmp_path)
    assert str(path) in str(info.value)


def test_read_idx_byte_cap(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(_idx_header(0x0C, (5, 2)) + bytes(40))
    np.testing.assert_array_equal(read_idx(path, max_bytes=40), np.zeros((5, 2), np.int32))
    with pytest.raises(DatasetError, match="40 bytes in all, more than the cap of 39 bytes"):
        read_idx(path, max_bytes=39)


def test_gzip_idx_with_trailing_payload_is_cut_one_byte_past(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(_idx_header(0x08, (4,)) + bytes(4 + 10_000_000)))
    with pytest.raises(DatasetError, match="trailing bytes") as info:
        read_idx(path)
    assert str(path) in str(info.value)


# --- CIFAR-10 binary (preferred) and python (restricted) ---------------------------------------------


def test_cifar10_binary_round_trips_and_is_preferred(tmp_path: Path, make_cifar_binary, make_cifar_batches) -> None:
    arrays = make_cifar_binary(tmp_path / "cifar10" / "cifar-10-batches-bin", per_batch=2, n_test=3)
    make_cifar_batches(tmp_path / "cifar10" / "cifar-10-batches-py", per_batch=1, n_test=1, seed=9)
    data = load_dataset("cifar10", root=tmp_path)
    assert (data.num_train, data.num_test, data.num_features) == (10, 3, 3072)
    for split in ("train", "test"):
        images, labels = arrays[split]
        assert np.array_equal(getattr(data, f"x_{split}").numpy(), images.astype(np.float32) / 255)
        assert np.array_equal(getattr(data, f"y_{split}").numpy(), labels)


@pytest.mark.parametrize("size", [0, 3073 - 1, 2 * 3073 + 5], ids=["empty", "short-record", "partial-record"])
def test_cifar10_binary_bad_size_names_file(tmp_path: Path, make_cifar_binary, size: int) -> None:
    make_cifar_binary(tmp_path / "cifar10" / "cifar-10-batches-bin")
    path = tmp_path / "cifar10" / "cifar-10-batches-bin" / "test_batch.bin"
    path.write_bytes(b"\x02" * size)
    with pytest.raises(DatasetError, match="whole number of 3073-byte CIFAR-10 records") as info:
        load_dataset("cifar10", root=tmp_path)
    assert str(path) in str(info.value)


def test_cifar10_binary_record_count_is_capped(tmp_path: Path) -> None:
    path = tmp_path / "batch.bin"
    path.write_bytes(b"\x01" * (3 * 3073))
    images, labels = read_cifar_binary(path, max_records=3)
    assert images.shape == (3, 3072) and labels.tolist() == [1, 1, 1]
    with pytest.raises(DatasetError, match="3 records, more than the 2"):
        read_cifar_binary(path, max_records=2)


def test_cifar10_python_image_count_is_capped(tmp_path: Path) -> None:
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({"data": np.zeros((3, 3072), np.uint8), "labels": [0, 1, 2]}, protocol=2))
    assert read_cifar_batch(path, max_records=3)[0].shape == (3, 3072)
    with pytest.raises(DatasetError, match="3 images, more than the 2"):
        read_cifar_batch(path, max_records=2)


def test_cifar10_python_protocol5_arrays_still_load(tmp_path: Path) -> None:
    images = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    labels = np.array([3, 4], np.int64)
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({"data": images, "labels": labels}, protocol=5))
    got_images, got_labels = read_cifar_batch(path)
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)


def test_cifar10_python_batch_as_python2_wrote_it_still_loads(tmp_path: Path) -> None:
    """The official python version: protocol 2 from Python 2, bytes keys, pixels as one BINSTRING."""
    pixels = (np.arange(2 * 3072) % 251).astype(np.uint8)
    raw = pixels.tobytes()
    data = (b"\x80\x02}q\x00(U\x04dataq\x01" + _global("numpy.core.multiarray", "_reconstruct") + b"q\x02"
            + _global("numpy", "ndarray") + b"q\x03K\x00\x85U\x01b\x87Rq\x04(K\x01K\x02M\x00\x0c\x86"
            + _global("numpy", "dtype") + b"q\x05U\x02u1K\x00K\x01\x87Rq\x06"
            + b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tbI00\nT" + struct.pack("<I", len(raw)) + raw
            + b"tbU\x06labels](K\x07K\x02eU\tfilenames](U\x05a.pngU\x05b.pngeU\x0bbatch_labelU\x04testu.")
    path = tmp_path / "data_batch_1"
    path.write_bytes(data)
    images, labels = read_cifar_batch(path)
    assert np.array_equal(images, pixels.reshape(2, 3072)) and labels.tolist() == [7, 2]


class _Touch:
    """Unpickling this with a plain unpickler would create ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


class _Plain:
    pass


def _malicious_pickles(sentinel: Path) -> dict[str, bytes]:
    code = f"open({str(sentinel)!r}, 'w').close()"
    plain = _Plain()
    plain.__dict__["data"] = 1
    return {
        "reduce-protocol-2": pickle.dumps({"data": _Touch(sentinel), "labels": [0]}, protocol=2),
        "stack-global-exec": (b"\x80\x04\x8c\x08builtins\x8c\x04exec\x93\x8c" + bytes([len(code)]) + code.encode()
                              + b"\x85R."),
        "global-os-system": b"cos\nsystem\n(" + _binunicode(f"touch {sentinel}") + b"tR.",
        "newobj-ndarray": b"\x80\x02" + _global("numpy", "ndarray") + _binint(1 << 20) + b"\x85\x81.",
        "build-plain-object": pickle.dumps(plain, protocol=2),
        "ndarray-of-objects": pickle.dumps({"data": np.array([_Plain()], dtype=object), "labels": [0]}, protocol=2),
    }


@pytest.mark.parametrize("vector", ["reduce-protocol-2", "stack-global-exec", "global-os-system", "newobj-ndarray",
                                    "build-plain-object", "ndarray-of-objects"])
def test_cifar10_python_malicious_pickle_runs_nothing(tmp_path: Path, vector: str) -> None:
    sentinel = tmp_path / "sentinel"
    path = tmp_path / "data_batch_1"
    path.write_bytes(_malicious_pickles(sentinel)[vector])
    with pytest.raises(DatasetError, match="not a valid CIFAR-10 python batch") as info:
        read_cifar_batch(path)
    assert str(path) in str(info.value)
    assert "not allowed" in str(info.value)
    assert not sentinel.exists(), "nothing in the file may run"
