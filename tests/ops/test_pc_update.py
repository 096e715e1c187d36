"""The PC latent-update kernel (``pcfast/ops/pc_update.py``): one relaxation step against its
formula, and what its stacked launcher refuses. Whole trajectories through it: ``test_triton_pc``."""
import pytest
import torch

pytest.importorskip("triton")

from pcfast.activations import phi_grad
from pcfast.ops import pc_update
from pcfast.ops._triton_common import LayerTable
from pcfast.ops.pc_update import RelaxationStep
from pcfast.testing import assert_close


@pytest.mark.parametrize("fpa, update_error", [(False, False), (False, True), (True, True)],
                         ids=["jacobi", "sequential", "fpa"])
def test_latent_update_equals_its_formula(fpa, update_error):
    """step = κ (γ_{l+1}/γ_l) φ'(s) ⊙ (ε_{l+1} W_{l+1}) − κ ε_l with s = u (FPA) or z; z += step and,
    with update_error, ε += step — batch 33 and widths 40/37 span several tiles."""
    gen = torch.Generator().manual_seed(0)
    z, e, u = (torch.randn(33, 40, generator=gen, dtype=torch.float64) for _ in range(3))
    e_next = torch.randn(33, 37, generator=gen, dtype=torch.float64)
    w_next = torch.randn(37, 40, generator=gen, dtype=torch.float64)
    coefficient, kappa = 0.3, 0.2
    slope = phi_grad("tanh")(u if fpa else z)
    step = coefficient * slope * (e_next @ w_next) - kappa * e
    expected_z, expected_e = z + step, (e + step if update_error else e.clone())
    pc_update.latent_update(z, e, e_next, w_next, RelaxationStep("tanh", coefficient, kappa, fpa),
                            update_error=update_error, preactivation=u if fpa else None)
    assert_close(z, expected_z, name="latent")
    assert_close(e, expected_e, name="error")


def test_latent_update_under_fpa_needs_the_preactivation():
    z = torch.zeros(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="preactivation"):
        pc_update.latent_update(z, z.clone(), z.clone(), torch.zeros(4, 4, dtype=torch.float64),
                                RelaxationStep("tanh", coefficient=1.0, kappa=0.1, fpa=True), update_error=True)


def test_stacked_update_refuses_to_write_errors_it_reads():
    """A stacked step that moves the errors must write them to another buffer: layer l reads ε_{l+1}
    while layer l+1 moves it."""
    z, e = torch.zeros(2, 3, 4, dtype=torch.float64), torch.zeros(2, 3, 4, dtype=torch.float64)
    table = LayerTable.of([torch.zeros(4, 4, dtype=torch.float64) for _ in range(2)])
    with pytest.raises(ValueError, match="errors_out"):
        pc_update.stacked_latent_update(z, e, e, table, RelaxationStep("tanh", coefficient=1.0, kappa=0.1, fpa=True),
                                        update_error=True, preactivations=z, errors_out=e)


def test_relaxation_step_of_a_layer_is_its_coefficients():
    """κ γ_{l+1}/γ_l and κ of hidden layer l, its activation, and FPA, from the net and the config."""
    from pcfast.types import Net, PCConfig

    net = Net([torch.zeros(3, 2), torch.zeros(3, 3), torch.zeros(1, 3)], [None] * 3, ["tanh", "gelu"])
    config = PCConfig((1.0, 2.0, 0.5), inference_lr=0.2, fpa=True)
    assert RelaxationStep.of(net, config, 0) == RelaxationStep("tanh", 0.2 * 2.0, 0.2, True)
    assert RelaxationStep.of(net, config, 1) == RelaxationStep("gelu", 0.2 * 0.5 / 2.0, 0.2, True)


def test_layer_table_rejects_tensors_that_cannot_share_a_launch():
    a = torch.zeros(4, 4)
    assert LayerTable.of([a, torch.zeros(4, 5)]) is None
    assert LayerTable.of([a, torch.zeros(4, 4).T.contiguous().T]) is None  # other strides
    assert LayerTable.of([a, torch.zeros(4, 4, dtype=torch.float64)]) is None
    table = LayerTable.of([a, torch.zeros(4, 4)])
    assert table.offsets[0] == 0 and table.offsets.dtype == torch.int64


