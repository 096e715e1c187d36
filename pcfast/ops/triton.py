"""The ``triton`` backend: PC and TP/DTP train steps as a few fused Triton launches per layer.

Loaded by ``pcfast.ops`` on demand (``backend="triton"``, or ``auto`` on CUDA), so ``import pcfast``
never imports triton. Runs on CUDA tensors, and on CPU under ``TRITON_INTERPRET=1`` (tests).
Signatures are those of ``pcfast.ops.torch_pc.pc_train_step`` / ``torch_tp.tp_train_step`` /
``torch_tp.feedback_grads`` (inputs already validated by ``pcfast.functional``), and so is the
order of every update — the ``torch`` backend is the readable twin of this module.

Launch schedule of one PC step (L layers, T steps; ``pc_relax`` has the kernels):
- feedforward: L prediction launches (φ applied on load, z_l = u_l stored, ε_L in the epilogue);
- per step, jacobi: L−1 top-down/update launches bottom-up (under FPA each also moves ε_l, which
  the layer below has already read), then, without FPA, L error launches;
- per step, sequential: per layer top-down one error launch (without FPA) then one update launch;
- weight gradients: L launches (bias row sums in the same pass); with ``sgd=`` (what the PC
  optimizer passes) each also applies the layer's SGD step (momentum, Nesterov, weight decay) and
  writes the new parameters and momentum buffers out of place.
The scalar energy and loss are torch reductions over the final buffers.

Stacked path (Jacobi schedule, H ≥ 2 hidden layers of one width, activation and precision; see
``_stack_plan``): the hidden layers' state lives in (H, B, M) buffers and the model's separate
W_2 … W_H are addressed through an offset table, so each pass is one launch for all of them —
per step one update launch for layers 1 … H−1 plus one for layer H, and (without FPA) one error
launch for layers 2 … H plus layer 1's and the output's: 5 launches instead of 2H + 1; under FPA,
2 instead of H, with the errors written to a second buffer (every layer reads the step's old ε).

DTP's feedback gradients draw their noise ξ inside the kernels from a seed when given one.

On CUDA the whole step is captured as a CUDA graph the second time a configuration is seen (the
first call runs eagerly, autotuning and compiling every kernel) and replayed afterwards: inputs are
copied into static buffers, parameters are read in place (the key holds their addresses, so an
optimizer's in-place updates are seen), and results are cloned out of the graph's pool.
Set ``pcfast.ops.triton.CUDA_GRAPHS = False`` to launch eagerly.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..network import check_pc_options, check_tp_options
from ..results import FeedbackResult, PCResult, TPResult
from ..sgd import LayerSGD, layer_updates
from . import pc_relax, tp_targets
from ._triton_common import activation_code, input_precision
from .torch_pc import _loss_sum

CUDA_GRAPHS = True  # capture and replay train steps on CUDA
STACKED = True  # equal-width hidden layers share launches in Jacobi PC steps (see _stack_plan)
GRAPH_CACHE_SIZE = 8  # configurations whose graphs are kept (least recently used goes first)

_graphs: OrderedDict[tuple, object] = OrderedDict()
_WARM = "warm"  # seen once: the next call captures
_EAGER = "eager"  # capture failed: always launch eagerly


def _check_supported(activations: Sequence[str], x: Tensor) -> None:
    for act in activations:
        activation_code(act)
    if not x.is_cuda and x.dtype not in (torch.float32, torch.float64):
        raise NotImplementedError(
            f"x: the Triton interpreter supports float32 and float64, got {x.dtype}; use backend='torch' on CPU"
        )
    if x.is_cuda and x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise NotImplementedError(f"x: unsupported dtype {x.dtype} for backend='triton'")


def _as_contiguous(t: Tensor) -> Tensor:
    """``t`` as a contiguous tensor whose memory holds its values (negative/conjugate bits applied)."""
    t = _resolved(t)
    return t if t.is_contiguous() else t.contiguous()


def _resolved(t: Tensor) -> Tensor:
    """``t`` with its lazy negative/conjugate bits applied: the kernels read raw memory."""
    if t.is_conj():
        t = t.resolve_conj()
    return t.resolve_neg() if t.is_neg() else t


def _kernel_layout(weights: Sequence[Tensor], biases: Sequence[Tensor | None]) -> tuple[list, list, bool]:
    """Parameters as the kernels read them: matrices through their strides (any layout, read in
    place), vectors (biases) contiguous, lazy negative/conjugate bits applied. Returns the weights,
    the biases and whether any of them had to be copied (a copy's address means nothing to a CUDA
    graph, so such a call runs eagerly)."""
    new_weights = [_resolved(w) for w in weights]
    new_biases = [None if b is None else _as_contiguous(b) for b in biases]
    copied = any(n is not o for n, o in zip([*new_weights, *new_biases], [*weights, *biases]))
    return new_weights, new_biases, copied


# ---------------------------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------------------------


def _clone(result):
    """A copy of ``result`` whose tensors live outside the graph's static pool."""
    fields = {}
    for name, value in vars(result).items():
        if isinstance(value, Tensor):
            fields[name] = value.clone()
        elif isinstance(value, list):
            fields[name] = [_clone_value(v) for v in value]
        else:
            fields[name] = value
    return type(result)(**fields)


