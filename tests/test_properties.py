"""Property-based checks (hypothesis, derandomized: the same examples every run).

1. Random valid problems — depth 1–4, widths 1–9, any activations, with or without biases, batch
   1–5, either loss, every tensor in a random layout — give on every backend here the result of
   ``pcfast.reference`` on plain contiguous copies, in float64.
2. Random malformed arguments to ``pcfast.functional`` and to an optimizer's ``step(x, y)`` raise a
   ``TypeError``/``ValueError``/``pcfast.DivergenceError`` whose message names the argument, and
   change nothing: the inputs, the model's parameters and ``.grad``, and the optimizer's state are
   bitwise what they were.
"""
import math
import re

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pcfast  # noqa: E402
from pcfast import functional as F  # noqa: E402
from pcfast import reference  # noqa: E402
from pcfast.testing import (  # noqa: E402
    assert_all_close, assert_close, interpreted, make_batch, make_batches, make_feedback, make_model, make_net,
    make_noise,
)
from tests.test_layouts import LAYOUTS  # noqa: E402

ACTS = ("tanh", "relu", "gelu", "sigmoid", "identity")
# The problems are CPU tensors: every backend that runs them at full speed, and triton under its
# interpreter on the small ones.
FAST_BACKENDS = [b for b in ("torch", "cpp") if pcfast.ops.is_available(b)]
TRITON = pcfast.ops.is_available("triton") and interpreted("triton")
ERRORS = (TypeError, ValueError, pcfast.DivergenceError)
SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------- 1. valid


@st.composite
def problems(draw):
    depth = draw(st.integers(1, 4))
    widths = [draw(st.integers(1, 9)) for _ in range(depth + 1)]
    loss = draw(st.sampled_from(["mse", "ce"]))
    if loss == "ce":
        widths[-1] = max(widths[-1], 2)
    return dict(
        widths=widths,
        activations=[draw(st.sampled_from(ACTS)) for _ in range(depth - 1)],
        bias=draw(st.booleans()),
        batch=draw(st.integers(1, 5)),
        loss=loss,
        seed=draw(st.integers(0, 2**16)),
        layouts=[draw(st.sampled_from(["contiguous", *LAYOUTS])) for _ in range(5 * depth + 2)],
    )


def tensors(p):
    """The problem's tensors in float64 and their laid-out twins (``p["layouts"]`` in order)."""
    widths, batch, seed = p["widths"], p["batch"], p["seed"]
    weights, biases, _ = make_net(widths, activation=p["activations"], bias=p["bias"], bias_scale=0.3, seed=seed)
    x, y = make_batch(widths, batch, p["loss"], seed=seed + 1)
    qs, cs, _ = make_feedback(widths, bias=p["bias"], bias_scale=0.3, seed=seed + 2)
    noise = make_noise(widths, batch, seed=seed + 3)
    layouts = iter(p["layouts"])

    def lay(t):
        name = next(layouts)
        if t is None or name == "contiguous":
            return t
        if name == "expanded":
            return t  # expansion repeats values: covered by tests/test_layouts.py
        return LAYOUTS[name](t)

    laid = dict(weights=[lay(w) for w in weights], biases=[lay(b) for b in biases], x=lay(x), y=lay(y),
                qs=[lay(q) for q in qs], cs=[lay(c) for c in cs], noise=[lay(n) for n in noise])
    plain_ = dict(weights=weights, biases=biases, x=x, y=y, qs=qs, cs=cs, noise=noise)
    return plain_, laid


def backends_to_check(p):
    # The interpreter is slow: triton takes the smaller problems only.
    small = TRITON and p["batch"] * max(p["widths"]) <= 20
    return FAST_BACKENDS + (["triton"] if small else [])


@settings(max_examples=60, **SETTINGS)
@given(p=problems(), steps=st.integers(0, 3), schedule=st.sampled_from(["jacobi", "sequential"]),
       fpa=st.booleans())
