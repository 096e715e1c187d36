"""One train step of PC, TP, DTP and BP per provider and configuration.

Providers: ``reference`` (the specification, autograd), ``torch`` (explicit backend), ``cpp`` (the C++
engine, when built) and ``compile`` (``torch.compile`` of the torch backend's ``pc_grads``). Run with

    pytest benchmarks/test_bench_train_step.py --benchmark-json=bench.json
    python benchmarks/report.py bench.json

``-k anchor`` etc. selects configurations; the wide one takes minutes on 2 cores.
"""
from __future__ import annotations

import pytest
import torch

from pcfast import functional as F
from pcfast import ops
from pcfast.testing import make_batch, make_feedback, make_net
from pcfast.types import Net, PCConfig

from .conftest import CONFIGS, Case, record

PROVIDERS = ["reference", "torch", "cpp", "compile"]


_compiled = {}


def step_function(algo: str, provider: str, dims, size):
    """A zero-argument callable running one train step (gradients + SGD update) for the provider."""
    weights, biases, acts = make_net(dims, dtype=torch.float32, bias_scale=0.0)  # zero biases
    x, y = make_batch(dims, size, targets="onehot", inputs="uniform", dtype=torch.float32)
    lr = 0.01
    backend = "torch" if provider == "compile" else provider
    if provider == "cpp" and not ops.is_available("cpp"):
        pytest.skip("pcfast._C is not built")

    def sgd(grads):
        for w, g in zip(weights, grads):
            w.sub_(g, alpha=lr)

    if algo == "pc":
        fn = F.pc_train_step
        if provider == "compile":
            if "pc" not in _compiled:
                _compiled["pc"] = torch.compile(ops.get_backend("torch", "pc", x.device).pc_grads, dynamic=False)
            compiled = _compiled["pc"]
            net = Net(weights, biases, acts)  # the parameters themselves: sgd updates them in place
            config = PCConfig.of(len(dims) - 1, inference_steps=Case(dims, size).steps, inference_lr=0.1)

            def run():
                sgd(compiled(net, x, y, config).weight_grads)
            return run

        def run():
            out = fn(weights, biases, acts, x, y, inference_steps=Case(dims, size).steps, inference_lr=0.1,
                     backend=backend)
            sgd(out.weight_grads)
        return run
    if algo == "bp":
        if provider not in ("reference", "torch"):
            pytest.skip("BP runs on autograd; only the reference provider applies")

        def run():
            sgd(F.bp_train_step(weights, biases, acts, x, y).weight_grads)
        return run
    qs, cs, _ = make_feedback(dims, dtype=torch.float32, bias_scale=0.0, seed=2)
    if provider == "compile":
        pytest.skip("torch.compile provider is measured for PC only")
    noise_gen = torch.Generator().manual_seed(3)

    def run():
        noise = [0.1 * torch.randn(size, d, generator=noise_gen) for d in dims[1:-1]]
        fb = F.feedback_grads(weights, biases, acts, qs, cs, None, x, noise, backend=backend)
        for q, g in zip(qs, fb.weight_grads):
            q.sub_(g, alpha=lr)
        out = F.tp_train_step(weights, biases, acts, qs, cs, None, x, y, beta=0.5,
                              difference=(algo == "dtp"), backend=backend)
        sgd(out.weight_grads)
    return run


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("algo", ["pc", "tp", "dtp", "bp"])
def test_train_step(benchmark, algo, provider, config):
    dims, size = CONFIGS[config]
    case = Case(dims, size)
    run = step_function(algo, provider, dims, size)
    benchmark.group = f"{algo}-{config}"
    rounds = 3 if config == "wide" else 10
    run()  # warm up (and compile)
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    record(benchmark, algo, provider, config, case)