def _clone_value(value):
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_clone_value(v) for v in value)
    return value


def _parameter_key(tensors: Sequence[Tensor | None]) -> tuple:
    return tuple(
        None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.data_ptr()) for t in tensors
    )


def _graphed(key: tuple, run: Callable[..., object], inputs: tuple[Tensor, ...], keep: object = None):
    """``run(*inputs)`` through a CUDA graph cached under ``key``: eager on first sight, captured
    on the second, replayed from then on (``inputs`` are copied into the graph's static copies:
    the batch, and values such as learning rates that change between calls). ``keep`` (tensors the
    graph reads, made outside it, e.g. offset tables) lives as long as the graph."""
    entry = _graphs.get(key)
    if entry is None:
        _graphs[key] = _WARM
        while len(_graphs) > GRAPH_CACHE_SIZE:
            _graphs.popitem(last=False)
        return run(*inputs)
    _graphs.move_to_end(key)
    if entry is _EAGER:
        return run(*inputs)
    device = inputs[0].device
    if entry is _WARM:
        static_inputs = tuple(t.clone() for t in inputs)
        try:
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                run(*static_inputs)  # capture needs compiled, tuned kernels and a warm allocator
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = run(*static_inputs)
        except RuntimeError as exc:  # capture is an optimisation: fall back to eager launches for good
            warnings.warn(f"pcfast triton backend: CUDA graph capture failed ({exc}); launching eagerly",
                          RuntimeWarning, stacklevel=3)
            _graphs[key] = _EAGER
            return run(*inputs)
        entry = (graph, static_inputs, static_out, keep)
        _graphs[key] = entry
    graph, static_inputs, static_out, _ = entry
    for static, new in zip(static_inputs, inputs):
        static.copy_(new)
    graph.replay()
    return _clone(static_out)


def clear_graphs() -> None:
    """Drop every captured graph (and its memory pool)."""
    _graphs.clear()


# ---------------------------------------------------------------------------------------------
# Predictive coding
# ---------------------------------------------------------------------------------------------


