"""PC relaxation and weight gradients with explicit formulas: the ``torch`` backend.

No autograd. Every buffer is allocated once per call and reused across inference steps; latents,
errors and activities are updated in place. Per step and layer there is one GEMM for the prediction
(the first layer's is constant and computed once) and one for the top-down term; with FPA only the
top-down GEMMs remain. Runs on any device and dtype. The math is ``pcfast.reference.pc``.

``pc_grads`` takes a ``Net`` and a ``PCConfig`` (``TorchBackend.pc_grads``). The state of one step
and its in-place updates are ``_Relaxation``; ``relax`` runs the inference steps of any such state and
collects the result — the triton backend's schedule (``triton_pc``) drives its kernels through it too.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ..activations import phi, phi_grad
from ..results import PCResult, PCTrace
from ..types import Net, PCConfig


def _affine(out: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``out = h Wᵀ + b`` in place."""
    if bias is None:
        return torch.mm(h, weight.T, out=out)
    return torch.addmm(bias, h, weight.T, out=out)


def _output_error(out: Tensor, f: Tensor, target: Tensor, loss: str) -> Tensor:
    """``out = −∂ℓ/∂f`` in place (MSE: ``y − f``; CE: ``onehot(y) − softmax(f)``)."""
    if loss == "mse":
        return torch.sub(target, f, out=out)
    torch.softmax(f, dim=1, out=out).neg_()
    out.scatter_add_(1, target.view(-1, 1), torch.ones_like(out[:, :1]))
    return out


def _loss_sum(f: Tensor, target: Tensor, loss: str) -> Tensor:
    if loss == "mse":
        return 0.5 * torch.sum((target - f) ** 2)
    return torch.nn.functional.cross_entropy(f, target, reduction="sum")


class Relaxation(Protocol):
    """The state of one PC step after its feedforward pass, as ``relax`` drives it."""

    latents: list[Tensor]
    errors: list[Tensor]

    def step(self, gate: Tensor | None = None, squares: Tensor | None = None) -> None:
        """One inference step of the schedule. With ``gate`` (0-dim, 1 or 0) every update is
        multiplied by it (0: the step changes nothing); with ``squares`` ((L−1,)) it receives
        ‖Δz_l‖² of each layer's update."""

    def refresh(self) -> None:
        """Bring every error up to date with the latents (a sequential sweep leaves them stale)."""

    def weight_grads(self) -> tuple[list[Tensor], list[Tensor | None]]:
        """−γ_l ε_lᵀ a_{l-1} / B and its bias row sums, at the final state."""

    def energy_terms(self) -> Tensor:
        """Each layer's term of F at the current state, errors up to date (DESIGN §3), shape (L,)."""


class Monitor:
    """Adaptive stopping and the trace of one relaxation, kept on the device (DESIGN §3).

    ``host_stops``: read the stopping test on the host after each step and end the loop there (CPU);
    otherwise a 0-dim ``gate`` turns the remaining steps into no-ops without a host sync (CUDA)."""

    def __init__(self, config: PCConfig, like: Tensor, depth: int, host_stops: bool) -> None:
        steps, hidden, kappa = config.inference_steps, depth - 1, config.inference_lr
        self.config, self.host_stops, self.stopped = config, host_stops, False
        self.tol, self.trace, self.gate = config.inference_tol, None, None
        self.energy_prev: Tensor | None = None
        self.measures_steps = self.tol is not None or config.return_trace  # ‖Δz_l‖² of every step
        if not self.measures_steps:  # the divergence check alone needs none of the buffers below
            return
        new = lambda *shape: torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
        self.squares = torch.zeros(hidden, dtype=like.dtype, device=like.device)
        # ‖∂F/∂z_l‖ = ‖Δz_l‖ γ_l / κ; filled from scalars: no host-to-device copy, which a CUDA
        # graph being captured does not allow
        self.to_grad = like.new_empty(hidden)
        for l, g in enumerate(config.precisions[:hidden]):
            self.to_grad[l] = g / kappa
        self.gate = like.new_ones(()) if self.tol is not None else None
        self.largest = like.new_zeros(())
        self.taken = torch.zeros((), dtype=torch.int64, device=like.device)
        self.trace = PCTrace(new(steps + 1, depth), new(steps, hidden)) if config.return_trace else None

    def terms(self, state: Relaxation) -> Tensor:
        """F's terms at the current state (refreshing the errors a sequential sweep left stale)."""
        if not self.config.fpa and self.config.schedule == "sequential":
            state.refresh()  # refreshing moves nothing: the next sweep recomputes every error it reads
        return state.energy_terms()

    def before_step(self, state: Relaxation, t: int) -> None:
        """F before the last step, for the divergence guard."""
        if self.config.check_divergence and t == self.config.inference_steps - 1:
            self.energy_prev = self.terms(state).sum()

    def record(self, state: Relaxation, t: int, running: Tensor | None) -> None:
        """Row t of the trace's energies (NaN where the relaxation had stopped)."""
        if self.trace is None:
            return
        terms = self.terms(state)
        self.trace.energy[t] = terms if running is None else torch.where(running > 0, terms, self.trace.energy[t])

    def after_step(self, state: Relaxation, t: int) -> None:
        """Bookkeeping after step t + 1 (0-based ``t``): trace rows and the stopping test."""
        if not self.measures_steps:
            return
        running = self.gate.clone() if self.gate is not None else None
        if self.trace is not None and self.squares.numel():
            norms = self.squares.sqrt() * self.to_grad
            self.trace.grad_norm[t] = norms if running is None else torch.where(running > 0, norms,
                                                                                self.trace.grad_norm[t])
        self.record(state, t + 1, running)
        if self.tol is None:
            return
        self.taken += running.to(torch.int64)
        size = self.squares.sum().sqrt()
        torch.maximum(self.largest, size, out=self.largest)
        going = size > self.tol * self.largest
        if self.host_stops:
            self.stopped = not bool(going)
        else:
            self.gate.mul_(going)


