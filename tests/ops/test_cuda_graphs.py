"""The CUDA-graph cache (``pcfast/ops/cuda_graphs.py``), with torch.cuda's graph API faked (no GPU
here): its bookkeeping, and that every input reaches the static buffers before a replay."""
import contextlib
from types import SimpleNamespace

import torch

from pcfast import reference
from pcfast.ops.cuda_graphs import GraphCache
from pcfast.testing import assert_close


def _fake_cuda(monkeypatch, events):
    class FakeGraph:
        def replay(self):
            events.append("replay")

    @contextlib.contextmanager
    def fake_graph(graph):
        events.append("capture")
        yield

    class FakeStream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())


def test_cuda_graph_cache_runs_eager_then_captures_then_replays(monkeypatch):
    """First call eager, second captures (warm-up run, then capture, then replay), later calls copy
    the new inputs into the static buffers and replay; results are copies, never the graph's
    static buffers."""
    events = []
    _fake_cuda(monkeypatch, events)
    cache = GraphCache()

    def run(x, target):
        events.append("run")
        return reference.bp_train_step([torch.ones(2, 3, dtype=torch.float64)], [None], [], x, target, loss="mse")

    x1, x2, x3 = (torch.full((4, 3), float(v), dtype=torch.float64) for v in (1, 2, 3))
    target = torch.zeros(4, 2, dtype=torch.float64)
    first = cache.run(("key",), run, (x1, target), capacity=8)
    assert events == ["run"]
    second = cache.run(("key",), run, (x2, target), capacity=8)
    assert events == ["run", "run", "capture", "run", "replay"]
    assert_close(second.loss, run(x2, target).loss)
    _, (static_x, _), static_out, _ = cache.entries[("key",)]
    assert second.weight_grads[0].data_ptr() != static_out.weight_grads[0].data_ptr()
    events.clear()
    cache.run(("key",), run, (x3, target), capacity=8)
    assert events == ["replay"] and torch.equal(static_x, x3)
    assert float(first.loss) != float(second.loss)


def test_cuda_graph_cache_copies_every_input_into_the_static_buffers(monkeypatch):
    """Every input is copied before a replay (here a third, a float64 rate): a replay with new values
    must see them."""
    seen = []
    _fake_cuda(monkeypatch, seen)
    cache = GraphCache()

    def run(x, target, hyper):
        return reference.bp_train_step([torch.ones(2, 3, dtype=torch.float64)], [None], [], x * hyper[0], target, loss="mse")

    x, target = torch.ones(4, 3, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)
    for rate in (1.0, 2.0, 3.0):
        cache.run(("hyper",), run, (x, target, torch.tensor([rate], dtype=torch.float64)), capacity=8)
    _, (_, _, static_hyper), _, _ = cache.entries[("hyper",)]
    assert float(static_hyper[0]) == 3.0 and seen == ["capture", "replay", "replay"]


def test_cuda_graph_cache_keeps_the_most_recently_used(monkeypatch):
    _fake_cuda(monkeypatch, [])
    cache = GraphCache()
    for key in ("a", "b", "a", "c"):
        cache.run((key,), lambda x: SimpleNamespace(x=x * 2), (torch.zeros(1),), capacity=2)
    assert list(cache.entries) == [("a",), ("c",)]