def _pc_step(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    x: Tensor,
    target: Tensor,
    gammas: Sequence[float],
    kappa: float,
    inference_steps: int,
    schedule: str,
    fpa: bool,
    loss: str,
    return_trajectory: bool,
    stack: tuple[pc_relax.LayerTable, pc_relax.LayerTable | None] | None = None,
    sgd: Sequence[LayerSGD] | None = None,
    hyper: Tensor | None = None,
) -> PCResult:
    depth, batch = len(weights), x.shape[0]
    hidden = depth - 1
    output_epilogue = pc_relax.EPILOGUE_MSE if loss == "mse" else pc_relax.EPILOGUE_CE
    new = lambda width: torch.empty(batch, width, dtype=x.dtype, device=x.device)
    zeros = lambda *shape: torch.zeros(*shape, dtype=x.dtype, device=x.device)

    # predictions[l]: u_l from the feedforward pass (FPA's frozen values and φ'; layer 1's prediction
    # is constant), except the output layer's, refreshed with ε_L (the energy needs f).
    # latents[l] = z_l; errors[l] = ε_l. With a stack (see _stack_plan) the hidden layers' state
    # are views of (H, B, M) buffers, and FPA keeps a second error buffer to write the next step into.
    if stack is None:
        predictions = [new(w.shape[0]) for w in weights]
        latents = [new(w.shape[0]) for w in weights[:hidden]]
        errors = [zeros(batch, w.shape[0]) for w in weights]
    else:
        width = weights[0].shape[0]
        stacked_z, stacked_u = (torch.empty(hidden, batch, width, dtype=x.dtype, device=x.device) for _ in range(2))
        stacked_e = [zeros(hidden, batch, width) for _ in range(2 if fpa else 1)]
        predictions = list(stacked_u) + [new(weights[-1].shape[0])]
        latents = list(stacked_z)
        errors = list(stacked_e[0]) + [zeros(batch, weights[-1].shape[0])]

    def presynaptic(l: int, frozen: bool = False) -> tuple[Tensor, str]:
        """Layer l's input before φ, and φ: x, or z_{l-1} (u_{l-1} when ``frozen``)."""
        if l == 0:
            return x, "identity"
        return (predictions if frozen else latents)[l - 1], activations[l - 1]

    def refresh_error(l: int) -> None:
        a, act = presynaptic(l)
        if l < hidden:
            pc_relax.prediction_error(
                a, weights[l], biases[l], act_in=act, epilogue=pc_relax.EPILOGUE_HIDDEN_ERROR,
                out=errors[l], latent=latents[l], pred=predictions[0] if l == 0 else None, load_pred=l == 0,
            )
        else:
            pc_relax.prediction_error(
                a, weights[l], biases[l], act_in=act, epilogue=output_epilogue, out=errors[l],
                target=target, pred=predictions[l],
            )

    def update(l: int, update_error: bool, error_out: Tensor | None = None) -> None:
        pc_relax.latent_update(
            latents[l], errors[l], errors[l + 1], weights[l + 1], act=activations[l],
            coefficient=kappa * gammas[l + 1] / gammas[l], kappa=kappa, fpa=fpa,
            update_error=update_error, preactivation=predictions[l], error_out=error_out,
        )

    def stacked_jacobi_step() -> None:
        """Hidden layers 1 … H−1 (whose W_{l+1} are M × M) in one update launch, layer H alone;
        then the errors of layers 2 … H in one launch (layer 1's and ε_L's alone)."""
        weight_table, bias_table = stack
        coefficient = kappa * gammas[1] / gammas[0]
        if fpa:  # read this step's errors from stacked_e[0], write the next step's into stacked_e[1]
            current, following = stacked_e
            pc_relax.stacked_latent_update(
                stacked_z[:-1], current[:-1], current[1:], weight_table, act=activations[0],
                coefficient=coefficient, kappa=kappa, fpa=True, update_error=True,
                preactivations=stacked_u[:-1], errors_out=following[:-1],
            )
            update(hidden - 1, update_error=True, error_out=following[-1])
            stacked_e.reverse()
            errors[:hidden] = list(following)
            return
        pc_relax.stacked_latent_update(
            stacked_z[:-1], stacked_e[0][:-1], stacked_e[0][1:], weight_table, act=activations[0],
            coefficient=coefficient, kappa=kappa, fpa=False, update_error=False,
        )
        update(hidden - 1, update_error=False)
        refresh_error(0)
        pc_relax.stacked_hidden_error(stacked_z[:-1], stacked_z[1:], stacked_e[0][1:], weight_table, bias_table,
                                      act_in=activations[0])
        refresh_error(depth - 1)

    # Feedforward pass: z_l = u_l (so ε_l = 0 for l < L), ε_L = −∂ℓ/∂f_0.
    for l in range(hidden):
        a, act = presynaptic(l)
        pc_relax.prediction_error(a, weights[l], biases[l], act_in=act, out=latents[l], pred=predictions[l])
    refresh_error(depth - 1)
    loss_value = _loss_sum(predictions[-1], target, loss) / batch

    trajectory = [[z.clone() for z in latents]] if return_trajectory else None
    for _ in range(inference_steps):
        if stack is not None:
            stacked_jacobi_step()
        elif schedule == "jacobi":
            for l in range(hidden):  # bottom-up: layer l moves ε_l after layer l−1 has read it
                update(l, update_error=fpa)
            if not fpa:
                for l in range(depth):
                    refresh_error(l)
        else:
            if not fpa:
                refresh_error(depth - 1)
            for l in reversed(range(hidden)):
                if not fpa:
                    refresh_error(l)
                update(l, update_error=True)
        if trajectory is not None:
            trajectory.append([z.clone() for z in latents])
    if not fpa and schedule == "sequential" and inference_steps > 0:
        for l in range(depth):  # a sweep leaves the errors above each layer stale
            refresh_error(l)

    # Weight gradients at the final state: −γ_l ε_lᵀ φ(z_{l-1}) / B (FPA: φ(u_{l-1})).
    # With sgd, every layer's launch also applies its SGD step (per layer: parameters are separate).
    weight_grads, bias_grads, fused = [], [], []
    for l in range(depth):
        if stack is not None and sgd is None and 0 < l < hidden:
            continue
        a, act = presynaptic(l, frozen=fpa)
        step = None
        if sgd is not None:
            step = pc_relax.FusedSGD(
                weights[l], biases[l], hyper[l], momentum=sgd[l].momentum > 0, nesterov=sgd[l].nesterov,
                weight_buffer=sgd[l].weight_buffer, bias_buffer=sgd[l].bias_buffer,
            )
            fused.append(step)
        gw, gb = pc_relax.weight_grad(
            errors[l], a, scale=-gammas[l] / batch, act_in=act, has_bias=biases[l] is not None, sgd=step,
        )
        weight_grads.append(gw)
        bias_grads.append(gb)
    if stack is not None and sgd is None:  # layers 2 … H in one launch
        current = stacked_e[0]
        gw, gb = pc_relax.stacked_weight_grad(
            current[1:], (stacked_u if fpa else stacked_z)[:-1], scale=-gammas[1] / batch, act_in=activations[0],
            has_bias=stack[1] is not None,
        )
        weight_grads[1:1] = list(gw)
        bias_grads[1:1] = list(gb) if gb is not None else [None] * (hidden - 1)

    energy = x.new_zeros(())
    for l in range(hidden):
        energy += 0.5 * gammas[l] * torch.sum(errors[l] * errors[l])
    energy += gammas[-1] * _loss_sum(predictions[-1], target, loss)
    updates = None
    if sgd is not None:
        updates = []
        for step in fused:
            updates.append((step.new_weight, step.new_weight_buffer))
            if step.bias is not None:
                updates.append((step.new_bias, step.new_bias_buffer))
    return PCResult(
        latents=latents, errors=errors, weight_grads=weight_grads, bias_grads=bias_grads,
        energy=energy, loss=loss_value, trajectory=trajectory, sgd_updates=updates,
    )


