"""Minibatch iteration over in-memory tensors.

This module owns :func:`iterate_batches`, the loop every pcfast example and benchmark uses instead of
a ``DataLoader``: datasets here fit in memory, and indexing a tensor is far cheaper than collating.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["iterate_batches"]


def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x_batch, y_batch)`` pairs covering one epoch.

    Args:
        x, y: tensors sharing their first dimension.
        batch_size: rows per batch; the last batch is smaller unless ``drop_last``.
        shuffle: visit rows in a random order drawn from ``generator`` (the global RNG when None);
            the same generator state gives the same batches. Unshuffled batches are views.
        drop_last: skip a final partial batch.

    Raises:
        ValueError: at the call, not at the first ``next``: a bad ``batch_size`` or mismatched rows.

    Example::

        data = load_dataset("mnist5k")
        g = torch.Generator().manual_seed(0)
        for epoch in range(10):
            for xb, yb in iterate_batches(data.x_train, data.y_train, 128, generator=g):
                opt.zero_grad()
                stats = opt.step(xb, yb)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y disagree on the number of rows: {x.shape[0]} vs {y.shape[0]}")
    return _batches(x, y, batch_size, shuffle, generator, drop_last)


def _batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n = x.shape[0]
    stop = n - n % batch_size if drop_last else n
    if not shuffle:
        for start in range(0, stop, batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
        return
    device = generator.device if generator is not None else torch.device("cpu")
    order = torch.randperm(n, generator=generator, device=device)
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        yield x[index.to(x.device)], y[index.to(y.device)]
