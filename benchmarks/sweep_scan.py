"""Launch-shape sweep of the Triton selective scan: (TILE, BLOCK_D, num_warps) for forward and backward,
and the two kernels of each pass (the tile kernels; "seq:" shapes: the plain recurrence).

Times each forward shape (forward only) and each backward shape (forward + backward, forward at
its default) at Mamba-7B shapes, checks every result against the PyTorch backend, and prints
one table; the defaults live in ``openlm_mamba.ops.selective_scan.triton.GPU_LAUNCH``. Kernels
are compiled in parallel worker processes first (Triton's on-disk cache), then timed one at a
time in this process.

    python benchmarks/sweep_scan.py                      # GPU, default candidate shapes
    python benchmarks/sweep_scan.py --fwd 16x16x4,8x16x4 --bwd 8x16x4
    python benchmarks/sweep_scan.py --fwd 8x16x4,seq:1x128x4 --bwd 4x32x4,seq:1x128x4   # both kernels
    python benchmarks/sweep_scan.py --quick              # tiny; on CPU through the interpreter (CI smoke test)

Without --quick it needs a CUDA GPU (on a machine without one it exits with code 2). --quick
takes tiny inputs and, unless --fwd / --bwd are given, two forward and one backward shape.
A shape that fails to compile or run is a row of the table, not the end of the sweep.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_args import HelpFormatter, needs_gpu, nonneg_int, output_file, shape_list, write_json

FWD = "8x16x4,16x16x4,8x32x8,seq:1x128x4,seq:2x128x4,seq:4x128x4,seq:2x64x2,seq:1x256x4"
BWD = "4x32x4,4x16x2,2x64x4,8x32x4,seq:1x128x4,seq:2x128x4,seq:1x64x2,seq:2x64x2"
QUICK_FWD, QUICK_BWD = "4x16x1,seq:2x16x1", "4x16x1,seq:2x16x1"


def _setup(quick: bool):
    import bench_kernels as bk
    import torch

    if quick and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported

    args = bk.parse_args(["--quick"] if quick else [])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tensors, kwargs, fwd_bytes, total_bytes = bk.make_inputs("selective_scan", args, device, getattr(torch, args.dtype))
    return bk, args, device, tensors, kwargs, fwd_bytes, total_bytes


def _run(tensors, kwargs, which: str, launch, backend: str = "triton"):
    """Output (and gradients for "bwd") of the scan with ``launch`` as the ``which`` default shape."""
    import torch

    from openlm_mamba import ops
    from openlm_mamba.ops.selective_scan import triton as ss

    saved = dict(ss.GPU_LAUNCH), dict(ss.CPU_LAUNCH)
    try:
        if launch:
            ss.GPU_LAUNCH[which] = ss.CPU_LAUNCH[which] = tuple(launch)
            if which == "bwd":
                ss.GPU_LAUNCH["bwd_wide"] = tuple(launch)
        if which == "fwd":
            with torch.no_grad():
                return [ops.selective_scan(*tensors, **kwargs, backend=backend)]
        out = ops.selective_scan(*tensors, **kwargs, backend=backend)
        grads = torch.autograd.grad(out, [t for t in tensors if t is not None], torch.ones_like(out))
        return [out, *grads]
    finally:
        ss.GPU_LAUNCH.update(saved[0])
        ss.CPU_LAUNCH.update(saved[1])


def ss_env() -> str:
    from openlm_mamba.ops.selective_scan.triton import LAUNCH_ENV

    return LAUNCH_ENV


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"


def _compile_worker(job) -> tuple[str, tuple[int, int, int], str | None]:
    """Compile one launch shape by running it once (fills Triton's cache for the timing process);
    returns (pass, shape, None) or, when it failed, (pass, shape, the error)."""
    quick, which, launch = job
    try:
        _, _, _, tensors, kwargs, _, _ = _setup(quick)
        _run(tensors, kwargs, which, launch)
    except Exception as exc:  # a shape that does not compile is a result row, not the end of the sweep
        return which, launch, _error(exc)
    return which, launch, None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--fwd",
        type=shape_list,
        help=f"forward shapes [seq:]TILExBLOCK_DxWARPS, comma-separated (default {FWD}; --quick: {QUICK_FWD})",
    )
    p.add_argument("--bwd", type=shape_list, help=f"backward shapes, same form (default {BWD}; --quick: {QUICK_BWD})")
    p.add_argument(
        "--jobs",
        type=nonneg_int,
        help="parallel compile workers (default 8, --quick 0; 0: compile while timing)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes, few launch shapes (CPU: through the interpreter); without --quick a CUDA GPU is needed",
    )
    p.add_argument("--json", type=output_file, help="also write the rows here (its directory must exist)")
    args = p.parse_args(argv)
    fwd = args.fwd if args.fwd is not None else shape_list(QUICK_FWD if args.quick else FWD)
    bwd = args.bwd if args.bwd is not None else shape_list(QUICK_BWD if args.quick else BWD)
    if args.jobs is None:
        args.jobs = 0 if args.quick else 8
    import torch

    if not args.quick and not torch.cuda.is_available():
        return needs_gpu("sweep_scan")
    if args.quick and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before ss_env() below first imports the kernels
    if os.environ.pop(ss_env(), None) is not None:  # it would override every row's launch shape
        print(f"sweep_scan: ignoring ${ss_env()} (each row sets its own launch shape)", file=sys.stderr)
    bk, bargs, device, tensors, kwargs, fwd_bytes, total_bytes = _setup(args.quick)

    failed: dict[tuple[str, tuple[int, int, int]], str] = {}  # shapes whose compile worker failed
    if args.jobs:
        jobs = [(args.quick, "fwd", s) for s in fwd] + [(args.quick, "bwd", s) for s in bwd]
        with mp.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
            for i, (which, launch, err) in enumerate(pool.imap_unordered(_compile_worker, jobs), 1):
                print(f"# compiled {i}/{len(jobs)}: {which} {launch}" + (f": failed: {err}" if err else ""), flush=True)
                if err:
                    failed[which, tuple(launch)] = err

    ref = {w: _run(tensors, kwargs, w, None, backend="torch") for w in ("fwd", "bwd")}
    peak = bk.peak_bandwidth(device)
    rows = []
    for which, shapes, nbytes in (("fwd", fwd, fwd_bytes), ("bwd", bwd, total_bytes)):
        for shape in shapes:
            row = {"pass": which, "kernel": shape[3] if len(shape) > 3 else "tile"}
            row.update(tile=shape[0], block_d=shape[1], warps=shape[2])
            if (which, tuple(shape)) in failed:
                row["error"] = failed[which, tuple(shape)]
                rows.append(row)
                print(f"# {row}", flush=True)
                continue
            try:
                got = _run(tensors, kwargs, which, shape)
                row["rel_err"] = max(
                    ((g.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30)).item()
                    for g, r in zip(got, ref[which])
                )
                sec = bk.timeit(
                    lambda w=which, s=shape: _run(tensors, kwargs, w, s), device, bargs.repeats, not args.quick
                )
                row["ms"] = sec * 1e3
                row["bw_frac"] = nbytes / sec / peak if peak else None
            except Exception as exc:  # a shape that does not compile or fit is a result, not a crash
                row["error"] = _error(exc)
            rows.append(row)
            print(f"# {row}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    name = bk.device_name(device)
    print(f"\nselective scan launch sweep: {name}, tokens {bargs.tokens}, d_inner {bargs.d_inner}, {bargs.dtype}")
    print("| pass | kernel | TILE | BLOCK_D | warps | ms | BW | max rel err vs torch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['pass']} | {r['kernel']} | {r['tile']} | {r['block_d']} | {r['warps']} |"
        if "error" in r:
            print(f"{head} {r['error']} | | |")
            continue
        bw = f"{r['bw_frac']:.1%}" if r.get("bw_frac") else "-"
        print(f"{head} {r['ms']:.3f} | {bw} | {r['rel_err']:.1e} |")
    print(
        "(fwd: forward only; bwd: forward + backward with the default forward shape; kernel seq: the plain "
        "recurrence, TILE = steps unrolled)"
    )
    ok = [r for r in rows if "ms" in r and r["rel_err"] < 2e-2]
    best = {}
    for which in ("fwd", "bwd"):
        mine = [r for r in ok if r["pass"] == which]
        if mine:
            r = min(mine, key=lambda r: r["ms"])
            best[which] = ("seq:" if r["kernel"] == "seq" else "") + f"{r['tile']}x{r['block_d']}x{r['warps']}"
    if best:
        print("best launch:", ",".join(f"{k}={v}" for k, v in best.items()), f"(set ${ss_env()} to use it)")
        for which in ("fwd", "bwd"):
            if which not in best:
                print(f"no {which} launch shape ran and matched torch (see the table)")
    else:
        print("best launch: none: no launch shape ran and matched torch (see the table)")
    if args.json:
        write_json(args.json, {"device": name, "rows": rows, "best": best})
    measured = [r for r in rows if "ms" in r]
    return 0 if measured and len(ok) == len(measured) else 1


if __name__ == "__main__":
    sys.exit(main())
