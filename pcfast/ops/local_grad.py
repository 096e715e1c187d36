"""Triton kernels of the local weight and bias gradients (DESIGN §3, §4, §6): one GEMM per layer
``g_W = scale · δᵀ φ(a)`` reducing over the batch, with the bias row sums ``g_b = scale · Σ_m δ``
in the same pass. Two variants, by how δ is formed:

- ``_pc_weight_grad_kernel``: PC's ``δ = ε`` with φ applied to the presynaptic latent on load
  (``scale = −γ_l / B``);
- ``_tp_weight_grad_kernel``: TP's local-loss ``δ = (t − φ(u)) ⊙ φ'(u)`` formed on load from the
  target t and the pre-activation u (``scale = −1 / B``); for DTP's feedback loss the target may be
  read with noise drawn in the kernel, ``t + σ ξ``, and the squared residuals summed per column.

Both have a stacked form (grid axis 1 over equal-shape layers whose state lives in (G, B, ·)
buffers). Gradients are written contiguous. The launchers take (G, B, ·) stacks; the 2-D functions
are the one-layer case.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import NO_NOISE, Noise, activation_code, as_acc, check_matrix, check_same_layout, gaussian
from ._triton_common import grad_configs, input_precision, phi, phi_grad, prune_grad_configs, tile_offsets, tiles


@triton.jit
def _store_grads(acc, bias_acc, grad_w_ptr, grad_b_ptr, offs_n, offs_k, pid_k, N, K, scale,
                 ACC: tl.constexpr, HAS_BIAS: tl.constexpr, STACKED: tl.constexpr):
    """g_W = scale·acc into the contiguous (N, K) tile; the first column tile also stores g_b.
    STACKED: layer ``program_id(1)``'s gradients, of the (G, N, K) and (G, N) outputs."""
    if STACKED:
        layer = tl.program_id(1).to(tl.int64)
        grad_w_ptr += layer * N * K
        if HAS_BIAS:
            grad_b_ptr += layer * N
    s = as_acc(scale, ACC)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_k < K)[None, :]
    tl.store(grad_w_ptr + offs_n[:, None] * K + offs_k[None, :], (s * acc).to(grad_w_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:  # noqa: SIM102 - a constexpr test, then a runtime one: they do not combine in Triton
        # Every column tile computes the row sums; the first stores them.
        if pid_k == 0:
            tl.store(grad_b_ptr + offs_n, (s * bias_acc).to(grad_b_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _pc_weight_grad_kernel(
    # δ = ε (M, N); a: presynaptic activity before φ (M, K); outputs g_W (N, K) and g_b (N,), contiguous
    e_ptr, a_ptr, grad_w_ptr, grad_b_ptr,
    # sizes (the reduction runs over the batch M) and strides
    M, N, K,
    stride_em, stride_en, stride_am, stride_ak,
    # STACKED: layer strides of ε and a (the gradients are (G, N, K) and (G, N))
    layer_stride_e, layer_stride_a,
    # −γ_l / B
    scale: tl.float64,
    # meta-parameters
    ACT_A: tl.constexpr, HAS_BIAS: tl.constexpr, STACKED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr,
):
    """g_W[n, k] = scale · Σ_m ε[m, n] φ_A(a[m, k]),   g_b[n] = scale · Σ_m ε[m, n]."""
    ACC: tl.constexpr = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    if STACKED:
        layer = tl.program_id(1).to(tl.int64)
        e_ptr += layer * layer_stride_e
        a_ptr += layer * layer_stride_a
    offs_n, offs_k, pid_k = tile_offsets(N, K, BLOCK_N, BLOCK_K, GROUP_M)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    # Rows of W past N and columns past K wrap (in-bounds loads; the store is masked); the batch is masked.
    e_ptrs = e_ptr + (offs_n % N)[:, None] * stride_en + offs_m[None, :] * stride_em
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + (offs_k % K)[None, :] * stride_ak
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    bias_acc = tl.zeros((BLOCK_N,), dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        mask_m = offs_m < M - m0
        delta = tl.load(e_ptrs, mask=mask_m[None, :], other=0.0)  # δᵀ tile (BLOCK_N, BLOCK_M)
        a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
        if ACT_A != 0:  # padded rows give φ(0) ≠ 0 (sigmoid), but meet δ = 0
            a = phi(a.to(ACC), ACT_A).to(a_ptr.dtype.element_ty)
        acc = tl.dot(delta, a, acc, input_precision=INPUT_PRECISION, out_dtype=ACC)
        if HAS_BIAS:
            bias_acc += tl.sum(delta.to(ACC), axis=1)
        e_ptrs += BLOCK_M * stride_em
        a_ptrs += BLOCK_M * stride_am
    _store_grads(acc, bias_acc, grad_w_ptr, grad_b_ptr, offs_n, offs_k, pid_k, N, K, scale, ACC, HAS_BIAS, STACKED)


@triton.jit
def _tp_weight_grad_kernel(
    # target t and pre-activation u, (M, N) sharing strides; a: presynaptic activity (M, K)
    t_ptr, u_ptr, a_ptr,
    # outputs, contiguous: g_W (N, K), g_b (N,); LOSS: sq (N,)
    grad_w_ptr, grad_b_ptr, sq_ptr,
    # sizes (the reduction runs over the batch M) and strides
    M, N, K,
    stride_tm, stride_tn, stride_am, stride_ak,
    # STACKED: layer strides of t/u and a (the gradients are (G, N, K) and (G, N))
    layer_stride_t, layer_stride_a,
    # NOISE on t: element (m, n) at counter noise_offset + m N + n (see matmul_tile)
    noise_seed, noise_offset, noise_std: tl.float64,
    # −1 / B
    scale: tl.float64,
    # meta-parameters
    ACT_E: tl.constexpr, HAS_BIAS: tl.constexpr, STACKED: tl.constexpr, NOISE: tl.constexpr,
    LOSS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr,
):
    """g_W[n, k] = scale · Σ_m δ[m, n] a[m, k],   g_b[n] = scale · Σ_m δ[m, n],   with

        δ = (t̃ − φ_E(u)) ⊙ φ_E'(u),   t̃ = t + noise_std·ξ (NOISE) or t

    and with LOSS ``sq[n] = Σ_m (t̃ − φ_E(u))²[m, n]`` (the reconstruction loss of DTP's feedback
    maps, whose target is the noisy input h + ξ; summed deterministically outside)."""
    ACC: tl.constexpr = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    if STACKED:
        layer = tl.program_id(1).to(tl.int64)
        t_ptr += layer * layer_stride_t
        u_ptr += layer * layer_stride_t
        a_ptr += layer * layer_stride_a
    offs_n, offs_k, pid_k = tile_offsets(N, K, BLOCK_N, BLOCK_K, GROUP_M)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    rows_n = offs_n % N  # rows of W past N and columns past K wrap; the batch is masked
    t_ptrs = t_ptr + rows_n[:, None] * stride_tn + offs_m[None, :] * stride_tm
    u_ptrs = u_ptr + rows_n[:, None] * stride_tn + offs_m[None, :] * stride_tm
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + (offs_k % K)[None, :] * stride_ak
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    bias_acc = tl.zeros((BLOCK_N,), dtype=ACC)
    sq_acc = tl.zeros((BLOCK_N,), dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        mask_m = offs_m < M - m0
        t = tl.load(t_ptrs, mask=mask_m[None, :], other=0.0).to(ACC)  # transposed tiles (BLOCK_N, BLOCK_M)
        u = tl.load(u_ptrs, mask=mask_m[None, :], other=0.0).to(ACC)
        if NOISE:
            counter = noise_offset + (m0 + offs_m)[None, :] * N + rows_n[:, None]
            t += as_acc(noise_std, ACC) * gaussian(noise_seed, counter, ACC)
        residual = tl.where(mask_m[None, :], t - phi(u, ACT_E), 0.0)
        if LOSS:
            sq_acc += tl.sum(residual * residual, axis=1)
        delta = residual * phi_grad(u, ACT_E)
        if HAS_BIAS:
            bias_acc += tl.sum(delta, axis=1)
        a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
        acc = tl.dot(delta.to(a_ptr.dtype.element_ty), a, acc, input_precision=INPUT_PRECISION, out_dtype=ACC)
        t_ptrs += BLOCK_M * stride_tm
        u_ptrs += BLOCK_M * stride_tm
        a_ptrs += BLOCK_M * stride_am
    _store_grads(acc, bias_acc, grad_w_ptr, grad_b_ptr, offs_n, offs_k, pid_k, N, K, scale, ACC, HAS_BIAS, STACKED)
    if LOSS:  # noqa: SIM102
        if pid_k == 0:
            tl.store(sq_ptr + offs_n, sq_acc.to(sq_ptr.dtype.element_ty), mask=offs_n < N)


_GRAD_KEY = ["M", "N", "K", "HAS_BIAS", "STACKED", "INPUT_PRECISION"]
_GRAD_PRUNE = {"early_config_prune": prune_grad_configs}

_pc_weight_grad_kernel_tuned = triton.autotune(
    configs=grad_configs(), key=_GRAD_KEY + ["ACT_A"], prune_configs_by=_GRAD_PRUNE,
)(_pc_weight_grad_kernel)

_tp_weight_grad_kernel_tuned = triton.autotune(
    configs=grad_configs(), key=_GRAD_KEY + ["ACT_E", "NOISE", "LOSS"], prune_configs_by=_GRAD_PRUNE,
)(_tp_weight_grad_kernel)


# ---------------------------------------------------------------------------------------------
# Launchers: (G, B, ·) stacks; G = 1 runs the plain kernel
# ---------------------------------------------------------------------------------------------


def _gradients(delta_like: Tensor, inputs: Tensor, has_bias: bool) -> tuple[Tensor, Tensor | None, int]:
    """Check the (G, B, N) and (G, B, K) operands; allocate the (G, N, K) and (G, N) gradients."""
    layers, batch, rows = delta_like.shape
    if tuple(inputs.shape[:2]) != (layers, batch) or inputs.dtype != delta_like.dtype:
        raise ValueError(f"inputs: expected shape ({layers}, {batch}, K) and dtype {delta_like.dtype}, "
                         f"got {tuple(inputs.shape)} {inputs.dtype}")
    cols = inputs.shape[2]
    grad_weight = torch.empty(layers, rows, cols, dtype=inputs.dtype, device=inputs.device)
    grad_bias = torch.empty(layers, rows, dtype=inputs.dtype, device=inputs.device) if has_bias else None
    return grad_weight, grad_bias, layers


def stacked_pc_weight_grad(errors: Tensor, inputs: Tensor, *, scale: float, act_in: str,
                           has_bias: bool) -> tuple[Tensor, Tensor | None]:
    """``scale · ε_gᵀ φ_in(a_g)`` and ``scale · Σ_m ε_g`` for G layers in one launch: ``errors``
    (G, B, N), ``inputs`` (G, B, K); returns (G, N, K) and (G, N) gradients."""
    return _launch_pc(errors, inputs, scale, act_in, has_bias)


def _launch_pc(errors: Tensor, inputs: Tensor, scale: float, act_in: str, has_bias: bool):
    grad_weight, grad_bias, layers = _gradients(errors, inputs, has_bias)
    _, batch, rows = errors.shape
    cols = inputs.shape[2]
    _pc_weight_grad_kernel_tuned[lambda meta: (tiles(meta, rows, cols, "BLOCK_N", "BLOCK_K")[0], layers)](
        e_ptr=errors, a_ptr=inputs, grad_w_ptr=grad_weight, grad_b_ptr=grad_bias,
        M=batch, N=rows, K=cols,
        stride_em=errors.stride(1), stride_en=errors.stride(2), stride_am=inputs.stride(1),
        stride_ak=inputs.stride(2), layer_stride_e=errors.stride(0), layer_stride_a=inputs.stride(0),
        scale=float(scale),
        ACT_A=activation_code(act_in), HAS_BIAS=has_bias, STACKED=layers > 1, INPUT_PRECISION=input_precision(inputs),
    )
    return grad_weight, grad_bias


def stacked_tp_weight_grad(
    targets: Tensor,
    preactivations: Tensor,
    inputs: Tensor,
    *,
    scale: float,
    act: str,
    has_bias: bool,
    noise: Noise | None = None,
    squares: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``scale · δ_gᵀ a_g`` and ``scale · Σ_m δ_g`` for G layers in one launch, with the TP delta
    ``δ = (t − φ(u)) ⊙ φ'(u)`` formed on load from ``targets`` t and ``preactivations`` u (G, B, N),
    ``inputs`` (G, B, K). One layer only: ``noise`` reads t as ``t + noise.std · ξ``, and ``squares``
    (N,) receives ``Σ_m (t − φ(u))²`` per column of δ. Returns (G, N, K) and (G, N) gradients."""
    return _launch_tp(targets, preactivations, inputs, scale, act, has_bias, noise, squares)


def _launch_tp(targets, preactivations, inputs, scale, act, has_bias, noise, squares):
    check_same_layout("preactivations", preactivations, targets)
    grad_weight, grad_bias, layers = _gradients(targets, inputs, has_bias)
    _, batch, rows = targets.shape
    cols = inputs.shape[2]
    if layers > 1 and (noise is not None or squares is not None):
        raise ValueError("noise, squares: one layer at a time")
    if squares is not None:
        check_matrix("squares", squares.view(1, -1), (1, rows), inputs.dtype)
    noise = noise or NO_NOISE
    _tp_weight_grad_kernel_tuned[lambda meta: (tiles(meta, rows, cols, "BLOCK_N", "BLOCK_K")[0], layers)](
        t_ptr=targets, u_ptr=preactivations, a_ptr=inputs, grad_w_ptr=grad_weight, grad_b_ptr=grad_bias,
        sq_ptr=squares,
        M=batch, N=rows, K=cols,
        stride_tm=targets.stride(1), stride_tn=targets.stride(2), stride_am=inputs.stride(1),
        stride_ak=inputs.stride(2), layer_stride_t=targets.stride(0), layer_stride_a=inputs.stride(0),
        noise_seed=noise.seed, noise_offset=noise.offset, noise_std=noise.std, scale=float(scale),
        ACT_E=activation_code(act), HAS_BIAS=has_bias, STACKED=layers > 1, NOISE=noise is not NO_NOISE,
        LOSS=squares is not None, INPUT_PRECISION=input_precision(inputs),
    )
    return grad_weight, grad_bias


def _first(grads: tuple[Tensor, Tensor | None]) -> tuple[Tensor, Tensor | None]:
    grad_weight, grad_bias = grads
    return grad_weight[0], None if grad_bias is None else grad_bias[0]


def pc_weight_grad(error: Tensor, a: Tensor, *, scale: float, act_in: str = "identity",
                   has_bias: bool = True) -> tuple[Tensor, Tensor | None]:
    """PC's ``scale · εᵀ φ_in(a)`` and ``scale · Σ_m ε`` of one layer: ``error`` (B, N), ``a`` (B, K)."""
    return _first(_launch_pc(error[None], a[None], scale, act_in, has_bias))


def tp_weight_grad(target: Tensor, preactivation: Tensor, a: Tensor, *, scale: float, act: str = "identity",
                   has_bias: bool = True, noise: Noise | None = None,
                   squares: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """TP's local gradient of one layer (see ``stacked_tp_weight_grad``): ``target``, ``preactivation``
    (B, N), ``a`` (B, K)."""
    return _first(_launch_tp(target[None], preactivation[None], a[None], scale, act, has_bias, noise, squares))
