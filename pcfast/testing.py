"""The test and benchmark case catalogue: tolerances as data, one ``assert_close``, and seeded builders
for every network and batch a test or benchmark needs.

Tolerances: ``assert_close`` reports max-abs and RMS error and the worst index, and fails on any
NaN. For low precision, compare the fused error against the reference's own error in that dtype
(``max_err <= 2 * ref_err + atol``; see ``assert_close_to_reference``).

Builders (every one seeded by its own ``torch.Generator``; the global random state is never touched):

- ``make_net(dims, ...)`` → ``Net``: raw weights (d_l, d_{l-1}) ~ N(0, scale²/d_{l-1}), biases
  ~ N(0, bias_scale²) or None, one activation name per hidden layer — the arguments of
  ``pcfast.functional``; ``weights, biases, activations = make_net(...)`` unpacks it;
- ``make_feedback(dims, ...)`` → ``Feedback``: TP/DTP feedback maps Q_l (d_{l-1}, d_l), c_l, ψ_l;
- ``make_noise(dims, batch, ...)``: the ξ_l of ``feedback_grads``;
- ``make_batch(dims, size, loss, ...)`` → ``Batch``: inputs and mse/ce targets (normal targets,
  int64 labels or their one-hot rows); ``x, y = make_batch(...)`` unpacks it; ``make_batches`` draws
  several from one generator;
- ``make_model(dims, ...)``: an ``nn.Sequential`` of ``nn.Linear`` and activation modules with
  PyTorch's default initialisation (the numbers ``torch.manual_seed(seed)`` and building the layers
  would give); ``Net.model()`` and ``Net.of(model)`` convert between the two forms.

Example::

    net = make_net((5, 7, 3), activation="tanh", dtype=torch.float32)
    x, y = make_batch(net.dims, 4, "ce", dtype=torch.float32)
    out = pcfast.functional.pc_train_step(*net, x, y, backend="torch")

``interpreted(backend)`` says whether a backend runs under the Triton interpreter (100–2000×
slower): tests give it their small problems (``tests/conftest.py``'s ``small`` fixture);
``device_for(backend)`` where its tensors live (CUDA for compiled Triton, else the CPU).
``precision_mode("fp32" | "tf32" | "bf16")`` sets torch.matmul's mode for a GPU precision;
``triton_options(cuda_graphs=..., stacked=...)`` sets the triton backend's launch options for a block.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn


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


# ------------------------------------------------------------------------------------------------
# Builders: networks, feedback maps, noise, batches, models.

ACTIVATION_MODULES: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "identity": nn.Identity,
}
_GENERATED = (torch.float32, torch.float64)  # dtypes drawn directly; others are drawn in float32, then cast


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, device) -> Tensor:
    """N(0, 1) drawn on the CPU in ``dtype`` (float32 for other dtypes, then cast), moved to ``device``:
    the same numbers on every device."""
    t = torch.randn(*shape, generator=gen, dtype=dtype if dtype in _GENERATED else torch.float32)
    return t.to(device=device, dtype=dtype)


def _activations(activation: str | Sequence[str], hidden: int) -> list[str]:
    acts = [activation] * hidden if isinstance(activation, str) else list(activation)
    if len(acts) != hidden:
        raise ValueError(f"activation: expected a name or {hidden} names (one per hidden layer), got {len(acts)}")
    unknown = [a for a in acts if a not in ACTIVATION_MODULES]
    if unknown:
        raise ValueError(f"activation: unknown {unknown}; expected some of {sorted(ACTIVATION_MODULES)}")
    return acts


@dataclass(frozen=True)
class Net:
    """A raw MLP as ``pcfast.functional`` takes it: ``weights[l]`` is (d_{l+1}, d_l), ``biases[l]``
    (d_{l+1},) or None, ``activations`` one name per hidden layer. Unpacks as
    ``weights, biases, activations``."""

    weights: list[Tensor]
    biases: list[Tensor | None]
    activations: list[str]

    def __iter__(self) -> Iterator:
        return iter((self.weights, self.biases, self.activations))

    @property
    def dims(self) -> tuple[int, ...]:
        """(d_0, d_1, …, d_L)."""
        return (self.weights[0].shape[1], *(w.shape[0] for w in self.weights))

    def to(self, dtype: torch.dtype | None = None, device=None) -> "Net":
        """Copies in ``dtype`` on ``device`` (e.g. ``net.to(torch.float64)`` for a high-precision twin)."""
        move = lambda t: None if t is None else t.detach().to(device=device, dtype=dtype, copy=True)
        return Net([move(w) for w in self.weights], [move(b) for b in self.biases], list(self.activations))

    def model(self) -> nn.Sequential:
        """An ``nn.Sequential`` of ``nn.Linear`` and activation modules holding copies of these tensors."""
        layers: list[nn.Module] = []
        for l, (w, b) in enumerate(zip(self.weights, self.biases)):
            linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
            linear.weight = nn.Parameter(w.detach().clone())
            if b is not None:
                linear.bias = nn.Parameter(b.detach().clone())
            layers.append(linear)
            if l < len(self.activations):
                layers.append(ACTIVATION_MODULES[self.activations[l]]())
        return nn.Sequential(*layers)

    @classmethod
    def of(cls, model: nn.Module) -> "Net":
        """The ``model``'s own parameters (detached views, not copies) as a raw network."""
        from .network import parse_mlp

        mlp = parse_mlp(model)
        return cls([lin.weight.detach() for lin in mlp.linears],
                   [None if lin.bias is None else lin.bias.detach() for lin in mlp.linears], list(mlp.activations))


