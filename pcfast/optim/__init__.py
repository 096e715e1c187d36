"""Drop-in ``torch.optim.Optimizer`` subclasses: ``PC``, ``TP``, ``DTP`` and ``BP``."""
from .base import LocalOptimizer
from .bp import BP
from .pc import PC
from .tp import DTP, TP

__all__ = ["BP", "DTP", "LocalOptimizer", "PC", "TP"]
