"""The iPC reference against PC's: T = 1 is one PC step, frozen weights are PC's relaxation."""
from __future__ import annotations

import pytest
import torch

from pcfast.reference import pc_relax, pc_train_step
from pcfast.reference.ipc import ipc_trajectory, sgd
from pcfast.testing import assert_all_close, assert_close, make_batch, make_net
from pcfast.types import Net, PCConfig

CASES = [((3, 7, 1, 3), 5, True, "mse"), ((7, 1, 3), 1, False, "ce"), ((1, 3), 5, True, "ce")]
IDS = [f"D{'-'.join(map(str, d))}-B{b}-{'bias' if bias else 'nobias'}-{loss}" for d, b, bias, loss in CASES]


def _setup(dims, batch, bias, loss, steps, precisions=None):
    net = make_net(dims, bias=bias)
    x, y = make_batch(dims, batch, loss)
    config = PCConfig.of(len(dims) - 1, precisions, inference_steps=steps, inference_lr=0.3, loss=loss)
    return Net(net.weights, net.biases, net.activations), x, y, config


@pytest.mark.parametrize("dims, batch, bias, loss", CASES, ids=IDS)
def test_ipc_with_one_step_equals_pc_with_one_step(dims, batch, bias, loss):
    net, x, y, config = _setup(dims, batch, bias, loss, 1, precisions=[2.0] * (len(dims) - 2) + [0.5])
    trajectory = ipc_trajectory(net, x, y, config, sgd(0.1))
    pc = pc_train_step(net.weights, net.biases, net.activations, x, y, precisions=list(config.precisions),
                       inference_steps=1, inference_lr=0.3, loss=loss)
    assert_all_close(trajectory.latents[1], pc.latents, name="latents")
    assert_all_close(trajectory.weights[1], [w - 0.1 * g for w, g in zip(net.weights, pc.weight_grads)], name="W")
    assert_all_close(trajectory.biases[1], [None if b is None else b - 0.1 * g
                                            for b, g in zip(net.biases, pc.bias_grads)], name="b")
    assert_close(trajectory.energies[0], pc.energy, name="energy")
    assert_close(trajectory.loss, pc.loss, name="loss")


@pytest.mark.parametrize("dims, batch, bias, loss", CASES, ids=IDS)
def test_ipc_with_frozen_weights_relaxes_as_pc(dims, batch, bias, loss):
    """With an update that keeps the weights, iPC's latents are PC's relaxation trajectory."""
    net, x, y, config = _setup(dims, batch, bias, loss, 5)
    trajectory = ipc_trajectory(net, x, y, config, lambda w, b, gw, gb: (w, b))
    _, expected = pc_relax(net, x, y, PCConfig(config.precisions, inference_steps=5, inference_lr=0.3, loss=loss,
                                               return_trajectory=True))
    assert len(trajectory.latents) == len(expected) == 6
    for t, (latents, reference) in enumerate(zip(trajectory.latents, expected)):
        assert_all_close(latents, reference, name=f"z_{t}")
    assert all(torch.equal(w, w0) for ws in trajectory.weights for w, w0 in zip(ws, net.weights))


def test_ipc_weights_move_at_every_step():
    net, x, y, config = _setup((3, 7, 1, 3), 5, True, "mse", 5)
    trajectory = ipc_trajectory(net, x, y, config, sgd(0.1))
    assert len(trajectory.weights) == 6 and len(trajectory.energies) == 5
    for t in range(5):
        assert not torch.equal(trajectory.weights[t][-1], trajectory.weights[t + 1][-1]), f"step {t + 1}"


@pytest.mark.parametrize("setting", [{"schedule": "sequential"}, {"fpa": True}], ids=["sequential", "fpa"])
def test_ipc_refuses_settings_it_does_not_define(setting):
    net, x, y, _ = _setup((3, 7, 3), 2, True, "mse", 2)
    with pytest.raises(ValueError, match=next(iter(setting))):
        ipc_trajectory(net, x, y, PCConfig.of(2, None, inference_steps=2, **setting), sgd(0.1))