@torch.no_grad()
def pc_train_step(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    x: Tensor,
    target: Tensor,
    *,
    precisions: Sequence[float],
    inference_steps: int,
    inference_lr: float,
    schedule: str,
    fpa: bool,
    loss: str,
    return_trajectory: bool = False,
    sgd: Sequence[LayerSGD] | None = None,
) -> PCResult:
    """PC relaxation and weight gradients (DESIGN §3) with the kernels of ``pc_relax``; with ``sgd``
    (checked by ``pcfast.functional``) each gradient launch also applies the layer's SGD step."""
    check_pc_options(inference_steps=inference_steps, inference_lr=inference_lr, schedule=schedule, fpa=fpa,
                     return_trajectory=return_trajectory)
    _check_supported(activations, x)
    x, target = _as_contiguous(x), _as_contiguous(target)
    weights, biases, copied = _kernel_layout(weights, biases)
    gammas, kappa = [float(g) for g in precisions], float(inference_lr)
    buffers = [] if sgd is None else [t for step in sgd for t in (step.weight_buffer, step.bias_buffer)]
    if sgd is not None and not all(t is None or (t.is_contiguous() and not t.is_neg() and not t.is_conj())
                                   for t in [*weights, *biases, *buffers]):
        # The fused step reads and writes with the gradients' (contiguous) layout: update strided
        # parameters or buffers after, with torch ops.
        result = pc_train_step(weights, biases, activations, x, target, precisions=precisions,
                               inference_steps=inference_steps, inference_lr=inference_lr, schedule=schedule,
                               fpa=fpa, loss=loss, return_trajectory=return_trajectory)
        result.sgd_updates = layer_updates(weights, biases, result.weight_grads, result.bias_grads, sgd)
        return result
    stack = _stack_plan(weights, biases, activations, gammas, schedule)
    hyper = None if sgd is None else torch.tensor([step.row() for step in sgd], dtype=torch.float64, device=x.device)

    def run(x_in: Tensor, target_in: Tensor, hyper_in: Tensor | None = None) -> PCResult:
        return _pc_step(weights, biases, activations, x_in, target_in, gammas, kappa, inference_steps,
                        schedule, fpa, loss, return_trajectory, stack, sgd, hyper_in)

    if not (CUDA_GRAPHS and x.is_cuda and not return_trajectory) or copied:
        return run(x, target, hyper)
    sgd_key = None if sgd is None else tuple(
        (step.momentum > 0, step.nesterov, _parameter_key([step.weight_buffer, step.bias_buffer])) for step in sgd
    )
    key = (
        "pc", _parameter_key(weights), _parameter_key(biases), tuple(activations), tuple(x.shape), x.dtype,
        x.device, tuple(target.shape), target.dtype, tuple(gammas), kappa, inference_steps, schedule, fpa, loss,
        input_precision(x), sgd_key,
    )
    inputs = (x, target) if hyper is None else (x, target, hyper)
    return _graphed(key, run, inputs, keep=stack)


