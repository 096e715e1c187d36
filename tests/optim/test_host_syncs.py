"""Device-to-host reads in one optimizer step: PC, BP, TP and DTP read the host once per step (the step's
statistics with its finiteness flag), so a CUDA step never waits on the GPU more than once.

Counted under a dispatch mode: calls of ``aten::_local_scalar_dense`` (``item()``, ``bool()``,
``float()``, ``int()`` of a tensor) and of ``Tensor.tolist`` (which reads without dispatching), except
reads of Adam's ``step`` counters, which torch.optim keeps on the CPU (unless capturable or fused)
so that reading them costs no device sync. The ``triton`` backend runs under the interpreter on CPU
here: the count is the host code's, the same on a GPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import pcfast
from pcfast.testing import device_for


class HostReads(TorchDispatchMode):
    def __init__(self, host_tensors=()):
        super().__init__()
        self.count = 0
        self.host_tensors = {id(t) for t in host_tensors}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and id(args[0]) not in self.host_tensors:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_host_reads(monkeypatch, run, host_tensors=()) -> int:
    reads = HostReads(host_tensors)
    tolist = torch.Tensor.tolist

    def counted(self, *args, **kwargs):
        reads.count += 1
        return tolist(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    with reads:
        run()
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return reads.count


# (TP/DTP on triton read once more per feedback step: the seed of the in-kernel noise.)
CASES = [("pc", "triton"), ("pc", "torch"), ("pc", "cpp"), ("bp", "auto"), ("tp", "torch"), ("dtp", "cpp")]


@pytest.mark.parametrize("target", ["labels", "one-hot"])
@pytest.mark.parametrize("algo, backend", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_one_optimizer_step_reads_the_host_once(monkeypatch, algo, backend, target):
    if not pcfast.ops.is_available(backend if backend != "auto" else "torch"):
        pytest.skip(f"backend {backend} is not available here")
    device = device_for(backend)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).to(device)
    settings = dict(inference_steps=3) if algo == "pc" else {}
    optimizers = {"pc": pcfast.optim.PC, "bp": pcfast.optim.BP, "tp": pcfast.optim.TP, "dtp": pcfast.optim.DTP}
    opt = optimizers[algo](model, lr=0.1, momentum=0.9, backend=backend, **settings)
    x, y = torch.randn(4, 6, device=device), torch.tensor([0, 1, 2, 1], device=device)
    if target == "one-hot":
        y = nn.functional.one_hot(y, 3).float()
    opt.step(x, y)  # momentum buffers exist
    for optimizer in (torch.optim.SGD, torch.optim.Adam):
        if optimizer is torch.optim.Adam:
            opt = type(opt)(model, lr=1e-3, optimizer=optimizer, backend=backend, **settings)
            opt.step(x, y)  # Adam's state exists
        counters = [entry["step"] for entry in opt.state.values() if "step" in entry]
        assert all(t.device.type == "cpu" for t in counters)
        stats = {}
        reads = count_host_reads(monkeypatch, lambda: stats.update(opt.step(x, y)), counters)
        assert reads == 1, (optimizer.__name__, reads)
        assert set(stats) >= {"loss"} and all(isinstance(v, float) for v in stats.values())


def test_the_counter_sees_a_read(monkeypatch):
    """The counter is not blind: one item() and one tolist() are two reads."""
    t = torch.ones(3)
    assert count_host_reads(monkeypatch, lambda: (t.sum().item(), t.tolist())) == 2


@pytest.mark.parametrize("hook", [False, True], ids=["live", "hooked"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_a_bp_step_reads_the_host_once_under_either_loss_and_with_a_hook(monkeypatch, loss, hook):
    """BP's label checks (MSE: the one-hot table's NaN row; CE: one comparison) and its path for a
    parameter with a tensor hook (the reference's gradients on detached copies) read nothing early."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    if hook:
        model[0].weight.register_hook(lambda g: g)
    opt = pcfast.optim.BP(model, lr=0.1, momentum=0.9, loss=loss)
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 1])
    opt.step(x, y)
    stats = {}
    assert count_host_reads(monkeypatch, lambda: stats.update(opt.step(x, y))) == 1
    assert set(stats) == {"loss"}