def make_net(dims: Sequence[int], *, activation: str | Sequence[str] = "tanh", bias: bool = True,
             dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu", seed: int = 0,
             scale: float = 1.0, bias_scale: float = 0.1) -> Net:
    """A seeded raw MLP ``dims[0] → … → dims[-1]``: weights ~ N(0, scale²/fan_in), biases
    ~ N(0, bias_scale²) (zeros for ``bias_scale=0``; None without ``bias``), drawn on the CPU (all
    weights, then all biases) in ``dtype`` — the same numbers on every device."""
    if len(dims) < 2:
        raise ValueError(f"dims: expected at least (d_0, d_1), got {tuple(dims)}")
    gen = _generator(seed)
    pairs = list(zip(dims[:-1], dims[1:]))
    weights = [scale * _randn(gen, b, a, dtype=dtype, device=device) / a**0.5 for a, b in pairs]
    if not bias:
        biases = [None] * len(pairs)
    elif bias_scale == 0:
        biases = [torch.zeros(b, dtype=dtype, device=device) for b in dims[1:]]
    else:
        biases = [bias_scale * _randn(gen, b, dtype=dtype, device=device) for b in dims[1:]]
    return Net(weights, biases, _activations(activation, len(dims) - 2))


@dataclass(frozen=True)
class Feedback:
    """TP/DTP feedback maps ``g_l(v) = ψ_l(v Q_lᵀ + c_l)``, l = 2..L: ``weights[k]`` is Q_{k+2}
    (d_{k+1}, d_{k+2}); ``activations`` None means ψ = φ (``pcfast.functional``'s default).
    Unpacks as ``weights, biases, activations``."""

    weights: list[Tensor]
    biases: list[Tensor | None]
    activations: list[str] | None = None

    def __iter__(self) -> Iterator:
        return iter((self.weights, self.biases, self.activations))

    def to(self, dtype: torch.dtype | None = None, device=None) -> "Feedback":
        move = lambda t: None if t is None else t.detach().to(device=device, dtype=dtype, copy=True)
        acts = None if self.activations is None else list(self.activations)
        return Feedback([move(q) for q in self.weights], [move(c) for c in self.biases], acts)


def make_feedback(dims: Sequence[int], *, activation: str | Sequence[str] | None = None, bias: bool = True,
                  dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu", seed: int = 5,
                  scale: float = 1.0, bias_scale: float = 0.1) -> Feedback:
    """Seeded feedback maps for the network ``dims``: Q_l ~ N(0, scale²/d_l), c_l ~ N(0, bias_scale²)
    (zeros for ``bias_scale=0``, None without ``bias``); ψ ``activation`` (None: ψ = φ)."""
    gen = _generator(seed)
    layers = range(2, len(dims))
    qs = [scale * _randn(gen, dims[l - 1], dims[l], dtype=dtype, device=device) / dims[l] ** 0.5 for l in layers]
    if not bias:
        cs = [None for _ in layers]
    elif bias_scale == 0:
        cs = [torch.zeros(dims[l - 1], dtype=dtype, device=device) for l in layers]
    else:
        cs = [bias_scale * _randn(gen, dims[l - 1], dtype=dtype, device=device) for l in layers]
    acts = None if activation is None else _activations(activation, len(dims) - 2)
    return Feedback(qs, cs, acts)


def make_noise(dims: Sequence[int], batch: int, *, std: float = 0.1, dtype: torch.dtype = torch.float64,
               device: torch.device | str = "cpu", seed: int = 6) -> list[Tensor]:
    """ξ_l ~ N(0, std²), shape (batch, d_{l-1}) for l = 2..L: the ``noise`` of ``feedback_grads``."""
    gen = _generator(seed)
    return [std * _randn(gen, batch, d, dtype=dtype, device=device) for d in dims[1:-1]]


TARGETS = ("normal", "labels", "onehot")


@dataclass(frozen=True)
class Batch:
    """Inputs ``x`` (B, d_0) and targets ``y``: (B, C) floats, or int64 labels (B,). ``labels`` holds
    the class labels when there are any (``targets="labels"`` or ``"onehot"``). Unpacks as ``x, y``."""

    x: Tensor
    y: Tensor
    labels: Tensor | None = None

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.x, self.y))


