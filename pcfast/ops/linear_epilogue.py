"""Triton kernels of the prediction GEMM ``pred = φ_in(a) Wᵀ + b`` with an epilogue (DESIGN §3, §6).

φ_in is applied while ``a`` is loaded (``a`` is x or a latent z_{l-1}, so φ(z) is never materialised),
and the epilogue turns the prediction into what the step needs, in the same pass:

- ``_linear_kernel``: ``out = φ_out(pred)`` (the feedforward pass: z = u, or h = φ(u) with u stored
  too); with noise, ``a`` is read as ``a + σ ξ`` (DTP's feedback loss);
- ``_hidden_error_kernel``: ``ε = z − pred``; its stacked form runs equal-width hidden layers in one
  launch (grid axis 1), finding their separate W and b through offset tables;
- ``_output_error_kernel``: ``out = ADD_PRED·pred + scale·(−∂ℓ/∂f)`` with MSE ``y − f`` or CE
  ``onehot(y) − softmax(f)`` when the class row fits one tile — PC's ε_L, or TP's ``f + β ε_L``;
- ``_ce_error_kernel``: the CE epilogue row by row after the logits were stored, for wider rows.

Every μP constant (``scale``) is a ``tl.float64`` argument cast once to the accumulator dtype. The
public functions are the launchers: they check shapes, allocate when no ``out`` is given, pick the
grid and launch; the schedules (which launch when) are ``triton_pc`` and ``triton_tp``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import NO_NOISE, LayerTable, Noise, activation_code, as_acc, check_matrix, check_same_layout
from ._triton_common import check_table, gemm_configs, input_precision, interpreting, matmul_tile, phi
from ._triton_common import prune_tile_configs, tile_offsets, tiles

# Output losses of _output_error_kernel (its LOSS constexpr).
LOSS_CODES = {"mse": 0, "ce": 1}

# Widest class row handled inside one tile of _output_error_kernel; wider rows store the logits and
# run _ce_error_kernel (``pcfast.ops.triton.TritonOptions.ce_fused_max_classes`` overrides it).
CE_FUSED_MAX_CLASSES = 256


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _linear_tile(
    a_ptr, w_ptr, bias_ptr, offs_m, offs_n, M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk,
    noise_seed, noise_offset, noise_std,
    ACT_IN: tl.constexpr, HAS_BIAS: tl.constexpr, NOISE: tl.constexpr, ACC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One tile of pred = φ_in(ã) Wᵀ + b in ACC (ã = a, or a + noise_std·ξ with NOISE)."""
    pred = matmul_tile(
        a_ptr, w_ptr, offs_m, offs_n, M, N, K, stride_am, stride_ak, stride_wk, stride_wn,
        noise_seed, noise_offset, noise_std, ACT_IN, NOISE, ACC, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    if HAS_BIAS:
        pred += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(ACC)[None, :]
    return pred


@triton.jit
def _linear_kernel(
    # GEMM operands: a (M, K), W (N, K), b (N,)
    a_ptr, w_ptr, bias_ptr,
    # outputs (M, N), sharing strides: the prediction (STORE_PRED) and φ_out of it
    pred_ptr, out_ptr,
    # sizes and strides
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
    # NOISE on a (see matmul_tile): seed, first counter, standard deviation
    noise_seed, noise_offset, noise_std: tl.float64,
    # meta-parameters
    ACT_IN: tl.constexpr, ACT_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRED: tl.constexpr,
    NOISE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """pred = φ_in(ã) Wᵀ + b,   out = φ_out(pred)   (ã = a + noise_std·ξ with NOISE, else a)."""
    ACC: tl.constexpr = tl.float64 if w_ptr.dtype.element_ty == tl.float64 else tl.float32
    offs_m, offs_n, _ = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pred = _linear_tile(
        a_ptr, w_ptr, bias_ptr, offs_m, offs_n, M, N, K, stride_am, stride_ak, stride_wn, stride_wk,
        noise_seed, noise_offset, noise_std, ACT_IN, HAS_BIAS, NOISE, ACC, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    offsets = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if STORE_PRED:
        tl.store(pred_ptr + offsets, pred.to(pred_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + offsets, phi(pred, ACT_OUT).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _hidden_error_kernel(
    # GEMM operands: a (M, K), W (N, K), b (N,); epilogue input z and output ε, (M, N) sharing strides
    a_ptr, w_ptr, bias_ptr, z_ptr, out_ptr,
    # STACKED: int64 element offsets of layer g's W and b from w_ptr and bias_ptr
    w_table_ptr, b_table_ptr,
    # sizes and strides; STACKED: a's and z/out's layer strides
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
    layer_stride_a, layer_stride_o,
    # meta-parameters
    ACT_IN: tl.constexpr, HAS_BIAS: tl.constexpr, STACKED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """ε = z − (φ_in(a) Wᵀ + b)   (the hidden error of PC).

    STACKED: grid axis 1 runs over G layers of equal shape in one launch; layer g reads a, z and
    writes ε at ``g·layer_stride`` and finds its W and b through the offset tables (parameters are
    separate tensors)."""
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
    pred = _linear_tile(
        a_ptr, w_ptr, bias_ptr, offs_m, offs_n, M, N, K, stride_am, stride_ak, stride_wn, stride_wk,
        0, 0, 0.0, ACT_IN, HAS_BIAS, False, ACC, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    offsets = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    error = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(ACC) - pred
    tl.store(out_ptr + offsets, error.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _output_error_kernel(
    # GEMM operands: a (M, K), W (N, K), b (N,); target: float y (M, N) for MSE, int64 labels (M,) for CE
    a_ptr, w_ptr, bias_ptr, target_ptr,
    # outputs (M, N), sharing strides: the prediction f and the epilogue's result
    pred_ptr, out_ptr,
    # sizes and strides (a CE target has stride_tn = 0)
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on, stride_tm, stride_tn,
    # the error's coefficient: 1 (PC's ε_L) or β (TP's output target)
    scale: tl.float64,
    # meta-parameters
    ACT_IN: tl.constexpr, HAS_BIAS: tl.constexpr, LOSS: tl.constexpr, ADD_PRED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """f = φ_in(a) Wᵀ + b (stored), then

    LOSS 0 (MSE):  out = ADD_PRED·f + scale·(y − f)
    LOSS 1 (CE):   out = ADD_PRED·f + scale·(onehot(y) − softmax(f))   (the row is one tile: BLOCK_N ≥ N)"""
    ACC: tl.constexpr = tl.float64 if w_ptr.dtype.element_ty == tl.float64 else tl.float32
    offs_m, offs_n, _ = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    mask_m = offs_m < M
    mask_n = offs_n < N
    pred = _linear_tile(
        a_ptr, w_ptr, bias_ptr, offs_m, offs_n, M, N, K, stride_am, stride_ak, stride_wn, stride_wk,
        0, 0, 0.0, ACT_IN, HAS_BIAS, False, ACC, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    mask = mask_m[:, None] & mask_n[None, :]
    offsets = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(pred_ptr + offsets, pred.to(pred_ptr.dtype.element_ty), mask=mask)
    if LOSS == 0:
        y = tl.load(target_ptr + offs_m[:, None] * stride_tm + offs_n[None, :] * stride_tn, mask=mask, other=0.0)
        out = as_acc(scale, ACC) * (y.to(ACC) - pred)
    else:
        # Whole rows: a numerically safe softmax over the valid columns.
        logits = tl.where(mask_n[None, :], pred, -float("inf"))
        row_max = tl.where(mask_m, tl.max(logits, axis=1), 0.0)
        e = tl.where(mask_n[None, :], tl.exp(logits - row_max[:, None]), 0.0)
        softmax = e / tl.sum(e, axis=1)[:, None]
        labels = tl.load(target_ptr + offs_m * stride_tm, mask=mask_m, other=-1)
        onehot = tl.where(offs_n[None, :] == labels[:, None], 1.0, 0.0).to(ACC)
        out = as_acc(scale, ACC) * (onehot - softmax)
    if ADD_PRED:
        out += pred
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


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


_TILE_KEY = ["M", "N", "K", "INPUT_PRECISION"]
_TILE_PRUNE = {"early_config_prune": prune_tile_configs}

_linear_kernel_tuned = triton.autotune(
    configs=gemm_configs(), key=_TILE_KEY + ["ACT_IN", "ACT_OUT", "HAS_BIAS", "STORE_PRED", "NOISE"],
    prune_configs_by=_TILE_PRUNE,
)(_linear_kernel)

_hidden_error_kernel_tuned = triton.autotune(
    configs=gemm_configs(), key=_TILE_KEY + ["ACT_IN", "HAS_BIAS", "STACKED"], prune_configs_by=_TILE_PRUNE,
)(_hidden_error_kernel)

_output_error_kernel_tuned = triton.autotune(  # MSE only: CE needs the whole row in one tile (ce_fused_config)
    configs=gemm_configs(), key=_TILE_KEY + ["ACT_IN", "HAS_BIAS", "LOSS", "ADD_PRED"], prune_configs_by=_TILE_PRUNE,
)(_output_error_kernel)


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


@dataclass(frozen=True)
class OutputLoss:
    """What ``output_error``'s epilogue makes of the prediction f: ``add_pred·f + scale·(−∂ℓ/∂f)``
    for ``target`` under ``loss`` (MSE: float y (B, C); CE: int64 labels (B,)) — PC's ε_L (scale 1)
    or TP's output target f + β ε_L (scale β, add_pred)."""

    target: Tensor
    loss: str
    scale: float = 1.0
    add_pred: bool = False

    def target_strides(self, batch: int, classes: int) -> tuple[int, int]:
        """Check the target against a (batch, classes) prediction; its row and class strides (CE: 0)."""
        target = self.target
        if self.loss == "mse":
            check_matrix("target", target, (batch, classes))
            return target.stride(0), target.stride(1)
        if self.loss == "ce":
            if target.shape != (batch,) or target.dtype != torch.int64:
                raise ValueError(f"target: expected int64 labels of shape ({batch},), got {target.dtype} "
                                 f"{tuple(target.shape)}")
            return target.stride(0), 0
        raise ValueError(f"loss: expected 'mse' or 'ce', got {self.loss!r}")


def _check_operands(a: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None) -> Tensor:
    """Check a, W, b and ``out`` (allocated when None) of ``φ(a) Wᵀ + b``; return ``out``."""
    batch, features = a.shape
    classes = weight.shape[0]
    check_matrix("weight", weight, (classes, features), a.dtype)
    if bias is not None:
        check_matrix("bias", bias.view(1, -1), (1, classes), a.dtype)
    if out is None:
        out = torch.empty(batch, classes, dtype=a.dtype, device=a.device)
    check_matrix("out", out, (batch, classes), a.dtype)
    return out


def linear(
    a: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    act_in: str = "identity",
    act_out: str = "identity",
    out: Tensor | None = None,
    pred: Tensor | None = None,
    noise: Noise | None = None,
) -> Tensor:
    """Launch ``_linear_kernel``: ``out = φ_out(φ_in(a) Wᵀ + b)``, also storing the prediction into
    ``pred`` when given; with ``noise``, ``a`` is read as ``a + noise.std · ξ`` (ξ from
    ``noise.seed`` at ``noise.offset``). Returns ``out``."""
    out = _check_operands(a, weight, bias, out)
    if pred is not None:
        check_same_layout("pred", pred, out)
    noise = noise or NO_NOISE
    batch, classes = out.shape
    _linear_kernel_tuned[lambda meta: tiles(meta, batch, classes)](
        a_ptr=a, w_ptr=weight, bias_ptr=bias, pred_ptr=pred, out_ptr=out,
        M=batch, N=classes, K=a.shape[1],
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_om=out.stride(0), stride_on=out.stride(1),
        noise_seed=noise.seed, noise_offset=noise.offset, noise_std=noise.std,
        ACT_IN=activation_code(act_in), ACT_OUT=activation_code(act_out), HAS_BIAS=bias is not None,
        STORE_PRED=pred is not None, NOISE=noise is not NO_NOISE, INPUT_PRECISION=input_precision(a),
    )
    return out


def hidden_error(a: Tensor, weight: Tensor, bias: Tensor | None, latent: Tensor, *, act_in: str,
                 out: Tensor | None = None) -> Tensor:
    """Launch ``_hidden_error_kernel``: ``out = ε = z − (φ_in(a) Wᵀ + b)`` with z = ``latent``."""
    out = _check_operands(a, weight, bias, out)
    check_same_layout("latent", latent, out)
    batch, classes = out.shape
    _hidden_error_kernel_tuned[lambda meta: tiles(meta, batch, classes)](
        a_ptr=a, w_ptr=weight, bias_ptr=bias, z_ptr=latent, out_ptr=out, w_table_ptr=None, b_table_ptr=None,
        M=batch, N=classes, K=a.shape[1],
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_om=out.stride(0), stride_on=out.stride(1), layer_stride_a=0, layer_stride_o=0,
        ACT_IN=activation_code(act_in), HAS_BIAS=bias is not None, STACKED=False,
        INPUT_PRECISION=input_precision(a),
    )
    return out


def stacked_hidden_error(
    inputs: Tensor, latents: Tensor, out: Tensor, weights: LayerTable, biases: LayerTable | None, *, act_in: str,
) -> Tensor:
    """ε_g = z_g − (φ_in(a_g) W_gᵀ + b_g) for G layers in one launch: ``inputs`` (G, B, K),
    ``latents`` and ``out`` (G, B, N), W_g (N, K) and b_g from the tables."""
    layers, batch, features = inputs.shape
    classes = weights.base.shape[0]
    check_matrix("weight", weights.base, (classes, features), inputs.dtype)
    check_table("weights", weights, layers)
    check_table("biases", biases, layers)
    check_same_layout("out", out, latents)
    check_matrix("latents", latents, (layers, batch, classes))
    _hidden_error_kernel_tuned[lambda meta: (tiles(meta, batch, classes)[0], layers)](
        a_ptr=inputs, w_ptr=weights.base, bias_ptr=None if biases is None else biases.base, z_ptr=latents,
        out_ptr=out, w_table_ptr=weights.offsets, b_table_ptr=None if biases is None else biases.offsets,
        M=batch, N=classes, K=features,
        stride_am=inputs.stride(1), stride_ak=inputs.stride(2), stride_wn=weights.base.stride(0),
        stride_wk=weights.base.stride(1), stride_om=out.stride(1), stride_on=out.stride(2),
        layer_stride_a=inputs.stride(0), layer_stride_o=out.stride(0),
        ACT_IN=activation_code(act_in), HAS_BIAS=biases is not None, STACKED=True,
        INPUT_PRECISION=input_precision(inputs),
    )
    return out


def output_error(a: Tensor, weight: Tensor, bias: Tensor | None, objective: OutputLoss, *, pred: Tensor,
                 out: Tensor | None = None, act_in: str = "identity",
                 ce_fused_max_classes: int = CE_FUSED_MAX_CLASSES) -> Tensor:
    """``f = φ_in(a) Wᵀ + b`` into ``pred`` and ``out = add_pred·f + scale·(−∂ℓ/∂f)`` (``objective``:
    MSE ``y − f``, CE ``onehot(y) − softmax(f)``) — one launch of ``_output_error_kernel``, or, for CE
    rows over ``ce_fused_max_classes`` classes, ``_linear_kernel`` then ``_ce_error_kernel``.
    Returns ``out``."""
    out = _check_operands(a, weight, bias, out)
    check_same_layout("pred", pred, out)
    batch, classes = out.shape
    target, scale, add_pred = objective.target, float(objective.scale), objective.add_pred
    stride_tm, stride_tn = objective.target_strides(batch, classes)
    if objective.loss == "ce" and classes > ce_fused_max_classes:
        # The row spans several tiles: store the logits, then the row-wise kernel.
        linear(a, weight, bias, act_in=act_in, out=pred)
        meta = ce_error_config()
        _ce_error_kernel[(triton.cdiv(batch, meta["BLOCK_M"]),)](
            f_ptr=pred, labels_ptr=target, out_ptr=out, M=batch, N=classes, stride_m=out.stride(0),
            stride_n=out.stride(1), stride_label=target.stride(0), scale=scale, ADD_PRED=add_pred, **meta,
        )
        return out
    args = dict(
        a_ptr=a, w_ptr=weight, bias_ptr=bias, target_ptr=target, pred_ptr=pred, out_ptr=out,
        M=batch, N=classes, K=a.shape[1],
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_om=out.stride(0), stride_on=out.stride(1), stride_tm=stride_tm, stride_tn=stride_tn,
        scale=scale,
        ACT_IN=activation_code(act_in), HAS_BIAS=bias is not None, LOSS=LOSS_CODES[objective.loss], ADD_PRED=add_pred,
        INPUT_PRECISION=input_precision(a),
    )
    if objective.loss == "ce":
        meta = ce_fused_config(classes)
        _output_error_kernel[(triton.cdiv(batch, meta["BLOCK_M"]),)](**args, **meta)
    else:
        _output_error_kernel_tuned[lambda meta: tiles(meta, batch, classes)](**args)
    return out
