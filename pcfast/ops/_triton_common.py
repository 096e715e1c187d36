"""What the Triton kernels of every op family share: jit helpers, autotune configs, launch helpers.

Imported only by the Triton op modules (``linear_epilogue``, ``pc_update``, ``local_grad``,
``tp_targets``) and the Triton backend, which the registry loads on demand, so ``import pcfast``
never imports triton.

- ``phi`` / ``phi_grad``: φ and φ' selected by the constexpr ``ACT`` (codes in :data:`ACTIVATION_CODES`),
  written with ``tl.exp``/``tl.sigmoid``/``tl.erf`` only: ``tl.extra.libdevice`` does not run in the
  interpreter. Inputs are already in the accumulator dtype (fp32, or fp64 for fp64 tensors).
- ``matmul_tile``: one output tile of ``φ(A) B`` with φ applied to A as it is loaded.
- ``gemm_configs`` / ``prune_*_configs``: autotune configs, one small config under the interpreter.
- ``Noise`` (in-kernel Gaussian noise), ``LayerTable`` (separate equal tensors addressed as one
  stack), and the shape checks and grids of the launchers.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

# φ codes: the constexpr ACT of every kernel.
ACTIVATION_CODES = {"identity": 0, "tanh": 1, "relu": 2, "sigmoid": 3, "gelu": 4}

_TORCH_TO_TRITON = {
    torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32",
}


def interpreting() -> bool:
    """Whether triton runs in interpreter mode (set before triton was imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def activation_code(name: str) -> int:
    if name not in ACTIVATION_CODES:
        raise ValueError(f"activation: the triton backend supports {sorted(ACTIVATION_CODES)}, got {name!r}")
    return ACTIVATION_CODES[name]


def triton_type(dtype: torch.dtype) -> str:
    """The signature type string of a tensor of ``dtype`` (``fp32``, ``bf16``, …)."""
    return _TORCH_TO_TRITON[dtype]


def input_precision(x: torch.Tensor) -> str:
    """``tl.dot``'s input precision for operands like ``x``.

    fp32 on CUDA: ``tf32`` when torch's matmul uses TF32 (``torch.backends.cuda.matmul``), else
    ``tf32x3`` — three TF32 tensor-core products, about fp32 accuracy; Triton's ``ieee`` fp32 dot runs
    on CUDA cores and spills registers at useful tile sizes. ``PCFAST_TRITON_FP32_PRECISION``
    (``ieee``, ``tf32x3``, ``tf32``) overrides. Everything else (fp64, fp16, bf16, CPU): ``ieee``."""
    if x.dtype != torch.float32 or not x.is_cuda:
        return "ieee"
    forced = os.environ.get("PCFAST_TRITON_FP32_PRECISION")
    if forced:
        if forced not in ("ieee", "tf32x3", "tf32"):
            raise ValueError(f"PCFAST_TRITON_FP32_PRECISION: expected ieee, tf32x3 or tf32, got {forced!r}")
        return forced
    matmul = torch.backends.cuda.matmul
    tf32 = getattr(matmul, "fp32_precision", None) == "tf32" or bool(getattr(matmul, "allow_tf32", False))
    return "tf32" if tf32 else "tf32x3"


# ---------------------------------------------------------------------------------------------
# Device functions
# ---------------------------------------------------------------------------------------------


@triton.jit
def as_acc(value, ACC: tl.constexpr):
    """A scalar kernel argument (declared ``tl.float64``) in the accumulator dtype: float64 scalars
    keep their precision in fp64 kernels and cost no fp64 math in fp32 kernels."""
    return (tl.zeros((1,), ACC) + value).to(ACC)


@triton.jit
def phi(u, ACT: tl.constexpr):
    """φ(u): 0 identity, 1 tanh, 2 relu, 3 sigmoid, 4 gelu (exact, erf form).

    tanh(u) = sign(u) (1 − e^{−2|u|}) / (1 + e^{−2|u|}) never overflows."""
    if ACT == 1:
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        out = tl.where(u < 0, -t, t)
    elif ACT == 2:
        out = tl.where(u > 0, u, 0.0)
    elif ACT == 3:
        out = tl.sigmoid(u)
    elif ACT == 4:
        out = 0.5 * u * (1.0 + tl.erf(u * 0.7071067811865476))
    else:
        out = u
    return out


@triton.jit
def phi_grad(u, ACT: tl.constexpr):
    """φ'(u) for the codes of :func:`phi`; gelu' = Φ(u) + u e^{−u²/2} / √(2π)."""
    if ACT == 1:
        t = phi(u, 1)
        out = 1.0 - t * t
    elif ACT == 2:
        out = tl.where(u > 0, 1.0, 0.0).to(u.dtype)
    elif ACT == 3:
        s = tl.sigmoid(u)
        out = s * (1.0 - s)
    elif ACT == 4:
        out = 0.5 * (1.0 + tl.erf(u * 0.7071067811865476)) + u * tl.exp(-0.5 * u * u) * 0.3989422804014327
    else:
        out = tl.full(u.shape, 1.0, u.dtype)
    return out


@triton.jit
def gaussian(seed, counter, ACC: tl.constexpr):
    """Standard normal numbers, a pure function of (seed, counter): Philox via ``tl.randn``.

    Every kernel that needs the noise ξ of an (M, K) operand draws element (m, k) at counter
    ``offset + m K + k``, so kernels reading the same operand see the same ξ without storing it
    (``pcfast.ops.tp_targets.gaussian_noise`` materialises it, for tests and other backends)."""
    return tl.randn(seed, counter).to(ACC)


@triton.jit
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """int64 row and column offsets of this program's output tile, in grouped order (programs that
    run together share rows of A and columns of B in L2)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, pid_n


@triton.jit
def matmul_tile(
    a_ptr, b_ptr, offs_m, offs_n, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    noise_seed, noise_offset, noise_std,
    ACT_A: tl.constexpr, NOISE: tl.constexpr, ACC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc[m, n] = Σ_k φ(ã[m, k]) b[k, n] over one tile, accumulated in ACC; φ applied on load, and
    with NOISE ``ã = a + noise_std · gaussian(noise_seed, noise_offset + m K + k)`` (see
    :func:`gaussian`), else ã = a.

    Rows and columns past M and N wrap around (the tutorials' trick: every load is in bounds and only
    k is masked; the caller masks the store). Out-of-range k read 0 from B, so φ(0) ≠ 0 (sigmoid) in
    padded A columns never contributes."""
    rows = offs_m % M
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_k[None, :], other=0.0)
        if NOISE:
            counter = noise_offset + rows[:, None] * K + (k0 + offs_k)[None, :]
            a = (a.to(ACC) + as_acc(noise_std, ACC) * gaussian(noise_seed, counter, ACC)).to(a_ptr.dtype.element_ty)
        if ACT_A != 0:
            a = phi(a.to(ACC), ACT_A).to(a_ptr.dtype.element_ty)
        b = tl.load(b_ptrs, mask=mask_k[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


# ---------------------------------------------------------------------------------------------
# Autotune configs
# ---------------------------------------------------------------------------------------------

# Under the interpreter: one config, small enough that test shapes span several tiles and several
# k-iterations (so masking and the main loop are exercised), large enough to stay fast.
INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}


def _configs(names: tuple[str, str, str], shapes: list[tuple[int, ...]]) -> list[triton.Config]:
    """One config per row (three block sizes, named by ``names``; stages; warps), GROUP_M 8; under the
    interpreter the one INTERPRETER_BLOCKS config."""
    if interpreting():
        return [triton.Config(dict(INTERPRETER_BLOCKS, GROUP_M=8), num_warps=4, num_stages=1)]
    return [triton.Config({**dict(zip(names, blocks)), "GROUP_M": 8}, num_stages=stages, num_warps=warps)
            for *blocks, stages, warps in shapes]


def gemm_configs(*, two_accumulators: bool = False) -> list[triton.Config]:
    """Configs of the output-tile GEMMs (prediction/error, top-down/update, DTP targets).

    Wide tiles (8 warps) for batch ≥ 128, narrow BLOCK_M for small batches (PC on MNIST uses batch
    64); ``two_accumulators`` (DTP: ĥ and h share each Q tile) drops the 128×128 tile for registers.
    fp32 runs the dot as 3xTF32, which needs about three times the operand registers of bf16: the
    wide tiles use 8 warps so that they fit (tests/ops/test_aot_compile.py prints the spills)."""
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, stages, warps
        (128, 128, 32, 3, 8),
        (128, 64, 32, 3, 8),
        (64, 128, 32, 3, 8),
        (64, 64, 32, 4, 4),
        (32, 64, 32, 4, 4),
        (16, 64, 64, 4, 4),
    ]
    if two_accumulators:
        shapes = [s for s in shapes if s[0] * s[1] < 128 * 128]
    return _configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), shapes)


