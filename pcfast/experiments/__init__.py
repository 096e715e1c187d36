"""The experiments behind the ``pcfast`` command: μTransfer sweeps, coordinate checks, PC's
GD↔Gauss–Newton interpolation in deep linear networks, and plain training runs.

Each experiment is ``run_*(settings) -> dict`` (JSON-ready: settings, machine, measurements,
summary and the acceptance checks it was built to show) plus ``write_*(result, out_dir)`` for the
JSON/CSV/PNG files. Plotting needs matplotlib; nothing here is imported by ``import pcfast``.
"""
from .common import Variant, parse_variant
from .coordcheck import CoordSettings, run_coordcheck, write_coordcheck
from .interp import InterpSettings, closed_form_pc_grads, run_interp, write_interp
from .train import TrainConfig, run_train
from .transfer import (
    PRESETS,
    TransferSettings,
    run_transfer,
    settings_for,
    write_transfer,
)

__all__ = [
    "PRESETS",
    "CoordSettings",
    "InterpSettings",
    "TrainConfig",
    "TransferSettings",
    "Variant",
    "closed_form_pc_grads",
    "parse_variant",
    "run_coordcheck",
    "run_interp",
    "run_train",
    "run_transfer",
    "settings_for",
    "write_coordcheck",
    "write_interp",
    "write_transfer",
]
