"""Exceptions raised by pcfast."""


class DivergenceError(FloatingPointError):
    """A step produced a non-finite energy, gradient or update.

    Raised before any parameter, gradient buffer or optimizer state is changed, so the model and the
    optimizer are exactly as they were before the step.
    """
