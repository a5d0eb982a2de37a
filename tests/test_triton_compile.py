"""The Triton kernels compile for an H100 (sm_90) without a GPU, through Triton's ahead-of-time compiler.

The interpreter tests check what the kernels compute; this checks that the native path builds
(type errors, unsupported ops and register-allocation failures only show up when compiling).
Runs in a fresh process without TRITON_INTERPRET, so the kernels are real JIT functions.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Both scripts below start with this: the Triton signature of a kernel, its int arguments typed i32 as Triton
# types int arguments below 2^31.
SIGNATURE = textwrap.dedent(
    """
    def signature(jit, consts, ptr_types=None, floats=()):
        sig = {}
        for name in jit.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = (ptr_types or {}).get(name, "*fp32")
            else:
                sig[name] = "fp32" if name in floats else "i32"
        return sig
    """
)

COMPILE = SIGNATURE + textwrap.dedent(
    """
    import itertools, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from openlm_mamba.ops.selective_scan import triton as ss
    from openlm_mamba.ops.causal_conv1d import triton as cc
    from openlm_mamba.ops.rms_norm import triton as rn
    from openlm_mamba.ops.state_update import triton as su

    FULL = sys.argv[1] == "full"
    target = GPUTarget("cuda", 90, 32)
    count = 0

    def compile_kernel(jit, consts, ptr_types, floats=(), warps=4):
        global count
        sig = signature(jit, consts, ptr_types, floats)
        kernel = triton.compile(ASTSource(jit, sig, constexprs=consts), target=target, options={"num_warps": warps})
        assert kernel.asm.get("cubin"), jit.__name__
        count += 1

    flag_sets = list(itertools.product([True, False], repeat=3)) if FULL else [(True, True, True), (False, False, False)]
    for dt in ("*bf16", "*fp32") if FULL else ("*bf16",):
        io = dict.fromkeys(["u_ptr", "dl_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "go_ptr", "du_ptr", "ddl_ptr", "dz_ptr"], dt)
        for a, b, c in flag_sets:
            common = dict(HAS_D=a, HAS_Z=b, SOFTPLUS=c, HAS_BIAS=c, ACC=tl.float32, CHUNK=128, BLOCK_N=16)
            for which, launch in ss.GPU_LAUNCH.items():  # the default launch shapes
                tile, bd, warps = launch[:3]
                seq = len(launch) > 3 and launch[3] == "seq"
                extra = dict(FAST_EXP=True, ASM=True) if seq else {}
                if which == "fwd":
                    consts = dict(common, TILE=tile, BLOCK_D=bd, HAS_H0=a, SAVE=b, **extra)
                    compile_kernel(ss._scan_fwd_seq_kernel if seq else ss._scan_fwd_kernel, consts, io, warps=warps)
                else:
                    consts = dict(common, TILE=tile, BLOCK_D=bd, HAS_GL=a, **extra)
                    compile_kernel(ss._scan_bwd_seq_kernel if seq else ss._scan_bwd_kernel, consts, io, warps=warps)
            for tile, bd, warps in [(2, 128, 4), (1, 128, 4), (4, 64, 2)] if FULL else [(2, 128, 4)]:  # seq kernels
                consts = dict(common, TILE=tile, BLOCK_D=bd, HAS_H0=a, SAVE=b, FAST_EXP=True, ASM=True)  # as on a GPU
                compile_kernel(ss._scan_fwd_seq_kernel, consts, io, warps=warps)
                consts = dict(common, TILE=tile, BLOCK_D=bd, HAS_GL=a, FAST_EXP=True, ASM=True)
                compile_kernel(ss._scan_bwd_seq_kernel, consts, io, warps=warps)
        io = dict.fromkeys(["x_ptr", "w_ptr", "b_ptr", "i_ptr", "o_ptr", "go_ptr", "dx_ptr", "di_ptr"], dt)
        for W in (1, 2, 3, 4) if FULL else (4,):
            for a, b, c in flag_sets:
                consts = dict(W=W, HAS_BIAS=a, HAS_INIT=b and W > 1, SILU=c, ACC=tl.float32, BLOCK_D=16, BLOCK_T=128)
                compile_kernel(cc._conv_fwd_kernel, consts, io)
                compile_kernel(cc._conv_bwd_kernel, consts, io)
            # the tile used for channels-last inputs (the model's layout)
            consts = dict(W=W, HAS_BIAS=True, HAS_INIT=W > 1, SILU=True, ACC=tl.float32, BLOCK_D=64, BLOCK_T=32)
            compile_kernel(cc._conv_fwd_kernel, consts, io)
            compile_kernel(cc._conv_bwd_kernel, consts, io)
        io = dict.fromkeys(["x_ptr", "w_ptr", "b_ptr", "o_ptr", "go_ptr", "dx_ptr"], dt)
        for a, b, c in flag_sets:
            fwd = dict(HAS_RES=a, HAS_BIAS=b, IS_RMS=c, STORE_RES=True, ACC=tl.float32, BLOCK_M=1, BLOCK_H=4096)
            compile_kernel(rn._add_norm_fwd_kernel, fwd, io, floats=("eps",))
            bwd = dict(HAS_RES=a, HAS_GR=b, IS_RMS=c, ACC=tl.float32, BLOCK_M=1, BLOCK_H=4096)
            compile_kernel(rn._add_norm_bwd_kernel, bwd, io)
        io = dict.fromkeys(["x_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr"], dt)  # the state stays fp32
        for a, b, c in flag_sets:  # the decode step
            consts = dict(HAS_D=a, HAS_Z=b, HAS_DT_BIAS=c, DT_SOFTPLUS=c, BLOCK_D=64, BLOCK_N=16, ACC=tl.float32)
            compile_kernel(su._state_update_kernel, consts, io)
    ptrs = [n for n in su._state_update_kernel.arg_names if n.endswith("_ptr")]
    consts = dict(HAS_D=True, HAS_Z=True, HAS_DT_BIAS=True, DT_SOFTPLUS=True, BLOCK_D=64, BLOCK_N=16, ACC=tl.float64)
    compile_kernel(su._state_update_kernel, consts, dict.fromkeys(ptrs, "*fp64"))  # a float64 decode step
    print(f"compiled {count} kernels for sm_90")
    """
)

# Every address is base + index * stride. Triton types a program id, a loop counter and an int
# argument below 2^31 as int32, so such a product wraps unless one side is int64 first: at Mamba-7B
# sizes z's batch stride is 2 * seqlen * d_inner, its time stride 2 * d_inner (a 131072-token
# sequence passes 2^31), and the norm's row offset rows * d_model passes it from 524288 tokens. This
# follows the values computed from program ids and loop counters through each kernel's Triton IR
# and lists every int32 multiplication of one by a large argument.
INDEX_PRODUCTS = SIGNATURE + textwrap.dedent(
    """
    import re
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from openlm_mamba.ops.selective_scan import triton as ss
    from openlm_mamba.ops.causal_conv1d import triton as cc
    from openlm_mamba.ops.rms_norm import triton as rn
    from openlm_mamba.ops.state_update import triton as su

    # int arguments whose products with an index stay far below 2^31 (strides over d_state, over
    # the channels of per-channel parameters and steps, group counts); every other one (batch,
    # channel and time strides of activations, seqlen, dim, hidden size) is large
    SMALL = {
        "dpg", "N", "M", "sA_d", "sA_n", "sB_g", "sB_n", "sC_g", "sC_n", "sh_d", "sh_n", "sgl_d", "sgl_n",
        "sw_d", "sw_k", "ratio", "dstate", "s_sd", "s_sn", "s_xd", "s_td", "s_ad", "s_an", "s_bg", "s_bn",
        "s_cg", "s_cn", "s_zd", "s_od",
    }
    SSA = re.compile(r"%([\\w.$-]+)")


    def narrow_products(ttir, large):
        index = set(re.findall(r"scf\\.for %([\\w.$-]+) =", ttir))  # loop counters
        large = set(large)
        bad = []
        for line in ttir.splitlines():
            m = re.match(r"\\s*%([\\w.$-]+)(?::\\d+)? = (\\S+) (.*)", line)
            if not m:
                continue
            res, op, rest = m.group(1), m.group(2), m.group(3).split(" loc(")[0]
            operands = [o.split("#")[0] for o in SSA.findall(rest.split(" : ")[0])]
            if op == "tt.get_program_id" or index.intersection(operands):
                index.add(res)
            if large.intersection(operands):
                large.add(res)
            if op == "arith.muli" and re.search(r"(: i32|xi32>)$", rest.strip()) and len(operands) == 2:
                a, b = operands
                if (a in index and b in large) or (b in index and a in large):
                    bad.append(line.strip())
        return bad


    target = GPUTarget("cuda", 90, 32)
    found = 0


    def check(jit, consts, floats=()):
        global found
        sig = signature(jit, consts, floats=floats)
        large = [n for n, t in sig.items() if t == "i32" and n not in SMALL]
        ttir = triton.compile(ASTSource(jit, sig, constexprs=consts), target=target).asm["ttir"]
        for line in narrow_products(ttir, large):
            print(f"{jit.__name__}: int32 index * stride: {line}")
            found += 1


    scan = dict(HAS_D=True, HAS_Z=True, SOFTPLUS=True, HAS_BIAS=True, ACC=tl.float32, CHUNK=128, TILE=8, BLOCK_D=16, BLOCK_N=16)
    check(ss._scan_fwd_kernel, dict(scan, HAS_H0=True, SAVE=True))
    check(ss._scan_bwd_kernel, dict(scan, HAS_GL=True))
    check(ss._scan_fwd_seq_kernel, dict(scan, HAS_H0=True, SAVE=True, TILE=2, BLOCK_D=128, FAST_EXP=True, ASM=True))
    check(ss._scan_bwd_seq_kernel, dict(scan, HAS_GL=True, TILE=2, BLOCK_D=128, FAST_EXP=True, ASM=True))
    conv = dict(W=4, HAS_BIAS=True, HAS_INIT=True, SILU=True, ACC=tl.float32, BLOCK_D=64, BLOCK_T=32)
    check(cc._conv_fwd_kernel, conv)
    check(cc._conv_bwd_kernel, conv)
    norm = dict(HAS_RES=True, IS_RMS=False, ACC=tl.float32, BLOCK_M=4, BLOCK_H=1024)
    check(rn._add_norm_fwd_kernel, dict(norm, HAS_BIAS=True, STORE_RES=True), floats=("eps",))
    check(rn._add_norm_bwd_kernel, dict(norm, HAS_GR=True))
    check(su._state_update_kernel, dict(HAS_D=True, HAS_Z=True, HAS_DT_BIAS=True, DT_SOFTPLUS=True, BLOCK_D=64, BLOCK_N=16, ACC=tl.float32))
    print(f"{found} int32 index products in 9 kernels")
    """
)


def _nvidia_backend() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _nvidia_backend(), reason="triton with its NVIDIA backend is not installed")


def compile_all(which: str, script: str = COMPILE) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-c", script, which], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    return proc.stdout


def test_kernels_compile_for_sm90():
    assert "compiled 23 kernels" in compile_all("ci")


@pytest.mark.slow
def test_all_kernel_variants_compile_for_sm90():
    assert "compiled 337 kernels" in compile_all("full")


def test_index_times_stride_is_computed_in_int64():
    out = compile_all("", INDEX_PRODUCTS)
    assert "0 int32 index products in 9 kernels" in out, out
