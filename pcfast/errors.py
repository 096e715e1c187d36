"""Exceptions raised by pcfast."""


class DivergenceError(FloatingPointError):
    """A step produced a non-finite energy, gradient or update, or a PC relaxation whose energy rose.

    Raised before any parameter, gradient buffer or optimizer state is changed, so the model and the
    optimizer are exactly as they were before the step. For a diverging relaxation, ``step`` is the
    first inference step whose energy rose, ``layer`` the hidden layer (1-based) whose curvature
    limits the inference rate most, and ``stable_inference_lr`` the largest stable rate estimated at
    the feedforward state; otherwise they are None.
    """

    def __init__(self, message: str, *, step: int | None = None, layer: int | None = None,
                 stable_inference_lr: float | None = None) -> None:
        super().__init__(message)
        self.step, self.layer, self.stable_inference_lr = step, layer, stable_inference_lr
