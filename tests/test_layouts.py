"""Every backend gives the reference's result for every tensor layout torch can hand it.

Grid: each public function of ``pcfast.functional`` × each backend that runs here (``reference``,
``torch``, ``cpp`` when built, ``triton`` under the interpreter) × each group of tensor arguments
(weights, biases, x, y, feedback weights and biases, noise, latents) × each
layout below (on the Triton interpreter, which is slow: every group in the layout at once). The expected values come from ``pcfast.reference`` on plain contiguous copies of the
same values, in float64 (tolerance ``pcfast.testing``'s float64).

Layouts (same values unless stated): strided (every other element of a larger buffer), transposed
(column-major), padded transposed (column-major inside a wider buffer, at an offset: the 2-D analogue
of channels-last), storage offset, negative bit (``torch.complex(0, -t).conj().imag``, equal to
``t`` by ``torch.equal`` but stored negated), expanded (stride 0: the first row or element repeated —
new values, the same for backend and reference).
"""
import pytest
import torch

import pcfast
from pcfast import functional as F
from pcfast import reference
from pcfast.testing import assert_all_close, assert_close
from pcfast.types import Net, PCConfig

DTYPE = torch.float64
WIDTHS = (3, 4, 4, 2)  # equal hidden widths: triton's stacked launches are exercised too
BATCH = 3
ACTS = ["tanh", "gelu"]
BACKENDS = [name for name in ("reference", "torch", "cpp", "triton") if pcfast.ops.is_available(name)]


# -------------------------------------------------------------------------------------------- layouts


def _strided(t):
    if t.dim() == 1:
        out = torch.full((2 * t.shape[0],), 7.0, dtype=t.dtype)[::2]
    else:
        out = torch.full((2 * t.shape[0], 3 * t.shape[1]), 7.0, dtype=t.dtype)[::2, ::3]
    return out.copy_(t)


def _transposed(t):
    return t.T.contiguous().T if t.dim() == 2 else _strided(t)


def _padded_transposed(t):
    if t.dim() == 1:
        return _offset(t)
    rows, cols = t.shape
    buffer = torch.full((cols, rows + 3), 7.0, dtype=t.dtype)
    out = buffer.T[2:2 + rows]  # strides (1, rows + 3), storage offset 2
    return out.copy_(t)


def _offset(t):
    buffer = torch.full((t.numel() + 5,), 7.0, dtype=t.dtype)
    return buffer[5:].view(t.shape).copy_(t)


def _negative(t):
    if not t.is_floating_point():
        return _offset(t)  # integer tensors have no negative bit
    out = torch.complex(torch.zeros_like(t), -t).conj().imag
    assert out.is_neg() and torch.equal(out, t)
    return out


def _expanded(t):
    return t[:1].expand(t.shape)


LAYOUTS = {
    "strided": _strided,
    "transposed": _transposed,
    "padded_transposed": _padded_transposed,
    "offset": _offset,
    "negative": _negative,
    "expanded": _expanded,
}


def plain(t):
    """A contiguous copy holding ``t``'s values, with no lazy bits."""
    if t is None:
        return None
    return t.resolve_neg().clone(memory_format=torch.contiguous_format)


def plain_all(ts):
    return None if ts is None else [plain(t) for t in ts]


# ----------------------------------------------------------------------------------------- problems


def problem(loss="mse"):
    gen = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=DTYPE)
    weights = [randn(b, a) / a**0.5 for a, b in zip(WIDTHS[:-1], WIDTHS[1:])]
    biases = [0.3 * randn(b) for b in WIDTHS[1:]]
    x = randn(BATCH, WIDTHS[0])
    y = randn(BATCH, WIDTHS[-1]) if loss == "mse" else torch.tensor([1, 0, 1])
    feedback_weights = [randn(WIDTHS[k + 1], WIDTHS[k + 2]) / WIDTHS[k + 2] ** 0.5 for k in range(len(WIDTHS) - 2)]
    feedback_biases = [0.3 * randn(WIDTHS[k + 1]) for k in range(len(WIDTHS) - 2)]
    noise = [0.2 * randn(BATCH, w) for w in WIDTHS[1:-1]]
    latents = [randn(BATCH, w) for w in WIDTHS[1:-1]]
    return dict(weights=weights, biases=biases, x=x, y=y, feedback_weights=feedback_weights,
                feedback_biases=feedback_biases, noise=noise, latents=latents)


