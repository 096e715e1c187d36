"""iterate_batches: coverage, alignment, determinism, drop_last, and argument checks."""

from __future__ import annotations

import pytest
import torch

from pcfast.data import iterate_batches


def _data(n: int, features: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(n)
    x = y[:, None].float().repeat(1, features)  # row i is all i, so alignment is checkable
    return x, y


@pytest.mark.parametrize("n,batch_size", [(1, 1), (10, 3), (12, 4), (7, 100), (0, 5)],
                         ids=["N1-B1", "N10-B3", "N12-B4", "N7-B100", "N0-B5"])
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffle", "ordered"])
def test_one_epoch_visits_every_row_once(n: int, batch_size: int, shuffle: bool) -> None:
    x, y = _data(n)
    batches = list(iterate_batches(x, y, batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(1)))
    assert [len(yb) for _, yb in batches] == [min(batch_size, n - s) for s in range(0, n, batch_size)]
    seen = torch.cat([yb for _, yb in batches]) if batches else torch.empty(0, dtype=torch.int64)
    assert sorted(seen.tolist()) == list(range(n))
    if not shuffle:
        assert seen.tolist() == list(range(n))
    for xb, yb in batches:
        assert torch.equal(xb[:, 0].long(), yb)


def test_drop_last_skips_the_partial_batch() -> None:
    x, y = _data(10)
    sizes = [len(yb) for _, yb in iterate_batches(x, y, 3, drop_last=True, generator=torch.Generator().manual_seed(0))]
    assert sizes == [3, 3, 3]
    assert [len(yb) for _, yb in iterate_batches(x, y, 5, shuffle=False, drop_last=True)] == [5, 5]


def test_same_generator_seed_gives_same_batches() -> None:
    x, y = _data(50)

    def order(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return torch.cat([yb for _, yb in iterate_batches(x, y, 8, generator=generator)]).tolist()

    assert order(3) == order(3)
    assert order(3) != order(4)
    assert order(3) != list(range(50))


def test_generator_state_advances_between_epochs() -> None:
    x, y = _data(30)
    g = torch.Generator().manual_seed(0)
    first = torch.cat([yb for _, yb in iterate_batches(x, y, 30, generator=g)])
    second = torch.cat([yb for _, yb in iterate_batches(x, y, 30, generator=g)])
    assert not torch.equal(first, second)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_bad_batch_size_is_rejected(batch_size) -> None:
    x, y = _data(4)
    with pytest.raises(ValueError, match="batch_size"):
        iterate_batches(x, y, batch_size)  # raises before any iteration


def test_mismatched_rows_are_rejected() -> None:
    with pytest.raises(ValueError, match="4 vs 5"):
        iterate_batches(torch.zeros(4, 2), torch.zeros(5), 2)
