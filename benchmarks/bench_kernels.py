"""Kernel benchmark: selective scan, causal conv1d and add+RMSNorm, each backend side by side.

For every op and backend (the PyTorch path, Triton, and mamba-ssm / causal-conv1d when
installed) it measures the forward and forward+backward time, the achieved memory bandwidth
(minimum bytes the op must move / time) as a fraction of the device's peak, and the memory the
op keeps for its backward (bytes of the tensors autograd saves). Each forward+backward run takes
fresh gradients (``torch.autograd.grad``: nothing accumulates into ``.grad``). Once per op, untimed,
each other backend's output and input gradients are compared with the torch backend's on the same
inputs: the "check" column says ref (torch), ok, or MISMATCH with the largest error relative to
max(1, max |torch|); a mismatch makes the exit code 1. Default shapes are one Mamba-7B layer at
16K tokens per step: d_model 4096, d_inner 8192, d_state 16, width 4, bf16.

    python benchmarks/bench_kernels.py                  # GPU, Mamba-7B shapes
    python benchmarks/bench_kernels.py --quick          # CPU, tiny shapes, Triton interpreter
    python benchmarks/bench_kernels.py --json out.json  # also write the rows as JSON

Without --quick it needs a CUDA GPU (on a machine without one it exits with code 2).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_args import HelpFormatter, add_names_arg, needs_gpu, output_file, positive_int, progress, write_json

# Peak HBM bandwidth (bytes/s) of common training GPUs, matched by substring of the device name.
PEAK_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
    ("A10G", 0.6e12),
    ("RTX 4090", 1.008e12),
)

FULL = {
    "tokens": 16384,
    "seqlen": 2048,
    "d_model": 4096,
    "d_inner": 8192,
    "d_state": 16,
    "dtype": "bfloat16",
    "repeats": 5,
}
QUICK = {"tokens": 16, "seqlen": 8, "d_model": 32, "d_inner": 32, "d_state": 4, "dtype": "float32", "repeats": 1}
OPS = ("selective_scan", "causal_conv1d", "add_norm")
BACKENDS = ("torch", "triton", "cuda")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes on CPU through the Triton interpreter (without --quick a CUDA GPU is needed)",
    )
    p.add_argument("--tokens", type=positive_int, help="tokens per step (batch * seqlen); default 16384 (--quick: 16)")
    p.add_argument("--seqlen", type=positive_int, help="default 2048 (--quick: 8)")
    p.add_argument("--d-model", type=positive_int, help="default 4096 (--quick: 32)")
    p.add_argument("--d-inner", type=positive_int, help="default 8192 (--quick: 32)")
    p.add_argument("--d-state", type=positive_int, help="default 16 (--quick: 4)")
    p.add_argument("--width", type=int, default=4, choices=(1, 2, 3, 4), help="causal conv1d kernel width")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="default bfloat16 (--quick: float32)")
    p.add_argument("--repeats", type=positive_int, help="timed runs per measurement; default 5 (--quick: 1)")
    add_names_arg(p, "--ops", OPS)
    add_names_arg(p, "--backends", BACKENDS, "; one not installed or not usable here gets an 'unavailable' row")
    p.add_argument(
        "--json", type=output_file, default=None, help="write the result rows to this file (its directory must exist)"
    )
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tokens % args.seqlen:
        p.error(f"--tokens ({args.tokens}) must be a multiple of --seqlen ({args.seqlen})")
    return args


def peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bw in PEAK_BANDWIDTH:
        if key in name:
            return bw
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, repeats: int, warmup: bool = True) -> float:
    """Median seconds of ``fn()`` (after one warm-up call unless ``warmup`` is False)."""
    if warmup:
        fn()
        sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd saves for backward while running ``fn``."""
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def make_inputs(op: str, args, device: torch.device, dtype: torch.dtype) -> tuple[list, dict, int, int]:
    """(tensors, kwargs, bytes moved by a forward, bytes moved by forward+backward) for ``op``."""
    batch, L = args.tokens // args.seqlen, args.seqlen
    di, N, dm = args.d_inner, args.d_state, args.d_model
    esz = torch.finfo(dtype).bits // 8
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt).requires_grad_()

    def bdl(scale=1.0):  # the model's layout: (batch, d_inner, L) views of (batch, L, d_inner)
        return (
            (torch.randn(batch, L, di, generator=g) * scale)
            .to(device=device, dtype=dtype)
            .transpose(1, 2)
            .requires_grad_()
        )

    if op == "selective_scan":
        A = (-(torch.rand(di, N, generator=g) + 0.5)).to(device).requires_grad_()
        tensors = [
            bdl(),
            bdl(0.5),
            A,
            r(batch, N, L),
            r(batch, N, L),
            r(di, dt=torch.float32),
            bdl(),
            r(di, dt=torch.float32),
        ]
        big = batch * di * L * esz
        small = 2 * batch * N * L * esz
        return tensors, {"delta_softplus": True}, 4 * big + small, 11 * big + 4 * small
    if op == "causal_conv1d":
        tensors = [bdl(), r(di, args.width), r(di)]
        big = batch * di * L * esz
        return tensors, {"activation": "silu"}, 2 * big, 5 * big
    if op == "add_norm":
        x = r(batch, L, dm)
        res = r(batch, L, dm, dt=torch.float32)
        rows = batch * L * dm
        return [x, r(dm), None, res], {}, rows * (2 * esz + 8), rows * (3 * esz + 16)
    raise ValueError(f"unknown op {op!r}")


