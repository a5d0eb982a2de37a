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

COMPILE = textwrap.dedent(
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
        sig = {}
        for name in jit.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = ptr_types.get(name, "*fp32")
            else:
                sig[name] = "fp32" if name in floats else "i32"
        kernel = triton.compile(ASTSource(jit, sig, constexprs=consts), target=target, options={"num_warps": warps})
        assert kernel.asm.get("cubin"), jit.__name__
        count += 1

    flag_sets = list(itertools.product([True, False], repeat=3)) if FULL else [(True, True, True), (False, False, False)]
    for dt in ("*bf16", "*fp32") if FULL else ("*bf16",):
        io = dict.fromkeys(["u_ptr", "dl_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "go_ptr", "du_ptr", "ddl_ptr", "dz_ptr"], dt)
        for a, b, c in flag_sets:
            common = dict(HAS_D=a, HAS_Z=b, SOFTPLUS=c, HAS_BIAS=c, ACC=tl.float32, CHUNK=128, BLOCK_N=16)
            for which, launch in ss.GPU_LAUNCH.items():  # the default launch shapes
                tile, bd, warps = launch
                if which == "fwd":
                    consts = dict(common, TILE=tile, BLOCK_D=bd, HAS_H0=a, SAVE=b)
                    compile_kernel(ss._scan_fwd_kernel, consts, io, warps=warps)
                else:
                    compile_kernel(ss._scan_bwd_kernel, dict(common, TILE=tile, BLOCK_D=bd, HAS_GL=a), io, warps=warps)
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
            consts = dict(HAS_D=a, HAS_Z=b, HAS_DT_BIAS=c, DT_SOFTPLUS=c, BLOCK_D=64, BLOCK_N=16)
            compile_kernel(su._state_update_kernel, consts, io)
    print(f"compiled {count} kernels for sm_90")
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


def compile_all(which: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE, which], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    return proc.stdout


def test_kernels_compile_for_sm90():
    assert "compiled 18 kernels" in compile_all("ci")


@pytest.mark.slow
def test_all_kernel_variants_compile_for_sm90():
    assert "compiled 240 kernels" in compile_all("full")
