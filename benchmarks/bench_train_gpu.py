"""Training step on a GPU: openlm_mamba (Triton kernels) vs mambapy vs transformers' MambaForCausalLM.

Same config and weights for every contender (transformers without mamba-ssm runs its PyTorch
path, which is what users get when the CUDA build fails). One step = forward + cross-entropy +
backward under bf16 autocast, as OpenLM trains. Reports the median step time, tokens/s, peak
GPU memory and each contender's time relative to openlm_mamba, measured in this one run.

    python benchmarks/bench_train_gpu.py                       # mamba_130m, 4 x 2048 tokens, bf16
    python benchmarks/bench_train_gpu.py --model mamba_370m --batch 8
    python benchmarks/bench_train_gpu.py --quick               # tiny, CPU, seconds (CI smoke test)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import _build

CONTENDERS = ("openlm_mamba", "openlm_mamba+ckpt", "mambapy", "transformers")


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
    for i in range(warmup + runs):
        _sync(args.device)
        t0 = time.perf_counter()
        loss = step()
        _sync(args.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    return {"name": name, "times": times, "median_s": statistics.median(times), "peak_gib": peak, "loss": loss}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model on CPU, 1 run (CI smoke test)")
    p.add_argument("--model", default="mamba_130m", help="model config name (default mamba_130m)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="autocast dtype")
    p.add_argument("--runs", type=int, default=5, help="timed steps per contender (median reported)")
    p.add_argument("--hf-runs", type=int, default=2, help="timed steps for transformers (slow)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--hf-warmup", type=int, default=1, help="untimed steps for transformers")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default=None, help="openlm_mamba op backend (default: triton on GPU, torch on CPU)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.seq, args.runs, args.hf_runs, args.device = "mamba_tiny", 2, 64, 1, 1, "cpu"
        args.dtype = "float32"
    args.backend = args.backend or ("triton" if args.device.startswith("cuda") else "torch")

    from openlm_mamba import MambaConfig

    cfg = MambaConfig.load(args.model).replace(seq_len=args.seq)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"# bench_train_gpu: {dev}, torch {torch.__version__}; {args.model} (d_model {cfg.d_model} x {cfg.n_layer}, "
        f"vocab {cfg.padded_vocab_size}), batch {args.batch} x {args.seq}, autocast {args.dtype}, "
        f"openlm_mamba backend {args.backend}",
        flush=True,
    )
    results = []
    for name in args.contenders.split(","):
        try:
            r = measure(name, cfg, args)
        except Exception as exc:  # one contender failing (OOM, missing package) must not hide the others
            print(f"  {name}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            continue
        results.append(r)
        print(f"  {name}: {r['median_s'] * 1e3:.1f} ms/step, loss {r['loss']:.4f}", flush=True)
    base = next((r for r in results if r["name"] == "openlm_mamba"), None)
    tokens = args.batch * args.seq
    print("\n| contender | step ms | tokens/s | peak GiB | time vs openlm_mamba |\n|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['median_s'] / base['median_s']:.2f}x" if base else "-"
        print(
            f"| {r['name']} | {r['median_s'] * 1e3:.1f} | {tokens / r['median_s']:,.0f} | {r['peak_gib']:.2f} | {ratio} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": dev, "results": results}, indent=1))
    return 0 if base else 1


if __name__ == "__main__":
    sys.exit(main())