def _stack_plan(weights, biases, activations, gammas, schedule):
    """Offset tables of W_2 … W_H (and b_2 … b_H) when the hidden layers can share launches, else None.

    A Jacobi step reads every layer's state from before the step, so equal-width hidden layers with
    one activation and one precision run as one launch per pass (grid axis 1 = layer). The
    sequential sweep is ordered by definition and never stacks."""
    hidden = len(weights) - 1
    if not STACKED or schedule != "jacobi" or hidden < 2:
        return None
    width = weights[0].shape[0]
    if any(w.shape[0] != width for w in weights[:hidden]) or len(set(activations[:hidden])) != 1:
        return None
    if len(set(gammas[:hidden])) != 1:
        return None
    weight_table = pc_relax.LayerTable.of(list(weights[1:hidden]))
    if weight_table is None:
        return None
    inner = list(biases[1:hidden])
    if all(b is None for b in inner):
        return weight_table, None
    if any(b is None for b in inner):
        return None
    bias_table = pc_relax.LayerTable.of(inner)
    return None if bias_table is None else (weight_table, bias_table)


# ---------------------------------------------------------------------------------------------
# Target propagation
# ---------------------------------------------------------------------------------------------


def _forward(weights, biases, activations, x, *, target=None, loss="mse", beta=0.0, stacked=False):
    """Pre-activations [u_1 … u_L] and activities [h_1 … h_{L-1}, f] with one launch per layer;
    with ``target`` the last launch also returns the output target ``f + β ε_L``; ``stacked``: the
    hidden layers' u and h are views of (H, B, M) buffers (equal widths), returned as the fourth value."""
    depth, batch = len(weights), x.shape[0]
    us, hs = [], []
    h = x
    output_target = None
    if stacked:
        stacked_u, stacked_h = (torch.empty(depth - 1, batch, weights[0].shape[0], dtype=x.dtype, device=x.device)
                                for _ in range(2))
    for l, (w, b) in enumerate(zip(weights, biases)):
        u = stacked_u[l] if stacked and l < depth - 1 else torch.empty(batch, w.shape[0], dtype=x.dtype, device=x.device)
        if l < depth - 1:
            h = pc_relax.prediction_error(h, w, b, pred=u, act_out=activations[l], out=stacked_h[l] if stacked else None)
        elif target is None:
            pc_relax.prediction_error(h, w, b, out=u)
            h = u
        else:
            epilogue = pc_relax.EPILOGUE_MSE if loss == "mse" else pc_relax.EPILOGUE_CE
            output_target = pc_relax.prediction_error(
                h, w, b, epilogue=epilogue, pred=u, target=target, scale=beta, add_pred=True,
            )
            h = u
        us.append(u)
        hs.append(h)
    return us, hs, output_target, (stacked_u, stacked_h) if stacked else None


