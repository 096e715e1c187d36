"""mnist, fashion_mnist (IDX) and cifar10 (python pickles) from tiny generated files, and their failures."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pcfast.data import DatasetError, load_dataset, read_idx

IDX_NAMES = ["mnist", "fashion_mnist"]


def _assert_split(x: torch.Tensor, y: torch.Tensor, images: np.ndarray, labels: np.ndarray) -> None:
    expected = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, expected)
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("name", IDX_NAMES)
def test_idx_dataset_round_trips(tmp_path: Path, make_idx_dataset, name: str, gz: bool) -> None:
    arrays = make_idx_dataset(tmp_path / name, gz=gz, n_train=7, n_test=5)
    data = load_dataset(name, root=tmp_path)
    assert data.name == name
    assert (data.num_train, data.num_test, data.num_features, data.num_classes) == (7, 5, 784, 10)
    _assert_split(data.x_train, data.y_train, *arrays["train"])
    _assert_split(data.x_test, data.y_test, *arrays["test"])
    assert data.x_train.min().item() == 0.0 and data.x_train.max().item() == 1.0


def test_root_defaults_to_pcfast_data_env(tmp_path: Path, make_idx_dataset, monkeypatch) -> None:
    arrays = make_idx_dataset(tmp_path / "mnist", gz=True, n_train=1, n_test=1)
    monkeypatch.setenv("PCFAST_DATA", str(tmp_path))
    data = load_dataset("mnist")
    _assert_split(data.x_test, data.y_test, *arrays["test"])


def test_read_idx_other_type_bytes(tmp_path: Path, make_idx_file) -> None:
    shorts = np.array([[-2, 300], [7, -32768]], dtype=np.int16)
    floats = np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(read_idx(make_idx_file(tmp_path / "s", shorts, gz=False, type_byte=0x0B)), shorts)
    np.testing.assert_array_equal(read_idx(make_idx_file(tmp_path / "f", floats, gz=True, type_byte=0x0D)), floats)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_truncated_idx_names_file(tmp_path: Path, make_idx_dataset, gz: bool) -> None:
    make_idx_dataset(tmp_path / "mnist", gz=gz)
    path = tmp_path / "mnist" / ("train-images-idx3-ubyte.gz" if gz else "train-images-idx3-ubyte")
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DatasetError, match="truncated") as info:
        load_dataset("mnist", root=tmp_path)
    assert str(path) in str(info.value)


def test_trailing_bytes_are_rejected(tmp_path: Path, make_idx_dataset) -> None:
    make_idx_dataset(tmp_path / "mnist", gz=False)
    path = tmp_path / "mnist" / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(DatasetError, match="trailing bytes"):
        load_dataset("mnist", root=tmp_path)


@pytest.mark.parametrize("header", [b"\x00\x00\x08\x03"[::-1], b"\x01\x00\x08\x03", b"\x00\x00\x07\x03"],
                         ids=["reversed", "nonzero-lead", "bad-type"])
def test_bad_magic_names_file(tmp_path: Path, make_idx_dataset, header: bytes) -> None:
    make_idx_dataset(tmp_path / "fashion_mnist", gz=True)
    path = tmp_path / "fashion_mnist" / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(header + raw[4:]))
    with pytest.raises(DatasetError, match="magic") as info:
        load_dataset("fashion_mnist", root=tmp_path)
    assert str(path) in str(info.value)


def test_swapped_files_are_caught_by_dimensionality(tmp_path: Path, make_idx_dataset) -> None:
    directory = tmp_path / "mnist"
    make_idx_dataset(directory, gz=False)
    images, labels = directory / "train-images-idx3-ubyte", directory / "train-labels-idx1-ubyte"
    swap = images.read_bytes()
    images.write_bytes(labels.read_bytes())
    labels.write_bytes(swap)
    with pytest.raises(DatasetError, match="1 dimensions, expected 3"):
        load_dataset("mnist", root=tmp_path)


def test_image_and_label_counts_must_agree(tmp_path: Path, make_idx_dataset, make_idx_file) -> None:
    make_idx_dataset(tmp_path / "mnist", gz=False, n_train=4)
    make_idx_file(tmp_path / "mnist" / "train-labels-idx1-ubyte", np.zeros(3, np.uint8), gz=False)
    with pytest.raises(DatasetError, match="4 images but .* 3 labels"):
        load_dataset("mnist", root=tmp_path)


def test_labels_out_of_range_are_rejected(tmp_path: Path, make_idx_dataset, make_idx_file) -> None:
    make_idx_dataset(tmp_path / "mnist", gz=False, n_test=2)
    make_idx_file(tmp_path / "mnist" / "t10k-labels-idx1-ubyte", np.array([3, 12], np.uint8), gz=False)
    with pytest.raises(DatasetError, match=r"test labels span \[3, 12\]"):
        load_dataset("mnist", root=tmp_path)


@pytest.mark.parametrize("name", [*IDX_NAMES, "cifar10"])
def test_missing_directory_names_path_and_fix(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset(name, root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / name) in message
    assert "does not exist" in message and "download=True" in message
    assert not (tmp_path / name).exists(), "a failed load must not create directories"


def test_missing_single_file_is_named(tmp_path: Path, make_idx_dataset) -> None:
    make_idx_dataset(tmp_path / "mnist", gz=True)
    os.remove(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DatasetError, match="missing") as info:
        load_dataset("mnist", root=tmp_path)
    missing_part = str(info.value).split(" Put ")[0]
    assert str(tmp_path / "mnist" / "t10k-labels-idx1-ubyte") in missing_part
    assert "train-images" not in missing_part


# --- cifar10 -----------------------------------------------------------------------------------------


def test_cifar10_round_trips(tmp_path: Path, make_cifar_batches) -> None:
    arrays = make_cifar_batches(tmp_path / "cifar10" / "cifar-10-batches-py", per_batch=2, n_test=3)
    data = load_dataset("cifar10", root=tmp_path, dtype=torch.float64)
    assert (data.num_train, data.num_test, data.num_features, data.num_classes) == (10, 3, 3072, 10)
    for split in ("train", "test"):
        images, labels = arrays[split]
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        assert x.dtype == torch.float64
        assert torch.equal(x, torch.from_numpy(images.astype(np.float64) / 255))
        assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
        # (N, 3, 32, 32): the files' R, G and B planes, row by row
        planes = images.reshape(-1, 3, 32, 32).astype(np.float64) / 255
        assert torch.equal(data.images(split), torch.from_numpy(planes))


class _Boom:
    """Unpickling this would delete ``path``; the loader must refuse before that happens."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.remove, (str(self.path),))


