"""What the train-step functions of every backend return."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class PCTrace:
    """What happened inside one PC relaxation (DESIGN §3, "Traces"), for T = ``inference_steps``:

    - ``energy[t, l]``: layer l+1's term of F after t steps (t = 0 … T), summed over the batch:
      γ_l/2 ‖ε_l‖² for a hidden layer, γ_L Σ ℓ(f, y) for the output (under FPA the predictions and
      f are the feedforward ones, as in the step's ``energy``); ``energy.sum(1)`` is F.
    - ``grad_norm[t-1, l]``: ‖∂F/∂z_{l+1}‖ (Frobenius, over the batch) that step t used, t = 1 … T
      (under FPA the written-out direction; in a sequential sweep, at the sweep's state when the
      layer moved).

    Rows after the step where adaptive stopping stopped are NaN."""

    energy: Tensor  # (T + 1, L)
    grad_norm: Tensor  # (T, L − 1)


@dataclass
class PCResult:
    """One PC train step: the relaxed state and the local gradients (DESIGN §3)."""

    latents: list[Tensor]  # z_1 … z_{L-1} after the relaxation
    errors: list[Tensor]  # ε_1 … ε_L at the final state
    weight_grads: list[Tensor]  # ∂F/∂W_l, batch mean
    bias_grads: list[Tensor | None]  # ∂F/∂b_l, batch mean; None where the layer has no bias
    energy: Tensor  # F at the final state, summed over the batch (0-dim)
    loss: Tensor  # feedforward loss ℓ(f_0, y), mean over the batch (0-dim)
    trajectory: list[list[Tensor]] | None = None  # latents after step 0 (init) … T, if asked for
    steps: Tensor | None = None  # inference steps taken (0-dim int64), with inference_tol; else all T
    trace: PCTrace | None = None  # with return_trace
    # With check_divergence: F before the last step taken when all T steps ran (F_{T-1}), else F at
    # the final state (stopped early, or T = 0), summed over the batch (0-dim)
    energy_prev: Tensor | None = None


@dataclass
class TPResult:
    """One TP/DTP train step: the targets and the local gradients (DESIGN §4)."""

    targets: list[Tensor]  # ĥ_1 … ĥ_L
    activities: list[Tensor]  # h_1 … h_{L-1}, f
    weight_grads: list[Tensor]
    bias_grads: list[Tensor | None]
    loss: Tensor  # feedforward loss, mean over the batch (0-dim)
    local_loss: Tensor  # Σ_l ½‖ĥ_l − h_l‖², mean over the batch (0-dim)


@dataclass
class FeedbackResult:
    """Gradients of the feedback reconstruction losses, l = 2 … L (index 0 is layer 2)."""

    weight_grads: list[Tensor]  # ∂/∂Q_l
    bias_grads: list[Tensor | None]  # ∂/∂c_l
    loss: Tensor  # Σ_l ½‖g_l(f_l(h_{l-1}+ξ)) − (h_{l-1}+ξ)‖², mean over the batch (0-dim)


@dataclass
class GradResult:
    """Gradients of a global loss (BP) or of local losses to fixed targets (GNT)."""

    weight_grads: list[Tensor]
    bias_grads: list[Tensor | None]
    loss: Tensor  # feedforward loss, mean over the batch (0-dim)