def _draw_batch(gen, dims, size, targets, inputs, dtype, device) -> Batch:
    if inputs == "normal":
        x = _randn(gen, size, dims[0], dtype=dtype, device=device)
    else:
        x = torch.rand(size, dims[0], generator=gen, dtype=dtype if dtype in _GENERATED else torch.float32)
        x = x.to(device=device, dtype=dtype)
    if targets == "normal":
        return Batch(x, _randn(gen, size, dims[-1], dtype=dtype, device=device))
    labels = torch.randint(0, dims[-1], (size,), generator=gen).to(device)
    if targets == "labels":
        return Batch(x, labels, labels)
    return Batch(x, nn.functional.one_hot(labels, dims[-1]).to(dtype), labels)


def _check_batch_options(loss: str, targets: str | None, inputs: str) -> str:
    if loss not in ("mse", "ce"):
        raise ValueError(f"loss: expected 'mse' or 'ce', got {loss!r}")
    targets = targets or ("labels" if loss == "ce" else "normal")
    if targets not in TARGETS:
        raise ValueError(f"targets: expected one of {TARGETS}, got {targets!r}")
    if loss == "ce" and targets != "labels":
        raise ValueError(f"targets: loss='ce' takes labels, got {targets!r}")
    if inputs not in ("normal", "uniform"):
        raise ValueError(f"inputs: expected 'normal' or 'uniform', got {inputs!r}")
    return targets


def make_batch(dims: Sequence[int], size: int, loss: str = "mse", *, targets: str | None = None,
               inputs: str = "normal", dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
               seed: int = 1) -> Batch:
    """A seeded batch for the network ``dims``: ``x`` ~ N(0, 1) (``inputs="uniform"``: U[0, 1)), then
    the targets — ``"normal"`` (N(0, 1) rows, ``loss="mse"``'s default), ``"labels"`` (int64 classes,
    ``loss="ce"``'s, which the mse functions one-hot encode) or ``"onehot"`` (float rows of the labels)."""
    targets = _check_batch_options(loss, targets, inputs)
    return _draw_batch(_generator(seed), dims, size, targets, inputs, dtype, device)


def make_batches(dims: Sequence[int], size: int, count: int, loss: str = "mse", *, targets: str | None = None,
                 inputs: str = "normal", dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                 seed: int = 1) -> list[Batch]:
    """``count`` batches drawn one after the other from one generator (a small training set)."""
    targets = _check_batch_options(loss, targets, inputs)
    gen = _generator(seed)
    return [_draw_batch(gen, dims, size, targets, inputs, dtype, device) for _ in range(count)]


def make_model(dims: Sequence[int], *, activation: str | Sequence[str] = "tanh", bias: bool = True,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0) -> nn.Sequential:
    """``nn.Sequential(Linear, act, …, Linear)`` with PyTorch's default ``nn.Linear`` initialisation,
    drawn from a generator seeded with ``seed``: the parameters ``torch.manual_seed(seed)`` followed by
    building the same layers gives, without touching the global random state. Drawn in float32 on
    the CPU, then moved to ``dtype`` and ``device``."""
    acts = _activations(activation, len(dims) - 2)
    gen = _generator(seed)
    layers: list[nn.Module] = []
    for l, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        linear = nn.Linear(a, b, bias=bias, device="meta")
        weight = torch.empty(b, a)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=gen)  # nn.Linear.reset_parameters
        linear.weight = nn.Parameter(weight)
        if bias:
            bound = 1 / math.sqrt(a) if a > 0 else 0.0
            linear.bias = nn.Parameter(nn.init.uniform_(torch.empty(b), -bound, bound, generator=gen))
        layers.append(linear)
        if l < len(acts):
            layers.append(ACTIVATION_MODULES[acts[l]]())
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def device_for(backend: str) -> torch.device:
    """Where ``backend``'s tensors live in a test: CUDA for compiled Triton kernels, else the CPU."""
    return torch.device("cuda" if backend == "triton" and not interpreted(backend) else "cpu")


def interpreted(backend: str) -> bool:
    """Whether ``backend`` runs under the Triton interpreter (``TRITON_INTERPRET=1``), 100–2000× slower
    than the other CPU backends: tests give it their small problems."""
    return backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------
# GPU precisions.

PRECISIONS = ("fp32", "tf32", "bf16")


@contextlib.contextmanager
def precision_mode(name: str) -> Iterator[torch.dtype]:
    """For the duration, torch.matmul's float32 mode for precision ``name`` (TF32 only for
    ``"tf32"``); yields the tensor dtype of that precision (bfloat16 for ``"bf16"``, else float32)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {name!r}")
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    matmul.allow_tf32 = name == "tf32"
    try:
        yield torch.bfloat16 if name == "bf16" else torch.float32
    finally:
        matmul.allow_tf32 = saved


def precision_tolerance(name: str) -> Tolerance:
    """The table row of GPU precision ``name``."""
    return tolerance({"fp32": "float32", "tf32": "tf32", "bf16": "bfloat16"}[name])


@contextlib.contextmanager
def triton_options(**changes: bool) -> Iterator[object]:
    """Run the block with these launch options of the ``triton`` backend (``cuda_graphs``, ``stacked``)
    and yield ``pcfast.ops.triton``; the options are restored afterwards."""
    from .ops import triton as backend

    with backend.options(**changes):
        yield backend
