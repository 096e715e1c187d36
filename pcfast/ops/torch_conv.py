"""PC relaxation and weight gradients on convolutional networks with explicit formulas: the ``torch``
implementation of ``pcfast.reference.conv``'s ``conv_pc_train_step``.

No autograd. The layers are ``pcfast.reference.conv``'s ``ConvLayer`` / ``LinearLayer``; the math and
the order of the updates are that module's (its docstring is the specification), written out:

- layer map ``m_l``: ``conv2d`` (stride, padding, dilation) or ``flatten(a) Wᵀ + b``; then φ_l and
  the pooling π_l (max or avg, kernel, stride);
- top-down term ``J_l(z_l)ᵀ ε_{l+1}``, the vector–Jacobian product of ``m_{l+1} ∘ π_l ∘ φ_l``:
  ``conv_transpose2d`` of ε_{l+1} with W_{l+1} and the output padding that restores a_l's size
  (``ε_{l+1} W_{l+1}`` reshaped to a_l's shape for a linear layer), then the pooling's adjoint — max:
  each value added to its window's arg-max (the indices ``max_pool2d`` returns, ``scatter_add_`` so
  that overlapping windows sum); avg: ``conv_transpose2d`` with the uniform kernel 1/k² — then
  times φ_l'(z_l). Under FPA φ' and the arg-max routing stay at the feedforward state;
- weight gradients ``−(γ_l/B) Σ_b ε_l ⋆ a_{l-1}`` (``torch.nn.grad.conv2d_weight``, an explicit
  kernel) or ``−(γ_l/B) ε_lᵀ flatten(a_{l-1})``, biases ``−(γ_l/B)`` times the sums of ε_l over the
  batch (and the image).

Latents and errors live in buffers allocated once per call and updated in place, as do the linear
layers' predictions and top-down products and the max-pool routing buffers; convolutions, activations
and poolings (no ``out=`` form) bind fresh tensors into the state. A layer's step is one fused update
``z_l += φ_l'(z_l) ⊙ t_l − κ ε_l`` with t_l the top-down term computed with W_{l+1} scaled by
κγ_{l+1}/γ_l (once per call), after which ``ε_l = z_l − μ_l`` is recomputed where the schedule reads
it. With a max pooling of disjoint windows t_l is zero off the arg-maxes, so φ_l' is taken there only
and the pooled-size product is added straight into z_l (no full-size t_l or φ'); ReLU then max pooling
is computed as relu(maxpool(z)), one full-size pass fewer. The schedules (``jacobi``: every layer
from one state; ``sequential``: one sweep l = L−1 … 1 from the freshest state) are the reference's; the loop, the trajectory and the result are
``torch_pc.relax``'s, the MLP backend's driver.

Runs on any device and dtype, in the memory format of ``x``: an input in ``torch.channels_last``
keeps the whole state in it, with the same numbers; on the CPU that is much faster with max pooling
(its channels-last kernel is about 15× faster than the contiguous one for a 32×32×32×32 float32 input
on one thread), so there ``conv_pc_grads`` runs a net with a max pooling in channels-last whatever
the input's format (the latents and errors it returns are then channels-last tensors).

Inference control (DESIGN §3) is ``torch_pc.relax``'s ``Monitor``, as for MLPs: adaptive stopping
(``inference_tol``), the trace (``return_trace``) and F before the last step (``check_divergence``).
For it a step takes a 0-dim gate (on the device, a stopped relaxation's remaining steps multiply
their updates by 0 instead of syncing with the host) and writes each layer's ‖Δz_l‖²; the update is
then formed as a tensor, gated and measured before it is added, instead of the fused one.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as nnf
from torch import Tensor

from ..activations import phi, phi_grad
from ..reference.conv import ConvLayer, Layer, check_conv_net
from ..results import PCResult
from ..types import PCConfig
from .torch_pc import Refreshing, _affine, _loss_sum, _output_error, relax


def _transpose_padding(in_size: Sequence[int], out_size: Sequence[int], kernel: Sequence[int], stride: int,
                       padding: int, dilation: int) -> tuple[int, int]:
    """The ``output_padding`` with which ``conv_transpose2d`` maps ``out_size`` back to ``in_size``."""
    return tuple(size - ((out - 1) * stride - 2 * padding + dilation * (k - 1) + 1)
                 for size, out, k in zip(in_size, out_size, kernel))


def _route(out: Tensor, back: Tensor, indices: Tensor) -> Tensor:
    """Max pooling's adjoint: add each value of ``back`` at its window's arg-max (``indices``, flat
    within each (H, W) plane, as ``max_pool2d`` returns them) into ``out``; overlapping windows add up.
    ``out`` is contiguous or channels-last (a state in either memory format)."""
    batch, channels = out.shape[:2]
    if out.is_contiguous():
        out.view(batch, channels, -1).scatter_add_(2, indices.reshape(batch, channels, -1),
                                                   back.reshape(batch, channels, -1))
    else:  # channels last: scatter along the pixels of (B, H·W, C)
        flat = lambda t: t.permute(0, 2, 3, 1).reshape(batch, -1, channels)
        out.permute(0, 2, 3, 1).view(batch, -1, channels).scatter_add_(1, flat(indices), flat(back))
    return out


def _gather(t: Tensor, indices: Tensor) -> Tensor:
    """``t`` at each window's arg-max (``indices`` as in ``_route``): a tensor of the pooled shape, in
    ``t``'s memory format."""
    batch, channels = t.shape[:2]
    if t.is_contiguous():
        return t.view(batch, channels, -1).gather(2, indices.reshape(batch, channels, -1)).view(indices.shape)
    height, width = indices.shape[2:]
    picked = t.permute(0, 2, 3, 1).view(batch, -1, channels).gather(
        1, indices.permute(0, 2, 3, 1).reshape(batch, -1, channels))
    return picked.view(batch, height, width, channels).permute(0, 3, 1, 2)