@pytest.mark.parametrize("gate", [None, 1.0, 0.0], ids=["ungated", "open", "closed"])
@pytest.mark.parametrize("fpa, update_error", [(False, False), (True, True)], ids=["jacobi", "fpa"])
def test_latent_update_gate_and_squares_equal_their_formula(gate, fpa, update_error):
    """With ``gate`` the step is gate · step (0: z and ε stay bit for bit); ``squares`` gets
    ‖gate · step‖² added to what it held — batch 33 and widths 40/37 span several tiles, whose
    wrapped-around rows and columns must not enter the sum."""
    gen = torch.Generator().manual_seed(4)
    z, e, u = (torch.randn(33, 40, generator=gen, dtype=torch.float64) for _ in range(3))
    e_next = torch.randn(33, 37, generator=gen, dtype=torch.float64)
    w_next = torch.randn(37, 40, generator=gen, dtype=torch.float64)
    coefficient, kappa = 0.3, 0.2
    step = coefficient * phi_grad("tanh")(u if fpa else z) * (e_next @ w_next) - kappa * e
    if gate is not None:
        step = gate * step
    expected_z, expected_e = z + step, (e + step if update_error else e.clone())
    z_before, e_before = z.clone(), e.clone()
    squares = torch.full((1,), 0.25, dtype=torch.float64)
    pc_update.latent_update(z, e, e_next, w_next, RelaxationStep("tanh", coefficient, kappa, fpa),
                            update_error=update_error, preactivation=u if fpa else None,
                            gate=None if gate is None else torch.tensor(gate, dtype=torch.float64), squares=squares)
    assert_close(z, expected_z, name="latent")
    assert_close(e, expected_e, name="error")
    assert_close(squares[0], 0.25 + (step**2).sum(), name="squares")
    if gate == 0.0:
        assert torch.equal(z, z_before) and torch.equal(e, e_before), "a closed gate moved the state"


@pytest.mark.parametrize("gate", [1.0, 0.0], ids=["open", "closed"])
def test_stacked_update_gate_and_squares_per_layer(gate):
    """Stacked launch (FPA, three layers of width 40, batch 33): layer g's ‖gate · step‖² is added to
    squares[g], and the gate scales every layer's step."""
    gen = torch.Generator().manual_seed(5)
    layers, batch, width = 3, 33, 40
    z, e, e_next, u = (torch.randn(layers, batch, width, generator=gen, dtype=torch.float64) for _ in range(4))
    ws = [torch.randn(width, width, generator=gen, dtype=torch.float64) / width**0.5 for _ in range(layers)]
    coefficient, kappa = 0.3, 0.2
    step = gate * (coefficient * phi_grad("tanh")(u) * torch.stack([e_next[g] @ ws[g] for g in range(layers)])
                   - kappa * e)
    expected_z, expected_e = z + step, e + step
    e_out, squares = torch.empty_like(e), torch.zeros(layers, dtype=torch.float64)
    pc_update.stacked_latent_update(z, e, e_next, LayerTable.of(ws), RelaxationStep("tanh", coefficient, kappa, True),
                                    update_error=True, preactivations=u, errors_out=e_out,
                                    gate=torch.tensor(gate, dtype=torch.float64), squares=squares)
    assert_close(z, expected_z, name="latents")
    assert_close(e_out, expected_e, name="errors_out")
    assert_close(squares, (step**2).sum(dim=(1, 2)), name="squares")


def test_latent_update_checks_gate_and_squares():
    z = torch.zeros(3, 4, dtype=torch.float64)
    step = RelaxationStep("tanh", coefficient=1.0, kappa=0.1, fpa=False)
    args = (z, z.clone(), z.clone(), torch.zeros(4, 4, dtype=torch.float64), step)
    with pytest.raises(ValueError, match="squares"):
        pc_update.latent_update(*args, update_error=False, squares=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="squares"):
        pc_update.latent_update(*args, update_error=False, squares=torch.zeros(1, dtype=torch.float16))
    with pytest.raises(ValueError, match="gate"):
        pc_update.latent_update(*args, update_error=False, gate=torch.ones(2, dtype=torch.float64))
