"""Triton kernels of the PC relaxation (DESIGN §3, §6): predictions with the error in the epilogue,
the top-down GEMM with the latent update in the epilogue, and weight gradients as one GEMM per layer.

Per inference step and layer there are at most two launches:

- ``_pc_error_kernel``: ``pred = φ(a) Wᵀ + b`` with φ applied while ``a`` is loaded (``a`` is x or a
  latent z_{l-1}, so φ(z) is never materialised) and the error in the epilogue — hidden
  ``ε = z − pred``, output ``ε = −∂ℓ/∂f`` (MSE ``y − f``; CE ``onehot(y) − softmax(f)`` when the row
  fits one tile, else ``_ce_error_kernel`` afterwards). The same kernel is the feedforward pass;
- ``_pc_update_kernel``: ``td = ε_{l+1} W_{l+1}`` with the step
  ``z_l += κ (γ_{l+1}/γ_l) φ'(z_l) ⊙ td − κ ε_l`` (and ``ε_l +=`` the step) in the epilogue;
- ``_pc_weight_grad_kernel``: ``∂F/∂W_l = −γ_l/B · ε_lᵀ φ(a_{l-1})`` and the bias row sum in the same pass;
  a TP variant forms its δ on load (``tp_targets`` uses it), optionally with noise drawn in the kernel
  and the squared residuals summed (DTP's feedback loss); optionally the SGD step (``FusedSGD``).

Each kernel also has a STACKED form: grid axis 1 runs over equal-width hidden layers, whose state
the schedule keeps in (H, B, M) buffers and whose separate parameter tensors are found through an
offset table (``LayerTable``); ``stacked_*`` are its launchers.

Every μP constant (κ γ_{l+1}/γ_l, κ, −γ_l/B, β) is a ``tl.float64`` kernel argument, cast once to
the accumulator dtype (fp32, or fp64 for fp64 tensors); SGD's rates, which a schedule changes every
step, are read from a float64 device row instead, so a captured CUDA graph stays valid. Public functions (no ``_``) are launchers:
they check shapes, allocate when no ``out`` is given, pick the grid and launch; the schedules
(which launch when) live in ``pcfast.ops.triton``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import (
    activation_code,
    as_acc,
    gaussian,
    gemm_configs,
    grad_configs,
    input_precision,
    interpreting,
    matmul_tile,
    phi,
    phi_grad,
    prune_grad_configs,
    prune_tile_configs,
    tile_offsets,
)

# Epilogues of _pc_error_kernel.
EPILOGUE_AFFINE = 0  # out = φ_out(pred)
EPILOGUE_HIDDEN_ERROR = 1  # out = z − pred
EPILOGUE_MSE = 2  # out = ADD_PRED·pred + scale·(y − pred)
EPILOGUE_CE = 3  # out = ADD_PRED·pred + scale·(onehot(y) − softmax(pred)); needs BLOCK_N ≥ N


@dataclass(frozen=True)
class Noise:
    """Gaussian noise drawn inside a kernel: ``std · ξ`` with ξ element (m, k) of an (M, K) operand
    at Philox counter ``offset + m K + k`` under ``seed`` (``tp_targets.gaussian_noise`` draws the same)."""

    seed: int
    std: float
    offset: int = 0


_NO_NOISE = Noise(0, 0.0, 0)

# Widest class count handled inside one tile of _pc_error_kernel; wider rows store logits and run
# _ce_error_kernel. A module attribute so tests can force either path.
CE_FUSED_MAX_CLASSES = 256


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _pc_error_kernel(
    # GEMM operands: pred = φ_in(a) Wᵀ + b; a is (M, K), W is (N, K)
    a_ptr, w_ptr, bias_ptr,
    # epilogue inputs: latent z (hidden error), target y (float (M, N) for MSE, int64 (M,) for CE)
    z_ptr, target_ptr,
    # outputs, (M, N): the prediction (if STORE_PRED) and the epilogue's result
    pred_ptr, out_ptr,
    # STACKED: int64 element offsets of layer g's W and b from w_ptr and bias_ptr
    w_table_ptr, b_table_ptr,
    # sizes
    M, N, K,
    # strides; z, pred and out share (stride_om, stride_on); STACKED: a's and z/out's layer strides
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on, stride_tm, stride_tn,
    layer_stride_a, layer_stride_o,
    # NOISE on a (see matmul_tile): seed and first counter
    noise_seed, noise_offset,
    # scalars
    scale: tl.float64, noise_std: tl.float64,
    # meta-parameters
    ACT_IN: tl.constexpr, ACT_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr,
    ADD_PRED: tl.constexpr, STORE_PRED: tl.constexpr, LOAD_PRED: tl.constexpr, STACKED: tl.constexpr,
    NOISE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """pred = φ_in(a) Wᵀ + b  (or pred loaded from pred_ptr when LOAD_PRED: layer 1's is constant), then

    EPILOGUE 0:  out = φ_out(pred)                                  (feedforward; φ_out = id gives z = u)
    EPILOGUE 1:  out = ε = z − pred                                 (hidden error)
    EPILOGUE 2:  out = ADD_PRED·pred + scale·(y − pred)             (MSE: ε_L, or the TP target f + β ε_L)
    EPILOGUE 3:  out = ADD_PRED·pred + scale·(onehot(y) − softmax(pred))   (CE; the row is one tile)

    STACKED: grid axis 1 runs over G layers of equal shape in one launch; layer g reads a, z and
    writes out at ``g·layer_stride`` and finds its W and b through the offset tables (parameters are
    separate tensors). NOISE: a ← a + noise_std·ξ on load (DTP's feedback loss).
    """
    ACC: tl.constexpr = tl.float64 if w_ptr.dtype.element_ty == tl.float64 else tl.float32
    if STACKED:
        layer = tl.program_id(1)
        w_ptr += tl.load(w_table_ptr + layer)
        if HAS_BIAS:
            bias_ptr += tl.load(b_table_ptr + layer)
        a_ptr += layer.to(tl.int64) * layer_stride_a
        z_ptr += layer.to(tl.int64) * layer_stride_o
        out_ptr += layer.to(tl.int64) * layer_stride_o
    offs_m, offs_n, _ = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    out_offsets = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on

    if LOAD_PRED:
        pred = tl.load(pred_ptr + out_offsets, mask=mask, other=0.0).to(ACC)
    else:
        pred = matmul_tile(
            a_ptr, w_ptr, offs_m, offs_n, M, N, K, stride_am, stride_ak, stride_wk, stride_wn,
            noise_seed, noise_offset, noise_std, ACT_IN, NOISE, ACC, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        if HAS_BIAS:
            pred += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
        if STORE_PRED:
            tl.store(pred_ptr + out_offsets, pred.to(pred_ptr.dtype.element_ty), mask=mask)

    if EPILOGUE == 0:
        out = phi(pred, ACT_OUT)
    elif EPILOGUE == 1:
        out = tl.load(z_ptr + out_offsets, mask=mask, other=0.0).to(ACC) - pred
    elif EPILOGUE == 2:
        y = tl.load(target_ptr + offs_m[:, None] * stride_tm + offs_n[None, :] * stride_tn, mask=mask, other=0.0)
        out = as_acc(scale, ACC) * (y.to(ACC) - pred)
        if ADD_PRED:
            out += pred
    else:
        # Whole rows: a numerically safe softmax over the valid columns.
        logits = tl.where(mask_n[None, :], pred, -float("inf"))
        row_max = tl.max(logits, axis=1)
        row_max = tl.where(mask_m, row_max, 0.0)
        e = tl.exp(logits - row_max[:, None])
        e = tl.where(mask_n[None, :], e, 0.0)
        softmax = e / tl.sum(e, axis=1)[:, None]
        labels = tl.load(target_ptr + offs_m * stride_tm, mask=mask_m, other=-1)
        onehot = tl.where(offs_n[None, :] == labels[:, None], 1.0, 0.0).to(ACC)
        out = as_acc(scale, ACC) * (onehot - softmax)
        if ADD_PRED:
            out += pred
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ce_error_kernel(
    # logits f (M, N), int64 labels (M,), output (M, N)
    f_ptr, labels_ptr, out_ptr,
    # sizes and strides; f and out share strides
    M, N, stride_m, stride_n, stride_label,
    # scalars
    scale: tl.float64,
    # meta-parameters
    ADD_PRED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out = ADD_PRED·f + scale·(onehot(y) − softmax(f)) row by row, for rows wider than one tile:
    one pass for the running max and normaliser (online softmax), one to write."""
    ACC: tl.constexpr = tl.float64 if f_ptr.dtype.element_ty == tl.float64 else tl.float32
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    row_max = tl.full((BLOCK_M,), -float("inf"), ACC)
    row_sum = tl.zeros((BLOCK_M,), ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + cols
        mask = mask_m[:, None] & (offs_n < N)[None, :]
        f = tl.load(f_ptr + offs_m[:, None] * stride_m + offs_n[None, :] * stride_n, mask=mask, other=-float("inf"))
        f = f.to(ACC)
        new_max = tl.maximum(row_max, tl.max(f, axis=1))
        new_max = tl.where(mask_m, new_max, 0.0)
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(f - new_max[:, None]), axis=1)
        row_max = new_max
    row_sum = tl.where(mask_m, row_sum, 1.0)
    labels = tl.load(labels_ptr + offs_m * stride_label, mask=mask_m, other=-1)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + cols
        mask = mask_m[:, None] & (offs_n < N)[None, :]
        offsets = offs_m[:, None] * stride_m + offs_n[None, :] * stride_n
        f = tl.load(f_ptr + offsets, mask=mask, other=0.0).to(ACC)
        softmax = tl.exp(f - row_max[:, None]) / row_sum[:, None]
        onehot = tl.where(offs_n[None, :] == labels[:, None], 1.0, 0.0).to(ACC)
        out = as_acc(scale, ACC) * (onehot - softmax)
        if ADD_PRED:
            out += f
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pc_update_kernel(
    # GEMM operands: td = ε_{l+1} W_{l+1}; ε_{l+1} is (M, K), W_{l+1} is (K, N)
    e_next_ptr, w_next_ptr,
    # state of layer l, (M, N), updated in place; u: feedforward pre-activation (FPA's φ');
    # e_out: where ε_l + step goes (e_ptr itself, or the other buffer of a stacked FPA step)
    z_ptr, e_ptr, u_ptr, e_out_ptr,
    # STACKED: int64 element offsets of layer g's W_{l+1} from w_next_ptr
    w_table_ptr,
    # sizes
    M, N, K,
    # strides; z, ε, u and e_out share (stride_zm, stride_zn); STACKED: layer stride of all five
    stride_em, stride_ek, stride_wk, stride_wn, stride_zm, stride_zn, layer_stride,
    # scalars: coefficient = κ γ_{l+1} / γ_l, kappa = κ
    coefficient: tl.float64, kappa: tl.float64,
    # meta-parameters
    ACT: tl.constexpr, FPA: tl.constexpr, UPDATE_ERROR: tl.constexpr, STACKED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """z_l ← z_l − (κ/γ_l) ∂F/∂z_l, i.e.

        step = κ (γ_{l+1}/γ_l) φ'(s) ⊙ (ε_{l+1} W_{l+1}) − κ ε_l,   s = u_l (FPA) or z_l
        z_l += step;   e_out = ε_l + step  (UPDATE_ERROR: FPA, or the sequential sweep, where layer
                                           l's prediction does not depend on z_l)

    STACKED: grid axis 1 runs over G consecutive layers of equal width in one launch (a Jacobi
    step): layer g's state sits at ``g·layer_stride`` from z, ε, u, e_out and ε_{l+1} at the same
    distance from e_next; W_{l+1} comes from the offset table.
    """
    ACC: tl.constexpr = tl.float64 if w_next_ptr.dtype.element_ty == tl.float64 else tl.float32
    if STACKED:
        layer = tl.program_id(1)
        w_next_ptr += tl.load(w_table_ptr + layer)
        shift = layer.to(tl.int64) * layer_stride
        e_next_ptr += shift
        z_ptr += shift
        e_ptr += shift
        u_ptr += shift
        e_out_ptr += shift
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
    tl.store(z_ptr + offsets, (z + step).to(z_ptr.dtype.element_ty), mask=mask)
    if UPDATE_ERROR:
        tl.store(e_out_ptr + offsets, (e + step).to(e_out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pc_weight_grad_kernel(
    # δ source: ε (PC), or the target t with the pre-activation u (TP); a: presynaptic activity
    e_ptr, u_ptr, a_ptr,
    # outputs: weight gradient (N, K), bias gradient (N,); LOSS: Σ_m (t − φ_E(u))² per row n of W
    grad_w_ptr, grad_b_ptr, sq_ptr,
    # SGD: W and b, their momentum buffers, where the new values go (all with g_W's / g_b's strides),
    # and the layer's float64 row (weight_lr, bias_lr, momentum, dampening, weight_decay)
    w_ptr, w_buf_ptr, new_w_ptr, new_w_buf_ptr, b_ptr, b_buf_ptr, new_b_ptr, new_b_buf_ptr, hyper_ptr,
    # sizes: ε and u are (M, N), a is (M, K); the reduction runs over the batch M
    M, N, K,
    # strides; u shares ε's; STACKED: layer strides of ε/u, a, g_W and g_b
    stride_em, stride_en, stride_am, stride_ak, stride_gn, stride_gk,
    layer_stride_e, layer_stride_a, layer_stride_gw, layer_stride_gb,
    # NOISE on t (see matmul_tile; t is (M, N), element (m, n) at counter noise_offset + m N + n)
    noise_seed, noise_offset,
    # scalars
    scale: tl.float64, noise_std: tl.float64,
    # meta-parameters
    ACT_A: tl.constexpr, ACT_E: tl.constexpr, HAS_BIAS: tl.constexpr, DELTA_FROM_TARGET: tl.constexpr,
    STACKED: tl.constexpr, NOISE: tl.constexpr, LOSS: tl.constexpr, SGD: tl.constexpr, MOMENTUM: tl.constexpr,
    HAS_BUFFER: tl.constexpr, NESTEROV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr,
):
    """g_W[n, k] = scale · Σ_m δ[m, n] φ_A(a[m, k]),   g_b[n] = scale · Σ_m δ[m, n]   (one pass), with

        δ = ε                          (PC: scale = −γ_l / B)
        δ = (t − φ_E(u)) ⊙ φ_E'(u)     (DELTA_FROM_TARGET, TP local loss: scale = −1 / B)

    and, for DELTA_FROM_TARGET, t ← t + noise_std·ξ on load with NOISE (the DTP feedback loss, whose
    target is the noisy input h + ξ), and with LOSS the first column tile also stores
    ``sq[n] = Σ_m (t − φ_E(u))²[m, n]`` (the reconstruction loss, summed deterministically outside).
    STACKED: grid axis 1 runs over G layers of equal shape (PC's equal-width hidden layers).
    SGD: the same pass applies ``pcfast.sgd``'s rule to W (and b) out of place: new W, new momentum
    buffer (MOMENTUM; HAS_BUFFER: one exists, else it starts as d), Nesterov.
    """
    ACC: tl.constexpr = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    if STACKED:
        layer = tl.program_id(1).to(tl.int64)
        e_ptr += layer * layer_stride_e
        u_ptr += layer * layer_stride_e
        a_ptr += layer * layer_stride_a
        grad_w_ptr += layer * layer_stride_gw
        grad_b_ptr += layer * layer_stride_gb
    offs_n, offs_k, pid_k = tile_offsets(N, K, BLOCK_N, BLOCK_K, GROUP_M)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    mask_n = offs_n < N
    mask_k = offs_k < K
    # Rows of W past N and columns past K wrap (in-bounds loads; the store is masked); the batch is masked.
    e_ptrs = e_ptr + (offs_n % N)[:, None] * stride_en + offs_m[None, :] * stride_em
    u_ptrs = u_ptr + (offs_n % N)[:, None] * stride_en + offs_m[None, :] * stride_em
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + (offs_k % K)[None, :] * stride_ak
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    bias_acc = tl.zeros((BLOCK_N,), dtype=ACC)
    sq_acc = tl.zeros((BLOCK_N,), dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        mask_m = offs_m < M - m0
        delta = tl.load(e_ptrs, mask=mask_m[None, :], other=0.0)  # δᵀ tile (BLOCK_N, BLOCK_M)
        if DELTA_FROM_TARGET:
            u = tl.load(u_ptrs, mask=mask_m[None, :], other=0.0).to(ACC)
            t = delta.to(ACC)
            if NOISE:
                counter = noise_offset + (m0 + offs_m)[None, :] * N + (offs_n % N)[:, None]
                t += as_acc(noise_std, ACC) * gaussian(noise_seed, counter, ACC)
            residual = tl.where(mask_m[None, :], t - phi(u, ACT_E), 0.0)
            if LOSS:
                sq_acc += tl.sum(residual * residual, axis=1)
            delta = (residual * phi_grad(u, ACT_E)).to(e_ptr.dtype.element_ty)
        a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
        if ACT_A != 0:
            a = phi(a.to(ACC), ACT_A).to(a_ptr.dtype.element_ty)
        acc = tl.dot(delta, a, acc, input_precision=INPUT_PRECISION, out_dtype=ACC)
        if HAS_BIAS:
            bias_acc += tl.sum(delta.to(ACC), axis=1)
        e_ptrs += BLOCK_M * stride_em
        u_ptrs += BLOCK_M * stride_em
        a_ptrs += BLOCK_M * stride_am
    s = as_acc(scale, ACC)
    mask = mask_n[:, None] & mask_k[None, :]
    offsets = offs_n[:, None] * stride_gn + offs_k[None, :] * stride_gk
    grad = s * acc
    tl.store(grad_w_ptr + offsets, grad.to(grad_w_ptr.dtype.element_ty), mask=mask)
    if SGD:
        _sgd_store(grad, offsets, mask, w_ptr, w_buf_ptr, new_w_ptr, new_w_buf_ptr, hyper_ptr, 0,
                   ACC, MOMENTUM, HAS_BUFFER, NESTEROV)
    if HAS_BIAS:  # noqa: SIM102 - a constexpr test, then a runtime one: they do not combine in Triton
        # Every column tile computes the row sums; the first stores them.
        if pid_k == 0:
            grad_b = s * bias_acc
            tl.store(grad_b_ptr + offs_n, grad_b.to(grad_b_ptr.dtype.element_ty), mask=mask_n)
            if SGD:
                _sgd_store(grad_b, offs_n, mask_n, b_ptr, b_buf_ptr, new_b_ptr, new_b_buf_ptr, hyper_ptr, 1,
                           ACC, MOMENTUM, HAS_BUFFER, NESTEROV)
    if LOSS:  # noqa: SIM102
        if pid_k == 0:
            tl.store(sq_ptr + offs_n, sq_acc.to(sq_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _sgd_store(grad, offsets, mask, p_ptr, buf_ptr, new_p_ptr, new_buf_ptr, hyper_ptr, LR_COLUMN: tl.constexpr,
               ACC: tl.constexpr, MOMENTUM: tl.constexpr, HAS_BUFFER: tl.constexpr, NESTEROV: tl.constexpr):
    """``pcfast.sgd.sgd_update`` on one tile: store the new parameter (and momentum buffer)."""
    lr = tl.load(hyper_ptr + LR_COLUMN).to(ACC)
    decay = tl.load(hyper_ptr + 4).to(ACC)
    p = tl.load(p_ptr + offsets, mask=mask, other=0.0).to(ACC)
    d = grad + decay * p
    if MOMENTUM:
        momentum = tl.load(hyper_ptr + 2).to(ACC)
        if HAS_BUFFER:
            dampening = tl.load(hyper_ptr + 3).to(ACC)
            buf = momentum * tl.load(buf_ptr + offsets, mask=mask, other=0.0).to(ACC) + (1.0 - dampening) * d
        else:
            buf = d
        tl.store(new_buf_ptr + offsets, buf.to(new_buf_ptr.dtype.element_ty), mask=mask)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    new = p - lr * d
    tl.store(new_p_ptr + offsets, new.to(new_p_ptr.dtype.element_ty), mask=mask)


_TILE_KEY = ["M", "N", "K"]

_pc_error_kernel_tuned = triton.autotune(
    configs=gemm_configs(),
    key=_TILE_KEY + ["ACT_IN", "ACT_OUT", "HAS_BIAS", "EPILOGUE", "ADD_PRED", "STORE_PRED", "LOAD_PRED", "STACKED",
                     "NOISE", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_tile_configs},
)(_pc_error_kernel)

_pc_update_kernel_tuned = triton.autotune(
    configs=gemm_configs(),
    key=_TILE_KEY + ["ACT", "FPA", "UPDATE_ERROR", "STACKED", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_tile_configs},
    restore_value=["z_ptr", "e_ptr", "e_out_ptr"],  # benchmarking must not advance the state
)(_pc_update_kernel)

_pc_weight_grad_kernel_tuned = triton.autotune(
    configs=grad_configs(),
    key=_TILE_KEY + ["ACT_A", "ACT_E", "HAS_BIAS", "DELTA_FROM_TARGET", "STACKED", "NOISE", "LOSS", "SGD", "MOMENTUM",
                     "HAS_BUFFER", "NESTEROV", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_grad_configs},
)(_pc_weight_grad_kernel)


def ce_fused_config(classes: int) -> dict:
    """Meta-parameters of the one-tile CE epilogue: BLOCK_N covers the row; the tile gets shorter
    as the row gets wider so the accumulator stays in registers."""
    block_n = max(16, triton.next_power_of_2(classes))
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=block_n, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=1)
    block_m = 64 if block_n <= 64 else 32 if block_n <= 128 else 16
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)


def ce_error_config() -> dict:
    """Meta-parameters of the row-wise CE kernel."""
    return dict(BLOCK_M=16, BLOCK_N=128, num_warps=4)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _tiles(meta: dict, rows: int, cols: int, row_block: str = "BLOCK_M", col_block: str = "BLOCK_N") -> tuple[int]:
    return (triton.cdiv(rows, meta[row_block]) * triton.cdiv(cols, meta[col_block]),)


def _check_matrix(name: str, t: Tensor, shape: tuple[int, int], dtype: torch.dtype | None = None) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {t.dtype}")


def _check_update(latent: Tensor, fpa: bool, preactivation: Tensor | None, error_out: Tensor | None,
                  stacked: bool = False) -> None:
    check = _check_stack if stacked else _check_state
    if fpa:
        if preactivation is None:
            raise ValueError("preactivation: FPA takes φ' at the feedforward u_l")
        check("preactivation", preactivation, latent)
    if error_out is not None:
        check("error_out", error_out, latent)


def _check_state(name: str, t: Tensor, like: Tensor) -> None:
    """Epilogue tensors share one pair of strides: they must match ``like`` exactly."""
    if t.shape != like.shape or t.stride() != like.stride() or t.dtype != like.dtype:
        raise ValueError(f"{name}: expected shape {tuple(like.shape)}, strides {like.stride()}, dtype "
                         f"{like.dtype}; got {tuple(t.shape)}, {t.stride()}, {t.dtype}")


def prediction_error(
    a: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    act_in: str = "identity",
    epilogue: int = EPILOGUE_AFFINE,
    out: Tensor | None = None,
    pred: Tensor | None = None,
    latent: Tensor | None = None,
    target: Tensor | None = None,
    act_out: str = "identity",
    scale: float = 1.0,
    add_pred: bool = False,
    load_pred: bool = False,
    noise: Noise | None = None,
) -> Tensor:
    """Launch ``_pc_error_kernel``: ``pred = φ_in(a) Wᵀ + b`` with one of the epilogues (see the
    kernel); ``pred`` is stored when given (or read, with ``load_pred``); with ``noise``, ``a`` is
    read as ``a + noise.std · ξ`` (ξ from ``noise.seed`` at ``noise.offset``). Returns ``out``."""
    batch, features = a.shape
    classes = weight.shape[0]
    _check_matrix("weight", weight, (classes, features), a.dtype)
    if out is None:
        out = torch.empty(batch, classes, dtype=a.dtype, device=a.device)
    _check_matrix("out", out, (batch, classes), a.dtype)
    for name, t in (("pred", pred), ("latent", latent)):
        if t is not None:
            _check_state(name, t, out)
    if bias is not None:
        _check_matrix("bias", bias.view(1, -1), (1, classes), a.dtype)
    if epilogue == EPILOGUE_HIDDEN_ERROR and latent is None:
        raise ValueError("latent: the hidden-error epilogue needs z")
    if load_pred and pred is None:
        raise ValueError("pred: load_pred needs the stored prediction")
    if epilogue in (EPILOGUE_MSE, EPILOGUE_CE) and target is None:
        raise ValueError("target: the output-error epilogue needs the target")
    if epilogue == EPILOGUE_MSE:
        _check_matrix("target", target, (batch, classes))
        stride_tm, stride_tn = target.stride()
    elif epilogue == EPILOGUE_CE:
        if target.shape != (batch,) or target.dtype != torch.int64:
            raise ValueError(f"target: expected int64 labels of shape ({batch},), got {target.dtype} {tuple(target.shape)}")
        stride_tm, stride_tn = target.stride(0), 0
    else:
        stride_tm = stride_tn = 0

    if noise is not None and (epilogue == EPILOGUE_CE or load_pred):
        raise ValueError("noise: supported on the GEMM operand of the affine and error epilogues, not CE or load_pred")
    if epilogue == EPILOGUE_CE and classes > CE_FUSED_MAX_CLASSES:
        # The row spans several tiles: store the logits, then the row-wise kernel.
        logits = pred if pred is not None else torch.empty_like(out)
        if not load_pred:
            prediction_error(a, weight, bias, act_in=act_in, out=logits)
        meta = ce_error_config()
        _ce_error_kernel[(triton.cdiv(batch, meta["BLOCK_M"]),)](
            logits, target, out, batch, classes, out.stride(0), out.stride(1), target.stride(0),
            float(scale), ADD_PRED=add_pred, **meta,
        )
        return out

    dummy = out  # never read: its flag is off
    noise = noise or _NO_NOISE
    args = (
        a, weight, bias if bias is not None else dummy,
        latent if latent is not None else dummy, target if target is not None else dummy,
        pred if pred is not None else dummy, out, out, out,
        batch, classes, features,
        a.stride(0), a.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        stride_tm, stride_tn, 0, 0, noise.seed, noise.offset,
        float(scale), noise.std,
    )
    flags = dict(
        ACT_IN=activation_code(act_in), ACT_OUT=activation_code(act_out), HAS_BIAS=bias is not None,
        EPILOGUE=epilogue, ADD_PRED=add_pred, STORE_PRED=pred is not None and not load_pred,
        LOAD_PRED=load_pred, STACKED=False, NOISE=noise is not _NO_NOISE, INPUT_PRECISION=input_precision(a),
    )
    if epilogue == EPILOGUE_CE:
        meta = ce_fused_config(classes)
        _pc_error_kernel[(triton.cdiv(batch, meta["BLOCK_M"]),)](*args, **flags, **meta)
    else:
        _pc_error_kernel_tuned[lambda meta: _tiles(meta, batch, classes)](*args, **flags)
    return out


def latent_update(
    latent: Tensor,
    error: Tensor,
    error_next: Tensor,
    weight_next: Tensor,
    *,
    act: str,
    coefficient: float,
    kappa: float,
    fpa: bool,
    update_error: bool,
    preactivation: Tensor | None = None,
    error_out: Tensor | None = None,
) -> None:
    """Launch ``_pc_update_kernel``: one relaxation step of ``latent`` (and ``error``) in place.
    ``preactivation`` (u_l) supplies φ' under FPA; ``error_out`` receives ε_l + step instead of
    ``error`` (a stacked FPA step reads the old errors of every layer while writing the new)."""
    batch, width = latent.shape
    _check_state("error", error, latent)
    _check_matrix("weight_next", weight_next, (error_next.shape[1], width), latent.dtype)
    _check_matrix("error_next", error_next, (batch, weight_next.shape[0]), latent.dtype)
    _check_update(latent, fpa, preactivation, error_out)
    _pc_update_kernel_tuned[lambda meta: _tiles(meta, batch, width)](
        error_next, weight_next, latent, error, preactivation if fpa else latent,
        error if error_out is None else error_out, latent,
        batch, width, weight_next.shape[0],
        error_next.stride(0), error_next.stride(1), weight_next.stride(0), weight_next.stride(1),
        latent.stride(0), latent.stride(1), 0,
        float(coefficient), float(kappa),
        ACT=activation_code(act), FPA=fpa, UPDATE_ERROR=update_error, STACKED=False,
        INPUT_PRECISION=input_precision(latent),
    )


def weight_grad(
    delta_source: Tensor,
    a: Tensor,
    *,
    scale: float,
    act_in: str = "identity",
    has_bias: bool = True,
    preactivation: Tensor | None = None,
    act_delta: str = "identity",
    grad_weight: Tensor | None = None,
    grad_bias: Tensor | None = None,
    noise: Noise | None = None,
    squares: Tensor | None = None,
    sgd: FusedSGD | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Launch ``_pc_weight_grad_kernel``: ``scale · δᵀ φ_in(a)`` and ``scale · Σ_m δ``.

    ``δ`` is ``delta_source`` (PC's ε), or with ``preactivation`` u the TP local-loss delta
    ``(t − φ(u)) ⊙ φ'(u)`` where ``delta_source`` is the target t — read as ``t + noise.std · ξ``
    with ``noise``; ``squares`` (shape (rows,)) then receives ``Σ_m (t − φ(u))²`` per column of δ.
    With ``sgd`` the same pass also writes the SGD step's new parameters and buffers into it."""
    batch, rows = delta_source.shape
    cols = a.shape[1]
    _check_matrix("a", a, (batch, cols), delta_source.dtype)
    if preactivation is not None:
        _check_state("preactivation", preactivation, delta_source)
    elif noise is not None or squares is not None:
        raise ValueError("noise, squares: only with a target and its preactivation (the TP delta)")
    if grad_weight is None:
        grad_weight = torch.empty(rows, cols, dtype=a.dtype, device=a.device)
    _check_matrix("grad_weight", grad_weight, (rows, cols), a.dtype)
    if has_bias and grad_bias is None:
        grad_bias = torch.empty(rows, dtype=a.dtype, device=a.device)
    if squares is not None:
        _check_matrix("squares", squares.view(1, -1), (1, rows), a.dtype)
    if sgd is not None:
        sgd.prepare(grad_weight, grad_bias)
    noise = noise or _NO_NOISE
    g = grad_weight  # stands in for every pointer whose flag is off
    _pc_weight_grad_kernel_tuned[lambda meta: _tiles(meta, rows, cols, "BLOCK_N", "BLOCK_K")](
        delta_source, preactivation if preactivation is not None else delta_source, a,
        grad_weight, grad_bias if has_bias else g, g if squares is None else squares,
        *(sgd.pointers(g) if sgd is not None else (g,) * 9),
        batch, rows, cols,
        delta_source.stride(0), delta_source.stride(1), a.stride(0), a.stride(1),
        grad_weight.stride(0), grad_weight.stride(1), 0, 0, 0, 0, noise.seed, noise.offset,
        float(scale), noise.std,
        ACT_A=activation_code(act_in), ACT_E=activation_code(act_delta), HAS_BIAS=has_bias,
        DELTA_FROM_TARGET=preactivation is not None, STACKED=False, NOISE=noise is not _NO_NOISE,
        LOSS=squares is not None, SGD=sgd is not None, MOMENTUM=sgd is not None and sgd.momentum,
        HAS_BUFFER=sgd is not None and sgd.weight_buffer is not None, NESTEROV=sgd is not None and sgd.nesterov,
        INPUT_PRECISION=input_precision(a),
    )
    return grad_weight, grad_bias if has_bias else None


@dataclass
class FusedSGD:
    """The SGD step ``weight_grad`` applies in its pass (``pcfast.sgd``'s rule), out of place.

    In: the parameters, their momentum buffers (None on the first step) and ``hyper``, the layer's
    float64 row of ``pcfast.sgd.HYPER_COLUMNS`` on the device (read by the kernel, so a CUDA graph
    replays with new rates). Out, set by ``weight_grad``: ``new_weight``, ``new_bias`` and the new
    buffers (with ``momentum``)."""

    weight: Tensor
    bias: Tensor | None
    hyper: Tensor
    momentum: bool
    nesterov: bool = False
    weight_buffer: Tensor | None = None
    bias_buffer: Tensor | None = None
    new_weight: Tensor | None = None
    new_bias: Tensor | None = None
    new_weight_buffer: Tensor | None = None
    new_bias_buffer: Tensor | None = None

    def prepare(self, grad_weight: Tensor, grad_bias: Tensor | None) -> None:
        """Check the inputs against the gradients' layout and allocate the outputs."""
        for name, t, like in (("weight", self.weight, grad_weight), ("weight_buffer", self.weight_buffer, grad_weight),
                              ("bias", self.bias, grad_bias), ("bias_buffer", self.bias_buffer, grad_bias)):
            if t is not None and (like is None or t.shape != like.shape or t.stride() != like.stride() or t.dtype != like.dtype):
                raise ValueError(f"{name}: the fused SGD step needs the gradient's shape, strides and dtype")
        if (self.bias is None) != (grad_bias is None):
            raise ValueError("bias: give it exactly when the layer has one")
        if self.bias is not None and (self.weight_buffer is None) != (self.bias_buffer is None):
            raise ValueError("weight_buffer, bias_buffer: give both or neither")
        if not self.momentum and (self.weight_buffer is not None or self.bias_buffer is not None):
            raise ValueError("weight_buffer, bias_buffer: momentum buffers without momentum")
        if self.hyper.dtype != torch.float64 or self.hyper.numel() != 5 or self.hyper.device != grad_weight.device:
            raise ValueError("hyper: expected 5 float64 values on the gradients' device")
        self.new_weight = torch.empty_like(grad_weight)
        self.new_bias = None if grad_bias is None else torch.empty_like(grad_bias)
        self.new_weight_buffer = torch.empty_like(grad_weight) if self.momentum else None
        self.new_bias_buffer = torch.empty_like(grad_bias) if self.momentum and grad_bias is not None else None

    def pointers(self, dummy: Tensor) -> tuple[Tensor, ...]:
        def either(t):
            return dummy if t is None else t

        return (self.weight, either(self.weight_buffer), self.new_weight, either(self.new_weight_buffer),
                either(self.bias), either(self.bias_buffer), either(self.new_bias), either(self.new_bias_buffer),
                self.hyper)


# ---------------------------------------------------------------------------------------------
# Stacked launchers: G equal-width hidden layers in one launch (grid axis 1)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerTable:
    """Separate, equally shaped tensors (a model's parameters) addressed as one stack: the first
    tensor, and the int64 element offsets of every tensor from it, on the tensors' device."""

    base: Tensor
    offsets: Tensor

    @staticmethod
    def of(tensors: list[Tensor]) -> LayerTable | None:
        """The table of ``tensors``, or None when they differ in shape, strides, dtype or device."""
        base = tensors[0]
        size = base.element_size()
        offsets = []
        for t in tensors:
            if (t.shape, t.stride(), t.dtype, t.device) != (base.shape, base.stride(), base.dtype, base.device):
                return None
            distance = t.data_ptr() - base.data_ptr()
            if distance % size:
                return None
            offsets.append(distance // size)
        return LayerTable(base, torch.tensor(offsets, dtype=torch.int64, device=base.device))


def _check_stack(name: str, t: Tensor, like: Tensor) -> None:
    """Stacked state tensors share shape, strides (including the layer stride) and dtype."""
    if t.shape != like.shape or t.stride() != like.stride() or t.dtype != like.dtype:
        raise ValueError(f"{name}: expected shape {tuple(like.shape)}, strides {like.stride()}, dtype "
                         f"{like.dtype}; got {tuple(t.shape)}, {t.stride()}, {t.dtype}")


def stacked_hidden_error(
    inputs: Tensor, latents: Tensor, out: Tensor, weights: LayerTable, biases: LayerTable | None, *, act_in: str,
) -> Tensor:
    """ε_g = z_g − (φ_in(a_g) W_gᵀ + b_g) for G layers in one launch: ``inputs`` (G, B, K),
    ``latents`` and ``out`` (G, B, N), W_g (N, K) and b_g from the tables."""
    layers, batch, features = inputs.shape
    classes = weights.base.shape[0]
    _check_matrix("weight", weights.base, (classes, features), inputs.dtype)
    if weights.offsets.numel() != layers or (biases is not None and biases.offsets.numel() != layers):
        raise ValueError(f"weights, biases: expected tables of {layers} layers")
    _check_stack("out", out, latents)
    if tuple(latents.shape) != (layers, batch, classes):
        raise ValueError(f"latents: expected shape {(layers, batch, classes)}, got {tuple(latents.shape)}")
    bias = biases.base if biases is not None else out
    _pc_error_kernel_tuned[lambda meta: (_tiles(meta, batch, classes)[0], layers)](
        inputs, weights.base, bias, latents, out, out, out, weights.offsets,
        biases.offsets if biases is not None else weights.offsets,
        batch, classes, features,
        inputs.stride(1), inputs.stride(2), weights.base.stride(0), weights.base.stride(1), out.stride(1), out.stride(2),
        0, 0, inputs.stride(0), out.stride(0), 0, 0,
        1.0, 0.0,
        ACT_IN=activation_code(act_in), ACT_OUT=0, HAS_BIAS=biases is not None, EPILOGUE=EPILOGUE_HIDDEN_ERROR,
        ADD_PRED=False, STORE_PRED=False, LOAD_PRED=False, STACKED=True, NOISE=False,
        INPUT_PRECISION=input_precision(inputs),
    )
    return out


def stacked_latent_update(
    latents: Tensor,
    errors: Tensor,
    errors_next: Tensor,
    weights_next: LayerTable,
    *,
    act: str,
    coefficient: float,
    kappa: float,
    fpa: bool,
    update_error: bool,
    preactivations: Tensor | None = None,
    errors_out: Tensor | None = None,
) -> None:
    """One Jacobi relaxation step of G equal-width layers in one launch (see ``latent_update``):
    ``latents``, ``errors``, ``errors_next``, ``preactivations``, ``errors_out`` are (G, B, N) with
    one layout; W_{l+1} (N, N) from the table. Every layer reads ``errors`` before any writes
    ``errors_out``, so with ``update_error`` the two must be different buffers."""
    layers, batch, width = latents.shape
    _check_matrix("weight_next", weights_next.base, (width, width), latents.dtype)
    if weights_next.offsets.numel() != layers:
        raise ValueError(f"weights_next: expected a table of {layers} layers")
    _check_stack("errors", errors, latents)
    _check_stack("errors_next", errors_next, latents)
    _check_update(latents, fpa, preactivations, errors_out, stacked=True)
    if update_error and (errors_out is None or errors_out.data_ptr() == errors.data_ptr()):
        raise ValueError("errors_out: a stacked step that moves the errors writes them to another buffer")
    _pc_update_kernel_tuned[lambda meta: (_tiles(meta, batch, width)[0], layers)](
        errors_next, weights_next.base, latents, errors, preactivations if fpa else latents,
        errors if errors_out is None else errors_out, weights_next.offsets,
        batch, width, width,
        errors_next.stride(1), errors_next.stride(2), weights_next.base.stride(0), weights_next.base.stride(1),
        latents.stride(1), latents.stride(2), latents.stride(0),
        float(coefficient), float(kappa),
        ACT=activation_code(act), FPA=fpa, UPDATE_ERROR=update_error, STACKED=True,
        INPUT_PRECISION=input_precision(latents),
    )


def stacked_weight_grad(
    errors: Tensor, inputs: Tensor, *, scale: float, act_in: str, has_bias: bool,
    preactivations: Tensor | None = None, act_delta: str = "identity",
) -> tuple[Tensor, Tensor | None]:
    """``scale · δ_gᵀ φ_in(a_g)`` and ``scale · Σ_m δ_g`` for G layers in one launch: δ = ``errors``
    (PC's ε), or with ``preactivations`` u the TP delta ``(t − φ(u)) ⊙ φ'(u)`` where ``errors`` holds
    the targets t; ``errors`` and ``preactivations`` (G, B, N) with one layout, ``inputs`` (G, B, K);
    returns (G, N, K) and (G, N) gradients."""
    layers, batch, rows = errors.shape
    cols = inputs.shape[2]
    if tuple(inputs.shape[:2]) != (layers, batch) or inputs.dtype != errors.dtype:
        raise ValueError(f"inputs: expected shape ({layers}, {batch}, K) and dtype {errors.dtype}, "
                         f"got {tuple(inputs.shape)} {inputs.dtype}")
    if preactivations is not None:
        _check_stack("preactivations", preactivations, errors)
    grad_weight = torch.empty(layers, rows, cols, dtype=errors.dtype, device=errors.device)
    grad_bias = torch.empty(layers, rows, dtype=errors.dtype, device=errors.device) if has_bias else None
    _pc_weight_grad_kernel_tuned[lambda meta: (_tiles(meta, rows, cols, "BLOCK_N", "BLOCK_K")[0], layers)](
        errors, errors if preactivations is None else preactivations, inputs, grad_weight,
        grad_bias if has_bias else grad_weight, grad_weight, *(grad_weight,) * 9,
        batch, rows, cols,
        errors.stride(1), errors.stride(2), inputs.stride(1), inputs.stride(2), grad_weight.stride(1),
        grad_weight.stride(2), errors.stride(0), inputs.stride(0), grad_weight.stride(0),
        grad_bias.stride(0) if has_bias else 0, 0, 0,
        float(scale), 0.0,
        ACT_A=activation_code(act_in), ACT_E=activation_code(act_delta), HAS_BIAS=has_bias,
        DELTA_FROM_TARGET=preactivations is not None, STACKED=True,
        NOISE=False, LOSS=False, SGD=False, MOMENTUM=False, HAS_BUFFER=False, NESTEROV=False,
        INPUT_PRECISION=input_precision(inputs),
    )
    return grad_weight, grad_bias