def _tp_step(weights, biases, activations, feedback_weights, feedback_biases, feedback_activations, x, target,
             beta, loss, difference) -> TPResult:
    depth, batch = len(weights), x.shape[0]
    hidden = depth - 1
    # Local gradients of equal-width hidden layers 2 … H in one launch: their u, h and ĥ are stacked.
    stacked = (STACKED and hidden >= 2 and len({w.shape[0] for w in weights[:hidden]}) == 1
               and len(set(activations[:hidden])) == 1 and len({b is None for b in biases[1:hidden]}) == 1)
    us, activities, output_target, stacks = _forward(weights, biases, activations, x, target=target, loss=loss,
                                                     beta=beta, stacked=stacked)
    targets: list[Tensor] = [None] * depth  # type: ignore[list-item]
    targets[-1] = output_target
    stacked_targets = torch.empty(hidden, batch, weights[0].shape[0], dtype=x.dtype, device=x.device) if stacked else None
    for l in reversed(range(1, depth)):
        targets[l - 1] = tp_targets.tp_targets(
            targets[l], activities[l], _as_contiguous(feedback_weights[l - 1]), feedback_biases[l - 1],
            activities[l - 1], act=feedback_activations[l - 1], difference=difference,
            out=None if stacked_targets is None else stacked_targets[l - 1],
        )

    # δ_l = φ'(u_l) ⊙ (ĥ_l − φ(u_l)) formed on load (no φ' on the readout); ∂/∂W_l = −δ_lᵀ h_{l-1} / B.
    inputs = [x] + activities[:-1]
    weight_grads, bias_grads = [], []
    local_loss = x.new_zeros(())
    for l in range(depth):
        local_loss += 0.5 * torch.sum((targets[l] - activities[l]) ** 2) / batch
        if stacked and 0 < l < hidden:
            continue
        gw, gb = pc_relax.weight_grad(
            targets[l], inputs[l], scale=-1.0 / batch, has_bias=biases[l] is not None, preactivation=us[l],
            act_delta=activations[l] if l < depth - 1 else "identity",
        )
        weight_grads.append(gw)
        bias_grads.append(gb)
    if stacked:
        stacked_u, stacked_h = stacks
        gw, gb = pc_relax.stacked_weight_grad(
            stacked_targets[1:], stacked_h[:-1], scale=-1.0 / batch, act_in="identity",
            has_bias=biases[1] is not None, preactivations=stacked_u[1:], act_delta=activations[0],
        )
        weight_grads[1:1] = list(gw)
        bias_grads[1:1] = list(gb) if gb is not None else [None] * (hidden - 1)
    return TPResult(
        targets=targets, activities=activities, weight_grads=weight_grads, bias_grads=bias_grads,
        loss=_loss_sum(activities[-1], target, loss) / batch, local_loss=local_loss,
    )


