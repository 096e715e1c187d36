"""Every Triton kernel, for every autotune config, compiles to cubin for sm_80 and sm_90 — no GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole pipeline
(TTIR → TTGIR → LLVM → PTX → ptxas → cubin) on the CPU. The compiles run in one subprocess per
architecture without ``TRITON_INTERPRET`` (tests/conftest.py sets it on machines without a GPU, and an
interpreted ``@triton.jit`` function cannot be compiled), which also gives the GPU autotune configs.
Each test prints registers, spills and shared memory per config (``pytest -s`` shows them) and fails
on a compile error or on shared memory beyond what the architecture can give one block.

Compile matrix: on both architectures every config of every autotuned kernel in fp32 (the dot's
input precision is ``tf32x3``, what fp32 runs with on CUDA) and every config that survives the fp64
pruning in fp64; on sm_90 (what the benchmarks target) also every config in bf16 and the flag
variants; fp16, TF32 (and bf16 on sm_80) with the smallest config. ``pc_update_monitored`` is the
update kernel with inference control on (DESIGN §3: the device gate and the atomic step-norm sums),
swept like a kernel of its own. About 245 compiles (90 for sm_80, 154 for sm_90), ~3 min on two
idle cores. Pointers that a launcher passes as None under a
variant's flags compile as constexpr None, as the JIT compiles them; the other pointers are marked
16-byte aligned, integer sizes and strides divisible by 16, and unit strides constant 1, as the JIT
specialises contiguous tensors of 16-divisible widths at run time.

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
KERNELS = ("linear", "hidden_error", "output_error", "output_error_ce_fused", "ce_error", "pc_update",
           "pc_update_monitored", "pc_weight_grad", "tp_weight_grad", "tp_target")
WORKER_TIMEOUT_S = 600  # a hang guard; ~90 s on two idle cores, ~260 s on two busy ones
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
    from pcfast.ops import linear_epilogue, local_grad, pc_update, tp_targets

    def metas(configs):
        return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]

    def precision(dtype, tf32=False):
        return ("tf32" if tf32 else "tf32x3") if dtype == "fp32" else "ieee"

    def ptrs_of(fn, dtype, **special):
        """Tensors of ``dtype``; offset tables (``*_table_ptr``) int64; ``special`` by name (a type,
        or a function of ``dtype`` giving it)."""
        types = {n: special.get(n, "*i64" if n.endswith("_table_ptr") else f"*{dtype}")
                 for n in fn.arg_names if n.endswith("_ptr")}
        return {n: t(dtype) if callable(t) else t for n, t in types.items()}

    def absent(name, flags):
        """The pointers a launcher passes as None under ``flags`` (the JIT compiles them as constexpr None)."""
        bias, stacked = flags.get("HAS_BIAS"), flags.get("STACKED")
        off = {
            "linear": {"bias_ptr": not bias, "pred_ptr": not flags.get("STORE_PRED")},
            "hidden_error": {"bias_ptr": not bias, "w_table_ptr": not stacked, "b_table_ptr": not (stacked and bias)},
            "output_error": {"bias_ptr": not bias},
            "output_error_ce_fused": {"bias_ptr": not bias},
            "pc_update": {"u_ptr": not flags.get("FPA"), "w_table_ptr": not stacked, "gate_ptr": not flags.get("GATE"),
                          "squares_ptr": not flags.get("SQUARES")},
            "pc_weight_grad": {"grad_b_ptr": not bias},
            "tp_weight_grad": {"grad_b_ptr": not bias, "sq_ptr": not flags.get("LOSS")},
            "tp_target": {"c_ptr": not bias},
        }.get("pc_update" if name.startswith("pc_update") else name, {})
        return {pointer for pointer, is_off in off.items() if is_off}

    def pointers(name, fn, dtype, flags, **special):
        """``ptrs_of`` with the absent pointers None."""
        return {n: None if n in absent(name, flags) else t for n, t in ptrs_of(fn, dtype, **special).items()}

    sweep_dtypes = ("fp32", "bf16") if arch == 90 else ("fp32",)
    low_dtypes = ("fp16",) if arch == 90 else ("fp16", "bf16")
    out = []

    def sweep(name, tuned, flags, units, fit, variants, **special):
        """Every config in the sweep dtypes, the fp64-fitted configs, the flag ``variants`` (sm_90) and
        TF32, fp16 (and bf16 on sm_80) with the smallest config."""
        def add(meta, dtype, tf32=False, **changes):
            row_flags = dict(flags, INPUT_PRECISION=precision(dtype, tf32), **changes)
            out.append((name, tuned.fn, meta, row_flags, dtype, pointers(name, tuned.fn, dtype, row_flags, **special),
                        units))

        for dtype in sweep_dtypes:
            for meta in metas(tuned.configs):
                add(meta, dtype)
        for meta in metas(common._fp64_fit(list(tuned.configs), *fit)):
            add(meta, "fp64")
        smallest = metas(tuned.configs)[-1]
        for changes in variants if arch == 90 else ():
            add(smallest, "fp32", **changes)
        add(smallest, "fp32", tf32=True)
        for dtype in low_dtypes:
            add(smallest, dtype)

    tile = ("BLOCK_M", "BLOCK_N")
    linear_units = ("stride_ak", "stride_wk", "stride_on")
    sweep("linear", linear_epilogue._linear_kernel_tuned,
          dict(ACT_IN=1, ACT_OUT=0, HAS_BIAS=True, STORE_PRED=True, NOISE=False), linear_units, tile,
          [dict(ACT_IN=4, ACT_OUT=4), dict(NOISE=True, ACT_IN=0, ACT_OUT=1, STORE_PRED=False, HAS_BIAS=False)])
    sweep("hidden_error", linear_epilogue._hidden_error_kernel_tuned,
          dict(ACT_IN=1, HAS_BIAS=True, STACKED=False), linear_units, tile,
          [dict(ACT_IN=2), dict(STACKED=True), dict(STACKED=True, HAS_BIAS=False, ACT_IN=3)])
    output_flags = dict(ACT_IN=1, HAS_BIAS=True, LOSS=linear_epilogue.LOSS_CODES["mse"], ADD_PRED=False)
    output_units = ("stride_ak", "stride_wk", "stride_on", "stride_tn")
    sweep("output_error", linear_epilogue._output_error_kernel_tuned, output_flags, output_units, tile,
          [dict(ADD_PRED=True, ACT_IN=3), dict(HAS_BIAS=False, ACT_IN=0)])

    # CE in one tile: BLOCK_N covers the row, for every class count up to CE_FUSED_MAX_CLASSES.
    fused = linear_epilogue._output_error_kernel
    ce_flags = dict(output_flags, LOSS=linear_epilogue.LOSS_CODES["ce"])
    for dtype in sweep_dtypes:
        for c in [16, 32, 64, 128, linear_epilogue.CE_FUSED_MAX_CLASSES]:
            out.append(("output_error_ce_fused", fused, linear_epilogue.ce_fused_config(c),
                        dict(ce_flags, INPUT_PRECISION=precision(dtype)), dtype,
                        ptrs_of(fused, dtype, target_ptr="*i64"), output_units))
    fp64_flags = dict(ce_flags, ADD_PRED=True, HAS_BIAS=False, INPUT_PRECISION="ieee")
    out.append(("output_error_ce_fused", fused, linear_epilogue.ce_fused_config(16), fp64_flags, "fp64",
                pointers("output_error_ce_fused", fused, "fp64", fp64_flags, target_ptr="*i64"), output_units))

    ce = linear_epilogue._ce_error_kernel
    for dtype in ("fp32", "bf16", "fp64") if arch == 90 else ("fp32",):
        out.append(("ce_error", ce, linear_epilogue.ce_error_config(), dict(ADD_PRED=True), dtype,
                    ptrs_of(ce, dtype, labels_ptr="*i64"), ("stride_n",)))

    update_units = ("stride_ek", "stride_wn", "stride_zn")
    sweep("pc_update", pc_update._pc_update_kernel_tuned,
          dict(ACT=1, FPA=False, UPDATE_ERROR=True, STACKED=False, GATE=False, SQUARES=False), update_units, tile,
          [dict(FPA=True, ACT=4), dict(UPDATE_ERROR=False, ACT=2), dict(STACKED=True, FPA=True)])
    # Inference control on (DESIGN §3): the device gate and the atomic ‖Δz‖² sums, which the
    # launcher takes in fp32 for 16-bit states and in the state's dtype otherwise (fp64 atomics).
    sweep("pc_update_monitored", pc_update._pc_update_kernel_tuned,
          dict(ACT=1, FPA=False, UPDATE_ERROR=True, STACKED=False, GATE=True, SQUARES=True), update_units, tile,
          [dict(STACKED=True, FPA=True, ACT=4), dict(UPDATE_ERROR=False, ACT=2, STACKED=True), dict(GATE=False)],
          squares_ptr=lambda dtype: f"*{dtype}" if dtype in ("fp32", "fp64") else "*fp32")

    grad_tile = ("BLOCK_N", "BLOCK_K")
    sweep("pc_weight_grad", local_grad._pc_weight_grad_kernel_tuned,
          dict(ACT_A=1, HAS_BIAS=True, STACKED=False), ("stride_en", "stride_ak"), grad_tile,
          [dict(STACKED=True), dict(ACT_A=3, HAS_BIAS=False)])
    sweep("tp_weight_grad", local_grad._tp_weight_grad_kernel_tuned,
          dict(ACT_E=1, HAS_BIAS=True, STACKED=False, NOISE=False, LOSS=False), ("stride_tn", "stride_ak"), grad_tile,
          [dict(ACT_E=3, STACKED=True), dict(NOISE=True, LOSS=True, ACT_E=1), dict(ACT_E=0, HAS_BIAS=False)])

    sweep("tp_target", tp_targets._tp_target_kernel_tuned,
          dict(ACT=1, HAS_BIAS=True, DIFFERENCE=True), ("stride_tk", "stride_qk", "stride_on"), tile,
          [dict(DIFFERENCE=False, ACT=4), dict(HAS_BIAS=False)])
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
    constexprs.update({name: None for name, kind in pointer_types.items() if kind is None})  # absent pointers
    signature = aot_signature(fn, pointer_types, constexprs)
    # As the JIT specialises aligned tensors of 16-divisible sizes (784, 256, 4096, batch 64, …).
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if signature[name] in ("i32",) or signature[name].startswith("*")}
    row = {"kernel": kernel, "arch": arch, "dtype": dtype, "meta": meta, "flags": flags, **options,
           "absent": sorted(name for name, kind in pointer_types.items() if kind is None)}
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
