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

Ours and each kernel are timed alike: --calls calls per round, every call one sample (rounds x calls
samples each). The floor's median is the sum of the kernels' medians, its fastest the sum of their
fastest. Transformers is timed once per round for --hf-rounds rounds, so its ratios use medians only.

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


def seconds(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of ``fn``."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


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


def measure(
    ours: Callable[[], float],
    parts: dict[str, Callable[[], float]],
    theirs: Callable[[], float] | None,
    rounds: int,
    calls: int,
    hf_rounds: int,
) -> dict[str, list[float]]:
    """Interleaved rounds of timed calls (each callable returns one sample, seconds): per round ``calls`` of ours,
    then ``calls`` of each kernel part, then one of ``theirs`` in the first ``hf_rounds`` rounds. Returns name ->
    every sample (ours and each part: rounds x calls; "hf": min(rounds, hf_rounds), none without ``theirs``)."""
    samples: dict[str, list[float]] = {k: [] for k in ("ours", *parts, "hf")}
    for rnd in range(rounds):
        samples["ours"] += [ours() for _ in range(calls)]
        for name, fn in parts.items():
            samples[name] += [fn() for _ in range(calls)]
        if theirs is not None and rnd < hf_rounds:
            samples["hf"].append(theirs())
        print(f"# round {rnd + 1} done", flush=True)
    return samples


def summarize(samples: dict[str, list[float]], parts: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """(median, fastest) of every non-empty sample list, plus "floor" after the parts: the sum of the parts'
    medians and the sum of their fastest (each part timed alone, so no call of one is paired with one of another)."""
    med = {k: statistics.median(v) for k, v in samples.items() if v}
    fast = {k: min(v) for k, v in samples.items() if v}
    order = [k for k in med if k != "hf"] + ["floor"] + (["hf"] if "hf" in med else [])
    med["floor"], fast["floor"] = sum(med[k] for k in parts), sum(fast[k] for k in parts)
    return {k: med[k] for k in order}, {k: fast[k] for k in order}


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
        help="timed calls per round, of ours and of each kernel alike (every call is a sample; default: 5)",
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
    hf = None if args.no_hf else hf_model(model, "its row and ratios are skipped")
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
    for fn in parts.values():
        fn()
    if hf is not None and args.hf_rounds:
        theirs()
    samples = measure(
        lambda: ttft(ours, clock),
        {k: lambda fn=fn: seconds(fn) for k, fn in parts.items()},
        None if hf is None else lambda: ttft(theirs, hclock),
        args.rounds,
        args.calls,
        args.hf_rounds,
    )
    med, fast = summarize(samples, list(parts))
    print("\n| part | median ms | fastest ms |\n|---|---|---|")
    labels = {"ours": "ours: TTFT", "floor": "floor: sum of the bare kernels", "hf": "transformers TTFT"}
    for k in med:
        print(f"| {labels.get(k, '  ' + k)} | {med[k] * 1e3:.2f} | {fast[k] * 1e3:.2f} |")
    print(
        f"\n# samples: ours {len(samples['ours'])}, each kernel {len(samples[next(iter(parts))])} ({args.rounds} rounds"
        f" x {args.calls} calls); floor median = sum of the kernels' medians, floor fastest = sum of their fastest"
        + (f"; transformers {len(samples['hf'])} (its ratios: medians only)" if samples["hf"] else "")
    )
    print(f"matmuls: {flops / 1e9:.2f} GFLOP, {flops / fast['matmuls'] / 1e9:.0f} GFLOP/s at their fastest")
    print(f"ours / floor: {med['ours'] / med['floor']:.2f}x median, {fast['ours'] / fast['floor']:.2f}x fastest")
    if "hf" in med:
        print(
            f"HF / ours:  {med['hf'] / med['ours']:.1f}x median\n"
            f"HF / floor: {med['hf'] / med['floor']:.1f}x median (the TTFT speedup these kernels allow here)"
        )


if __name__ == "__main__":
    main()
