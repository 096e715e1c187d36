"""pcfast: predictive coding, target propagation and DTP under μP, with fused kernels and
drop-in ``torch.optim`` optimizers.

    model = nn.Sequential(nn.Linear(784, 1024), nn.Tanh(), nn.Linear(1024, 10))
    par = pcfast.parametrize(model, "mup", algo="pc", base_width=64)
    opt = pcfast.optim.PC(model, par, lr=0.1, inference_steps=20, inference_lr=0.1)
    stats = opt.step(x, y)

Layers: ``pcfast.reference`` (the specification) → ``pcfast.functional`` (backend switch over
``pcfast.ops``) → ``pcfast.optim``. Importing pcfast never imports triton.
"""
from . import functional, mup, optim, reference
from .errors import DivergenceError
from .mup import Parametrization, coord_check, parametrize
from .network import parse_mlp
from .ops import available_backends

__version__ = "0.1.0"

__all__ = [
    "DivergenceError", "Parametrization", "available_backends", "coord_check", "functional", "mup",
    "optim", "parametrize", "parse_mlp", "reference",
]
