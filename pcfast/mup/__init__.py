"""μP for local learning rules: presets, ``parametrize`` and the coordinate check (DESIGN §2)."""
from .coord import CoordCheck, CoordCheckConfig, coord_check, make_cnn, make_mlp
from .presets import (
    ALGOS, PRESETS, UPDATE_RULES, GroupScale, LayerScale, Parametrization, bias_exponent, exponents, parametrize, standard,
)

__all__ = [
    "ALGOS", "PRESETS", "CoordCheck", "CoordCheckConfig", "LayerScale", "Parametrization", "bias_exponent", "coord_check", "exponents",
    "GroupScale", "UPDATE_RULES", "make_cnn", "make_mlp", "parametrize", "standard",
]
