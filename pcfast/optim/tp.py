"""``pcfast.optim.TP`` and ``DTP``: (difference) target propagation with trained feedback maps."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import distributed, functional, ops
from ..activations import check_activation
from ..errors import DivergenceError
from ..mup.presets import Parametrization
from ..ops.backend import activity_shapes
from ..types import Feedback, TPConfig
from ..reference.common import forward
from .base import LocalOptimizer, Options, _check_number, _describe

FEEDBACK_MODES = ("trained", "ridge")


@dataclass(frozen=True)
class TPOptions(Options):
    """TP/DTP's settings: β, the feedback maps' training (mode, rate, steps, noise, weight decay,
    activations) and the seed of their noise generator; ``feedback_activations`` and ``seed`` are
    used when the optimizer is built and are not group settings."""

    beta: float = 0.5
    feedback: str = "trained"
    feedback_lr: float = 0.01
    feedback_steps: int = 1
    feedback_noise: float = 0.1
    feedback_weight_decay: float = 0.0
    feedback_activations: list[str] | None = None
    seed: int = 0

    constructor_only: ClassVar[tuple[str, ...]] = ("feedback_activations", "seed")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("beta", "feedback_lr", "feedback_noise", "feedback_weight_decay"):
            _check_number(name, getattr(self, name))
            object.__setattr__(self, name, float(getattr(self, name)))
        steps = self.feedback_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"feedback_steps: expected an int >= 0, got {steps!r}")
        if self.feedback not in FEEDBACK_MODES:
            raise ValueError(f"feedback: expected one of {FEEDBACK_MODES}, got {self.feedback!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed: expected an int, got {self.seed!r}")


class TP(LocalOptimizer):
    r"""Target propagation (DESIGN §4) with μP learning rates; ``DTP`` is its difference variant.

    Per ``step(x, y)``:

    1. feedback training — ``feedback_steps`` SGD steps (rate ``feedback_lr``, weight decay
       ``feedback_weight_decay``) on each reconstruction loss
       ``½‖g_l(f_l(h_{l-1}+ξ)) − (h_{l-1}+ξ)‖²``, ξ ~ N(0, ``feedback_noise``²), drawn from the
       optimizer's own generator (``seed``; on the ``triton`` backend the generator gives a seed
       per step and the kernels draw ξ from it); or, with ``feedback="ridge"`` and ψ = identity, the
       closed-form ridge solution on the batch with μ = ``feedback_weight_decay``;
    2. targets ``ĥ_L = f − β ∂ℓ/∂f``, ``ĥ_{l-1} = g_l(ĥ_l)`` (TP) or
       ``h_{l-1} + g_l(ĥ_l) − g_l(h_l)`` (DTP), and local gradients of ``½‖ĥ_l − h_l‖²`` into ``.grad``;
    3. the update rule (``torch.optim.SGD`` unless ``optimizer=`` names another; its keyword
       arguments such as ``momentum=0.9`` go to it) with ``η_l = lr · m^{-c_l}`` (each group's ``lr``
       is η, its ``lr_mult`` ``m^{-c_l}``).

    Parameters with ``requires_grad=False`` are frozen (no ``.grad``, no update); the rest of the
    torch.optim contract is ``LocalOptimizer``'s.

    The feedback maps ``g_l(v) = ψ_l(v Q_lᵀ + c_l)`` live in the optimizer (``feedback_weights``,
    ``feedback_biases``; c_l exists where layer l has a bias) and in its ``state_dict``. Q_l starts
    as N(0, 1/d_l). Under μP a feedback map from a hidden layer learns at ``feedback_lr / m``.

    Returns from ``step``: ``loss``, ``local_loss`` (Σ_l ½‖ĥ_l − h_l‖² / B) and ``reconstruction``.

    Data parallel (``process_group``, as in ``PC``): each rank steps on its shard of the batch; every
    feedback SGD step's gradients are averaged over the group's samples before the update (one
    all-reduce each), so every rank's Q_l stays the same, and the ridge closed form is solved from
    the group's means and centred Gram matrices (two all-reduces; with μ = 0 it takes the
    pseudo-inverse of the Gram matrix, ``pinv(HᵀH)HᵀH'`` — the same minimum-norm solution as
    ``pinv(H)H'`` in exact arithmetic). The noise ξ is drawn for the whole batch from the generator on
    every rank, which keeps its rows (B_total × d_{l-1} draws per layer and step, and one small
    all-reduce per step to learn the shard sizes): the result is the single-process one on the full
    batch, whatever the number of ranks — on the ``triton`` backend too, which then draws ξ this way
    (the torch backends' numbers) rather than in its kernels. When built, the optimizer takes the
    group's first rank's model, Q_l, c_l and generator.

    Example:
        >>> model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 10))
        >>> par = pcfast.parametrize(model, "mup", algo="dtp", base_width=64)
        >>> opt = pcfast.optim.DTP(model, par, lr=0.1, beta=0.5)
        >>> for x, y in loader:
        ...     opt.zero_grad()
        ...     stats = opt.step(x, y)
    """

    algo = "tp"
    difference = False
    stat_names = ("loss", "local_loss", "reconstruction")
    options = TPOptions

    def __init__(self, model: nn.Module, parametrization: Parametrization | None = None, **kwargs: Any) -> None:
        super().__init__(model, parametrization, **kwargs)
        feedback, feedback_activations, seed = self.config.feedback, self.config.feedback_activations, self.config.seed
        depth = self.mlp.depth
        if feedback_activations is None:
            feedback_activations = ["identity"] * (depth - 1) if feedback == "ridge" else list(self.mlp.activations)
        if len(feedback_activations) != depth - 1:
            raise ValueError(f"feedback_activations: expected {depth - 1} names (layers 2 … L), got {len(feedback_activations)}")
        for k, act in enumerate(feedback_activations):
            check_activation(act, f"feedback_activations[{k}]")
        if feedback == "ridge" and any(a != "identity" for a in feedback_activations):
            raise ValueError("feedback='ridge' needs feedback_activations all 'identity' (the closed form is linear)")
        if feedback == "ridge" and self.mlp.is_conv:
            raise ValueError("feedback='ridge' is defined for MLPs only (the closed form solves for dense matrices, "
                             "not transposed convolutions); conv nets train their feedback maps: feedback='trained'")
        self.feedback_activations = list(feedback_activations)
        self._feedback_shapes = [self._feedback_shape(k) for k in range(depth - 1)]
        self._feedback_has_bias = [self.mlp.linears[k + 1].bias is not None for k in range(depth - 1)]
        first = self.mlp.linears[0].weight
        self.generator = torch.Generator(device=first.device)
        self.generator.manual_seed(int(seed))
        self.feedback_weights: list[Tensor] = []
        self.feedback_biases: list[Tensor | None] = []
        for l in range(1, depth):
            # Q_{l+1} ~ N(0, 1/fan-in) of the feedback map: layer l+1's outputs (× its kernel for a
            # transposed convolution); its bias c_{l+1} has layer l+1's input units, zero
            shape = self._feedback_shape(l - 1)
            fan = shape[0] * shape[2] * shape[3] if len(shape) == 4 else shape[1]
            q = torch.randn(shape, generator=self.generator, dtype=first.dtype, device=first.device)
            self.feedback_weights.append(q.mul_(fan**-0.5))
            has_bias = self.mlp.linears[l].bias is not None
            units = self.mlp.linears[l].weight.shape[1]
            self.feedback_biases.append(torch.zeros(units, dtype=first.dtype, device=first.device) if has_bias else None)
        if self.process_group is not None:
            generator_state = self.generator.get_state().to(first.device)
            distributed.broadcast_from_first_rank(
                [*self.feedback_weights, *(c for c in self.feedback_biases if c is not None), generator_state],
                self.process_group)
            self.generator.set_state(generator_state.cpu())

    @property
    def feedback_lr_mults(self) -> list[float]:
        """Learning-rate multipliers of Q_2 … Q_L: a map reading a hidden layer has a width-sized
        fan-in, so under μP its updates scale like a hidden layer's (1/m); the readout's map has 1."""
        depth, par = self.mlp.depth, self.parametrization
        return [1.0 / par.layers[l].width_mult if (l < depth - 1 and par.preset == "mup") else 1.0
                for l in range(1, depth)]

    # ------------------------------------------------------------------ algorithm

    def _new_feedback(self, x: Tensor) -> tuple[list[Tensor], list[Tensor | None], Tensor]:
        """Feedback weights after this step's feedback training (out of place) and the last loss."""
        weights, biases = self._params()
        acts = self.mlp.activations
        qs = list(self.feedback_weights)
        cs = list(self.feedback_biases)
        collectives = self._collectives  # a data-parallel step's, else None
        if self._setting("feedback") == "ridge":
            ridge, bias = self._setting("feedback_weight_decay"), any(c is not None for c in cs)
            if collectives is None:
                new_q, new_c = functional.ridge_feedback(weights, biases, acts, x, ridge=ridge, bias=bias)
            else:
                new_q, new_c = self._sharded_ridge_feedback(x, ridge, bias, collectives)
            new_c = [None if c is None else nc for c, nc in zip(cs, new_c)]
            result = functional.reconstruction_grads(self._net(), self._feedback(new_q, new_c), x,
                                                     backend=self._setting("backend"))
            return new_q, new_c, result.loss
        lr, decay, sigma = self._setting("feedback_lr"), self._setting("feedback_weight_decay"), self._setting("feedback_noise")
        loss = x.new_zeros(())
        mults = self.feedback_lr_mults
        backend = self._setting("backend")
        in_kernel_noise = collectives is None and "seeded_noise" in ops.get_backend(
            backend, "feedback", x.device, x.dtype, conv=self.mlp.is_conv).capabilities
        steps = self._setting("feedback_steps")
        rows = slice(0, x.shape[0])  # this rank's rows of the (group's) batch
        total = x.shape[0]
        if collectives is not None and sigma > 0 and steps > 0:
            _, sizes = collectives.mean([], x.shape[0])  # every rank's shard size, to draw ξ for the whole batch
            start = sum(sizes[:collectives.rank])
            rows, total = slice(start, start + x.shape[0]), sum(sizes)
        for _ in range(steps):
            noise, seed = None, None
            if sigma > 0 and in_kernel_noise:  # the kernels draw ξ from a seed taken from the generator
                seed = int(torch.randint(0, 2**62, (), generator=self.generator, device=self.generator.device))
            elif sigma > 0:
                noise = [
                    torch.randn(total, *shape, generator=self.generator, dtype=x.dtype,
                                device=x.device)[rows].mul_(sigma)
                    for shape in activity_shapes(self._net(), x)
                ]
            result = functional.reconstruction_grads(self._net(), self._feedback(qs, cs), x, noise, noise_seed=seed,
                                                     noise_std=sigma, backend=backend)
            weight_grads, bias_grads, loss = result.weight_grads, result.bias_grads, result.loss
            if collectives is not None:  # the group's mean gradients, so that every rank's Q_l stays the same
                depth = len(weight_grads)
                reduced, _ = collectives.mean([*weight_grads, *bias_grads, loss], x.shape[0])
                weight_grads, bias_grads, loss = reduced[:depth], reduced[depth:2 * depth], reduced[-1]
            for k, mult in enumerate(mults):
                g = weight_grads[k].add(qs[k], alpha=decay) if decay else weight_grads[k]
                qs[k] = qs[k].add(g, alpha=-lr * mult)
                if cs[k] is not None:
                    cs[k] = cs[k].add(bias_grads[k], alpha=-lr * mult)
        return qs, cs, loss

    def _sharded_ridge_feedback(self, x: Tensor, ridge: float, bias: bool,
                                collectives: distributed.StepCollectives) -> tuple[list[Tensor], list[Tensor | None]]:
        """``reference.ridge_feedback`` over the group's batch from each rank's shard: the means of
        the activities (one all-reduce, when ``bias``), then the centred Gram and cross matrices
        ``H_lᵀH_l / B`` and ``H_lᵀH_{l-1} / B`` (one all-reduce), then the same solve on every rank."""
        weights, biases = self._params()
        us, hs = forward(weights, biases, self.mlp.activations, x)
        activities = hs + [us[-1]]
        batch = x.shape[0]
        means: list[Tensor | None] = [None] * len(activities)
        if bias:
            reduced, _ = collectives.mean([h.mean(0) for h in activities[1:]], batch)
            means[1:] = reduced
            activities = [h if m is None else h - m for h, m in zip(activities, means)]
        pairs = [(activities[l], activities[l + 1]) for l in range(1, len(weights))]
        products = [m for h_in, h_out in pairs for m in (h_out.T @ h_out / batch, h_out.T @ h_in / batch)]
        products, _ = collectives.mean(products, batch)
        qs, cs = [], []
        try:
            for l in range(1, len(weights)):
                gram, cross = products[2 * (l - 1)], products[2 * (l - 1) + 1]
                if ridge > 0:
                    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                    q = torch.linalg.solve(gram + ridge * eye, cross).T
                else:
                    q = (torch.linalg.pinv(gram, hermitian=True) @ cross).T
                qs.append(q)
                cs.append(means[l] - means[l + 1] @ q.T if bias else None)
        except torch.linalg.LinAlgError as error:  # a singular system from non-finite activities
            raise DivergenceError(f"ridge_feedback: the ridge system cannot be solved ({error}): the computation "
                                  "diverged; nothing was changed") from None
        return qs, cs

    def _collective_plan(self) -> list[int]:
        plan = []
        if self._setting("feedback") == "ridge":
            dims = [lin.out_features for lin in self.mlp.linears]
            if any(c is not None for c in self.feedback_biases):
                plan.append(sum(dims))  # the means of h_1 … h_L
            plan.append(sum(d_out * (d_out + d_in) for d_in, d_out in zip(dims[:-1], dims[1:])))
        else:
            steps = self._setting("feedback_steps")
            if self._setting("feedback_noise") > 0 and steps > 0:
                plan.append(0)  # the shard sizes
            feedback = sum(q.numel() for q in self.feedback_weights)
            feedback += sum(c.numel() for c in self.feedback_biases if c is not None)
            plan += [feedback + 1] * steps
        return plan + super()._collective_plan()

    def _local_gradients(self, x: Tensor, target: Tensor):
        qs, cs, reconstruction = self._new_feedback(x)
        config = TPConfig(self._setting("beta"), self._setting("loss"), self.difference)
        result = functional.tp_grads(self._net(), self._feedback(qs, cs), x, target, config, self._setting("backend"))
        stats = {"loss": result.loss, "local_loss": result.local_loss, "reconstruction": reconstruction}
        return result.weight_grads, result.bias_grads, stats, {"feedback": (qs, cs)}

    def _feedback(self, qs: list[Tensor], cs: list[Tensor | None]) -> Feedback:
        return Feedback(qs, cs, self.feedback_activations)

    def _raise_non_finite(self, grads, values, step) -> None:
        """As the base class, after naming feedback weights that feedback training made non-finite."""
        if not all(map(math.isfinite, values.values())):
            self._raise_for_inputs(step)
            for k, q in enumerate(step.pending["feedback"][0]):
                if not bool(torch.isfinite(q).all()):
                    raise DivergenceError(f"feedback weights of layer {k + 2} are not finite: feedback training "
                                          "diverged (lower feedback_lr); nothing was changed")
        super()._raise_non_finite(grads, values, step)

    def _commit_extra(self, pending: dict) -> None:
        if "feedback" in pending:
            qs, cs = pending["feedback"]
            # In place: the tensors keep their addresses (the triton backend's CUDA graphs key on them).
            for k in range(len(qs)):
                self.feedback_weights[k].copy_(qs[k])
                if cs[k] is not None:
                    self.feedback_biases[k].copy_(cs[k])

    def _snapshot(self) -> Any:
        return self.generator.get_state()

    def _restore(self, snapshot: Any) -> None:
        self.generator.set_state(snapshot)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["feedback"] = {
            "weights": [q.clone() for q in self.feedback_weights],
            "biases": [None if c is None else c.clone() for c in self.feedback_biases],
            "activations": list(self.feedback_activations),
            "generator": self.generator.get_state(),
        }
        return state

    def _check_extra_state(self) -> None:
        dtype, device = self.mlp.linears[0].weight.dtype, self.mlp.linears[0].weight.device
        for k, (q, c) in enumerate(zip(self.feedback_weights, self.feedback_biases)):
            shape = self._feedback_shapes[k]
            if not (isinstance(q, Tensor) and q.shape == shape and q.dtype == dtype and q.device == device):
                self._raise_corrupted(f"feedback_weights[{k}]", f"shape {tuple(shape)}, dtype {dtype}, device {device} "
                                      "(the model's: build the optimizer after moving the model)", q)
            if not self._feedback_has_bias[k]:
                if c is not None:
                    self._raise_corrupted(f"feedback_biases[{k}]", f"None (layer {k + 2} has no bias)", c)
            elif not (isinstance(c, Tensor) and c.shape == self._feedback_bias_shape(k) and c.dtype == dtype):
                expected = f"shape {tuple(self._feedback_bias_shape(k))}, dtype {dtype}"
                self._raise_corrupted(f"feedback_biases[{k}]", expected, c)

    @staticmethod
    def _raise_corrupted(name: str, expected: str, value: Any) -> None:
        raise ValueError(f"{name}: expected {expected} (the model's), got {_describe(value)}; the optimizer state "
                         "was corrupted: build a new optimizer or load a state_dict saved for this model")

    def _feedback_shape(self, k: int) -> torch.Size:
        """Shape of Q_{k+2}: (d_{k+1}, d_{k+2}) — d_{k+1} the input features of linear layer k+2 — or
        W_{k+2}'s (C_out, C_in, k_h, k_w) for a conv layer (a transposed convolution)."""
        w = self.mlp.linears[k + 1].weight
        return torch.Size(w.shape if w.dim() == 4 else (w.shape[1], w.shape[0]))

    def _feedback_bias_shape(self, k: int) -> torch.Size:
        """Shape of c_{k+2}: layer k+2's input units (features, or channels of a conv layer)."""
        return torch.Size((self.mlp.linears[k + 1].weight.shape[1],))

    def _check_extra(self, state_dict: dict[str, Any]) -> None:
        feedback = state_dict.get("feedback")
        if not isinstance(feedback, dict):
            raise ValueError("state_dict: has no 'feedback' entry; it was not saved by a TP/DTP optimizer")
        missing = [k for k in ("weights", "biases", "activations", "generator") if k not in feedback]
        if missing:
            raise ValueError(f"state_dict['feedback']: has no {missing} entries")
        depth, like = self.mlp.depth, self.mlp.linears[0].weight
        for key in ("weights", "biases", "activations"):
            value = feedback[key]
            if not isinstance(value, (list, tuple)) or len(value) != depth - 1:
                raise ValueError(f"state_dict['feedback']['{key}']: expected {depth - 1} entries (layers 2 … L), "
                                 f"got {value!r:.200}")
        for k, (q, c) in enumerate(zip(feedback["weights"], feedback["biases"])):
            shape = self._feedback_shape(k)
            if not isinstance(q, Tensor) or q.shape != shape or q.dtype != like.dtype:
                raise ValueError(f"state_dict['feedback']['weights'][{k}]: expected shape {tuple(shape)}, dtype "
                                 f"{like.dtype} (the model's), got {_describe(q)}")
            has_bias = self.mlp.linears[k + 1].bias is not None
            if not has_bias and c is not None:
                raise ValueError(f"state_dict['feedback']['biases'][{k}]: expected None (layer {k + 2} has no bias), "
                                 f"got {_describe(c)}")
            bias_shape = self._feedback_bias_shape(k)
            if has_bias and (not isinstance(c, Tensor) or c.shape != bias_shape or c.dtype != like.dtype):
                raise ValueError(f"state_dict['feedback']['biases'][{k}]: expected shape {tuple(bias_shape)}, dtype "
                                 f"{like.dtype} (the model's), got {_describe(c)}")
        for k, act in enumerate(feedback["activations"]):
            check_activation(act, f"state_dict['feedback']['activations'][{k}]")
        if state_dict["param_groups"][0]["feedback"] == "ridge" and any(a != "identity" for a in feedback["activations"]):
            raise ValueError("state_dict['feedback']['activations']: feedback='ridge' needs them all 'identity', "
                             f"got {list(feedback['activations'])}")
        try:
            torch.Generator(device=self.generator.device).set_state(feedback["generator"])
        except (TypeError, RuntimeError, ValueError) as error:
            raise ValueError(f"state_dict['feedback']['generator']: not a generator state ({error})") from None

    def _load_extra(self, state_dict: dict[str, Any]) -> None:
        feedback = state_dict.pop("feedback")
        # In place: the tensors keep their addresses (the triton backend's CUDA graphs key on them).
        for k, (q, c) in enumerate(zip(feedback["weights"], feedback["biases"])):
            self.feedback_weights[k].copy_(q)
            if c is not None:
                self.feedback_biases[k].copy_(c)
        self.feedback_activations = list(feedback["activations"])
        self.generator.set_state(feedback["generator"])


class DTP(TP):
    __doc__ = TP.__doc__
    algo = "dtp"
    difference = True
