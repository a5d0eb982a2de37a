"""Training step on a GPU: openlm_mamba (Triton kernels) vs mambapy vs transformers' MambaForCausalLM.

Same config and weights for every contender (transformers without mamba-ssm runs its PyTorch
path, which is what users get when the CUDA build fails). One step = forward + cross-entropy +
backward under bf16 autocast, as OpenLM trains. Reports the median step time, tokens/s, peak
GPU memory and each contender's time relative to openlm_mamba, measured in this one run.
openlm_mamba+ckpt adds gradient checkpointing; openlm_mamba+seq runs the scan's opt-in
plain-recurrence kernels ($OPENLM_MAMBA_SCAN_LAUNCH set for its steps only; left out of the
default contenders where the scan does not run on Triton, e.g. on CPU). A contender that fails
is a "failed" row and the exit code is 1.

    python benchmarks/bench_train_gpu.py                       # mamba_130m, 4 x 2048 tokens, bf16
    python benchmarks/bench_train_gpu.py --model mamba_370m --batch 8
    python benchmarks/bench_train_gpu.py --quick               # tiny, CPU, seconds (CI smoke test)

Without --quick it needs a CUDA GPU (on a machine without one it exits with code 2), unless
--device cpu is given explicitly. --quick fills only the flags not given on the command line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_args import (
    HelpFormatter,
    check_backend,
    check_cuda_device,
    name_list,
    needs_gpu,
    nonneg_int,
    output_file,
    positive_int,
    write_json,
)
from bench_cpu import _build

from openlm_mamba import ConfigError, MambaConfig
from openlm_mamba.ops import dispatch
from openlm_mamba.ops.dispatch import BACKENDS
from openlm_mamba.ops.selective_scan.triton import LAUNCH_ENV  # read per launch by the Triton scan

CONTENDERS = ("openlm_mamba", "openlm_mamba+ckpt", "openlm_mamba+seq", "mambapy", "transformers")
# openlm_mamba+seq: the scan's opt-in plain-recurrence kernels (README, "How the scan works")
SEQ_LAUNCH = "fwd=seq:1x128x4,bwd=seq:1x128x4"
# Defaults of the flags --quick changes (None on the command line: filled from here).
FULL = {"model": "mamba_130m", "batch": 4, "seq": 2048, "dtype": "bfloat16", "runs": 5, "hf_runs": 2}
QUICK = {"model": "mamba_tiny", "batch": 2, "seq": 64, "dtype": "float32", "runs": 1, "hf_runs": 1}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(name: str, cfg, args) -> dict:
    """Median fwd+bwd step time and peak memory of one contender (built with seeded weights)."""
    model, fwd = _build(name.split("+")[0], cfg)
    model = model.to(args.device).train()
    if name.startswith("openlm_mamba"):
        model.set_backend(args.backend)
        model.set_grad_checkpointing(name.endswith("+ckpt"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(args.device)
    inp, tgt = ids[:, :-1], ids[:, 1:]
    amp = args.dtype != "float32"

    def step() -> float:
        with torch.autocast(args.device.split(":")[0], dtype=getattr(torch, args.dtype), enabled=amp):
            logits = fwd(inp)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    runs, warmup = (args.hf_runs, args.hf_warmup) if name == "transformers" else (args.runs, args.warmup)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], float("nan")
    saved = os.environ.get(LAUNCH_ENV)
    if name.endswith("+seq"):
        os.environ[LAUNCH_ENV] = SEQ_LAUNCH
    try:
        for i in range(warmup + runs):
            _sync(args.device)
            t0 = time.perf_counter()
            loss = step()
            _sync(args.device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        if saved is None:
            os.environ.pop(LAUNCH_ENV, None)
        else:
            os.environ[LAUNCH_ENV] = saved
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    return {"name": name, "times": times, "median_s": statistics.median(times), "peak_gib": peak, "loss": loss}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)

    def default(key: str) -> str:
        return f"default {FULL[key]}; --quick: {QUICK[key]}"

    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny model on CPU, 1 run (CI smoke test); fills only the flags not given",
    )
    p.add_argument("--model", help=f"model config name or JSON path ({default('model')})")
    p.add_argument("--batch", type=positive_int, help=f"sequences per step ({default('batch')})")
    p.add_argument("--seq", type=positive_int, help=f"tokens per sequence ({default('seq')})")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help=f"autocast dtype ({default('dtype')})")
    p.add_argument("--runs", type=positive_int, help=f"timed steps per contender, median reported ({default('runs')})")
    p.add_argument("--hf-runs", type=positive_int, help=f"timed steps for transformers, slow ({default('hf_runs')})")
    p.add_argument("--warmup", type=nonneg_int, default=1, help="untimed steps per contender")
    p.add_argument("--hf-warmup", type=nonneg_int, default=1, help="untimed steps for transformers")
    p.add_argument(
        "--contenders",
        type=name_list(CONTENDERS),
        help=f"comma-separated, from: {', '.join(CONTENDERS)}; must include openlm_mamba, the baseline of the "
        "ratios (default: all, but openlm_mamba+seq only where the scan runs on Triton: elsewhere it would "
        "repeat openlm_mamba)",
    )
    p.add_argument(
        "--device",
        help="torch device (default cuda; --quick: cpu; without CUDA and without --quick the script stops "
        "unless --device cpu is given)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help="openlm_mamba op backend (default: triton on GPU, torch on CPU)",
    )
    p.add_argument("--json", type=output_file, help="also write the results here (its directory must exist)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:  # --quick fills only what was not given
            setattr(args, key, value)
    if args.contenders is not None and "openlm_mamba" not in args.contenders:
        p.error("argument --contenders: must include openlm_mamba (the baseline every ratio is measured against)")
    try:
        cfg = MambaConfig.load(args.model).replace(seq_len=args.seq)
    except ConfigError as exc:
        p.error(f"argument --model: {exc}")
    if args.device is None:
        if args.quick:
            args.device = "cpu"
        elif torch.cuda.is_available():
            args.device = "cuda"
        else:
            return needs_gpu(
                "bench_train_gpu", "--quick runs a tiny CPU smoke test; --device cpu runs the given shapes on CPU"
            )
    check_cuda_device(p, args.device)
    args.backend = args.backend or ("triton" if args.device.startswith("cuda") else "torch")
    check_backend(p, args.backend, args.device)
    notes = []
    if args.contenders is None:
        args.contenders = list(CONTENDERS)
        scan = dispatch.resolve("selective_scan", torch.device(args.device), args.backend)[0]
        if scan != "triton":  # +seq only changes the Triton scan's launch: here it would repeat openlm_mamba
            args.contenders.remove("openlm_mamba+seq")
            notes.append(
                f"# openlm_mamba+seq left out: it changes only the Triton scan, which does not run here (scan "
                f"backend {scan}); name it in --contenders to run it anyway"
            )

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"# bench_train_gpu: {dev}, torch {torch.__version__}; {args.model} (d_model {cfg.d_model} x {cfg.n_layer}, "
        f"vocab {cfg.padded_vocab_size}), batch {args.batch} x {args.seq}, autocast {args.dtype}, "
        f"openlm_mamba backend {args.backend}",
        flush=True,
    )
    for note in notes:
        print(note, flush=True)
    results = []
    for name in args.contenders:
        try:
            r = measure(name, cfg, args)
        except Exception as exc:  # one contender failing (OOM, missing package) must not hide the others
            error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
            print(f"  {name}: failed: {error}", flush=True)
            results.append({"name": name, "error": error})
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            continue
        results.append(r)
        print(f"  {name}: {r['median_s'] * 1e3:.1f} ms/step, loss {r['loss']:.4f}", flush=True)
    base = next((r for r in results if r["name"] == "openlm_mamba" and "error" not in r), None)
    tokens = args.batch * args.seq
    print("\n| contender | step ms | tokens/s | peak GiB | time vs openlm_mamba |\n|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | failed | | | |")
            continue
        ratio = f"{r['median_s'] / base['median_s']:.2f}x" if base else "-"
        peak = "-" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.2f}"  # nan (not on a GPU) -> "-"
        print(f"| {r['name']} | {r['median_s'] * 1e3:.1f} | {tokens / r['median_s']:,.0f} | {peak} | {ratio} |")
    if args.json:
        write_json(args.json, {"args": vars(args), "device": dev, "results": results})
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
