"""download=True end to end against a local HTTP server, and the checksum table itself."""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pcfast.data import MIRROR_ENV, SOURCES, DatasetError, load_dataset
from pcfast.data.download import Resource, Source, download_file, resource_urls


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _serve_idx(server, make_idx_dataset, name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return make_idx_dataset(server.root / name, gz=True, n_train=6, n_test=4, seed=3)


def _table_for(server, name: str, *, use_sha256: bool = False, wrong: str | None = None) -> Source:
    """The dataset's real file list with checksums of the served files (``wrong`` gets a bad one)."""
    resources = []
    for resource in SOURCES[name].resources:
        data = (server.root / name / resource.filename).read_bytes()
        digest = (hashlib.sha256 if use_sha256 else hashlib.md5)(data).hexdigest()
        if resource.filename == wrong:
            digest = "0" * len(digest)
        resources.append(Resource(resource.filename, **{"sha256" if use_sha256 else "md5": digest}))
    return Source(mirrors=("http://public.invalid/",), resources=tuple(resources), members=SOURCES[name].members)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*")) if directory.exists() else []


def test_download_mnist_via_mirror_argument(tmp_path, http_server, make_idx_dataset, monkeypatch) -> None:
    served = _serve_idx(http_server, make_idx_dataset, "mnist")
    monkeypatch.setitem(SOURCES, "mnist", _table_for(http_server, "mnist"))
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    data = load_dataset("mnist", root=tmp_path, download=True, mirror=http_server.url + "/")
    assert torch.equal(data.y_train, torch.from_numpy(served["train"][1].astype(np.int64)))
    assert torch.equal(data.x_test, torch.from_numpy(served["test"][0].reshape(4, -1) / np.float32(255)))
    names = [r.filename for r in SOURCES["mnist"].resources]
    assert _leftovers(tmp_path / "mnist") == sorted(names), "only the verified files, no .part leftovers"
    for name in names:
        assert _md5(tmp_path / "mnist" / name) == _md5(http_server.root / "mnist" / name)
    assert sorted(http_server.requested) == sorted(f"/mnist/{n}" for n in names)

    http_server.requested.clear()
    load_dataset("mnist", root=tmp_path, download=True, mirror=http_server.url)
    assert http_server.requested == [], "files already in place must not be fetched again"


def test_download_fashion_mnist_via_env_with_sha256(tmp_path, http_server, make_idx_dataset, monkeypatch) -> None:
    served = _serve_idx(http_server, make_idx_dataset, "fashion_mnist")
    monkeypatch.setitem(SOURCES, "fashion_mnist", _table_for(http_server, "fashion_mnist", use_sha256=True))
    monkeypatch.setenv(MIRROR_ENV, http_server.url)
    data = load_dataset("fashion_mnist", root=tmp_path, download=True)
    assert torch.equal(data.y_test, torch.from_numpy(served["test"][1].astype(np.int64)))


def test_download_fetches_only_missing_files(tmp_path, http_server, make_idx_dataset, monkeypatch) -> None:
    _serve_idx(http_server, make_idx_dataset, "mnist")
    monkeypatch.setitem(SOURCES, "mnist", _table_for(http_server, "mnist"))
    local = tmp_path / "mnist"
    local.mkdir()
    for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):  # the user's uncompressed copies
        (local / stem).write_bytes(gzip.decompress((http_server.root / "mnist" / f"{stem}.gz").read_bytes()))
    load_dataset("mnist", root=tmp_path, download=True, mirror=http_server.url)
    assert sorted(http_server.requested) == ["/mnist/t10k-labels-idx1-ubyte.gz", "/mnist/train-labels-idx1-ubyte.gz"]


def test_wrong_checksum_raises_and_leaves_no_file(tmp_path, http_server, make_idx_dataset, monkeypatch) -> None:
    _serve_idx(http_server, make_idx_dataset, "mnist")
    bad = "t10k-images-idx3-ubyte.gz"
    monkeypatch.setitem(SOURCES, "mnist", _table_for(http_server, "mnist", wrong=bad))
    with pytest.raises(DatasetError, match="checksum mismatch") as info:
        load_dataset("mnist", root=tmp_path, download=True, mirror=http_server.url)
    message = str(info.value)
    assert f"expected md5 {'0' * 32}" in message
    assert f"got {_md5(http_server.root / 'mnist' / bad)}" in message
    assert bad not in _leftovers(tmp_path / "mnist")
    assert not [n for n in _leftovers(tmp_path / "mnist") if n.endswith(".part")]


