"""The Triton backend's PC train step: which kernel runs when (DESIGN §3, §6).

Launch schedule of one PC step (L layers, T steps); the kernels are ``linear_epilogue``,
``pc_update`` and ``local_grad``:

- feedforward: L−1 ``linear`` launches (φ applied on load, z_l = u_l stored twice: the latent and
  FPA's frozen prediction) and the output error ε_L with its prediction f in one launch;
- per step, jacobi: L−1 update launches bottom-up (under FPA each also moves ε_l, which the layer
  below has already read), then, without FPA, L error launches (layer 1's prediction is constant:
  its error is a subtraction);
- per step, sequential: per layer top-down one error launch (without FPA) then one update launch;
- weight gradients: L launches, bias row sums in the same pass.

The scalar energy and loss are torch reductions over the final buffers.

Stacked path (Jacobi schedule, H ≥ 2 hidden layers of one width, activation and precision; see
``stack_plan``): the hidden layers' state lives in (H, B, M) buffers and the model's separate
W_2 … W_H are addressed through an offset table, so each pass is one launch for all of them —
per step one update launch for layers 1 … H−1 plus one for layer H, and (without FPA) one error
launch for layers 2 … H plus layer 1's and the output's: 5 launches instead of 2H + 1; under FPA,
2 instead of H, with the errors written to a second buffer (every layer reads the step's old ε).

Inference control (DESIGN §3): ``relax`` (``torch_pc``) drives the steps. With adaptive stopping,
a trace or the divergence check it passes a device gate and a (L−1,) buffer to ``step``: every
update launch multiplies its step by the gate and adds its layer's ‖Δz_l‖² to the buffer (one
atomic add per tile), so the step norm costs no extra pass; the buffer is zeroed first (16-bit
states sum in fp32, then one copy). The trace's energies are ``energy_terms`` at each step.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..results import PCResult
from ..types import Net, PCConfig
from . import linear_epilogue, local_grad, pc_update
from ._triton_common import LayerTable
from .pc_update import RelaxationStep
from .torch_pc import _loss_sum, relax

Stack = tuple[LayerTable, LayerTable | None]


def stack_plan(weights: Sequence[Tensor], biases: Sequence[Tensor | None], activations: Sequence[str],
               config: PCConfig) -> Stack | None:
    """Offset tables of W_2 … W_H (and b_2 … b_H) when the hidden layers can share launches, else None.

    A Jacobi step reads every layer's state from before the step, so equal-width hidden layers with
    one activation and one precision run as one launch per pass (grid axis 1 = layer). The
    sequential sweep is ordered by definition and never stacks."""
    hidden = len(weights) - 1
    if config.schedule != "jacobi" or hidden < 2:
        return None
    width = weights[0].shape[0]
    if any(w.shape[0] != width for w in weights[:hidden]) or len(set(activations[:hidden])) != 1:
        return None
    if len(set(config.precisions[:hidden])) != 1:
        return None
    weight_table = LayerTable.of(list(weights[1:hidden]))
    if weight_table is None:
        return None
    inner = list(biases[1:hidden])
    if all(b is None for b in inner):
        return weight_table, None
    if any(b is None for b in inner):
        return None
    bias_table = LayerTable.of(inner)
    return None if bias_table is None else (weight_table, bias_table)


class _Relaxation:
    """The state of one PC step in the kernels' buffers, and the launches that move it.

    predictions[l]: u_l from the feedforward pass (FPA's frozen values and φ'; layer 1's prediction
    is constant), except the output layer's, refreshed with ε_L (the energy needs f).
    latents[l] = z_l; errors[l] = ε_l. With a stack (see stack_plan) the hidden layers' state are
    views of (H, B, M) buffers, and FPA keeps a second error buffer to write the next step into."""

    def __init__(self, net: Net, x: Tensor, target: Tensor, config: PCConfig, stack: Stack | None,
                 ce_fused_max_classes: int) -> None:
        self.net, self.x, self.target, self.config, self.stack = net, x, target, config, stack
        self.ce_fused_max_classes = ce_fused_max_classes
        self.depth, self.batch = net.depth, x.shape[0]
        self.hidden = self.depth - 1
        self.steps = [RelaxationStep.of(net, config, l) for l in range(self.hidden)]
        self.objective = linear_epilogue.OutputLoss(target, config.loss)  # ε_L = −∂ℓ/∂f
        weights, batch, hidden = net.weights, self.batch, self.hidden
        new = lambda width: torch.empty(batch, width, dtype=x.dtype, device=x.device)
        zeros = lambda *shape: torch.zeros(*shape, dtype=x.dtype, device=x.device)
        if stack is None:
            self.predictions = [new(w.shape[0]) for w in weights]
            self.latents = [new(w.shape[0]) for w in weights[:hidden]]
            self.errors = [zeros(batch, w.shape[0]) for w in weights]
            return
        width = weights[0].shape[0]
        self.stacked_z, self.stacked_u = (torch.empty(hidden, batch, width, dtype=x.dtype, device=x.device)
                                          for _ in range(2))
        self.stacked_e = [zeros(hidden, batch, width) for _ in range(2 if config.fpa else 1)]
        self.predictions = list(self.stacked_u) + [new(weights[-1].shape[0])]
        self.latents = list(self.stacked_z)
        self.errors = list(self.stacked_e[0]) + [zeros(batch, weights[-1].shape[0])]

    def presynaptic(self, l: int, frozen: bool = False) -> tuple[Tensor, str]:
        """Layer l's input before φ, and φ: x, or z_{l-1} (u_{l-1} when ``frozen``)."""
        if l == 0:
            return self.x, "identity"
        return (self.predictions if frozen else self.latents)[l - 1], self.net.activations[l - 1]

    def feedforward(self) -> None:
        """z_l = u_l (so ε_l = 0 for l < L), ε_L = −∂ℓ/∂f_0."""
        net = self.net
        for l in range(self.hidden):
            a, act = self.presynaptic(l)
            linear_epilogue.linear(a, net.weights[l], net.biases[l], act_in=act, out=self.latents[l],
                                   pred=self.predictions[l])
        self.refresh_error(self.depth - 1)

    def refresh_error(self, l: int) -> None:
        net = self.net
        if l == 0 and self.hidden > 0:  # layer 1's prediction is constant
            torch.sub(self.latents[0], self.predictions[0], out=self.errors[0])
            return
        a, act = self.presynaptic(l)
        if l < self.hidden:
            linear_epilogue.hidden_error(a, net.weights[l], net.biases[l], self.latents[l], act_in=act,
                                         out=self.errors[l])
        else:
            linear_epilogue.output_error(a, net.weights[l], net.biases[l], self.objective, pred=self.predictions[l],
                                         out=self.errors[l], act_in=act, ce_fused_max_classes=self.ce_fused_max_classes)

    def refresh(self) -> None:
        for l in range(self.depth):
            self.refresh_error(l)

    def update(self, l: int, update_error: bool, error_out: Tensor | None = None) -> None:
        pc_update.latent_update(self.latents[l], self.errors[l], self.errors[l + 1], self.net.weights[l + 1],
                                self.steps[l], update_error=update_error, preactivation=self.predictions[l],
                                error_out=error_out, gate=self.gate, squares=self.layer_squares(l))

    gate: Tensor | None = None
    sums: Tensor | None = None  # where the update launches add ‖Δz_l‖² (``squares``, or an fp32 buffer)

    def layer_squares(self, first: int, count: int = 1) -> Tensor | None:
        return None if self.sums is None else self.sums[first:first + count]

    def step(self, gate: Tensor | None = None, squares: Tensor | None = None) -> None:
        """One inference step of the schedule. With ``gate`` (0-dim, 1 or 0) every update launch
        multiplies its step by it; with ``squares`` ((L−1,)) each update launch adds its layer's
        ‖Δz_l‖² into it, zeroed first (16-bit states sum in an fp32 buffer, copied out after)."""
        self.gate, self.sums = gate, None
        if squares is not None:
            wide = squares.dtype in (torch.float32, torch.float64) and squares.is_contiguous()
            self.sums = squares if wide else torch.zeros(squares.shape, dtype=torch.float32, device=squares.device)
            if wide:
                squares.zero_()
        try:
            self.schedule_step()
        finally:
            sums, self.gate, self.sums = self.sums, None, None
        if squares is not None and sums is not squares:
            squares.copy_(sums)

    def schedule_step(self) -> None:
        fpa, depth, hidden = self.config.fpa, self.depth, self.hidden
        if self.stack is not None:
            self.stacked_jacobi_step()
        elif self.config.schedule == "jacobi":
            for l in range(hidden):  # bottom-up: layer l moves ε_l after layer l−1 has read it
                self.update(l, update_error=fpa)
            if not fpa:
                for l in range(depth):
                    self.refresh_error(l)
        else:
            if not fpa:
                self.refresh_error(depth - 1)
            for l in reversed(range(hidden)):
                if not fpa:
                    self.refresh_error(l)
                self.update(l, update_error=True)

    def stacked_jacobi_step(self) -> None:
        """Hidden layers 1 … H−1 (whose W_{l+1} are M × M) in one update launch, layer H alone;
        then the errors of layers 2 … H in one launch (layer 1's and ε_L's alone)."""
        weight_table, bias_table = self.stack
        step, act = self.steps[0], self.net.activations[0]  # layers 1 … H−1 share φ and κ γ_{l+1}/γ_l
        z, hidden = self.stacked_z, self.hidden
        monitor = dict(gate=self.gate, squares=self.layer_squares(0, hidden - 1))
        if self.config.fpa:  # read this step's errors from stacked_e[0], write the next step's into stacked_e[1]
            current, following = self.stacked_e
            pc_update.stacked_latent_update(z[:-1], current[:-1], current[1:], weight_table, step, update_error=True,
                                            preactivations=self.stacked_u[:-1], errors_out=following[:-1], **monitor)
            self.update(hidden - 1, update_error=True, error_out=following[-1])
            self.stacked_e.reverse()
            self.errors[:hidden] = list(following)
            return
        errors = self.stacked_e[0]
        pc_update.stacked_latent_update(z[:-1], errors[:-1], errors[1:], weight_table, step, update_error=False,
                                        **monitor)
        self.update(hidden - 1, update_error=False)
        self.refresh_error(0)
        linear_epilogue.stacked_hidden_error(z[:-1], z[1:], errors[1:], weight_table, bias_table, act_in=act)
        self.refresh_error(self.depth - 1)

    def weight_grads(self) -> tuple[list[Tensor], list[Tensor | None]]:
        """−γ_l ε_lᵀ φ(z_{l-1}) / B at the final state (FPA: φ(u_{l-1})); layers 2 … H in one launch
        when stacked."""
        gammas, fpa, hidden, batch = self.config.precisions, self.config.fpa, self.hidden, self.batch
        weight_grads, bias_grads = [], []
        for l in range(self.depth):
            if self.stack is not None and 0 < l < hidden:
                continue
            a, act = self.presynaptic(l, frozen=fpa)
            gw, gb = local_grad.pc_weight_grad(self.errors[l], a, scale=-gammas[l] / batch, act_in=act,
                                               has_bias=self.net.biases[l] is not None)
            weight_grads.append(gw)
            bias_grads.append(gb)
        if self.stack is not None:
            gw, gb = local_grad.stacked_pc_weight_grad(
                self.stacked_e[0][1:], (self.stacked_u if fpa else self.stacked_z)[:-1], scale=-gammas[1] / batch,
                act_in=self.net.activations[0], has_bias=self.stack[1] is not None,
            )
            weight_grads[1:1] = list(gw)
            bias_grads[1:1] = list(gb) if gb is not None else [None] * (hidden - 1)
        return weight_grads, bias_grads

    def energy_terms(self) -> Tensor:
        """F's terms at the current state (DESIGN §3), errors up to date: under FPA ε_l = z_l − u_l
        moves with every update and predictions[-1] stays f_0 (the energy's f); without FPA a
        Jacobi step refreshes every error and f, and after a sequential sweep ``relax`` refreshes
        them first (the sweep leaves ε_L and f at its start)."""
        gammas = self.config.precisions
        return torch.stack([0.5 * gammas[l] * torch.sum(self.errors[l] * self.errors[l]) for l in range(self.hidden)]
                           + [gammas[-1] * _loss_sum(self.predictions[-1], self.target, self.config.loss)])


def pc_step(net: Net, x: Tensor, target: Tensor, config: PCConfig, stack: Stack | None,
            ce_fused_max_classes: int) -> PCResult:
    """One PC train step with the kernels (``net`` in the kernels' layout; see the module docstring)."""
    state = _Relaxation(net, x, target, config, stack, ce_fused_max_classes)
    state.feedforward()
    return relax(state, config, _loss_sum(state.predictions[-1], target, config.loss) / state.batch)
