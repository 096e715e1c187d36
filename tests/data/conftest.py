"""Fixtures for tests/data: tiny synthetic dataset files and a local HTTP server to download them from."""

from __future__ import annotations

import functools
import gzip
import http.server
import pickle
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray, type_byte: int = 0x08) -> bytes:
    """Encode ``array`` as IDX: zero, zero, type byte, ndim, big-endian uint32 dims, big-endian data."""
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[type_byte]
    header = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def write_idx(path: Path, array: np.ndarray, *, gz: bool, type_byte: int = 0x08) -> Path:
    data = idx_bytes(array, type_byte)
    path = path.with_name(path.name + ".gz") if gz else path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_idx_dataset(directory: Path, *, gz: bool, n_train: int = 7, n_test: int = 5, seed: int = 0,
                      side: int = 28) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write the four MNIST-layout files into ``directory``; return the arrays written per split."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255  # pin the range ends
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        image_stem, label_stem = IDX_STEMS[split]
        write_idx(directory / image_stem, images, gz=gz)
        write_idx(directory / label_stem, labels, gz=gz)
        arrays[split] = images, labels
    return arrays


def write_cifar_batches(batch_dir: Path, *, per_batch: int = 2, n_test: int = 3,
                        seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write data_batch_1..5 and test_batch as protocol-2 pickles, like the official python version.

    Batch 1 uses bytes keys (what a Python 2 writer produces read as bytes), the rest str keys.
    """
    rng = np.random.default_rng(seed)
    batch_dir.mkdir(parents=True, exist_ok=True)
    train_x, train_y = [], []
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        keys = (b"data", b"labels") if k == 0 else ("data", "labels")
        (batch_dir / name).write_bytes(pickle.dumps({keys[0]: images, keys[1]: labels}, protocol=2))
        if name == "test_batch":
            test = images, np.array(labels)
        else:
            train_x.append(images)
            train_y.extend(labels)
    return {"train": (np.concatenate(train_x), np.array(train_y)), "test": test}


def write_cifar_binary(batch_dir: Path, *, per_batch: int = 2, n_test: int = 3,
                       seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write data_batch_1..5.bin and test_batch.bin like the official binary version: records of one
    label byte then 3,072 pixel bytes."""
    rng = np.random.default_rng(seed)
    batch_dir.mkdir(parents=True, exist_ok=True)
    train_x, train_y = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        (batch_dir / f"{name}.bin").write_bytes(np.concatenate([labels[:, None], images], axis=1).tobytes())
        if name == "test_batch":
            test = images, labels.astype(np.int64)
        else:
            train_x.append(images)
            train_y.append(labels.astype(np.int64))
    return {"train": (np.concatenate(train_x), np.concatenate(train_y)), "test": test}


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep urllib from routing 127.0.0.1 through a proxy configured in the environment."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requested: list[str]

    def do_GET(self) -> None:
        self.requested.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client hanging up early (size cap, deadline) is what some tests provoke


class LocalServer:
    """A static file server on 127.0.0.1; ``root`` is served as ``url``, ``requested`` logs GET paths."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requested: list[str] = []
        handler: Callable[..., http.server.BaseHTTPRequestHandler] = functools.partial(
            type("Handler", (_QuietHandler,), {"requested": self.requested}), directory=str(root)
        )
        self._server = _QuietServer(("127.0.0.1", 0), handler)
        self._server.timeout = 5
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive(), "HTTP server thread did not stop"


@pytest.fixture
def http_server(tmp_path_factory: pytest.TempPathFactory, no_proxy: None) -> Iterator[LocalServer]:
    server = LocalServer(tmp_path_factory.mktemp("served"))
    try:
        yield server
    finally:
        server.close()


# Helpers reach the tests as fixtures: importing conftest by name breaks once other test folders
# have their own conftest.py.
@pytest.fixture
def make_idx_dataset() -> Callable[..., dict[str, tuple[np.ndarray, np.ndarray]]]:
    return write_idx_dataset


@pytest.fixture
def make_idx_file() -> Callable[..., Path]:
    return write_idx


@pytest.fixture
def make_cifar_batches() -> Callable[..., dict[str, tuple[np.ndarray, np.ndarray]]]:
    return write_cifar_batches


@pytest.fixture
def make_cifar_binary() -> Callable[..., dict[str, tuple[np.ndarray, np.ndarray]]]:
    return write_cifar_binary
