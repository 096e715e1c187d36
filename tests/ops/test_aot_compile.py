"""Every Triton kernel, for every autotune config, compiles to cubin for sm_80 and sm_90 — no GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole pipeline
(TTIR → TTGIR → LLVM → PTX → ptxas → cubin) on the CPU. The compiles run in one subprocess per
architecture without ``TRITON_INTERPRET`` (the interpreter tests of this directory set it, and an
interpreted ``@triton.jit`` function cannot be compiled), which also gives the GPU autotune configs.
Each test prints registers, spills and shared memory per config (``pytest -s`` shows them) and fails
on a compile error or on shared memory beyond what the architecture can give one block.

Compile matrix: on both architectures every config of every autotuned kernel in fp32 (the dot's
input precision is ``tf32x3``, what fp32 runs with on CUDA) and every config that survives the fp64
pruning in fp64; on sm_90 (what the benchmarks target) also every config in bf16 and the flag
variants; fp16, TF32 (and bf16 on sm_80) with the smallest config. About 130 compiles, ~1.5 min on
two cores. Pointers are marked 16-byte aligned
integer sizes and strides divisible by 16, and unit strides constant 1, as the JIT specialises
contiguous tensors of 16-divisible widths at run time.

Run the worker by hand: ``python tests/ops/test_aot_compile.py 90`` prints the JSON report.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARCHS = (80, 90)
# Largest dynamic shared memory one block may use (bytes): A100 164 KiB, H100/H200 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
KERNELS = ("pc_error", "pc_error_ce_fused", "ce_error", "pc_update", "pc_weight_grad", "tp_target")
WORKER_TIMEOUT_S = 600  # a hang guard; ~70 s on two idle cores
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# Worker: runs in a subprocess (``python test_aot_compile.py ARCH``)
# ---------------------------------------------------------------------------------------------


def _variants(arch: int):
    """(kernel name, jitted fn, meta-parameter dict with num_warps/num_stages, flags, dtype, pointer
    types, unit strides) for the compile matrix of ``arch``: fp32 and fp64 sweeps everywhere, the bf16
    sweep and the flag variants on sm_90 (the GPU the benchmarks target), bf16/fp16/TF32 with the
    smallest config on both."""
    import triton

    from pcfast.ops import _triton_common as common
    from pcfast.ops import pc_relax, tp_targets

    def metas(configs):
        return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]

    def fp64(configs, rows, cols):
        return metas(common._fp64_fit(list(configs), rows, cols))

    def precision(dtype, tf32=False):
        return ("tf32" if tf32 else "tf32x3") if dtype == "fp32" else "ieee"

    def ptrs_of(fn, dtype):
        """Tensors of ``dtype``; offset tables (``*_table_ptr``) are int64, SGD's rates (``hyper_ptr``) float64."""
        special = {"hyper_ptr": "*fp64"}
        return {n: "*i64" if n.endswith("_table_ptr") else special.get(n, f"*{dtype}")
                for n in fn.arg_names if n.endswith("_ptr")}

    sweep_dtypes = ("fp32", "bf16") if arch == 90 else ("fp32",)
    flag_variants = arch == 90
    out = []

    # _pc_error_kernel: autotuned epilogues 0–2 and LOAD_PRED; epilogue 3 (CE) is launched directly.
    error = pc_relax._pc_error_kernel_tuned
    error_units = ("stride_ak", "stride_wk", "stride_on", "stride_tn")

    def error_flags(dtype, tf32=False, **kw):
        flags = dict(ACT_IN=1, ACT_OUT=0, HAS_BIAS=True, EPILOGUE=pc_relax.EPILOGUE_HIDDEN_ERROR, ADD_PRED=False,
                     STORE_PRED=True, LOAD_PRED=False, STACKED=False, NOISE=False,
                     INPUT_PRECISION=precision(dtype, tf32))
        flags.update(kw)
        return flags

    def error_ptrs(dtype, labels=False):
        return ptrs_of(error.fn, dtype) | ({"target_ptr": "*i64"} if labels else {})

    smallest = metas(error.configs)[-1]
    for dtype in sweep_dtypes:
        for meta in metas(error.configs):
            out.append(("pc_error", error.fn, meta, error_flags(dtype), dtype, error_ptrs(dtype), error_units))
    for meta in fp64(error.configs, "BLOCK_M", "BLOCK_N"):
        out.append(("pc_error", error.fn, meta, error_flags("fp64"), "fp64", error_ptrs("fp64"), error_units))
    for label, flags in (
        ("affine-gelu", dict(EPILOGUE=pc_relax.EPILOGUE_AFFINE, ACT_IN=4, ACT_OUT=4)),
        ("mse-target", dict(EPILOGUE=pc_relax.EPILOGUE_MSE, ACT_IN=3, ADD_PRED=True)),
        ("load-pred", dict(LOAD_PRED=True, STORE_PRED=False, ACT_IN=0, HAS_BIAS=False)),
        ("relu", dict(ACT_IN=2)),
        ("stacked", dict(STACKED=True, STORE_PRED=False)),
        ("noise", dict(NOISE=True, EPILOGUE=pc_relax.EPILOGUE_AFFINE, ACT_IN=0, ACT_OUT=1)),
    ) if flag_variants else ():
        out.append(("pc_error", error.fn, smallest, error_flags("fp32", **flags), "fp32", error_ptrs("fp32"), error_units))
    out.append(("pc_error", error.fn, smallest, error_flags("fp32", tf32=True), "fp32", error_ptrs("fp32"), error_units))
    for dtype in ("fp16",) if arch == 90 else ("fp16", "bf16"):
        out.append(("pc_error", error.fn, smallest, error_flags(dtype), dtype, error_ptrs(dtype), error_units))

    # CE in one tile: BLOCK_N covers the row, for every class count up to CE_FUSED_MAX_CLASSES.
    classes = [16, 32, 64, 128, pc_relax.CE_FUSED_MAX_CLASSES]
    for dtype in sweep_dtypes:
        for c in classes:
            meta = pc_relax.ce_fused_config(c)
            flags = error_flags(dtype, EPILOGUE=pc_relax.EPILOGUE_CE, ACT_IN=1)
            out.append(("pc_error_ce_fused", error.fn, meta, flags, dtype, error_ptrs(dtype, labels=True), error_units))
    meta = pc_relax.ce_fused_config(16)
    out.append(("pc_error_ce_fused", error.fn, meta, error_flags("fp64", EPILOGUE=pc_relax.EPILOGUE_CE), "fp64",
                error_ptrs("fp64", labels=True), error_units))

    ce = pc_relax._ce_error_kernel
    for dtype in ("fp32", "bf16", "fp64") if arch == 90 else ("fp32",):
        ptrs = {"f_ptr": f"*{dtype}", "labels_ptr": "*i64", "out_ptr": f"*{dtype}"}
        out.append(("ce_error", ce, pc_relax.ce_error_config(), dict(ADD_PRED=True), dtype, ptrs, ("stride_n",)))

    # _pc_update_kernel
    update = pc_relax._pc_update_kernel_tuned
    update_units = ("stride_ek", "stride_wn", "stride_zn")

    def update_flags(dtype, tf32=False, **kw):
        return dict(ACT=1, FPA=False, UPDATE_ERROR=True, STACKED=False, INPUT_PRECISION=precision(dtype, tf32)) | kw

    for dtype in sweep_dtypes:
        for meta in metas(update.configs):
            out.append(("pc_update", update.fn, meta, update_flags(dtype), dtype, ptrs_of(update.fn, dtype), update_units))
    for meta in fp64(update.configs, "BLOCK_M", "BLOCK_N"):
        out.append(("pc_update", update.fn, meta, update_flags("fp64"), "fp64", ptrs_of(update.fn, "fp64"), update_units))
    small = metas(update.configs)[-1]
    flags_list = [update_flags("fp32", FPA=True, ACT=4), update_flags("fp32", UPDATE_ERROR=False, ACT=2),
                  update_flags("fp32", STACKED=True, FPA=True)] if flag_variants else []
    for flags in flags_list + [update_flags("fp32", tf32=True)]:
        out.append(("pc_update", update.fn, small, flags, "fp32", ptrs_of(update.fn, "fp32"), update_units))
    for dtype in ("fp16",) if arch == 90 else ("fp16", "bf16"):
        out.append(("pc_update", update.fn, small, update_flags(dtype), dtype, ptrs_of(update.fn, dtype), update_units))

    # _pc_weight_grad_kernel
    grad = pc_relax._pc_weight_grad_kernel_tuned
    grad_units = ("stride_en", "stride_ak", "stride_gk")

    def grad_flags(dtype, tf32=False, **kw):
        return dict(ACT_A=1, ACT_E=0, HAS_BIAS=True, DELTA_FROM_TARGET=False, STACKED=False, NOISE=False, LOSS=False,
                    SGD=False, MOMENTUM=False, HAS_BUFFER=False, NESTEROV=False, INPUT_PRECISION=precision(dtype, tf32)) | kw

    for dtype in sweep_dtypes:
        for meta in metas(grad.configs):
            out.append(("pc_weight_grad", grad.fn, meta, grad_flags(dtype), dtype, ptrs_of(grad.fn, dtype), grad_units))
    for meta in fp64(grad.configs, "BLOCK_N", "BLOCK_K"):
        out.append(("pc_weight_grad", grad.fn, meta, grad_flags("fp64"), "fp64", ptrs_of(grad.fn, "fp64"), grad_units))
    small = metas(grad.configs)[-1]
    flags_list = [grad_flags("fp32", DELTA_FROM_TARGET=True, ACT_E=3, ACT_A=0), grad_flags("fp32", STACKED=True),
                  grad_flags("fp32", DELTA_FROM_TARGET=True, NOISE=True, LOSS=True, ACT_E=1, ACT_A=0),
                  grad_flags("fp32", SGD=True, MOMENTUM=True, HAS_BUFFER=True, NESTEROV=True),
                  grad_flags("fp32", SGD=True),
                  grad_flags("fp32", STACKED=True, DELTA_FROM_TARGET=True, ACT_E=1, ACT_A=0)] if flag_variants else []
    for flags in flags_list + [grad_flags("fp32", tf32=True)]:
        out.append(("pc_weight_grad", grad.fn, small, flags, "fp32", ptrs_of(grad.fn, "fp32"), grad_units))
    for dtype in ("fp16",) if arch == 90 else ("fp16", "bf16"):
        out.append(("pc_weight_grad", grad.fn, small, grad_flags(dtype), dtype, ptrs_of(grad.fn, dtype), grad_units))

    # _tp_target_kernel
    target = tp_targets._tp_target_kernel_tuned
    target_units = ("stride_tk", "stride_qk", "stride_on")

    def target_flags(dtype, tf32=False, **kw):
        return dict(ACT=1, HAS_BIAS=True, DIFFERENCE=True, INPUT_PRECISION=precision(dtype, tf32)) | kw

    for dtype in sweep_dtypes:
        for meta in metas(target.configs):
            out.append(("tp_target", target.fn, meta, target_flags(dtype), dtype, ptrs_of(target.fn, dtype), target_units))
    for meta in fp64(target.configs, "BLOCK_M", "BLOCK_N"):
        out.append(("tp_target", target.fn, meta, target_flags("fp64"), "fp64", ptrs_of(target.fn, "fp64"), target_units))
    small = metas(target.configs)[-1]
    flags_list = [target_flags("fp32", DIFFERENCE=False, ACT=4)] if flag_variants else []
    for flags in flags_list + [target_flags("fp32", tf32=True)]:
        out.append(("tp_target", target.fn, small, flags, "fp32", ptrs_of(target.fn, "fp32"), target_units))
    for dtype in ("fp16",) if arch == 90 else ("fp16", "bf16"):
        out.append(("tp_target", target.fn, small, target_flags(dtype), dtype, ptrs_of(target.fn, dtype), target_units))
    del triton
    return out


