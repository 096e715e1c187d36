"""Triton kernel of the TP/DTP target propagation (DESIGN §4, §6).

``_tp_target_kernel`` maps the target of layer l back to layer l−1 through the feedback map
``g_l(v) = ψ(v Q_lᵀ + c_l)``. For DTP it evaluates g_l on ĥ_l and on h_l in one GEMM: each program
loads a tile of Q_l once and multiplies it with the same rows of both ĥ_l and h_l (the stacked
``[ĥ_l; h_l]`` sharing Q_l), so the difference ``h_{l-1} + ψ(·)_top − ψ(·)_bottom`` is formed in the
epilogue without writing either map to memory.

The feedforward pass and the output target ``ĥ_L = f + β ε_L`` are ``linear_epilogue``'s kernels
(``linear``, ``output_error`` with ``add_pred``); the local gradients
``−(φ'(u_l) ⊙ (ĥ_l − h_l))ᵀ h_{l-1} / B`` are ``local_grad``'s TP variant. ``tp_targets`` below is
the launcher; the schedule is ``triton_tp``.

DTP's feedback loss trains Q_l on noisy inputs h_{l-1} + ξ. With a seed, ξ is drawn inside the kernels
that read it (``Noise``: the forward GEMM adds it to its operand on load, the gradient kernel to its
target), as a function of (seed, element), so it is never stored and the same seed gives the same
result. ``gaussian_noise`` materialises the same numbers (tests, the oracle, and other backends).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import (
    activation_code,
    as_acc,
    check_matrix,
    check_same_layout,
    gaussian,
    gemm_configs,
    input_precision,
    phi,
    prune_tile_configs,
    tile_offsets,
    tiles,
)


@triton.jit
def _tp_target_kernel(
    # GEMM operands: ĥ_l and h_l are (M, K), Q_l is (N, K), c_l is (N,)
    t_ptr, h_ptr, q_ptr, c_ptr,
    # epilogue input h_{l-1} and output ĥ_{l-1}, (M, N)
    h_prev_ptr, out_ptr,
    # sizes
    M, N, K,
    # strides; ĥ_l and h_l share (stride_tm, stride_tk); h_{l-1} and ĥ_{l-1} share (stride_om, stride_on)
    stride_tm, stride_tk, stride_qn, stride_qk, stride_om, stride_on,
    # meta-parameters
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, DIFFERENCE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """DTP (DIFFERENCE):  ĥ_{l-1} = h_{l-1} + ψ(ĥ_l Q_lᵀ + c_l) − ψ(h_l Q_lᵀ + c_l)
    TP:                ĥ_{l-1} = ψ(ĥ_l Q_lᵀ + c_l)"""
    ACC: tl.constexpr = tl.float64 if q_ptr.dtype.element_ty == tl.float64 else tl.float32
    offs_m, offs_n, _ = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Rows and columns past M and N wrap (in-bounds loads; the store is masked).
    rows = (offs_m % M)[:, None] * stride_tm + offs_k[None, :] * stride_tk
    t_ptrs = t_ptr + rows
    h_ptrs = h_ptr + rows
    q_ptrs = q_ptr + offs_k[:, None] * stride_qk + (offs_n % N)[None, :] * stride_qn
    acc_target = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc_activity = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        q = tl.load(q_ptrs, mask=mask_k[:, None], other=0.0)
        t = tl.load(t_ptrs, mask=mask_k[None, :], other=0.0)
        acc_target = tl.dot(t, q, acc_target, input_precision=INPUT_PRECISION, out_dtype=ACC)
        if DIFFERENCE:
            h = tl.load(h_ptrs, mask=mask_k[None, :], other=0.0)
            acc_activity = tl.dot(h, q, acc_activity, input_precision=INPUT_PRECISION, out_dtype=ACC)
        t_ptrs += BLOCK_K * stride_tk
        h_ptrs += BLOCK_K * stride_tk
        q_ptrs += BLOCK_K * stride_qk
    if HAS_BIAS:
        c = tl.load(c_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
        acc_target += c
        acc_activity += c
    mask = mask_m[:, None] & mask_n[None, :]
    out_offsets = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out = phi(acc_target, ACT)
    if DIFFERENCE:
        h_prev = tl.load(h_prev_ptr + out_offsets, mask=mask, other=0.0).to(ACC)
        out = h_prev + out - phi(acc_activity, ACT)
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


_tp_target_kernel_tuned = triton.autotune(
    configs=gemm_configs(two_accumulators=True),
    key=["M", "N", "K", "ACT", "HAS_BIAS", "DIFFERENCE", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_tile_configs},
)(_tp_target_kernel)


def tp_targets(
    target: Tensor,
    activity: Tensor,
    feedback_weight: Tensor,
    feedback_bias: Tensor | None,
    activity_below: Tensor,
    *,
    act: str,
    difference: bool,
    out: Tensor | None = None,
) -> Tensor:
    """Launch ``_tp_target_kernel``: ĥ_{l-1} from ĥ_l (``target``), h_l (``activity``), Q_l, c_l and
    h_{l-1} (``activity_below``; read only for DTP). Returns ``out``."""
    batch, width = target.shape
    below = feedback_weight.shape[0]
    check_matrix("feedback_weight", feedback_weight, (below, width), target.dtype)
    check_same_layout("activity", activity, target)
    if feedback_bias is not None:
        check_matrix("feedback_bias", feedback_bias, (below,))
    if out is None:
        out = torch.empty(batch, below, dtype=target.dtype, device=target.device)
    check_matrix("out", out, (batch, below))
    check_same_layout("activity_below", activity_below, out)
    _tp_target_kernel_tuned[lambda meta: tiles(meta, batch, below)](
        t_ptr=target, h_ptr=activity, q_ptr=feedback_weight, c_ptr=feedback_bias, h_prev_ptr=activity_below,
        out_ptr=out,
        M=batch, N=below, K=width,
        stride_tm=target.stride(0), stride_tk=target.stride(1), stride_qn=feedback_weight.stride(0),
        stride_qk=feedback_weight.stride(1), stride_om=out.stride(0), stride_on=out.stride(1),
        ACT=activation_code(act), HAS_BIAS=feedback_bias is not None, DIFFERENCE=difference,
        INPUT_PRECISION=input_precision(target),
    )
    return out


@triton.jit
def _gaussian_kernel(out_ptr, numel, seed, offset, std: tl.float64, BLOCK: tl.constexpr):
    """out[i] = std · ξ(seed, offset + i) over a contiguous buffer: the in-kernel noise, stored."""
    ACC: tl.constexpr = tl.float64 if out_ptr.dtype.element_ty == tl.float64 else tl.float32
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    values = as_acc(std, ACC) * gaussian(seed, offset + index, ACC)
    tl.store(out_ptr + index, values.to(out_ptr.dtype.element_ty), mask=index < numel)


def noise_offsets(batch: int, widths: list[int]) -> list[int]:
    """First Philox counter of each layer's noise: the layers' (batch, width) blocks follow each
    other, so all of one step's noise is one stream under one seed."""
    offsets, total = [], 0
    for width in widths:
        offsets.append(total)
        total += batch * width
    return offsets


def gaussian_noise(seed: int, std: float, batch: int, widths: list[int], *, dtype: torch.dtype,
                   device: torch.device) -> list[Tensor]:
    """The noise ξ_l (shape (batch, width_l), scaled by ``std``) that the kernels draw in place from
    ``seed`` for feedback layers with these input widths."""
    out = []
    for width, offset in zip(widths, noise_offsets(batch, widths)):
        xi = torch.empty(batch, width, dtype=dtype, device=device)
        block = 1024
        _gaussian_kernel[(triton.cdiv(xi.numel(), block),)](
            out_ptr=xi, numel=xi.numel(), seed=int(seed), offset=offset, std=float(std), BLOCK=block,
        )
        out.append(xi)
    return out