def test_cifar10_refuses_pickled_code(tmp_path: Path, make_cifar_batches) -> None:
    batches = tmp_path / "cifar10" / "cifar-10-batches-py"
    make_cifar_batches(batches)
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("still here")
    (batches / "data_batch_3").write_bytes(pickle.dumps({"data": _Boom(sentinel), "labels": [0]}, protocol=2))
    with pytest.raises(DatasetError, match="not allowed") as info:
        load_dataset("cifar10", root=tmp_path)
    assert str(batches / "data_batch_3") in str(info.value)
    assert sentinel.exists()


@pytest.mark.parametrize("damage", ["truncated", "wrong-width", "no-labels"])
def test_cifar10_corrupt_batch(tmp_path: Path, make_cifar_batches, damage: str) -> None:
    batches = tmp_path / "cifar10" / "cifar-10-batches-py"
    make_cifar_batches(batches)
    path = batches / "test_batch"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        expected = "not a valid CIFAR-10"
    elif damage == "wrong-width":
        path.write_bytes(pickle.dumps({"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}))
        expected = r"\(N, 3072\)"
    else:
        path.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8)}))
        expected = "lacks the 'labels'"
    with pytest.raises(DatasetError, match=expected) as info:
        load_dataset("cifar10", root=tmp_path)
    assert str(path) in str(info.value)


def test_cifar10_missing_batch_is_named(tmp_path: Path, make_cifar_batches) -> None:
    batches = tmp_path / "cifar10" / "cifar-10-batches-py"
    make_cifar_batches(batches)
    os.remove(batches / "data_batch_4")
    with pytest.raises(DatasetError, match="missing") as info:
        load_dataset("cifar10", root=tmp_path)
    assert str(batches / "data_batch_4") in str(info.value)
