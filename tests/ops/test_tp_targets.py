"""DTP's feedback noise (``pcfast/ops/tp_targets.py``): ξ drawn from a seed inside the kernels that read
it equals the reference given the same noise (``gaussian_noise`` stores it), is reproducible, is
standard normal, and reaches the optimizer's resumable state. The target-propagation kernel itself
runs in every TP/DTP step: ``test_triton_tp``.
"""
import pytest
import torch

pytest.importorskip("triton")

from pcfast import functional as F
from pcfast import reference
from pcfast.ops import tp_targets
from pcfast.testing import assert_all_close, assert_close
from tests.conftest import random_batch
from tests.ops.cases import DTYPES, FEEDBACK_CASES, feedback_id, tp_network


# In-kernel noise: ξ drawn from a seed inside the kernels that read it, never stored.
def _noise_widths(dims):
    return list(dims[1:-1])


@pytest.mark.parametrize("case", FEEDBACK_CASES, ids=[feedback_id(c) for c in FEEDBACK_CASES])
def test_in_kernel_noise_equals_reference_with_the_same_noise(case):
    """Oracle: ``reference.feedback_grads`` given the noise tensors ``gaussian_noise`` stores for the
    seed. Depth 3–4 checks that every layer draws its own block of the stream."""
    dims, weights, biases, acts, qs, cs, psis = tp_network(case)
    dtype = DTYPES[case["dtype"]]
    x, _ = random_batch(dims, case["batch"], "mse", dtype=dtype)
    seed, std = 1234, 0.3
    noise = tp_targets.gaussian_noise(seed, std, case["batch"], _noise_widths(dims), dtype=dtype, device=x.device)
    assert all(xi.shape == (case["batch"], w) for xi, w in zip(noise, _noise_widths(dims)))
    ref = reference.feedback_grads(weights, biases, acts, qs, cs, psis, x, noise)
    out = F.feedback_grads(weights, biases, acts, qs, cs, psis, x, noise_seed=seed, noise_std=std, backend="triton")
    assert_all_close(out.weight_grads, ref.weight_grads, dtype=dtype, name="feedback weight grads")
    assert_all_close(out.bias_grads, ref.bias_grads, dtype=dtype, name="feedback bias grads")
    assert_close(out.loss, ref.loss, dtype=dtype, name="reconstruction loss")
    clean = reference.feedback_grads(weights, biases, acts, qs, cs, psis, x)
    assert float((out.weight_grads[0] - clean.weight_grads[0]).abs().max()) > 1e-3, "the noise had no effect"


def test_in_kernel_noise_same_seed_same_result_other_seed_other_result():
    case = FEEDBACK_CASES[0]
    dims, weights, biases, acts, qs, cs, psis = tp_network(case)
    x, _ = random_batch(dims, 5, "mse")

    def run(seed):
        return F.feedback_grads(weights, biases, acts, qs, cs, psis, x, noise_seed=seed, noise_std=0.2, backend="triton")

    a, b, c = run(7), run(7), run(8)
    for ga, gb, gc in zip(a.weight_grads, b.weight_grads, c.weight_grads):
        assert torch.equal(ga, gb)
        assert not torch.allclose(ga, gc)
    assert float(a.loss) == float(b.loss) != float(c.loss)


def test_gaussian_noise_is_standard_normal_scaled():
    """200,000 draws: mean, standard deviation and the fraction within one σ of a N(0, σ²) sample
    (bounds: 6 standard errors), and distinct layers are uncorrelated."""
    std = 0.5
    first, second = tp_targets.gaussian_noise(99, std, 400, [250, 250], dtype=torch.float64, device=torch.device("cpu"))
    values = first.flatten()
    n = values.numel()
    assert abs(float(values.mean())) < 6 * std / n**0.5
    assert abs(float(values.std()) / std - 1) < 6 / (2 * n) ** 0.5
    within = float((values.abs() < std).double().mean())
    assert abs(within - 0.6827) < 6 * (0.6827 * 0.3173 / n) ** 0.5
    correlation = float(torch.corrcoef(torch.stack([values, second.flatten()]))[0, 1])
    assert abs(correlation) < 6 / n**0.5


def test_noise_seed_on_other_backends_draws_from_a_seeded_generator():
    """The torch backend draws ξ_l with ``torch.Generator().manual_seed(seed)`` in layer order."""
    case = FEEDBACK_CASES[0]
    dims, weights, biases, acts, qs, cs, psis = tp_network(case)
    x, _ = random_batch(dims, 5, "mse")
    gen = torch.Generator().manual_seed(5)
    noise = [torch.randn(5, w, generator=gen, dtype=x.dtype).mul_(0.2) for w in _noise_widths(dims)]
    seeded = F.feedback_grads(weights, biases, acts, qs, cs, psis, x, noise_seed=5, noise_std=0.2, backend="torch")
    explicit = F.feedback_grads(weights, biases, acts, qs, cs, psis, x, noise, backend="torch")
    assert_all_close(seeded.weight_grads, explicit.weight_grads, name="feedback weight grads")


@pytest.mark.parametrize("bad, error", [
    (dict(noise_seed=-1), ValueError), (dict(noise_seed=1.5), TypeError), (dict(noise_seed=True), TypeError),
    (dict(noise_seed=1, noise_std=float("nan")), ValueError), (dict(noise_seed=1, noise_std=-0.1), ValueError),
    (dict(noise_seed=1, noise="tensors"), ValueError)])
def test_noise_seed_bad_input_is_a_clear_error(bad, error):
    case = FEEDBACK_CASES[0]
    dims, weights, biases, acts, qs, cs, psis = tp_network(case)
    x, _ = random_batch(dims, 5, "mse")
    if bad.get("noise") == "tensors":
        bad = dict(bad, noise=[torch.zeros(5, w, dtype=x.dtype) for w in _noise_widths(dims)])
    with pytest.raises(error, match="noise"):
        F.feedback_grads(weights, biases, acts, qs, cs, psis, x, backend="triton", **bad)


def test_dtp_optimizer_on_triton_draws_seeds_and_resumes_bitwise():
    """With backend="triton" the optimizer passes a seed from its generator to the kernels: a run
    resumed from a state_dict continues bitwise like the uninterrupted one."""
    import copy

    import pcfast
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Linear(17, 17), nn.Tanh(), nn.Linear(17, 3)).double()

    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen))
               for _ in range(3)]
    straight_model = model()
    straight = pcfast.optim.DTP(straight_model, lr=0.05, feedback_noise=0.3, backend="triton", seed=4)
    for x, y in batches[:2]:
        straight.step(x, y)
    saved_model, saved_opt = copy.deepcopy(straight_model.state_dict()), copy.deepcopy(straight.state_dict())
    straight.step(*batches[2])
    resumed_model = model()
    resumed_model.load_state_dict(saved_model)
    resumed = pcfast.optim.DTP(resumed_model, lr=0.05, feedback_noise=0.3, backend="triton", seed=99)
    resumed.load_state_dict(saved_opt)
    resumed.step(*batches[2])
    for a, b in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.feedback_weights, resumed.feedback_weights):
        assert torch.equal(a, b)