def test_pc_train_step_matches_reference_on_every_backend(p, steps, schedule, fpa):
    ref_args, args = tensors(p)
    acts, loss = p["activations"], p["loss"]
    target = ref_args["y"] if loss == "ce" else ref_args["y"]
    kwargs = dict(inference_steps=steps, inference_lr=0.1, schedule=schedule, fpa=fpa, loss=loss)
    expected = reference.pc_train_step(ref_args["weights"], ref_args["biases"], acts, ref_args["x"], target,
                                       precisions=None, **kwargs)
    for backend in backends_to_check(p):
        got = F.pc_train_step(args["weights"], args["biases"], acts, args["x"], args["y"], backend=backend, **kwargs)
        assert_close(got.energy, expected.energy, name=f"{backend} energy")
        assert_all_close(got.weight_grads, expected.weight_grads, name=f"{backend} weight_grads")
        assert_all_close(got.bias_grads, expected.bias_grads, name=f"{backend} bias_grads")


@settings(max_examples=50, **SETTINGS)
@given(p=problems().filter(lambda p: len(p["widths"]) > 2), difference=st.booleans(),
       beta=st.sampled_from([0.0, 0.1, 1.0]))
def test_tp_and_feedback_grads_match_reference_on_every_backend(p, difference, beta):
    ref_args, args = tensors(p)
    acts, loss = p["activations"], p["loss"]
    psi = reference.default_feedback_activations(acts)
    expected = reference.tp_train_step(ref_args["weights"], ref_args["biases"], acts, ref_args["qs"], ref_args["cs"],
                                       psi, ref_args["x"], ref_args["y"], beta=beta, loss=loss, difference=difference)
    expected_fb = reference.feedback_grads(ref_args["weights"], ref_args["biases"], acts, ref_args["qs"],
                                           ref_args["cs"], psi, ref_args["x"], ref_args["noise"])
    for backend in backends_to_check(p):
        got = F.tp_train_step(args["weights"], args["biases"], acts, args["qs"], args["cs"], None, args["x"],
                              args["y"], beta=beta, loss=loss, difference=difference, backend=backend)
        assert_close(got.loss, expected.loss, name=f"{backend} loss")
        assert_all_close(got.weight_grads, expected.weight_grads, name=f"{backend} weight_grads")
        assert_all_close(got.bias_grads, expected.bias_grads, name=f"{backend} bias_grads")
        fb = F.feedback_grads(args["weights"], args["biases"], acts, args["qs"], args["cs"], None, args["x"],
                              args["noise"], backend=backend)
        assert_close(fb.loss, expected_fb.loss, name=f"{backend} feedback loss")
        assert_all_close(fb.weight_grads, expected_fb.weight_grads, name=f"{backend} feedback weight_grads")
        assert_all_close(fb.bias_grads, expected_fb.bias_grads, name=f"{backend} feedback bias_grads")


# ------------------------------------------------------------------------------------ 2. malformed


def good_problem():
    dims = (4, 5, 3)
    w, b, acts = make_net(dims, dtype=torch.float32, seed=0)
    x, y = make_batch(dims, 2, dtype=torch.float32, seed=1)
    q, c, _ = make_feedback(dims, dtype=torch.float32, bias_scale=0.0, seed=2)
    return dict(weights=w, biases=b, activations=acts, x=x, y=y, feedback_weights=q, feedback_biases=c,
                latents=[torch.zeros(2, 5)])


