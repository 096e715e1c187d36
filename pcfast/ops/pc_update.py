"""Triton kernel of the PC latent update (DESIGN §3, §6): the top-down GEMM ``ε_{l+1} W_{l+1}`` with
the relaxation step in its epilogue, one launch per layer and inference step.

``_pc_update_kernel`` updates z_l (and, where layer l's prediction does not move with z_l, ε_l) in
place. Its stacked form runs a Jacobi step of equal-width hidden layers in one launch (grid axis 1),
their state in (H, B, M) buffers and their separate W_{l+1} found through an offset table. The μP
coefficients ``κ γ_{l+1}/γ_l`` and ``κ`` are ``tl.float64`` arguments; a layer's settings travel as
one ``RelaxationStep``. Inference control (DESIGN §3) rides on the same pass: an optional device
gate multiplies the step and an optional buffer receives ‖Δz_l‖², both compiled out when absent.
``latent_update`` and ``stacked_latent_update`` are the launchers; the schedule is ``triton_pc``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..types import Net, PCConfig
from ._triton_common import LayerTable, activation_code, as_acc, check_matrix, check_same_layout, check_table
from ._triton_common import gemm_configs, input_precision, matmul_tile, phi_grad, prune_tile_configs, tile_offsets
from ._triton_common import tiles


@triton.jit
def _pc_update_kernel(
    # GEMM operands: td = ε_{l+1} W_{l+1}; ε_{l+1} is (M, K), W_{l+1} is (K, N)
    e_next_ptr, w_next_ptr,
    # state of layer l, (M, N), updated in place; u: feedforward pre-activation (FPA's φ');
    # e_out: where ε_l + step goes (e_ptr itself, or the other buffer of a stacked FPA step)
    z_ptr, e_ptr, u_ptr, e_out_ptr,
    # STACKED: int64 element offsets of layer g's W_{l+1} from w_next_ptr
    w_table_ptr,
    # GATE: 0-dim factor of the step (1 running, 0 stopped); SQUARES: ‖step‖² accumulates into
    # squares_ptr[g] (g = 0 unless STACKED)
    gate_ptr, squares_ptr,
    # sizes
    M, N, K,
    # strides; z, ε, u and e_out share (stride_zm, stride_zn); STACKED: layer stride of all five
    stride_em, stride_ek, stride_wk, stride_wn, stride_zm, stride_zn, layer_stride,
    # scalars: coefficient = κ γ_{l+1} / γ_l, kappa = κ
    coefficient: tl.float64, kappa: tl.float64,
    # meta-parameters
    ACT: tl.constexpr, FPA: tl.constexpr, UPDATE_ERROR: tl.constexpr, STACKED: tl.constexpr,
    GATE: tl.constexpr, SQUARES: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """z_l ← z_l − (κ/γ_l) ∂F/∂z_l, i.e.

        step = κ (γ_{l+1}/γ_l) φ'(s) ⊙ (ε_{l+1} W_{l+1}) − κ ε_l,   s = u_l (FPA) or z_l
        z_l += step;   e_out = ε_l + step  (UPDATE_ERROR: FPA, or the sequential sweep, where layer
                                           l's prediction does not depend on z_l)

    STACKED: grid axis 1 runs over G consecutive layers of equal width in one launch (a Jacobi
    step): layer g's state sits at ``g·layer_stride`` from z, ε, u, e_out and ε_{l+1} at the same
    distance from e_next; W_{l+1} comes from the offset table.

    GATE: step ← gate · step (gate loaded once per program; 0 makes the launch change nothing).
    SQUARES: each program adds Σ step² over its tile (after the gate) to squares_ptr[g] with one
    atomic add, summed in the accumulator dtype (fp32 sums are order-dependent).
    """
    ACC: tl.constexpr = tl.float64 if w_next_ptr.dtype.element_ty == tl.float64 else tl.float32
    if STACKED:
        layer = tl.program_id(1)
        w_next_ptr += tl.load(w_table_ptr + layer)
        shift = layer.to(tl.int64) * layer_stride
        e_next_ptr += shift
        z_ptr += shift
        e_ptr += shift
        e_out_ptr += shift
        if FPA:
            u_ptr += shift
    offs_m, offs_n, _ = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    topdown = matmul_tile(
        e_next_ptr, w_next_ptr, offs_m, offs_n, M, N, K, stride_em, stride_ek, stride_wk, stride_wn,
        0, 0, 0.0, 0, False, ACC, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    offsets = offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(ACC)
    e = tl.load(e_ptr + offsets, mask=mask, other=0.0).to(ACC)
    if FPA:
        slope = phi_grad(tl.load(u_ptr + offsets, mask=mask, other=0.0).to(ACC), ACT)
    else:
        slope = phi_grad(z, ACT)
    step = as_acc(coefficient, ACC) * slope * topdown - as_acc(kappa, ACC) * e
    if GATE:
        step = step * tl.load(gate_ptr).to(ACC)
    if SQUARES:
        # rows and columns past M and N hold wrapped-around values (matmul_tile): masked out of the sum
        partial = tl.sum(tl.where(mask, step * step, 0.0))
        if STACKED:
            squares_ptr += layer
        tl.atomic_add(squares_ptr, partial.to(squares_ptr.dtype.element_ty))
    tl.store(z_ptr + offsets, (z + step).to(z_ptr.dtype.element_ty), mask=mask)
    if UPDATE_ERROR:
        tl.store(e_out_ptr + offsets, (e + step).to(e_out_ptr.dtype.element_ty), mask=mask)


_pc_update_kernel_tuned = triton.autotune(
    configs=gemm_configs(),
    key=["M", "N", "K", "ACT", "FPA", "UPDATE_ERROR", "STACKED", "GATE", "SQUARES", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_tile_configs},
    restore_value=["z_ptr", "e_ptr", "e_out_ptr", "squares_ptr"],  # benchmarking must not advance the state
)(_pc_update_kernel)


@dataclass(frozen=True)
class RelaxationStep:
    """The settings of hidden layer l's relaxation step (DESIGN §3): its activation φ_l (``act``), the
    top-down ``coefficient`` κ γ_{l+1}/γ_l, ``kappa`` κ, and ``fpa`` (φ' frozen at the feedforward u_l)."""

    act: str
    coefficient: float
    kappa: float
    fpa: bool

    @classmethod
    def of(cls, net: Net, config: PCConfig, layer: int) -> RelaxationStep:
        """The step of 0-based hidden layer ``layer`` of ``net`` under ``config``."""
        gammas, kappa = config.precisions, config.inference_lr
        return cls(net.activations[layer], kappa * gammas[layer + 1] / gammas[layer], kappa, config.fpa)


def _check_fpa(latent: Tensor, fpa: bool, preactivation: Tensor | None, error_out: Tensor | None) -> None:
    if fpa:
        if preactivation is None:
            raise ValueError("preactivation: FPA takes φ' at the feedforward u_l")
        check_same_layout("preactivation", preactivation, latent)
    if error_out is not None:
        check_same_layout("error_out", error_out, latent)


def _check_monitor(latent: Tensor, gate: Tensor | None, squares: Tensor | None, layers: int) -> None:
    """``gate``: one element; ``squares``: ``layers`` contiguous elements of fp32 or the state's dtype,
    on the state's device."""
    if gate is not None:
        if gate.numel() != 1 or gate.device != latent.device or not gate.dtype.is_floating_point:
            raise ValueError(f"gate: expected one floating-point element on {latent.device}, got "
                             f"{gate.dtype} {tuple(gate.shape)} on {gate.device}")
    if squares is not None:
        if (squares.numel() != layers or (layers > 1 and squares.stride(-1) != 1) or squares.device != latent.device
                or squares.dtype not in (latent.dtype, torch.float32)):
            raise ValueError(f"squares: expected {layers} contiguous float32 or {latent.dtype} elements on "
                             f"{latent.device}, got {squares.dtype} {tuple(squares.shape)} on {squares.device}")


def _launch(latents: Tensor, errors: Tensor, errors_next: Tensor, weight_next: Tensor, weight_table: Tensor | None,
            step: RelaxationStep, update_error: bool, preactivations: Tensor | None,
            errors_out: Tensor | None, monitor: tuple[Tensor | None, Tensor | None]) -> None:
    """Launch ``_pc_update_kernel`` over (G, B, N) state (G = 1 without ``weight_table``: one layer,
    W_{l+1} = ``weight_next``; else W_{l+1} of layer g at ``weight_table[g]`` from ``weight_next``);
    ``monitor`` is (gate, squares)."""
    gate, squares = monitor
    layers, batch, width = latents.shape
    _pc_update_kernel_tuned[lambda meta: (tiles(meta, batch, width)[0], layers)](
        e_next_ptr=errors_next, w_next_ptr=weight_next, z_ptr=latents, e_ptr=errors,
        u_ptr=preactivations if step.fpa else None, e_out_ptr=errors if errors_out is None else errors_out,
        w_table_ptr=weight_table, gate_ptr=gate, squares_ptr=squares,
        M=batch, N=width, K=weight_next.shape[0],
        stride_em=errors_next.stride(1), stride_ek=errors_next.stride(2), stride_wk=weight_next.stride(0),
        stride_wn=weight_next.stride(1), stride_zm=latents.stride(1), stride_zn=latents.stride(2),
        layer_stride=latents.stride(0) if weight_table is not None else 0,
        coefficient=float(step.coefficient), kappa=float(step.kappa),
        ACT=activation_code(step.act), FPA=step.fpa, UPDATE_ERROR=update_error, STACKED=weight_table is not None,
        GATE=gate is not None, SQUARES=squares is not None, INPUT_PRECISION=input_precision(latents),
    )


def _one(t: Tensor | None) -> Tensor | None:
    """A (B, N) tensor as the (1, B, N) state of one layer."""
    return None if t is None else t[None]


def latent_update(latent: Tensor, error: Tensor, error_next: Tensor, weight_next: Tensor, step: RelaxationStep, *,
                  update_error: bool, preactivation: Tensor | None = None, error_out: Tensor | None = None,
                  gate: Tensor | None = None, squares: Tensor | None = None) -> None:
    """Launch ``_pc_update_kernel``: one relaxation ``step`` of ``latent`` (and ``error``) in place.
    ``preactivation`` (u_l) supplies φ' under FPA; ``error_out`` receives ε_l + step instead of
    ``error`` (a stacked FPA step reads the old errors of every layer while writing the new).
    ``gate`` (one element, 1 or 0) multiplies the step; ``squares`` (one element, float32 or the
    state's dtype) has ‖step‖² (after the gate) added to it — the caller zeroes it."""
    batch, width = latent.shape
    check_same_layout("error", error, latent)
    check_matrix("weight_next", weight_next, (error_next.shape[1], width), latent.dtype)
    check_matrix("error_next", error_next, (batch, weight_next.shape[0]), latent.dtype)
    _check_fpa(latent, step.fpa, preactivation, error_out)
    _check_monitor(latent, gate, squares, 1)
    _launch(latent[None], error[None], error_next[None], weight_next, None, step, update_error, _one(preactivation),
            _one(error_out), (gate, squares))


def stacked_latent_update(latents: Tensor, errors: Tensor, errors_next: Tensor, weights_next: LayerTable,
                          step: RelaxationStep, *, update_error: bool, preactivations: Tensor | None = None,
                          errors_out: Tensor | None = None, gate: Tensor | None = None,
                          squares: Tensor | None = None) -> None:
    """One Jacobi relaxation ``step`` of G equal-width layers in one launch (see ``latent_update``):
    ``latents``, ``errors``, ``errors_next``, ``preactivations``, ``errors_out`` are (G, B, N) with
    one layout; W_{l+1} (N, N) from the table. Every layer reads ``errors`` before any writes
    ``errors_out``, so with ``update_error`` the two must be different buffers. ``gate`` as in
    ``latent_update``; ``squares`` (G contiguous elements) has layer g's ‖step‖² added to element g."""
    layers, batch, width = latents.shape
    check_matrix("weight_next", weights_next.base, (width, width), latents.dtype)
    check_table("weights_next", weights_next, layers)
    check_same_layout("errors", errors, latents)
    check_same_layout("errors_next", errors_next, latents)
    _check_fpa(latents, step.fpa, preactivations, errors_out)
    _check_monitor(latents, gate, squares, layers)
    if update_error and (errors_out is None or errors_out.data_ptr() == errors.data_ptr()):
        raise ValueError("errors_out: a stacked step that moves the errors writes them to another buffer")
    _launch(latents, errors, errors_next, weights_next.base, weights_next.offsets, step, update_error, preactivations,
            errors_out, (gate, squares))