@torch.no_grad()
def tp_train_step(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    feedback_weights: Sequence[Tensor],
    feedback_biases: Sequence[Tensor | None],
    feedback_activations: Sequence[str],
    x: Tensor,
    target: Tensor,
    *,
    beta: float,
    loss: str,
    difference: bool,
) -> TPResult:
    """TP/DTP targets and local gradients (DESIGN §4) with the kernels of ``tp_targets``/``pc_relax``."""
    check_tp_options(beta=beta, difference=difference)
    _check_supported(list(activations) + list(feedback_activations), x)
    x, target = _as_contiguous(x), _as_contiguous(target)
    weights, biases, copied = _kernel_layout(weights, biases)
    feedback_weights, feedback_biases, copied_feedback = _kernel_layout(feedback_weights, feedback_biases)

    def run(x_in: Tensor, target_in: Tensor) -> TPResult:
        return _tp_step(weights, biases, activations, feedback_weights, feedback_biases, feedback_activations,
                        x_in, target_in, float(beta), loss, difference)

    if not (CUDA_GRAPHS and x.is_cuda) or copied or copied_feedback:
        return run(x, target)
    key = (
        "tp", _parameter_key(weights), _parameter_key(biases), _parameter_key(feedback_weights),
        _parameter_key(feedback_biases), tuple(activations), tuple(feedback_activations), tuple(x.shape), x.dtype,
        x.device, tuple(target.shape), target.dtype, float(beta), loss, difference, input_precision(x),
    )
    return _graphed(key, run, (x, target))


@torch.no_grad()
def feedback_grads(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    feedback_weights: Sequence[Tensor],
    feedback_biases: Sequence[Tensor | None],
    feedback_activations: Sequence[str],
    x: Tensor,
    noise: Sequence[Tensor | None] | None = None,
    *,
    noise_seed: int | None = None,
    noise_std: float = 0.0,
) -> FeedbackResult:
    """Gradients of ``½‖g_l(f_l(h_{l-1}+ξ)) − (h_{l-1}+ξ)‖²`` (batch mean) for l = 2 … L.

    Per layer: one launch for h_out = f_l(h_in), one for pre = h_out Q_lᵀ + c_l, and one gradient
    launch whose δ = (h_in − ψ(pre)) ⊙ ψ'(pre) is formed on load (scale −1/B flips its sign) and
    which also sums the squared residuals for the loss. ξ is ``noise`` (tensors), or with
    ``noise_seed`` drawn inside the first and last launch (``tp_targets.gaussian_noise`` draws the
    same numbers), or zero."""
    _check_supported(list(activations) + list(feedback_activations), x)
    if noise is not None and noise_seed is not None:
        raise ValueError("noise, noise_seed: give the noise tensors or a seed, not both")
    x = _as_contiguous(x)
    weights, biases, _ = _kernel_layout(weights, biases)
    feedback_weights, feedback_biases, _ = _kernel_layout(feedback_weights, feedback_biases)
    depth, batch = len(weights), x.shape[0]
    _, activities, _, _ = _forward(weights, biases, activations, x)
    offsets = tp_targets.noise_offsets(batch, [w.shape[0] for w in weights[:-1]])
    weight_grads, bias_grads = [], []
    total = x.new_zeros(())
    for l in range(1, depth):
        xi = None if noise is None else noise[l - 1]
        h_in = activities[l - 1] if xi is None else (activities[l - 1] + xi).contiguous()
        drawn = None if noise_seed is None else pc_relax.Noise(int(noise_seed), float(noise_std), offsets[l - 1])
        h_out = pc_relax.prediction_error(
            h_in, weights[l], biases[l], act_out=activations[l] if l < depth - 1 else "identity", noise=drawn,
        )
        q, c, psi = _as_contiguous(feedback_weights[l - 1]), feedback_biases[l - 1], feedback_activations[l - 1]
        pre = torch.empty_like(h_in)
        pc_relax.prediction_error(h_out, q, c, out=pre)
        squares = torch.empty(h_in.shape[1], dtype=x.dtype, device=x.device)
        gw, gb = pc_relax.weight_grad(
            h_in, h_out, scale=-1.0 / batch, has_bias=c is not None, preactivation=pre, act_delta=psi, noise=drawn,
            squares=squares,
        )
        weight_grads.append(gw)
        bias_grads.append(gb)
        total += 0.5 * torch.sum(squares) / batch
    return FeedbackResult(weight_grads, bias_grads, total)
