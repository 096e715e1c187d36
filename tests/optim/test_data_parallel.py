"""Data parallel training over torch.distributed (gloo, CPU): each rank steps on its shard of the batch
and ends with the parameters, feedback weights and statistics of one process on the full batch.

The oracle is the single-process optimizer on the full batch (float64, 5 steps with momentum). The
test starts the ranks as processes (forked from a server that has imported torch and pcfast once),
which rendezvous through a file store and talk over the loopback interface; each rank saves what it
ended with, and the test compares. Ranks that hang are killed after a timeout.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

import pcfast

STEPS = 5
BATCH = 12
SHARDS = {2: [6, 6], 3: [5, 3, 4]}
TIMEOUT_S = 120  # a whole launch; each collective also times out (init_process_group) after 60 s

# name -> (optimizer class, its settings); all with momentum and weight decay.
CASES = {
    "pc": (pcfast.optim.PC, dict(inference_steps=4, inference_lr=0.1)),
    "pc-sequential-ce": (pcfast.optim.PC, dict(inference_steps=3, inference_lr=0.1, schedule="sequential", loss="ce")),
    "bp": (pcfast.optim.BP, {}),
    "gnt": (pcfast.optim.GNT, dict(beta=0.5)),
    "tp-ridge": (pcfast.optim.TP, dict(feedback="ridge", feedback_weight_decay=1e-2, beta=0.3)),
    "dtp-ridge0": (pcfast.optim.DTP, dict(feedback="ridge", feedback_weight_decay=0.0, beta=0.3)),
    "dtp-noise0": (pcfast.optim.DTP, dict(feedback_noise=0.0, feedback_steps=2, feedback_lr=0.05, beta=0.3)),
    "dtp-noise": (pcfast.optim.DTP, dict(feedback_noise=0.1, feedback_steps=2, feedback_lr=0.05, beta=0.3)),
    # triton (under the interpreter, so 2 steps): PC's SGD is not fused into the gradient launch of a
    # shard, and DTP's noise is drawn as the torch backends draw it (their single-process run is the oracle).
    "pc-triton": (pcfast.optim.PC, dict(inference_steps=2, inference_lr=0.1)),
    "dtp-noise-triton": (pcfast.optim.DTP, dict(feedback_noise=0.1, feedback_steps=1, feedback_lr=0.05, beta=0.3)),
    # conv nets (the torch backend), on 1×6×6 images
    "pc-cnn": (pcfast.optim.PC, dict(inference_steps=3, inference_lr=0.1)),
    "bp-cnn": (pcfast.optim.BP, {}),
    "dtp-noise-cnn": (pcfast.optim.DTP, dict(feedback_noise=0.1, feedback_steps=2, feedback_lr=0.05, beta=0.3)),
}
SINGLE_PROCESS_BACKEND = {"pc-triton": "triton", "dtp-noise-triton": "torch"}
FAILING = ("pc", "bp", "dtp-noise", "tp-ridge")


def make_model(perturb: float = 0.0, name: str = "") -> nn.Module:
    torch.manual_seed(0)
    if name.endswith("-cnn"):
        model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 4),
                              nn.Tanh(), nn.Linear(4, 3)).double()
    else:
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb)
    return model


def make_optimizer(name: str, model: nn.Module, **extra):
    cls, settings = CASES[name]
    par = pcfast.parametrize(model, "mup", algo=cls.algo, base_width=4, generator=torch.Generator().manual_seed(1))
    return cls(model, par, lr=0.05, momentum=0.9, weight_decay=1e-3, **settings, **extra)


def batches(name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    out = []
    for _ in range(2 if name.endswith("triton") else STEPS):
        x = torch.randn(BATCH, *((1, 6, 6) if name.endswith("-cnn") else (5,)), generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (BATCH,), generator=gen) if name.endswith("-ce") else \
            torch.randn(BATCH, 3, generator=gen, dtype=torch.float64)
        out.append((x, y))
    return out


def train(name: str, opt, model, rows: slice):
    stats = [opt.step(x[rows], y[rows]) for x, y in batches(name)]
    feedback = [q.clone() for q in getattr(opt, "feedback_weights", [])]
    feedback += [c.clone() for c in getattr(opt, "feedback_biases", []) if c is not None]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    return {"params": [p.detach().clone() for p in model.parameters()], "stats": stats, "feedback": feedback,
            "buffers": buffers}


def accumulate(opt, model, rows: slice) -> dict:
    """Two ``compute_gradients`` calls and a ``step()``: the grads, statistics and parameters."""
    (x1, y1), (x2, y2) = batches("pc")[:2]
    stats = [opt.compute_gradients(x1[rows], y1[rows]), opt.compute_gradients(x2[rows], y2[rows])]
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return {"grads": grads, "stats": stats, "params": [p.detach().clone() for p in model.parameters()]}


def case_backend(name: str) -> str:
    return "triton" if name.endswith("triton") else "auto"


def takes_process_group(name: str) -> bool:
    return CASES[name][0] not in (pcfast.optim.BP, pcfast.optim.GNT)  # these find the default group ("auto")


# ---------------------------------------------------------------------------------------------- one rank


def _failure(opt, model, x, y) -> dict:
    """Step on (x, y), which fails on some rank; what this rank raised and whether anything changed."""
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in ((id(p), opt.state[p]["momentum_buffer"]) for p in model.parameters())}
    feedback = [t.clone() for t in getattr(opt, "feedback_weights", []) + getattr(opt, "feedback_biases", [])
                if t is not None]
    generator = opt.generator.get_state() if hasattr(opt, "generator") else None
    raised = None
    try:
        opt.step(x, y)
    except Exception as error:  # noqa: BLE001 - the type is what is checked
        raised = type(error).__name__
    unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    unchanged &= all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    unchanged &= all(torch.equal(state[id(p)], opt.state[p]["momentum_buffer"]) for p in model.parameters())
    now = [t for t in getattr(opt, "feedback_weights", []) + getattr(opt, "feedback_biases", []) if t is not None]
    unchanged &= all(torch.equal(a, b) for a, b in zip(feedback, now))
    unchanged &= generator is None or torch.equal(generator, opt.generator.get_state())
    return {"raised": raised, "unchanged": unchanged}


def rank_main(rank: int, world: int, store: str, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                         timeout=timedelta(seconds=60))
    sizes = SHARDS[world]
    rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    results = {}
    for name in CASES:
        if name.endswith("triton") and world != 2:
            continue  # the interpreter is slow: one world size is enough
        # Ranks other than the first start from another model and seed: the optimizer takes the first's.
        model = make_model(perturb=0.01 * rank, name=name)
        extra = {"seed": 7 * rank} if issubclass(CASES[name][0], pcfast.optim.TP) else {}
        if name == "pc-sequential-ce":
            extra["process_group"] = torch.distributed.group.WORLD  # the others detect it ("auto")
        opt = make_optimizer(name, model, backend=case_backend(name), **extra)
        results[name] = train(name, opt, model, rows)

    # compute_gradients on two micro-batches (accumulating into .grad), then step() on that .grad.
    model = make_model()
    opt = make_optimizer("pc", model)
    results["accumulated"] = accumulate(opt, model, rows)

    # Failures on one rank's shard, after 5 good steps; then one more good step, on every rank.
    failures = {}
    for name in FAILING:
        model = make_model()
        opt = make_optimizer(name, model)
        train(name, opt, model, rows)
        x, y = batches(name)[0]
        x, y = x[rows].clone(), y[rows].clone()
        huge = y.clone()
        if rank == world - 1:
            huge[0] = 1e300  # this shard's loss overflows: the computation diverges here only
        failures[name, "diverged"] = _failure(opt, model, x, huge)
        bad_y = y[:, :2] if rank == world - 1 else y  # a malformed shard: ValueError here only
        failures[name, "bad_input"] = _failure(opt, model, x, bad_y)
        labels = y.argmax(1)
        if rank == world - 1:
            labels[0] = 99  # a class label out of range on one shard: checked inside the reduced flag
        failures[name, "bad_label"] = _failure(opt, model, x, labels)
        if name == "pc":  # a relaxation that diverges on the last rank only (its own κ, far too large)
            for group in opt.param_groups:
                group["inference_lr"] = 50.0 if rank == world - 1 else 0.1
            failures[name, "relaxation"] = _failure(opt, model, x, y)
            try:
                opt.step(x, y)
            except Exception as error:  # noqa: BLE001 - the message is what is checked
                failures[name, "relaxation"]["message"] = str(error)
            for group in opt.param_groups:
                group["inference_lr"] = 0.1
        opt.param_groups[0]["lr"] = float("nan")  # on every rank: every update is NaN
        failures[name, "nan_lr"] = _failure(opt, model, x, y)
        opt.param_groups[0]["lr"] = 0.05
        after = opt.step(x, y)  # the ranks' collectives are still in step
        failures[name, "after"] = {"loss": after["loss"], "params": [p.detach().clone() for p in model.parameters()]}
    torch.save({"results": results, "failures": failures}, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------- the tests


def launch(world: int, tmp_path: Path) -> tuple[list[dict], float]:
    """Run ``rank_main`` on ``world`` processes; what each saved, and the wall time of the launch."""
    context = multiprocessing.get_context("forkserver")  # not fork: the parent's thread pools may be in use
    context.set_forkserver_preload(["torch", "torch._dynamo", "triton", "pcfast", "pcfast.optim"])  # imported once
    store = tmp_path / "store"
    start = time.perf_counter()
    procs = [context.Process(target=rank_main, args=(rank, world, str(store), str(tmp_path)), daemon=True)
             for rank in range(world)]
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=max(1.0, start + TIMEOUT_S - time.perf_counter()))
        hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
        assert not hung, f"rank(s) {hung} of {world} did not finish within {TIMEOUT_S} s"
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    for rank, proc in enumerate(procs):
        assert proc.exitcode == 0, f"rank {rank} exited with {proc.exitcode} (its traceback is in the captured output)"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)], time.perf_counter() - start


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.fixture(scope="module")
def single_process():
    """Every case on one process and the full batch (no process group)."""
    out = {}
    for name in CASES:
        model = make_model(name=name)
        backend = SINGLE_PROCESS_BACKEND.get(name, case_backend(name))
        extra = {"process_group": None, "backend": backend} if takes_process_group(name) else {}
        out[name] = train(name, make_optimizer(name, model, **extra), model, slice(None))
    model = make_model()
    out["accumulated"] = accumulate(make_optimizer("pc", model, process_group=None), model, slice(None))
    return out


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """``world`` -> what each rank saved (one launch per world size for the tests of this file)."""
    cache = {}

    def get(world):
        if world not in cache:
            ranks, seconds = launch(world, tmp_path_factory.mktemp(f"world{world}"))
            print(f"{world} ranks: {seconds:.1f} s")
            cache[world] = ranks
        return cache[world]

    return get


@pytest.mark.parametrize("world", [2, 3], ids=["2-ranks-6+6", "3-ranks-5+3+4"])
def test_data_parallel_equals_one_process_on_the_full_batch(world, launched, single_process):
    ranks = launched(world)
    for name, expected in single_process.items():
        if name.endswith("triton") and world != 2 or name == "accumulated":
            continue
        for rank, saved in enumerate(ranks):
            got = saved["results"][name]
            for key in ("params", "feedback", "buffers"):
                assert len(got[key]) == len(expected[key])
                for i, (a, b) in enumerate(zip(got[key], expected[key])):
                    error = relative_error(a, b)
                    assert error <= 1e-12, f"{name}, rank {rank}: {key}[{i}] differs by {error:.2e} (relative)"
            for step, (a, b) in enumerate(zip(got["stats"], expected["stats"])):
                assert a.keys() == b.keys()
                for k in a:
                    assert abs(a[k] - b[k]) <= 1e-12 * abs(b[k]), f"{name}, rank {rank}: step {step} {k} {a[k]} vs {b[k]}"


@pytest.mark.parametrize("world", [2, 3], ids=["2-ranks-6+6", "3-ranks-5+3+4"])
def test_compute_gradients_accumulates_the_group_means(world, launched, single_process):
    expected = single_process["accumulated"]
    for rank, saved in enumerate(launched(world)):
        got = saved["results"]["accumulated"]
        for key in ("grads", "params"):
            for i, (a, b) in enumerate(zip(got[key], expected[key])):
                assert relative_error(a, b) <= 1e-12, f"rank {rank}: {key}[{i}]"
        for a, b in zip(got["stats"], expected["stats"]):
            assert all(abs(a[k] - b[k]) <= 1e-12 * abs(b[k]) for k in b), (rank, a, b)


def test_process_group_argument():
    """Without torch.distributed initialised, "auto" and None are single-process; anything else
    is refused with the argument named."""
    assert not torch.distributed.is_initialized()
    for value in ("auto", None):
        assert make_optimizer("dtp-noise", make_model(), process_group=value).process_group is None
    with pytest.raises(ValueError, match="process_group: expected 'auto', None or a torch.distributed ProcessGroup"):
        make_optimizer("pc", make_model(), process_group="world")
    with pytest.raises(TypeError, match="process_group: .* got int"):
        make_optimizer("pc", make_model(), process_group=0)


@pytest.mark.parametrize("world", [2, 3], ids=["2-ranks-6+6", "3-ranks-5+3+4"])
def test_a_failure_on_one_rank_is_raised_on_every_rank_with_nothing_changed(world, launched):
    """The last rank's shard diverges (or is malformed): every rank raises the same error type and
    changes nothing; a NaN rate raises on every rank; and the next good step works everywhere."""
    ranks = launched(world)
    for name in FAILING:
        for rank, saved in enumerate(ranks):
            failures = saved["failures"]
            assert failures[name, "diverged"] == {"raised": "DivergenceError", "unchanged": True}, (name, rank)
            assert failures[name, "bad_input"] == {"raised": "ValueError", "unchanged": True}, (name, rank)
            assert failures[name, "bad_label"] == {"raised": "ValueError", "unchanged": True}, (name, rank)
            assert failures[name, "nan_lr"] == {"raised": "DivergenceError", "unchanged": True}, (name, rank)
            if name == "pc":  # the guard of the relaxation: every rank refuses; the others say where it diverged
                relaxation = failures[name, "relaxation"]
                assert (relaxation["raised"], relaxation["unchanged"]) == ("DivergenceError", True), rank
                expected = "inference step" if rank == world - 1 else "on another rank"
                assert expected in relaxation["message"], (rank, relaxation["message"])
            first = ranks[0]["failures"][name, "after"]
            after = failures[name, "after"]
            assert after["loss"] == first["loss"]
            assert all(torch.equal(a, b) for a, b in zip(after["params"], first["params"])), (name, rank)

