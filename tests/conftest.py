"""Shared fixtures (``backend``, ``device``, ``small``), the process environment of the suite, and the GPU marker.

Environment, set here and nowhere else in the tests, before any test module is collected:

- ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep instead of spinning, so the suite slows in
  proportion, not many-fold, when other processes share the cores (read when torch loads its OpenMP
  runtime: before importing torch);
- ``TRITON_INTERPRET=1`` on machines without CUDA: the Triton tests run under the interpreter, which
  triton reads when it is first imported; a module that imports triton on the way (``torch.compile``'s
  backends do) would otherwise fix the mode for the whole run.

GPU checks (``@pytest.mark.gpu``, ``tests/gpu``) run only when asked for with ``-m gpu``: the
default run deselects them, and without CUDA they skip.

Networks and batches come from ``pcfast.testing`` (``make_net``, ``make_batch``, …).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pcfast import ops  # noqa: E402
from pcfast.testing import device_for, interpreted, make_batch, make_net  # noqa: E402

BACKENDS = ops.available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Every backend that can run here (``pcfast.ops.available_backends()``: reference, torch, cpp when
    built, triton on CUDA or under the interpreter), by name, for ``backend=`` of ``pcfast.functional``."""
    return request.param


@pytest.fixture
def device(backend) -> torch.device:
    """Where the test's tensors live for ``backend``: CUDA for triton compiled on a GPU, else the CPU."""
    return device_for(backend)


@pytest.fixture
def small(backend) -> bool:
    """Size hint: True when ``backend`` runs under the Triton interpreter (100–2000× slower), so the
    test uses its small problem — the same assertions and tolerances on fewer steps or smaller shapes."""
    return interpreted(backend)


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests: deselected unless the mark expression names them; skipped without CUDA."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    if "gpu" not in (config.option.markexpr or ""):
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
        return
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu:
            item.add_marker(skip)


# Kept while other test modules still import these names: ``pcfast.testing.make_net`` and
# ``make_batch`` draw the same numbers.
def random_mlp(dims, *, bias=True, activation="tanh", dtype=torch.float64, seed=0, scale=1.0):
    """Deprecated: ``tuple(pcfast.testing.make_net(...))``."""
    return tuple(make_net(dims, bias=bias, activation=activation, dtype=dtype, seed=seed, scale=scale))


def random_batch(dims, batch, loss, *, dtype=torch.float64, seed=1):
    """Deprecated: ``tuple(pcfast.testing.make_batch(...))``."""
    return tuple(make_batch(dims, batch, loss, dtype=dtype, seed=seed))