def with_layout(args, group, layout):
    args = dict(args)
    make = LAYOUTS[layout]
    value = args[group]
    args[group] = [make(t) for t in value] if isinstance(value, list) else make(value)
    return args


# Each function: the argument groups it reads, how to call it, and which results to compare.
def run_pc(a, backend, loss):
    return F.pc_train_step(a["weights"], a["biases"], ACTS, a["x"], a["y"], inference_steps=2, inference_lr=0.2,
                           loss=loss, backend=backend)


def expect_pc(a, loss):
    ref = reference.pc_train_step(a["weights"], a["biases"], ACTS, a["x"], a["y"], precisions=None,
                                  inference_steps=2, inference_lr=0.2, schedule="jacobi", fpa=False, loss=loss)
    return ref


def compare_pc(got, ref):
    assert_close(got.energy, ref.energy, name="energy")
    assert_all_close(got.weight_grads, ref.weight_grads, name="weight_grads")
    assert_all_close(got.bias_grads, ref.bias_grads, name="bias_grads")
    assert_all_close(got.latents, ref.latents, name="latents")


def run_tp(a, backend, loss):
    return F.tp_train_step(a["weights"], a["biases"], ACTS, a["feedback_weights"], a["feedback_biases"], None,
                           a["x"], a["y"], beta=0.3, loss=loss, backend=backend)


def expect_tp(a, loss):
    psi = reference.default_feedback_activations(ACTS)
    return reference.tp_train_step(a["weights"], a["biases"], ACTS, a["feedback_weights"], a["feedback_biases"],
                                   psi, a["x"], a["y"], beta=0.3, loss=loss, difference=True)


def compare_tp(got, ref):
    assert_close(got.loss, ref.loss, name="loss")
    assert_all_close(got.targets, ref.targets, name="targets")
    assert_all_close(got.weight_grads, ref.weight_grads, name="weight_grads")
    assert_all_close(got.bias_grads, ref.bias_grads, name="bias_grads")


def run_feedback(a, backend, loss):
    return F.feedback_grads(a["weights"], a["biases"], ACTS, a["feedback_weights"], a["feedback_biases"], None,
                            a["x"], a["noise"], backend=backend)


def expect_feedback(a, loss):
    psi = reference.default_feedback_activations(ACTS)
    return reference.feedback_grads(a["weights"], a["biases"], ACTS, a["feedback_weights"], a["feedback_biases"],
                                    psi, a["x"], a["noise"])


def compare_feedback(got, ref):
    assert_close(got.loss, ref.loss, name="loss")
    assert_all_close(got.weight_grads, ref.weight_grads, name="weight_grads")
    assert_all_close(got.bias_grads, ref.bias_grads, name="bias_grads")


def run_ridge(a, backend, loss):
    return F.ridge_feedback(a["weights"], a["biases"], ACTS, a["x"], ridge=0.1)


def expect_ridge(a, loss):
    return reference.ridge_feedback(a["weights"], a["biases"], ACTS, a["x"], ridge=0.1)


def compare_ridge(got, ref):
    assert_all_close(got[0], ref[0], name="feedback_weights")
    assert_all_close(got[1], ref[1], name="feedback_biases")


def run_bp(a, backend, loss):
    return F.bp_train_step(a["weights"], a["biases"], ACTS, a["x"], a["y"], loss=loss)


def expect_bp(a, loss):
    return reference.bp_train_step(a["weights"], a["biases"], ACTS, a["x"], a["y"], loss=loss)


def run_gnt(a, backend, loss):
    return F.gnt_train_step(a["weights"], a["biases"], ACTS, a["x"], a["y"], beta=0.5, loss=loss)


def expect_gnt(a, loss):
    return reference.gnt_train_step(a["weights"], a["biases"], ACTS, a["x"], a["y"], beta=0.5, loss=loss)


def compare_grads(got, ref):
    assert_close(got.loss, ref.loss, name="loss")
    assert_all_close(got.weight_grads, ref.weight_grads, name="weight_grads")
    assert_all_close(got.bias_grads, ref.bias_grads, name="bias_grads")


def run_energy(a, backend, loss):
    return F.pc_energy(a["weights"], a["biases"], ACTS, a["x"], a["y"], a["latents"], loss=loss)


