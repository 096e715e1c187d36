"""μP for local learning rules: presets, ``parametrize`` and the coordinate check (DESIGN §2)."""
from .coord import CoordCheck, coord_check, make_mlp
from .presets import ALGOS, PRESETS, LayerScale, Parametrization, bias_exponent, exponents, parametrize, standard

__all__ = [
    "ALGOS", "PRESETS", "CoordCheck", "LayerScale", "Parametrization", "bias_exponent", "coord_check", "exponents",
    "make_mlp", "parametrize", "standard",
]
