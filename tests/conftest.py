"""Shared fixtures: small random MLPs in any dtype; the Triton interpreter on machines without a GPU.

Without CUDA the Triton tests run under ``TRITON_INTERPRET=1``, which triton reads when it is first
imported. Set here, before any test module is collected: a module that imports triton on the way
(``torch.compile``'s backends do) would otherwise fix the mode for the whole run.
"""
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning, so the suite slows in proportion, not many-fold, when
# other processes share the cores (read when torch loads its OpenMP runtime: before importing torch).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def random_mlp(dims, *, bias=True, activation="tanh", dtype=torch.float64, seed=0, scale=1.0):
    """Weights (out, in) ~ N(0, scale²/fan_in), small biases, one activation name per hidden layer."""
    gen = torch.Generator().manual_seed(seed)
    weights = [scale * torch.randn(b, a, generator=gen, dtype=dtype) / a**0.5 for a, b in zip(dims[:-1], dims[1:])]
    biases = [0.1 * torch.randn(b, generator=gen, dtype=dtype) if bias else None for b in dims[1:]]
    acts = [activation] * (len(dims) - 2) if isinstance(activation, str) else list(activation)
    return weights, biases, acts


def random_batch(dims, batch, loss, *, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dims[0], generator=gen, dtype=dtype)
    if loss == "ce":
        y = torch.randint(0, dims[-1], (batch,), generator=gen)
    else:
        y = torch.randn(batch, dims[-1], generator=gen, dtype=dtype)
    return x, y


@pytest.fixture
def mlp_factory():
    return random_mlp


@pytest.fixture
def batch_factory():
    return random_batch