def expect_energy(a, loss):
    target = torch.nn.functional.one_hot(a["y"], WIDTHS[-1]).to(DTYPE) if loss == "mse" and a["y"].dim() == 1 else a["y"]
    return reference.pc_energy(a["weights"], a["biases"], ACTS, a["x"], target, a["latents"], loss=loss)


def compare_energy(got, ref):
    assert_close(got, ref, name="energy")


FUNCTIONS = {
    # name: (groups, uses backend=, run, expect, compare)
    "pc_train_step": (("weights", "biases", "x", "y"), True, run_pc, expect_pc, compare_pc),
    "tp_train_step": (("weights", "biases", "x", "y", "feedback_weights", "feedback_biases"), True,
                      run_tp, expect_tp, compare_tp),
    "feedback_grads": (("weights", "biases", "x", "feedback_weights", "feedback_biases", "noise"), True,
                       run_feedback, expect_feedback, compare_feedback),
    "ridge_feedback": (("weights", "biases", "x"), False, run_ridge, expect_ridge, compare_ridge),
    "bp_train_step": (("weights", "biases", "x", "y"), False, run_bp, expect_bp, compare_grads),
    "gnt_train_step": (("weights", "biases", "x", "y"), False, run_gnt, expect_gnt, compare_grads),
    "pc_energy": (("weights", "biases", "x", "y", "latents"), False, run_energy, expect_energy, compare_energy),
}


def _cases():
    """One case per argument group and layout; on the (slow) Triton interpreter one case per layout
    with every argument in that layout at once."""
    for function, (groups, uses_backend, *_) in FUNCTIONS.items():
        for backend in (BACKENDS if uses_backend else ["reference"]):
            for group in (("all",) if backend == "triton" else groups):
                for layout in LAYOUTS:
                    yield pytest.param(function, backend, group, layout, id=f"{function}-{backend}-{group}-{layout}")


@pytest.mark.parametrize("function, backend, group, layout", list(_cases()))
def test_every_layout_gives_the_reference_result(function, backend, group, layout):
    groups, _, run, expect, compare = FUNCTIONS[function]
    loss = "mse"
    args = problem(loss)
    for name in (groups if group == "all" else [group]):
        args = with_layout(args, name, layout)
    expected = expect({k: (plain_all(v) if isinstance(v, list) else plain(v)) for k, v in args.items()}, loss)
    compare(run(args, backend, loss), expected)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("layout", ["strided", "offset", "expanded"])
def test_class_label_layouts(backend, layout):
    """Integer labels (loss='ce') through their strides, offset or expansion."""
    args = with_layout(problem("ce"), "y", layout)
    expected = expect_pc({k: (plain_all(v) if isinstance(v, list) else plain(v)) for k, v in args.items()}, "ce")
    compare_pc(run_pc(args, backend, "ce"), expected)
    tp_expected = expect_tp({k: (plain_all(v) if isinstance(v, list) else plain(v)) for k, v in args.items()}, "ce")
    compare_tp(run_tp(args, backend, "ce"), tp_expected)


# The raw backends, called directly (as pcfast.optim and advanced users may): the lazy negative bit and
# strided vectors are read correctly there too, not only behind pcfast.functional.
@pytest.mark.parametrize("backend", [b for b in ("cpp", "triton") if b in BACKENDS])
@pytest.mark.parametrize("group, layout", [("biases", "negative"), ("weights", "negative"), ("x", "negative"),
                                           ("biases", "strided"), ("y", "negative")])
def test_raw_backend_reads_lazy_bits_and_strided_vectors(backend, group, layout):
    args = with_layout(problem(), group, layout)
    kwargs = dict(precisions=[1.0, 1.0, 1.0], inference_steps=2, inference_lr=0.2, schedule="jacobi", fpa=False,
                  loss="mse")
    raw = pcfast.ops.get_backend(backend, "pc", args["x"].device, args["x"].dtype)
    got = raw.pc_grads(Net(args["weights"], args["biases"], ACTS), args["x"], args["y"],
                       PCConfig.of(len(args["weights"]), **kwargs))
    plain_args = {k: (plain_all(v) if isinstance(v, list) else plain(v)) for k, v in args.items()}
    ref = reference.pc_train_step(plain_args["weights"], plain_args["biases"], ACTS, plain_args["x"],
                                  plain_args["y"], **kwargs)
    assert_close(got.energy, ref.energy, name="energy")
    assert_all_close(got.weight_grads, ref.weight_grads, name="weight_grads")