def test_unreachable_file_lists_url_and_fix(tmp_path, http_server, monkeypatch) -> None:
    table = Source(("http://public.invalid/",), (Resource("train-images-idx3-ubyte.gz"),))
    monkeypatch.setitem(SOURCES, "mnist", table)
    with pytest.raises(DatasetError, match="could not download") as info:
        load_dataset("mnist", root=tmp_path, download=True, mirror=http_server.url)
    assert f"{http_server.url}/mnist/train-images-idx3-ubyte.gz" in str(info.value)
    assert "404" in str(info.value)
    assert _leftovers(tmp_path / "mnist") == []


def test_download_file_tries_mirrors_in_order(tmp_path, http_server) -> None:
    (http_server.root / "blob.bin").write_bytes(b"payload" * 1000)
    expected = hashlib.sha256(b"payload" * 1000).hexdigest()
    urls = [f"{http_server.url}/absent.bin", f"{http_server.url}/blob.bin"]
    path = download_file(urls, tmp_path / "out" / "blob.bin", sha256=expected, progress=False)
    assert path.read_bytes() == b"payload" * 1000
    assert http_server.requested == ["/absent.bin", "/blob.bin"]


def test_download_cifar10_archive_is_extracted(tmp_path, http_server, make_cifar_binary, monkeypatch) -> None:
    staging = tmp_path / "staging"
    arrays = make_cifar_binary(staging / "cifar-10-batches-bin", per_batch=1, n_test=2)
    (staging / "cifar-10-batches-bin" / "batches.meta.txt").write_bytes(b"airplane\n")
    archive = http_server.root / "cifar10" / "cifar-10-binary.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
        evil = tarfile.TarInfo("../escaped.txt")  # extraction must ignore members it was not asked for
        tar.addfile(evil, io.BytesIO(b""))
    monkeypatch.setitem(SOURCES, "cifar10", _table_for(http_server, "cifar10"))
    data = load_dataset("cifar10", root=tmp_path / "root", download=True, mirror=http_server.url)
    assert torch.equal(data.y_test, torch.from_numpy(arrays["test"][1]))
    assert torch.equal(data.x_train, torch.from_numpy(arrays["train"][0].astype(np.float32) / 255))
    assert (data.num_train, data.num_test) == (5, 2)
    assert not (tmp_path / "root" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "root" / "cifar10" / "cifar-10-batches-py").exists(), "the binary version is fetched"


def test_public_table_is_well_formed(monkeypatch) -> None:
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    assert set(SOURCES) == {"mnist", "fashion_mnist", "cifar10"}
    for name, source in SOURCES.items():
        assert source.mirrors and all(m.startswith(("https://", "http://")) and m.endswith("/") for m in source.mirrors)
        for resource in source.resources:
            assert resource.md5 is not None and re.fullmatch(r"[0-9a-f]{32}", resource.md5), (name, resource)
            urls = resource_urls(name, resource)
            assert urls == [m + resource.filename for m in source.mirrors]
            assert 1024 <= resource.max_bytes <= 256 << 20, (name, resource)  # every file has a size cap
    assert SOURCES["cifar10"].resources[0].filename == "cifar-10-binary.tar.gz", "the version with no pickles"
    assert SOURCES["cifar10"].resources[0].member_max_bytes == 10_000 * 3073
    mnist_names = [r.filename for r in SOURCES["mnist"].resources]
    assert mnist_names == [r.filename for r in SOURCES["fashion_mnist"].resources]
    assert len({r.md5 for s in SOURCES.values() for r in s.resources}) == 9, "every file has its own checksum"


def test_mirror_layout_is_mirror_slash_dataset_slash_file(monkeypatch) -> None:
    resource = SOURCES["fashion_mnist"].resources[0]
    monkeypatch.setenv(MIRROR_ENV, "file:///srv/data/")
    assert resource_urls("fashion_mnist", resource) == [f"file:///srv/data/fashion_mnist/{resource.filename}"]
    assert resource_urls("fashion_mnist", resource, "http://h:1") == [f"http://h:1/fashion_mnist/{resource.filename}"]
