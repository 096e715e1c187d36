"""``pcfast.sgd.sgd_update`` (the optimizers' out-of-place SGD rule) is ``torch.optim.SGD``."""
import torch


def test_sgd_update_is_torch_optim_sgd():
    """Oracle: ``torch.optim.SGD`` over three steps, for each combination of its options."""
    from pcfast.sgd import sgd_update

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    for momentum, dampening, decay, nesterov in [(0, 0, 0, False), (0.9, 0, 0, False), (0.9, 0.3, 0.01, False),
                                                 (0.8, 0, 0.05, True), (0, 0, 0.1, False)]:
        param = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        torch_param = param.clone().requires_grad_(True)
        opt = torch.optim.SGD([torch_param], lr=0.1, momentum=momentum, dampening=dampening, weight_decay=decay,
                              nesterov=nesterov)
        buffer = None
        for g in grads:
            torch_param.grad = g.clone()
            opt.step()
            param, buffer = sgd_update(param, g, lr=0.1, momentum=momentum, dampening=dampening, weight_decay=decay,
                                       nesterov=nesterov, buffer=buffer)
            assert torch.allclose(param, torch_param.detach(), rtol=1e-14, atol=1e-15)