def _nan_like(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def tensor_variants(t):
    """Malformed stand-ins for a tensor argument."""
    return [None, True, 1.5, "cpu", t.tolist(), t.numpy(), t.int(), t.double(), t.to(torch.complex64),
            t.bool(), _nan_like(t), t.unsqueeze(0), t[..., :-1], t.to("meta")]


def list_variants(ts):
    """Malformed stand-ins for a list of tensors: the list itself, or one of its entries."""
    out = [None, True, "weights", ts[0], ts[:-1] if len(ts) > 1 else ts + ts]
    for k, t in enumerate(ts):
        for bad in [None, True, t.tolist(), t.int(), t.double(), t.to(torch.complex64), _nan_like(t),
                    t.unsqueeze(0), t.to("meta")]:
            out.append(ts[:k] + [bad] + ts[k + 1:])
    return out


NUMBER_VARIANTS = [None, True, False, "0.1", float("nan"), float("inf"), -1.0, [0.1], torch.tensor(0.1)]
INT_VARIANTS = [None, True, 2.0, "3", -1, [2], torch.tensor(2)]
BOOL_VARIANTS = ["false", "true", 0, 1, None, torch.tensor(True)]
CHOICE_VARIANTS = [None, 1, True, "nope", ["mse"]]

SIGNATURES = {
    # function: (tensor args, list args, number kwargs, int kwargs, bool kwargs, choice kwargs)
    "pc_train_step": (["x", "y"], ["weights", "biases"], ["inference_lr"], ["inference_steps"],
                      ["fpa", "return_trajectory"], ["schedule", "loss", "backend"]),
    "tp_train_step": (["x", "y"], ["weights", "biases", "feedback_weights", "feedback_biases"], ["beta"], [],
                      ["difference"], ["loss", "backend"]),
    "feedback_grads": (["x"], ["weights", "biases", "feedback_weights", "feedback_biases"], ["noise_std"],
                       ["noise_seed"], [], ["backend"]),
    "ridge_feedback": (["x"], ["weights", "biases"], ["ridge"], [], ["bias"], []),
    "bp_train_step": (["x", "y"], ["weights", "biases"], [], [], [], ["loss"]),
    "gnt_train_step": (["x", "y"], ["weights", "biases"], ["beta"], [], [], ["loss"]),
    "pc_energy": (["x", "y"], ["weights", "biases", "latents"], [], [], ["fpa"], ["loss"]),
}


def call(name, args, kwargs):
    a = args
    if name in ("pc_train_step", "bp_train_step", "gnt_train_step"):
        return getattr(F, name)(a["weights"], a["biases"], a["activations"], a["x"], a["y"], **kwargs)
    if name == "tp_train_step":
        return F.tp_train_step(a["weights"], a["biases"], a["activations"], a["feedback_weights"],
                               a["feedback_biases"], None, a["x"], a["y"], **kwargs)
    if name == "feedback_grads":
        return F.feedback_grads(a["weights"], a["biases"], a["activations"], a["feedback_weights"],
                                a["feedback_biases"], None, a["x"], **kwargs)
    if name == "ridge_feedback":
        return F.ridge_feedback(a["weights"], a["biases"], a["activations"], a["x"], **kwargs)
    return F.pc_energy(a["weights"], a["biases"], a["activations"], a["x"], a["y"], a["latents"], **kwargs)


@st.composite
def malformed_calls(draw):
    name = draw(st.sampled_from(sorted(SIGNATURES)))
    tensor_args, list_args, numbers, ints, bools, choices = SIGNATURES[name]
    args = good_problem()
    kind = draw(st.sampled_from([k for k, v in [("tensor", tensor_args), ("list", list_args), ("number", numbers),
                                                ("int", ints), ("bool", bools), ("choice", choices),
                                                ("activations", ["activations"])] if v]))
    kwargs = {}
    if kind == "tensor":
        arg = draw(st.sampled_from(tensor_args))
        args[arg] = draw(st.sampled_from(tensor_variants(args[arg])))
    elif kind == "list":
        arg = draw(st.sampled_from(list_args))
        args[arg] = draw(st.sampled_from(list_variants(args[arg])))
    elif kind == "activations":
        arg = "activations"
        args[arg] = draw(st.sampled_from([None, "tanh", [None], [1], ["softsign"], ["tanh", "tanh"], []]))
    else:
        arg = draw(st.sampled_from({"number": numbers, "int": ints, "bool": bools, "choice": choices}[kind]))
        values = {"number": NUMBER_VARIANTS, "int": INT_VARIANTS, "bool": BOOL_VARIANTS, "choice": CHOICE_VARIANTS}
        kwargs[arg] = draw(st.sampled_from([v for v in values[kind] if not (arg == "noise_seed" and v is None)]))
        if arg == "noise_std":
            kwargs["noise_seed"] = 1
    return name, arg, args, kwargs


def _snapshot(value):
    if isinstance(value, torch.Tensor):
        return value.clone() if value.device.type != "meta" else value
    if isinstance(value, (list, tuple)):
        return [_snapshot(v) for v in value]
    return value


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if a.device.type == "meta" or a.dtype.is_complex:
            return a.shape == b.shape
        return a.dtype == b.dtype and a.shape == b.shape and bool(
            torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                  and torch.equal(a.nan_to_num(), b.nan_to_num())))
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return True


