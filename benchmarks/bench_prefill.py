"""CPU prefill against its own floor: our time to first token next to the bare kernels it is made of.

For one prompt through a float32 model it times, in interleaved rounds of one process:
  * ours:   ``generate(max_new_tokens=1)``, the time to the first token (the fused C++ prefill)
  * floor:  the same prefill's work as bare kernels, each timed alone on warm inputs and summed:
            the MKL matmuls of exactly the shapes the prefill runs (the last layer projects only
            what the last position needs), the scan kernel and the conv kernel once per layer;
            add + RMSNorm and the cache bookkeeping are left out, so it is a lower bound
  * transformers' ``MambaForCausalLM.generate`` TTFT on the same weights
and prints each with the ratios: ours / floor is the overhead left above the kernels; HF / floor
is the largest TTFT speedup over transformers those kernels allow on this machine, if nothing
but them ran.

    python benchmarks/bench_prefill.py                        # issue 6's model: d_model 256 x 4, vocab 1024
    python benchmarks/bench_prefill.py --threads 1 --no-hf
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_args import HelpFormatter, nonneg_int, positive_int
from bench_generate import Clock, build_model, hf_model

from openlm_mamba import generate
from openlm_mamba.ops.cpp import load_extension


def _best(fn: Callable[[], object], n: int) -> float:
    """Fastest of n calls after one warm-up, seconds."""
    fn()
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def ttft(run: Callable[[], None], clock: Clock) -> float:
    """Seconds from the call to the first token ``clock`` saw."""
    clock.reset()
    start = time.perf_counter()
    run()
    return clock.times[0] - start


def kernel_parts(model, ctx: int) -> tuple[dict[str, Callable[[], object]], int]:
    """The prefill's work (batch 1, ``ctx`` tokens) as bare kernels on random inputs of the right
    shapes: (name -> one call that runs that part for every layer, the matmuls' FLOPs)."""
    cfg = model.cfg
    di, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank_value
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    normed, x_dbl = rand(ctx, cfg.d_model), rand(ctx, r + 2 * n)
    xz, xc, dt, h = torch.empty(ctx, 2 * di), rand(ctx, di), torch.empty(ctx, di), torch.empty(ctx, cfg.d_model)
    mixers = [layer.mixer for layer in model.layers]
    per_layer = di * cfg.d_model + (r + 2 * n) * di + r * di  # x half of in_proj, x_proj, dt_proj
    flops = 2 * ctx * (len(mixers) * per_layer + (len(mixers) - 1) * 2 * di * cfg.d_model)  # + z half, out_proj

    def matmuls() -> None:
        for i, mx in enumerate(mixers):
            last = i == len(mixers) - 1
            w = mx.in_proj.weight[:di] if last else mx.in_proj.weight  # the last layer: x only
            torch.mm(normed, w.t(), out=xz[:, : w.shape[0]])
            torch.mm(xc, mx.x_proj.weight.t(), out=x_dbl)
            torch.mm(x_dbl[:, :r], mx.dt_proj.weight.t(), out=dt)
            if not last:
                torch.mm(xc, mx.out_proj.weight.t(), out=h)

    u, delta, z = rand(1, ctx, di), rand(1, ctx, di) - 2, rand(1, ctx, di)
    bc = rand(1, 1, ctx, 2 * n)
    scan_args = [
        (-torch.exp(mx.A_log.float()).t().contiguous(), mx.D.float(), mx.dt_proj.bias.float()) for mx in mixers
    ]

    def scan() -> None:
        for i, (At, D, bias) in enumerate(scan_args):
            gate = z if i < len(scan_args) - 1 else None  # the last layer gates one position
            torch.ops.openlm_mamba_cpu.scan_fwd(u, delta, At, bc[..., :n], bc[..., n:], D, gate, bias, True, None, 64)

    xt = rand(1, ctx, di)
    conv_w = [mx.conv1d.weight.squeeze(1) for mx in mixers]

    def conv() -> None:
        for w in conv_w:
            torch.ops.openlm_mamba_cpu.conv_fwd(xt, w, None, None, True)

    return {"matmuls": matmuls, "scan": scan, "conv": conv}, flops


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--d-model", type=positive_int, default=256, help="model width")
    p.add_argument("--n-layer", type=positive_int, default=4, help="layers")
    p.add_argument("--vocab", type=positive_int, default=1024, help="vocabulary size (padded as the model pads it)")
    p.add_argument("--context", type=positive_int, default=1024, help="prompt length (default: 1024)")
    p.add_argument("--rounds", type=positive_int, default=9, help="interleaved rounds (default: 9)")
    p.add_argument(
        "--calls",
        type=positive_int,
        default=5,
        help="our timed calls per round, and per kernel (its fastest counts; default: 5)",
    )
    p.add_argument("--hf-rounds", type=nonneg_int, default=3, help="rounds that also time transformers (default: 3)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if not load_extension():
        raise SystemExit(
            "bench_prefill: the C++ CPU kernels are unavailable (no compiler, or OPENLM_MAMBA_DISABLE_CPP)"
        )
    args.contexts, args.new_tokens, args.device, args.dtype = [args.context], 1, "cpu", "float32"
    model = build_model(args)
    hf = None if args.no_hf else hf_model(model)
    ids = torch.randint(0, model.cfg.vocab_size, (1, args.context))
    clock, hclock = Clock("cpu"), Clock("cpu", skip_first_put=True)

    def ours() -> None:
        generate(model, ids, max_new_tokens=1, streamer=clock)

    def theirs() -> None:
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, streamer=hclock, pad_token_id=0)

    parts, flops = kernel_parts(model, args.context)
    print(
        f"# cpu ({torch.get_num_threads()} threads) d_model={args.d_model} n_layer={args.n_layer} "
        f"vocab={model.cfg.padded_vocab_size} context={args.context} torch={torch.__version__} "
        f"load_average={os.getloadavg()[0]:.1f}"
    )
    ours()  # untimed warm-up of each side: a process's first generate() pays one-off costs
    if hf is not None and args.hf_rounds:
        theirs()
    samples: dict[str, list[float]] = {k: [] for k in ("ours", *parts, "floor", "hf")}
    for rnd in range(args.rounds):
        samples["ours"] += [ttft(ours, clock) for _ in range(args.calls)]
        floor = 0.0
        for name, fn in parts.items():
            samples[name].append(_best(fn, args.calls))
            floor += samples[name][-1]
        samples["floor"].append(floor)
        if hf is not None and rnd < args.hf_rounds:
            samples["hf"].append(ttft(theirs, hclock))
        print(f"# round {rnd + 1} done", flush=True)

    med = {k: statistics.median(v) for k, v in samples.items() if v}
    fast = {k: min(v) for k, v in samples.items() if v}
    print("\n| part | median ms | fastest ms |\n|---|---|---|")
    labels = {"ours": "ours: TTFT", "floor": "floor: sum of the bare kernels", "hf": "transformers TTFT"}
    for k in med:
        print(f"| {labels.get(k, '  ' + k)} | {med[k] * 1e3:.2f} | {fast[k] * 1e3:.2f} |")
    print(f"\nmatmuls: {flops / 1e9:.2f} GFLOP, {flops / fast['matmuls'] / 1e9:.0f} GFLOP/s at their fastest")
    print(f"ours / floor: {med['ours'] / med['floor']:.2f}x median, {fast['ours'] / fast['floor']:.2f}x fastest")
    if "hf" in med:
        print(
            f"HF / ours:  {med['hf'] / med['ours']:.1f}x median, {fast['hf'] / fast['ours']:.1f}x fastest\n"
            f"HF / floor: {med['hf'] / med['floor']:.1f}x median, {fast['hf'] / fast['floor']:.1f}x fastest "
            "(the TTFT speedup these kernels allow here)"
        )


if __name__ == "__main__":
    main()