def relax(state: Relaxation, config: PCConfig, loss: Tensor, host_stops: bool | None = None) -> PCResult:
    """Run ``config``'s inference steps on ``state`` and collect the result (``loss``: ℓ at the
    feedforward pass, batch mean). ``host_stops`` (default: on the CPU) see ``Monitor``."""
    trajectory = [[z.clone() for z in state.latents]] if config.return_trajectory else None
    monitor = None
    if config.inference_tol is not None or config.return_trace or config.check_divergence:
        like = state.errors[-1]
        monitor = Monitor(config, like, len(state.errors),
                          like.device.type == "cpu" if host_stops is None else host_stops)
        monitor.record(state, 0, None)
    taken = config.inference_steps
    for t in range(config.inference_steps):
        if monitor is None:
            state.step()
        else:
            monitor.before_step(state, t)
            state.step(monitor.gate, monitor.squares if monitor.measures_steps else None)
            monitor.after_step(state, t)
        if trajectory is not None:
            trajectory.append([z.clone() for z in state.latents])
        if monitor is not None and monitor.stopped:
            taken = t + 1
            break
    if trajectory is not None:
        trajectory += [[z.clone() for z in state.latents] for _ in range(config.inference_steps - taken)]
    if not config.fpa and config.schedule == "sequential" and config.inference_steps > 0:
        state.refresh()
    weight_grads, bias_grads = state.weight_grads()
    energy = state.energy_terms().sum()
    energy_prev = None
    if config.check_divergence:
        energy_prev = monitor.energy_prev if monitor.energy_prev is not None and taken == config.inference_steps \
            else energy
    return PCResult(latents=state.latents, errors=state.errors, weight_grads=weight_grads, bias_grads=bias_grads,
                    energy=energy, loss=loss, trajectory=trajectory,
                    steps=None if monitor is None or monitor.tol is None else monitor.taken,
                    trace=None if monitor is None else monitor.trace, energy_prev=energy_prev)


class Refreshing:
    """Bringing errors up to date, shared by the explicit relaxations (here and ``torch_conv``): each
    defines ``layer_map(l)`` (predictions[l] from acts[l]) and ``refresh_activity(l)`` (acts[l+1]
    from z_l), and holds ``latents``, ``predictions``, ``errors``, ``target``, ``config``."""

    depth: int
    hidden: int

    def refresh_error(self, l: int) -> None:
        """ε of 0-based layer l from the current presynaptic activity (layer 1's prediction is constant)."""
        if l > 0:
            self.layer_map(l)
        if l < self.hidden:
            torch.sub(self.latents[l], self.predictions[l], out=self.errors[l])
        else:
            _output_error(self.errors[l], self.predictions[l], self.target, self.config.loss)

    def refresh(self) -> None:
        for l in range(self.hidden):
            self.refresh_activity(l)
        for l in range(self.depth):
            self.refresh_error(l)