# A backend's output and input gradients match the torch backend's when max |theirs - torch| <= tol * max(1,
# max |torch|), per tensor: float rounding in a different order of the sums, at the dtype's precision.
CHECK_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def op_fn(op: str):
    """The ``openlm_mamba.ops`` function of ``op`` (it takes ``backend=``)."""
    from openlm_mamba import ops

    return {"selective_scan": ops.selective_scan, "causal_conv1d": ops.causal_conv1d, "add_norm": ops.add_norm}[op]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _leaves(tensors: list) -> list[torch.Tensor]:
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]


def outputs_and_grads(op: str, backend: str, args, device, dtype) -> list[torch.Tensor]:
    """The forward's outputs, then the gradients of every input (of ones backpropagated from the first output),
    of ``op`` through ``backend`` on the benchmark's inputs (the same ones for every backend), detached, float32."""
    tensors, kwargs, _, _ = make_inputs(op, args, device, dtype)
    out = op_fn(op)(*tensors, **kwargs, backend=backend)
    outs = list(out) if isinstance(out, tuple) else [out]
    first = outs[0]
    grads = torch.autograd.grad(first, _leaves(tensors), torch.ones_like(first), allow_unused=True)
    return [t.detach().float() if t is not None else None for t in (*outs, *grads)]


def compare(got: list, ref: list, dtype: torch.dtype) -> tuple[bool, float]:
    """(every tensor within :data:`CHECK_TOL` of the reference's, the largest error relative to max(1, max |ref|))."""
    worst, ok = 0.0, len(got) == len(ref)
    for a, b in zip(got, ref):
        if a is None or b is None:
            ok = ok and a is None and b is None
            continue
        if a.shape != b.shape:
            return False, float("inf")
        err = float((a - b).abs().max()) / max(1.0, float(b.abs().max())) if b.numel() else 0.0
        if err != err:  # NaN
            return False, float("nan")
        worst = max(worst, err)
        ok = ok and err <= CHECK_TOL[dtype]
    return ok, worst


def run_op(op: str, backend: str, args, device, dtype, reference: list | None = None) -> dict:
    """One row: times, bandwidth and saved memory of ``op`` through ``backend``; with ``reference`` (the torch
    backend's :func:`outputs_and_grads`), first, untimed, "check": "ok" or "MISMATCH" and "max_err"."""
    fn = op_fn(op)
    tensors, kwargs, fwd_bytes, total_bytes = make_inputs(op, args, device, dtype)
    leaves = _leaves(tensors)
    row = {"op": op, "backend": backend}

    def fwd():
        with torch.no_grad():
            return fn(*tensors, **kwargs, backend=backend)

    def fwd_bwd():  # autograd.grad: fresh gradients every run, none accumulated into .grad
        out = _first(fn(*tensors, **kwargs, backend=backend))
        return torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)

    try:
        if reference is not None:
            ok, err = compare(outputs_and_grads(op, backend, args, device, dtype), reference, dtype)
            row["check"], row["max_err"] = ("ok" if ok else "MISMATCH"), err
        row["fwd_ms"] = timeit(fwd, device, args.repeats, not args.quick) * 1e3
        row["fwd_bwd_ms"] = timeit(fwd_bwd, device, args.repeats, not args.quick) * 1e3
        row["saved_MiB"] = saved_bytes(lambda: _first(fn(*tensors, **kwargs, backend=backend))) / 2**20
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
        torch.cuda.empty_cache()
        return row
    except Exception as exc:  # one op/backend failing must not hide the other rows
        row["error"] = f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
        return row
    peak = peak_bandwidth(device)
    if peak:
        row["fwd_bw_frac"] = fwd_bytes / (row["fwd_ms"] / 1e3) / peak
        row["fwd_bwd_bw_frac"] = total_bytes / (row["fwd_bwd_ms"] / 1e3) / peak
    return row