def _names(message: str, arg: str) -> bool:
    return re.search(rf"(^|[^a-z_]){re.escape(arg)}([^a-z_]|$)", message) is not None


@settings(max_examples=150, **SETTINGS)
@given(case=malformed_calls())
def test_malformed_functional_arguments_raise_a_clear_error(case):
    name, arg, args, kwargs = case
    before = {k: _snapshot(v) for k, v in args.items()}
    with pytest.raises(ERRORS) as info:
        call(name, args, kwargs)
    assert _names(str(info.value), arg), f"{name}: the error for a bad {arg} does not name it: {info.value}"
    assert all(_same(args[k], before[k]) for k in args), "a failed call changed its inputs"


# ------------------------------------------------------------------------------ optimizer step(x, y)


def _optimizer(algo):
    model = make_model((4, 5, 3))
    opt = {"pc": lambda m: pcfast.optim.PC(m, lr=0.05, momentum=0.9, inference_steps=3),
           "bp": lambda m: pcfast.optim.BP(m, lr=0.05, momentum=0.9),
           "tp": lambda m: pcfast.optim.TP(m, lr=0.05, momentum=0.9),
           "dtp": lambda m: pcfast.optim.DTP(m, lr=0.05, momentum=0.9, feedback_noise=0.1)}[algo](model)
    for x, y in make_batches((4, 5, 3), 2, 2, "ce", dtype=torch.float32):  # momentum, .grad, feedback state
        opt.step(x, y)
    return model, opt


def _state_tensors(model, opt):
    tensors = [p.detach().clone() for p in model.parameters()]
    tensors += [p.grad.clone() for p in model.parameters() if p.grad is not None]

    def walk(value):
        if isinstance(value, torch.Tensor):
            tensors.append(value.clone())
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, float) and math.isnan(value):
            tensors.append(torch.tensor(float("nan")))

    walk(opt.state_dict())
    return tensors


GOOD_X, GOOD_Y = make_batch((4, 5, 3), 2, dtype=torch.float32, seed=2).x, torch.tensor([0, 2])


@st.composite
def malformed_batches(draw):
    which = draw(st.sampled_from(["x", "y"]))
    good = GOOD_X if which == "x" else GOOD_Y
    variants = [True, 3, "cpu", good.tolist(), good.numpy(), good.to("meta"), good.unsqueeze(0), good[:1],
                good.to(torch.complex64), good.bool()]
    if which == "x":
        variants += [good.int(), good.double(), _nan_like(good), good[:, :-1], torch.empty(0, 4)]
    else:
        variants += [torch.tensor([0, 3]), torch.tensor([-1, 0]), torch.tensor([True, False]), GOOD_Y.double(),
                     torch.full((2, 3), float("nan")), torch.zeros(2, 3, dtype=torch.float64)]
    bad = draw(st.sampled_from(variants))
    return which, (bad, GOOD_Y) if which == "x" else (GOOD_X, bad)


@settings(max_examples=80, **SETTINGS)
@given(algo=st.sampled_from(["pc", "bp", "tp", "dtp"]), case=malformed_batches())
def test_malformed_optimizer_batches_raise_and_change_nothing(algo, case):
    which, (x, y) = case
    model, opt = _optimizer(algo)
    before = _state_tensors(model, opt)
    with pytest.raises(ERRORS) as info:
        opt.step(x, y)
    assert _names(str(info.value), which), f"the error for a bad {which} does not name it: {info.value}"
    after = _state_tensors(model, opt)
    assert len(after) == len(before)
    for a, b in zip(after, before):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())
