"""Drop-in ``torch.optim.Optimizer`` subclasses: ``PC``, ``IPC`` (incremental PC), ``TP``, ``DTP``, ``BP`` and ``GNT``."""
from .base import LocalOptimizer
from .bp import BP
from .gnt import GNT
from .ipc import IPC
from .pc import PC
from .tp import DTP, TP

__all__ = ["BP", "DTP", "GNT", "IPC", "LocalOptimizer", "PC", "TP"]