def check_text(r: dict) -> str:
    """The row's "check" column: ref (the torch backend), ok / MISMATCH <max err>, or - (not checked)."""
    if r["backend"] == "torch":
        return "ref"
    if "check" not in r:
        return "-"
    return "ok" if r["check"] == "ok" else f"MISMATCH {r['max_err']:.1e}"


def fmt(v, spec: str) -> str:
    width = int(spec.split(".")[0])
    return "-".rjust(width) if v is None else format(v, spec)


def device_name(device: torch.device) -> str:
    """The GPU's name, or CPU (saying whether Triton kernels run through its interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from openlm_mamba.ops.triton_utils import interpreting

    return "CPU (Triton interpreter)" if interpreting() else "CPU"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        if not args.quick:
            return needs_gpu("bench_kernels")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported
    from openlm_mamba.ops import available_backends

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    name = device_name(device)
    batch = args.tokens // args.seqlen
    print(
        f"device: {name}; tokens {args.tokens} (batch {batch} x seqlen {args.seqlen}), d_model {args.d_model}, "
        f"d_inner {args.d_inner}, d_state {args.d_state}, width {args.width}, {args.dtype}; median of {args.repeats}"
    )
    rows = []
    for op in args.ops:
        have = available_backends(op, device)
        reference, ref_error = None, None
        if any(b != "torch" and b in have for b in args.backends):  # once per op, untimed
            try:
                reference = outputs_and_grads(op, "torch", args, device, dtype)
            except Exception as exc:  # e.g. out of memory: the rows still run, unchecked
                ref_error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
                progress(f"# {op}: torch reference failed ({ref_error}); the other backends are not checked")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        for backend in args.backends:
            if backend not in have:
                rows.append({"op": op, "backend": backend, "error": "unavailable"})
                progress(f"# {op} {backend}: unavailable")
                continue
            rows.append(run_op(op, backend, args, device, dtype, None if backend == "torch" else reference))
            r = rows[-1]
            progress(
                f"# {op} {backend}: "
                + (
                    r["error"]
                    if "error" in r
                    else f"fwd {r['fwd_ms']:.3f} ms, fwd+bwd {r['fwd_bwd_ms']:.3f} ms, check {check_text(r)}"
                )
            )
    header = (
        f"{'op':16s} {'backend':8s} {'fwd ms':>10s} {'fwd+bwd ms':>11s} {'fwd BW':>7s} {'f+b BW':>7s} "
        f"{'saved MiB':>10s}  check"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['op']:16s} {r['backend']:8s} {r['error']}")
            continue
        print(
            f"{r['op']:16s} {r['backend']:8s} {fmt(r['fwd_ms'], '10.3f')} {fmt(r['fwd_bwd_ms'], '11.3f')} "
            f"{fmt(r.get('fwd_bw_frac'), '7.1%')} {fmt(r.get('fwd_bwd_bw_frac'), '7.1%')} {fmt(r['saved_MiB'], '10.2f')}"
            f"  {check_text(r)}"
        )
    print("BW = minimum bytes the op must move / time, as a fraction of the device's peak HBM bandwidth")
    tol = CHECK_TOL[dtype]
    print(
        f"check = output and input gradients vs the torch backend's (ref), untimed: ok when every tensor's max "
        f"|error| <= {tol:g} x max(1, max |torch|)"
    )
    if args.json:
        write_json(args.json, {"device": name, "args": vars(args), "rows": rows})
    failed = [r for r in rows if r.get("error") not in (None, "unavailable") or r.get("check") == "MISMATCH"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
