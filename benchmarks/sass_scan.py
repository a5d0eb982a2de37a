"""Static cost of the selective-scan kernels on an H100 / H200 (sm_90), without a GPU.

Compiles each launch shape with Triton's ahead-of-time compiler, specialised as a Mamba-7B launch is
(the model's unit strides as constants, every other size divisible by 16), and counts the SASS
instructions in the innermost loops (the backward has two per tile: the recompute and the walk back,
summed): per (token, channel, state) update that is the number a GPU issues, which bounds an
instruction-bound kernel's speed (for the default tile kernels the counts match Nsight Compute's
measurements on an H200: ~64 forward, ~200 backward). Registers and stack (spill) bytes per thread come
from cuobjdump.

    python benchmarks/sass_scan.py                                  # the default and the seq candidates
    python benchmarks/sass_scan.py 8x16x4 seq:1x128x4 seq:2x256x4   # chosen launches ([seq:]TILExBLOCK_DxWARPS)
    python benchmarks/sass_scan.py --backward                       # the backward kernels

Needs triton with its NVIDIA backend (cuobjdump ships with it); no GPU. Counts depend on
the Triton version: the table in BENCHMARKS.md was made with Triton 3.6, the H200 image's.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _bench_args import HelpFormatter, shape_list

DEFAULT = {
    "fwd": "8x16x4,16x16x4,seq:1x128x4,seq:2x128x4,seq:4x128x4,seq:1x256x4",
    "bwd": "4x32x4,4x16x2,seq:1x128x4,seq:2x128x4,seq:1x64x2,seq:2x64x2",
}
# unit strides of the model's tensors: u, delta, z and out are (batch, d_inner, L) views with the channels
# contiguous; B and C (batch, d_state, L) views with the states contiguous; A as each kernel is given it
MODEL_ONES = {"su_d": 1, "sd_d": 1, "sz_d": 1, "so_d": 1, "sB_n": 1, "sC_n": 1}
MODEL_ONES_BWD = {"sgo_d": 1, "sdu_d": 1, "sdd_d": 1, "sdz_d": 1}
BF16_PTRS = ("u_ptr", "dl_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "go_ptr", "du_ptr", "ddl_ptr", "dz_ptr")


def loop_counts(cubin: Path, cuobjdump: str) -> list[tuple[int, collections.Counter, int, int]]:
    """(instructions, opcode counts, first, last instruction index) of each loop (a backward branch) in ``cubin``."""
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    ins = [
        (int(m.group(1), 16), m.group(2).strip())
        for m in (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines())
        if m
    ]
    index = {addr: i for i, (addr, _) in enumerate(ins)}
    loops = []
    for i, (addr, text) in enumerate(ins):
        target = re.search(r"BRA\s.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr and int(target.group(1), 16) in index:
            start = index[int(target.group(1), 16)]
            body = [t.split()[1] if t.startswith("@") else t.split()[0] for _, t in ins[start : i + 1]]
            loops.append((len(body), collections.Counter(op.split(".")[0] for op in body), start, i))
    return loops


def compile_launch(launch: tuple, tmp: Path, backward: bool = False) -> dict:
    """Registers, stack bytes and inner-loop instructions per state update of one forward (or backward) launch."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from openlm_mamba.ops.selective_scan import triton as ss

    tile, block_d, warps = launch[:3]
    seq = len(launch) > 3
    if backward:
        jit = ss._scan_bwd_seq_kernel if seq else ss._scan_bwd_kernel
        consts = dict(HAS_D=True, HAS_Z=True, SOFTPLUS=True, HAS_BIAS=True, HAS_GL=False, ACC=tl.float32)
        consts.update(MODEL_ONES_BWD)
    else:
        jit = ss._scan_fwd_seq_kernel if seq else ss._scan_fwd_kernel
        consts = dict(HAS_D=True, HAS_Z=True, SOFTPLUS=True, HAS_BIAS=True, HAS_H0=False, SAVE=True, ACC=tl.float32)
    consts.update(CHUNK=128, TILE=tile, BLOCK_D=block_d, BLOCK_N=16)
    consts.update({k: v for k, v in MODEL_ONES.items() if k in jit.arg_names})
    consts["sA_d" if seq else "sA_n"] = 1  # the seq kernel is given A channel-contiguous
    if seq:
        consts.update(FAST_EXP=True, ASM=True)
    sig, attrs = {}, {}
    for i, name in enumerate(jit.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        sig[name] = ("*bf16" if name in BF16_PTRS else "*fp32") if name.endswith("_ptr") else "i32"
        attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(
        ASTSource(jit, sig, constexprs=consts, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": warps},
    )
    cuobjdump = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    cubin = tmp / "k.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    usage = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    loops = loop_counts(cubin, cuobjdump)
    inner = [lp for lp in loops if not any(o is not lp and lp[2] <= o[2] and o[3] <= lp[3] for o in loops)]
    n = sum(lp[0] for lp in inner)
    ops = sum((lp[1] for lp in inner), collections.Counter())
    updates = tile * block_d * 16 / (32 * warps)  # (steps x channels x d_state) per thread per iteration
    return {
        "registers": int(regs.group(1)) if regs else None,
        "stack_bytes": int(stack.group(1)) if stack else None,
        "per_update": n / updates,
        "top": ", ".join(f"{op} {c / updates:.1f}" for op, c in ops.most_common(6)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "launches",
        nargs="*",
        type=shape_list,
        help=f"launches [seq:]TILExBLOCK_DxWARPS (default {DEFAULT['fwd']}; with --backward {DEFAULT['bwd']})",
    )
    p.add_argument("--backward", action="store_true", help="count the backward kernels instead of the forward ones")
    args = p.parse_args(argv)
    which = "bwd" if args.backward else "fwd"
    launches = [s for group in (args.launches or [shape_list(DEFAULT[which])]) for s in group]
    try:
        import triton
        from triton.backends import backends

        if "nvidia" not in backends:
            raise ImportError("triton has no NVIDIA backend")
    except ImportError as exc:
        print(f"sass_scan: needs triton with its NVIDIA backend ({exc})", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0"):
        print("sass_scan: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)", file=sys.stderr)
        return 2
    for launch in launches:
        if any(v & (v - 1) for v in launch[:3]):
            p.error(f"launch {'x'.join(map(str, launch[:3]))}: every number must be a power of two")
    kind = "backward" if args.backward else "forward"
    print(f"selective scan {kind} on sm_90, Triton {triton.__version__}, Mamba-7B specialisation, bf16 inputs")
    print("| launch | registers | stack bytes (spills) | instructions per state update | most frequent (per update) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, launch in enumerate(launches, 1):
            name = ("seq:" if len(launch) > 3 else "") + "x".join(str(v) for v in launch[:3])
            print(f"# {i}/{len(launches)}: {name}", file=sys.stderr, flush=True)
            r = compile_launch(launch, Path(tmp), args.backward)
            print(
                f"| {name} | {r['registers']} | {r['stack_bytes']} | {r['per_update']:.1f} | {r['top']} |", flush=True
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