class _Relaxation(Refreshing):
    """One PC step in preallocated buffers (a ``Relaxation``), updated in place.

    predictions[l]: layer l's prediction (layer 1's is constant: φ(z_0) = x); acts[l]: its
    presynaptic activity x, φ(z_1), …, φ(z_{L-1}); latents[l] = z_l; errors[l] = ε_l; topdown[l]:
    ε_{l+1} W_{l+1}; slopes[l]: φ'(z_l), frozen at φ'(u_l) under FPA."""

    def __init__(self, net: Net, x: Tensor, target: Tensor, config: PCConfig) -> None:
        self.net, self.target, self.config = net, target, config
        self.depth, self.batch = net.depth, x.shape[0]
        self.hidden = self.depth - 1
        self.phis = [phi(a) for a in net.activations]
        self.dphis = [phi_grad(a) for a in net.activations]
        self.feedforward(x)
        # z_l ← z_l − (κ/γ_l)(γ_l ε_l − γ_{l+1} φ'(z_l) ⊙ (ε_{l+1} W_{l+1}))
        gammas, kappa = config.precisions, config.inference_lr
        self.coefficients = [kappa * gammas[l + 1] / gammas[l] for l in range(self.hidden)]

    def feedforward(self, x: Tensor) -> None:
        """Forward initialisation: z_l = u_l, so ε_l = 0 for l < L, ε_L = −∂ℓ/∂f_0."""
        weights, biases, hidden = self.net.weights, self.net.biases, self.hidden
        self.predictions: list[Tensor] = []
        self.acts: list[Tensor] = [x]
        for l in range(self.depth):
            out = torch.empty(self.batch, weights[l].shape[0], dtype=x.dtype, device=x.device)
            self.predictions.append(_affine(out, self.acts[l], weights[l], biases[l]))
            if l < hidden:
                act = self.phis[l](out)
                self.acts.append(act.clone() if act is out else act)  # own buffer: refreshed in place later
        self.latents = [u.clone() for u in self.predictions[:hidden]]
        self.f0 = self.predictions[-1].clone()
        output_error = _output_error(torch.empty_like(self.f0), self.f0, self.target, self.config.loss)
        self.errors = [torch.zeros_like(z) for z in self.latents] + [output_error]
        self.topdown = [torch.empty_like(z) for z in self.latents]
        fpa = self.config.fpa
        self.slopes = [self.dphis[l](self.predictions[l]) if fpa else torch.empty_like(self.latents[l])
                       for l in range(hidden)]

    def refresh_activity(self, l: int) -> None:
        """acts[l+1] = φ(z_{l+1}) (0-based hidden layer l)."""
        self.acts[l + 1].copy_(self.phis[l](self.latents[l]))

    def layer_map(self, l: int) -> None:
        """predictions[l] = acts[l] W_lᵀ + b_l."""
        _affine(self.predictions[l], self.acts[l], self.net.weights[l], self.net.biases[l])

    def apply_update(self, l: int) -> Tensor:
        """Add the step to z_l, using topdown[l] = ε_{l+1} W_{l+1} (overwritten); return the step."""
        if not self.config.fpa:
            self.slopes[l].copy_(self.dphis[l](self.latents[l]))
        step = self.topdown[l].mul_(self.slopes[l]).mul_(self.coefficients[l])
        step.sub_(self.errors[l], alpha=self.config.inference_lr)
        if self.gate is not None:
            step.mul_(self.gate)
        if self.squares is not None:
            self.squares[l] = torch.linalg.vecdot(step.view(-1), step.view(-1))
        self.latents[l].add_(step)
        return step

    gate: Tensor | None = None
    squares: Tensor | None = None

    def step(self, gate: Tensor | None = None, squares: Tensor | None = None) -> None:
        self.gate, self.squares = gate, squares
        if self.config.schedule == "jacobi":
            self.jacobi_step()
        elif self.hidden > 0:
            self.sequential_step()

    def jacobi_step(self) -> None:
        errors, weights, fpa = self.errors, self.net.weights, self.config.fpa
        for l in range(self.hidden):
            torch.mm(errors[l + 1], weights[l + 1], out=self.topdown[l])
        for l in range(self.hidden):
            step = self.apply_update(l)
            if fpa:
                errors[l].add_(step)  # predictions are frozen: ε_l moves with z_l
        if not fpa:
            self.refresh()

    def sequential_step(self) -> None:
        errors, weights, fpa, hidden = self.errors, self.net.weights, self.config.fpa, self.hidden
        if not fpa:
            self.refresh_activity(hidden - 1)
            self.refresh_error(self.depth - 1)
        for l in reversed(range(hidden)):
            if not fpa:
                if l > 0:
                    self.refresh_activity(l - 1)
                self.refresh_error(l)
            torch.mm(errors[l + 1], weights[l + 1], out=self.topdown[l])
            # Layer l's prediction does not depend on z_l, so ε_l moves with z_l; the next layer
            # down reads this fresh ε_l in its top-down term.
            errors[l].add_(self.apply_update(l))

    def weight_grads(self) -> tuple[list[Tensor], list[Tensor | None]]:
        """−γ_l ε_lᵀ a_{l-1} / B at the final state."""
        weight_grads, bias_grads = [], []
        for l in range(self.depth):
            scale = -self.config.precisions[l] / self.batch
            weight_grads.append(torch.mm(self.errors[l].T, self.acts[l]).mul_(scale))
            bias_grads.append(None if self.net.biases[l] is None else self.errors[l].sum(0).mul_(scale))
        return weight_grads, bias_grads

    def energy_terms(self) -> Tensor:
        gammas, errors = self.config.precisions, self.errors
        f = self.f0 if self.config.fpa else self.predictions[-1]
        return torch.stack([0.5 * gammas[l] * torch.sum(errors[l] * errors[l]) for l in range(self.hidden)]
                           + [gammas[-1] * _loss_sum(f, self.target, self.config.loss)])

    def energy(self) -> Tensor:
        """F at the current state, errors up to date."""
        return self.energy_terms().sum()


@torch.no_grad()
def pc_grads(net: Net, x: Tensor, target: Tensor, config: PCConfig) -> PCResult:
    """PC relaxation and local gradients (the ``torch`` backend's ``pc_grads``)."""
    state = _Relaxation(net, x, target, config)
    return relax(state, config, _loss_sum(state.f0, target, config.loss) / state.batch)
