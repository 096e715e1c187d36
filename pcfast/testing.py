"""Tolerances as data and one ``assert_close`` for every comparison against the reference.

``assert_close`` reports max-abs and RMS error and the worst index, and fails on any NaN. For low
precision, compare the fused error against the reference's own error in that dtype
(``max_err <= 2 * ref_err + atol``; see ``assert_close_to_reference``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(atol=1e-10, rtol=1e-9),
    "float32": Tolerance(atol=1e-4, rtol=1e-4),
    "tf32": Tolerance(atol=5e-3, rtol=5e-3),
    "float16": Tolerance(atol=1e-2, rtol=1e-2),
    "bfloat16": Tolerance(atol=5e-2, rtol=5e-2),
}


def tolerance(dtype: torch.dtype | str) -> Tolerance:
    """The tolerance row for ``dtype`` (a torch dtype or one of the table's names)."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in TOLERANCES:
        raise KeyError(f"no tolerance for {name!r}; known: {sorted(TOLERANCES)}")
    return TOLERANCES[name]


def _error_report(actual: Tensor, expected: Tensor) -> tuple[float, float, tuple[int, ...]]:
    diff = (actual.double() - expected.double()).abs()
    if diff.numel() == 0:
        return 0.0, 0.0, ()
    flat = int(diff.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    return float(diff.max()), float(diff.pow(2).mean().sqrt()), index


def assert_close(actual: Tensor, expected: Tensor, *, dtype: torch.dtype | str | None = None,
                 atol: float | None = None, rtol: float | None = None, name: str = "tensor") -> None:
    """Fail unless ``|actual − expected| <= atol + rtol·|expected|`` everywhere, with no NaN."""
    tol = tolerance(dtype if dtype is not None else expected.dtype)
    atol = tol.atol if atol is None else atol
    rtol = tol.rtol if rtol is None else rtol
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if torch.isnan(actual).any() or torch.isnan(expected).any():
        raise AssertionError(f"{name}: contains NaN (actual {int(torch.isnan(actual).sum())}, "
                             f"expected {int(torch.isnan(expected).sum())})")
    bound = atol + rtol * expected.double().abs()
    bad = (actual.double() - expected.double()).abs() > bound
    if bool(bad.any()):
        max_abs, rms, index = _error_report(actual, expected)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off; max abs err {max_abs:.3e} at {index} "
            f"(actual {float(actual.double()[index] if index else actual):.6g}, expected "
            f"{float(expected.double()[index] if index else expected):.6g}), rms err {rms:.3e}, "
            f"atol {atol:g}, rtol {rtol:g}"
        )


def assert_all_close(actual: Sequence[Tensor | None], expected: Sequence[Tensor | None], *,
                     name: str = "list", **kwargs) -> None:
    """``assert_close`` element-wise over two lists (None must match None)."""
    if len(actual) != len(expected):
        raise AssertionError(f"{name}: {len(actual)} entries != expected {len(expected)}")
    for i, (a, e) in enumerate(zip(actual, expected)):
        if a is None or e is None:
            if (a is None) != (e is None):
                raise AssertionError(f"{name}[{i}]: {'None' if a is None else 'tensor'} vs expected "
                                     f"{'None' if e is None else 'tensor'}")
            continue
        assert_close(a, e, name=f"{name}[{i}]", **kwargs)


def assert_close_to_reference(actual: Tensor, reference_low: Tensor, reference_high: Tensor, *,
                              atol: float, name: str = "tensor") -> None:
    """Low-precision rule: the fused error (vs a float64 reference) is at most twice the reference's
    own error in the low dtype, plus ``atol``."""
    fused_err = float((actual.double() - reference_high.double()).abs().max())
    ref_err = float((reference_low.double() - reference_high.double()).abs().max())
    if not fused_err <= 2 * ref_err + atol:
        raise AssertionError(f"{name}: fused error {fused_err:.3e} > 2 x reference error {ref_err:.3e} + {atol:g}")