def _flat(t: Tensor) -> Tensor:
    """``t``'s values as one vector, a view in its memory order (contiguous or channels-last)."""
    if t.is_contiguous() or t.dim() != 4:
        return t.reshape(-1)
    return t.permute(0, 2, 3, 1).reshape(-1)


class _ConvRelaxation(Refreshing):
    """One PC step on a conv net in preallocated buffers (a ``torch_pc.Relaxation``).

    acts[l]: layer l's presynaptic activity x, a(z_1), …, a(z_{L-1}) (unflattened), with a(z) = π(φ(z));
    predictions[l] = m_l(acts[l]) (layer 1's is constant); latents[l] = z_l; errors[l] = ε_l;
    routes[l]: the arg-max indices of layer l's max pooling at acts[l+1]'s state; slopes[l]: φ'(u_l)
    under FPA, None for the identity (φ' = 1), else computed at z_l when the layer moves.
    ``step(gate, squares)``: with a 0-dim ``gate`` every update is multiplied by it, with ``squares``
    ((L−1,)) each layer's ‖Δz_l‖² is written there, as ``torch_pc.Relaxation`` specifies."""

    def __init__(self, layers: Sequence[Layer], x: Tensor, target: Tensor, config: PCConfig) -> None:
        self.layers, self.target, self.config = list(layers), target, config
        self.depth, self.batch = len(layers), x.shape[0]
        self.hidden = self.depth - 1
        self.phis = [phi(layer.activation) for layer in layers]
        self.dphis = [phi_grad(layer.activation) for layer in layers]
        self.pools = [getattr(layer, "pool", None) for layer in layers]
        gammas, kappa = config.precisions, config.inference_lr
        # z_l ← z_l − (κ/γ_l)(γ_l ε_l − γ_{l+1} J_l(z_l)ᵀ ε_{l+1}): the top-down term's factor
        # κγ_{l+1}/γ_l goes into a scaled copy of W_{l+1} (top-down weights), once per call
        self.topdown_weights = [layers[l + 1].weight * (kappa * gammas[l + 1] / gammas[l])
                                for l in range(self.hidden)]
        self.slopes_fixed = [config.fpa or layer.activation == "identity" for layer in layers]
        # a max pooling with disjoint windows (kernel ≤ stride) routes the top-down term straight into z_l
        self.routes_into_latent = [pool is not None and pool[0] == "max" and pool[1] <= pool[2]
                                   for pool in self.pools[:self.hidden]]
        self.feedforward(x)

    # -- the network's maps ---------------------------------------------------------------------

    def layer_map(self, l: int) -> None:
        """predictions[l] = m_l(acts[l])."""
        layer, a = self.layers[l], self.acts[l]
        if isinstance(layer, ConvLayer):
            self.predictions[l] = nnf.conv2d(a, layer.weight, layer.bias, layer.stride, layer.padding,
                                             layer.dilation)
        else:
            _affine(self.predictions[l], a.reshape(self.batch, -1), layer.weight, layer.bias)

    def activity(self, l: int, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """a(z) = π_l(φ_l(z)) as a tensor of its own, and the arg-max indices of a max pooling. ReLU
        then max: relu(maxpool(z)), the same values (relu is monotone) with one full-size pass fewer;
        the indices differ from maxpool(relu(z))'s only in windows with z ≤ 0 throughout, where
        φ' = 0 at both arg-maxes, so the routed top-down term φ'(z) ⊙ route(v) is the same."""
        pool = self.pools[l]
        if pool is not None and pool[0] == "max" and self.layers[l].activation == "relu":
            a, indices = nnf.max_pool2d(z, pool[1], pool[2], return_indices=True)
            return a.relu_(), indices
        h = self.phis[l](z)
        if pool is None:
            return (h.clone() if h is z else h), None
        kind, kernel, stride = pool
        if kind == "max":
            return nnf.max_pool2d(h, kernel, stride, return_indices=True)
        return nnf.avg_pool2d(h, kernel, stride), None

    def feedforward(self, x: Tensor) -> None:
        """Forward initialisation: z_l = u_l, so ε_l = 0 for l < L, ε_L = −∂ℓ/∂f_0; and every buffer."""
        layers, batch, hidden = self.layers, self.batch, self.hidden
        self.acts: list[Tensor] = [x]
        # linear layers' buffers, written in place; conv layers' predictions are bound by layer_map
        self.predictions: list[Tensor] = [None if isinstance(layer, ConvLayer) else
                                          x.new_empty(batch, layer.weight.shape[0]) for layer in layers]
        self.routes: list[Tensor | None] = [None] * hidden
        for l in range(self.depth):
            self.layer_map(l)
            if l < hidden:
                act, self.routes[l] = self.activity(l, self.predictions[l])
                self.acts.append(act)
        self.latents = [u.clone() for u in self.predictions[:hidden]]
        self.f0 = self.predictions[-1].clone()
        output_error = _output_error(torch.empty_like(self.f0), self.f0, self.target, self.config.loss)
        self.errors = [torch.zeros_like(z) for z in self.latents] + [output_error]
        self.quiet = [True] * hidden + [False]  # ε_l known to be exactly 0 (the Jacobi schedule's)
        # φ'(u_l), frozen under FPA (None: φ' = 1, the identity's)
        self.slopes = [None if layers[l].activation == "identity" else
                       self.dphis[l](self.predictions[l]) if self.config.fpa else None for l in range(hidden)]
        # top-down buffers: ε_{l+1} W_{l+1} of a linear next layer (a_l's size), the max pooling's
        # routed product (z_l's size); the avg pooling's adjoint kernel and output padding
        self.products = [x.new_empty(batch, layers[l + 1].weight.shape[1])
                         if not isinstance(layers[l + 1], ConvLayer) else None for l in range(hidden)]
        self.routed: list[Tensor | None] = [None] * hidden  # allocated when first needed
        self.pooled_slopes: list[Tensor | None] = [None] * hidden  # φ'(u_l) at the frozen arg-maxes
        self.avg_kernels: list[Tensor | None] = [None] * hidden
        self.pool_padding: list[tuple[int, int] | None] = [None] * hidden
        self.conv_padding: list[tuple[int, int] | None] = [None] * self.depth
        for l in range(hidden):
            pool = self.pools[l]
            if pool is not None:
                k, s = pool[1], pool[2]
                self.pool_padding[l] = _transpose_padding(self.latents[l].shape[2:], self.acts[l + 1].shape[2:],
                                                          (k, k), s, 0, 1)
                if pool[0] == "avg":
                    self.avg_kernels[l] = x.new_full((1, 1, k, k), 1.0 / (k * k))
        for l, layer in enumerate(layers):
            if isinstance(layer, ConvLayer):
                self.conv_padding[l] = _transpose_padding(self.acts[l].shape[2:], self.predictions[l].shape[2:],
                                                          layer.weight.shape[2:], layer.stride, layer.padding,
                                                          layer.dilation)

    def pulled_back(self, l: int) -> Tensor:
        """``(κγ_{l+1}/γ_l) ∂m_{l+1}/∂a_l ᵀ ε_{l+1}`` at a_l's size: ε_{l+1} back through m_{l+1} with
        the top-down weights (``conv_transpose2d``, or ``ε_{l+1} W_{l+1}`` reshaped to a_l's shape)."""
        layer, eps, weight = self.layers[l + 1], self.errors[l + 1], self.topdown_weights[l]
        if isinstance(layer, ConvLayer):
            return nnf.conv_transpose2d(eps, weight, None, layer.stride, layer.padding, self.conv_padding[l + 1],
                                        1, layer.dilation)
        return torch.mm(eps, weight, out=self.products[l]).view(self.acts[l + 1].shape)

    def unpool(self, l: int, back: Tensor) -> Tensor:
        """The adjoint of π_l applied to ``back`` (``pulled_back(l)``): z_l's size, the top-down term
        without its factor φ_l'(z_l)."""
        pool = self.pools[l]
        if pool is None:
            return back
        if pool[0] == "max":
            if self.routed[l] is None:
                self.routed[l] = torch.empty_like(self.latents[l])
            return _route(self.routed[l].zero_(), back, self.routes[l])
        batch, channels = back.shape[:2]
        spread = nnf.conv_transpose2d(back.reshape(batch * channels, 1, *back.shape[2:]), self.avg_kernels[l], None,
                                      pool[2], 0, self.pool_padding[l])
        return spread.view(self.latents[l].shape)

    def pooled_slope(self, l: int) -> Tensor | None:
        """φ_l'(z_l) at the max pooling's arg-maxes (a_l's size; None: φ' = 1). ReLU: sign(a_l) (a_l ≥ 0;
        1 where a_l > 0), since a_l = relu(z_l) at the arg-max; FPA: φ'(u_l) there, the routing being
        frozen too."""
        if self.slopes_fixed[l]:
            if self.slopes[l] is not None and self.pooled_slopes[l] is None:
                self.pooled_slopes[l] = _gather(self.slopes[l], self.routes[l])
            return self.pooled_slopes[l]
        if self.layers[l].activation == "relu":
            return self.acts[l + 1].sign()  # a float 0/1 mask: half the time of multiplying by a bool one
        return self.dphis[l](_gather(self.latents[l], self.routes[l]))

    # -- the state's updates ----------------------------------------------------------------------

    def refresh_activity(self, l: int) -> None:
        """acts[l+1] = a(z_l) and its routing (0-based hidden layer l)."""
        self.acts[l + 1], self.routes[l] = self.activity(l, self.latents[l])

    def apply_update(self, l: int, back: Tensor) -> None:
        """z_l ← z_l + φ_l'(z_l) ⊙ π_l*(back) − κ ε_l, with ``back`` = ``pulled_back(l)`` (φ' at u_l
        under FPA; ``back`` is overwritten); ε_l is left as it was. A max pooling with disjoint
        windows: π_l*(back) is zero off the arg-maxes, so φ' is needed only there and
        ``back ⊙ φ'(z_l[argmax])`` is added straight into z_l — the same sums, no full-size buffers."""
        z, kappa = self.latents[l], self.config.inference_lr
        fused = self.gate is None and self.squares is None
        if fused and self.routes_into_latent[l]:
            slope = self.pooled_slope(l)
            _route(z, back if slope is None else back.mul_(slope), self.routes[l])
            z.sub_(self.errors[l], alpha=kappa)
            return
        topdown = self.unpool(l, back)
        slope = self.slopes[l] if self.slopes_fixed[l] else self.dphis[l](z)
        if fused:
            if slope is None:
                z.add_(topdown)
            else:
                z.addcmul_(topdown, slope)
            z.sub_(self.errors[l], alpha=kappa)
            return
        step = topdown if slope is None else topdown.mul_(slope)
        step.sub_(self.errors[l], alpha=kappa)
        if self.gate is not None:
            step.mul_(self.gate)
        if self.squares is not None:
            flat = _flat(step)
            self.squares[l] = torch.linalg.vecdot(flat, flat)
        z.add_(step)

    gate: Tensor | None = None
    squares: Tensor | None = None

    def step(self, gate: Tensor | None = None, squares: Tensor | None = None) -> None:
        self.gate, self.squares = gate, squares
        if self.config.schedule == "jacobi":
            self.jacobi_step()
        elif self.hidden > 0:
            self.sequential_step()

    def jacobi_step(self) -> None:
        """Every layer from one state. From the forward initialisation the errors below the top are
        exactly 0 until the output error has come down to them, one layer per step: a layer whose ε_l
        and ε_{l+1} are both 0 gets an update of exactly 0, so it is not computed (its ‖Δz_l‖² is 0),
        and what reads only unmoved layers — a_l, μ_{l+1}, ε_{l+1} — is not recomputed. The same
        numbers as updating and refreshing every layer; at T = 7 on a 4-block VGG it saves 3, 2 and 1
        of the 7 steps' convolutions of blocks 2, 3 and 4, both ways."""
        hidden, quiet = self.hidden, self.quiet
        moves = [not (quiet[l] and quiet[l + 1]) for l in range(hidden)]
        backs = [self.pulled_back(l) if moves[l] else None for l in range(hidden)]
        for l in range(hidden):
            if moves[l]:
                self.apply_update(l, backs[l])
            elif self.squares is not None:
                self.squares[l] = 0
        for l in range(hidden):
            quiet[l] = quiet[l] and not moves[l] and not (l > 0 and moves[l - 1])
        if self.config.fpa:  # predictions are frozen: ε_l = z_l − u_l
            for l in range(hidden):
                if moves[l]:
                    torch.sub(self.latents[l], self.predictions[l], out=self.errors[l])
            return
        for l in range(hidden):
            if moves[l]:
                self.refresh_activity(l)
        for l in range(self.depth):
            if l > 0 and moves[l - 1]:
                self.refresh_error(l)  # a_{l-1} moved: μ_l and ε_l
            elif l < hidden and moves[l]:
                torch.sub(self.latents[l], self.predictions[l], out=self.errors[l])  # z_l moved: ε_l

    def sequential_step(self) -> None:
        fpa, hidden = self.config.fpa, self.hidden
        if not fpa:
            self.refresh_activity(hidden - 1)
            self.refresh_error(self.depth - 1)
        for l in reversed(range(hidden)):
            if not fpa:
                if l > 0:
                    self.refresh_activity(l - 1)
                self.refresh_error(l)
            self.apply_update(l, self.pulled_back(l))
            # Layer l's prediction does not depend on z_l: the next layer down reads this fresh ε_l
            torch.sub(self.latents[l], self.predictions[l], out=self.errors[l])

    # -- the results ------------------------------------------------------------------------------

    def weight_grads(self) -> tuple[list[Tensor], list[Tensor | None]]:
        """−(γ_l/B) Σ_b ε_l ⋆ a_{l-1} (conv) or −(γ_l/B) ε_lᵀ flatten(a_{l-1}), and the bias sums."""
        weight_grads, bias_grads = [], []
        for l, layer in enumerate(self.layers):
            scale = -self.config.precisions[l] / self.batch
            eps, a = self.errors[l], self.acts[l]
            if isinstance(layer, ConvLayer):
                grad = torch.nn.grad.conv2d_weight(a, layer.weight.shape, eps, layer.stride, layer.padding,
                                                   layer.dilation)
                dims = (0, 2, 3)
            else:
                grad = torch.mm(eps.T, a.reshape(self.batch, -1))
                dims = (0,)
            weight_grads.append(grad.mul_(scale))
            bias_grads.append(None if layer.bias is None else eps.sum(dims).mul_(scale))
        return weight_grads, bias_grads

    def energy_terms(self) -> Tensor:
        gammas, errors = self.config.precisions, self.errors
        f = self.f0 if self.config.fpa else self.predictions[-1]
        return torch.stack([0.5 * gammas[l] * torch.sum(errors[l] * errors[l]) for l in range(self.hidden)]
                           + [gammas[-1] * _loss_sum(f, self.target, self.config.loss)])


def _state_format(layers: Sequence[Layer], x: Tensor) -> Tensor:
    """``x`` in the memory format the state runs in: channels-last on the CPU when a layer max-pools
    (that pooling kernel, the step's largest cost after the convolutions, is several times faster
    there, and the convolutions are no slower), else as given. The same numbers either way: the
    format only changes the kernels' memory order."""
    if x.device.type != "cpu" or x.is_contiguous(memory_format=torch.channels_last):
        return x
    if any(pool is not None and pool[0] == "max" for pool in (getattr(layer, "pool", None) for layer in layers)):
        return x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def conv_pc_grads(layers: Sequence[Layer], x: Tensor, target: Tensor, config: PCConfig) -> PCResult:
    """PC relaxation and local gradients of a conv net: ``pcfast.reference.conv.conv_pc_train_step``
    with ``config``'s settings, written out. ``layers``: ``ConvLayer`` / ``LinearLayer`` (the readout
    last); ``x`` (B, C, H, W); ``target`` (B, C_out) for MSE, int64 labels (B,) for CE."""
    check_conv_net(layers, x)
    if len(config.precisions) != len(layers):
        raise ValueError(f"config.precisions: expected {len(layers)} entries (one per layer), "
                         f"got {len(config.precisions)}")
    state = _ConvRelaxation(layers, _state_format(layers, x), target, config)
    return relax(state, config, _loss_sum(state.f0, target, config.loss) / state.batch)