def grad_configs() -> list[triton.Config]:
    """Configs of the weight-gradient GEMM: output tile (BLOCK_N, BLOCK_K) of W, reduction over the
    batch in chunks of BLOCK_M."""
    return _configs(("BLOCK_N", "BLOCK_K", "BLOCK_M"), [  # BLOCK_N, BLOCK_K, BLOCK_M, stages, warps
        (128, 128, 32, 3, 8),
        (128, 64, 32, 3, 8),
        (64, 128, 32, 3, 8),
        (64, 64, 32, 4, 4),
        (32, 64, 64, 4, 4),
    ])


def _is_fp64(named_args: dict[str, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in named_args.values())


def _fp64_fit(configs: list[triton.Config], rows: str, cols: str) -> list[triton.Config]:
    """fp64 doubles shared memory and registers: keep ≤ 32×64 output tiles with ≤ 3 stages (64×64
    already spills on sm_90)."""
    kept = []
    for config in configs:
        if config.kwargs[rows] * config.kwargs[cols] > 32 * 64:
            continue
        kept.append(triton.Config(dict(config.kwargs), num_warps=config.num_warps,
                                  num_stages=min(config.num_stages, 3)))
    return kept or configs[-1:]


def prune_tile_configs(configs: list[triton.Config], named_args: dict[str, Any], **kwargs) -> list[triton.Config]:
    """Output-tile GEMMs (rows = batch ``M``): drop tiles more than twice as tall as the batch
    (they only compute padding), and fit fp64."""
    batch = named_args.get("M")
    if isinstance(batch, int):
        tallest = 2 * max(16, triton.next_power_of_2(batch))
        configs = [c for c in configs if c.kwargs["BLOCK_M"] <= tallest] or configs[-1:]
    return _fp64_fit(configs, "BLOCK_M", "BLOCK_N") if _is_fp64(named_args) else configs


def prune_grad_configs(configs: list[triton.Config], named_args: dict[str, Any], **kwargs) -> list[triton.Config]:
    """Weight-gradient GEMM (output tile of W, reduction over the batch): fit fp64."""
    return _fp64_fit(configs, "BLOCK_N", "BLOCK_K") if _is_fp64(named_args) else configs


@functools.cache
def _constexpr_names(fn) -> tuple[str, ...]:
    return tuple(fn.arg_names[i] for i in fn.constexprs)


def aot_signature(fn, pointer_types: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    """The ``ASTSource`` signature of jitted ``fn``: pointers typed by ``pointer_types`` (by name),
    ``tl.float64``-annotated scalars ``fp64``, other scalars ``i32``, constexprs ``constexpr``."""
    signature = {}
    annotations = getattr(fn.fn, "__annotations__", {})
    for name in fn.arg_names:
        if name in constexprs or name in _constexpr_names(fn):
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types[name]
        elif "float64" in str(annotations.get(name, "")):
            signature[name] = "fp64"
        else:
            signature[name] = "i32"
    return signature


# ---------------------------------------------------------------------------------------------
# Launch helpers: what the launchers of every op family pass or check
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Noise:
    """Gaussian noise drawn inside a kernel: ``std · ξ`` with ξ element (m, k) of an (M, K) operand
    at Philox counter ``offset + m K + k`` under ``seed`` (``tp_targets.gaussian_noise`` draws the same)."""

    seed: int
    std: float
    offset: int = 0


NO_NOISE = Noise(0, 0.0, 0)


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

    def __len__(self) -> int:
        return self.offsets.numel()


def tiles(meta: dict, rows: int, cols: int, row_block: str = "BLOCK_M", col_block: str = "BLOCK_N") -> tuple[int]:
    """The 1-D grid of output tiles of a (rows, cols) result."""
    return (triton.cdiv(rows, meta[row_block]) * triton.cdiv(cols, meta[col_block]),)


def check_matrix(name: str, t: Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {t.dtype}")


def check_same_layout(name: str, t: Tensor, like: Tensor) -> None:
    """Tensors that a kernel reads through one set of strides: shape, strides and dtype of ``like``."""
    if t.shape != like.shape or t.stride() != like.stride() or t.dtype != like.dtype:
        raise ValueError(f"{name}: expected shape {tuple(like.shape)}, strides {like.stride()}, dtype "
                         f"{like.dtype}; got {tuple(t.shape)}, {t.stride()}, {t.dtype}")


def check_table(name: str, table: LayerTable | None, layers: int) -> None:
    if table is not None and len(table) != layers:
        raise ValueError(f"{name}: expected a table of {layers} layers, got {len(table)}")


def resolved(t: Tensor) -> Tensor:
    """``t`` with its lazy negative/conjugate bits applied: the kernels read raw memory."""
    if t.is_conj():
        t = t.resolve_conj()
    return t.resolve_neg() if t.is_neg() else t


def as_contiguous(t: Tensor) -> Tensor:
    """``t`` as a contiguous tensor whose memory holds its values (negative/conjugate bits applied)."""
    t = resolved(t)
    return t if t.is_contiguous() else t.contiguous()


def kernel_layout(weights: tuple[Tensor, ...], biases: tuple[Tensor | None, ...]) -> tuple[list, list, bool]:
    """Parameters as the kernels read them: matrices through their strides (any layout, read in
    place), vectors (biases) contiguous, lazy negative/conjugate bits applied. Returns the weights,
    the biases and whether any of them had to be copied (a copy's address means nothing to a CUDA
    graph, so such a call runs eagerly)."""
    new_weights = [resolved(w) for w in weights]
    new_biases = [None if b is None else as_contiguous(b) for b in biases]
    copied = any(n is not o for n, o in zip([*new_weights, *new_biases], [*weights, *biases]))
    return new_weights, new_biases, copied