def _compile_one(arch, kernel, fn, meta, flags, dtype, pointer_types, unit_strides):
    """Compile one variant; return its report row (registers, spills, shared memory or the error)."""
    import contextlib
    import io
    import re

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    from pcfast.ops._triton_common import aot_signature

    meta = dict(meta)
    options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages", 3)}
    constexprs = {**meta, **flags, **{name: 1 for name in unit_strides}}
    signature = aot_signature(fn, pointer_types, constexprs)
    # As the JIT specialises aligned tensors of 16-divisible sizes (784, 256, 4096, batch 64, …).
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if signature[name] in ("i32",) or signature[name].startswith("*")}
    row = {"kernel": kernel, "arch": arch, "dtype": dtype, "meta": meta, "flags": flags, **options}
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned),
                target=GPUTarget("cuda", arch, 32), options=options,
            )
    except Exception as exc:  # noqa: BLE001 - reported as the row's error, the test fails on it
        row["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
        return row
    text = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    row.update(
        error=None,
        seconds=round(time.perf_counter() - start, 2),
        registers=int(regs[-1]) if regs else None,
        spill_stores=int(spills[-1][0]) if spills else None,
        spill_loads=int(spills[-1][1]) if spills else None,
        shared=int(compiled.metadata.shared),
        cubin_bytes=len(compiled.asm["cubin"]),
    )
    return row


def _worker(arch: int) -> list[dict]:
    rows = [_compile_one(arch, *variant) for variant in _variants(arch)]
    return rows


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[int, list[dict]]:
    """One worker subprocess per architecture, in parallel, each with an empty Triton cache (a cache
    hit skips ptxas, and with it the register report)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    workers = {
        arch: subprocess.Popen([sys.executable, __file__, str(arch)], cwd=REPO,
                               env=dict(env, TRITON_CACHE_DIR=str(tmp_path_factory.mktemp(f"triton-cache-sm{arch}"))),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for arch in ARCHS
    }
    reports = {}
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    for arch, proc in workers.items():
        try:
            stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in workers.values():
                p.kill()
            pytest.fail(f"sm_{arch}: compiling every kernel took over {WORKER_TIMEOUT_S} s")
        if proc.returncode != 0:
            if "ptxas" in stderr and ("No such file" in stderr or "not found" in stderr):
                pytest.skip(f"triton's ptxas is not usable here: {stderr.strip().splitlines()[-1]}")
            pytest.fail(f"sm_{arch} worker failed (exit {proc.returncode}):\n{stderr[-4000:]}")
        reports[arch] = json.loads(stdout)
    return reports


def _describe(row: dict) -> str:
    meta = row["meta"]
    tile = "x".join(str(meta[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in meta)
    flags = ",".join(f"{k}={v}" for k, v in row["flags"].items() if k != "INPUT_PRECISION")
    head = f"sm_{row['arch']} {row['dtype']:<4} {row['flags'].get('INPUT_PRECISION', ''):<6} {tile:<11} w{row['num_warps']} s{row['num_stages']}"
    if row["error"]:
        return f"{head}  ERROR {row['error'].splitlines()[0][:200]}  [{flags}]"
    return (f"{head}  regs {row['registers']:>3}  spills {row['spill_stores']:>4}/{row['spill_loads']:<4} "
            f"smem {row['shared']:>6}  {row['seconds']:.1f}s  [{flags}]")


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm{a}" for a in ARCHS])
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_compiles_for_every_config(reports, kernel, arch):
    rows = [r for r in reports[arch] if r["kernel"] == kernel]
    assert rows, f"no compile variants for {kernel}"
    print(f"\n{kernel} on sm_{arch}: {len(rows)} variants")
    for row in rows:
        print("  " + _describe(row))
    failed = [r for r in rows if r["error"]]
    assert not failed, "compile errors:\n" + "\n".join(_describe(r) for r in failed)
    too_big = [r for r in rows if r["shared"] > SHARED_LIMIT[arch]]
    assert not too_big, "shared memory over the per-block limit:\n" + "\n".join(_describe(r) for r in too_big)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(REPO))
    json.dump(_worker(int(sys.argv[1])), sys.stdout)
