"""Generation speed: openlm_mamba ``generate()`` vs transformers' ``MambaForCausalLM.generate``.

Same random weights for both (our state dict, renamed), batch 1 by default, greedy decoding
(``--sample``: the model card's sampling settings, the same seed on both sides).
For each prompt length ("context") it reports time to first token (prefill + first token),
per-token decode latency and decode throughput (tokens after the first / their wall time),
and the ratios against transformers measured in the same run. Runs are interleaved in rounds
(every context, both implementations) and each number is the median over rounds, so background
load on a shared machine hits all columns alike.

Both sides get one untimed warm-up run at every context, and its tokens are compared: greedy tokens must
match transformers' (a divergence is allowed only on a near-tie of transformers' own logits, or where it
picked a padded vocabulary row; anything else ends the run with an error and exit code 1); with --sample a
``#`` line per context says whether the tokens match (they can legitimately differ: transformers samples
over the padded vocabulary rows, ours masks them). Neither side stops at an EOS id: both decode exactly
--new-tokens tokens.

    python benchmarks/bench_generate.py                       # d_model 256 x 4 layers, CPU
    python benchmarks/bench_generate.py --contexts 16,1024 --no-hf
    python benchmarks/bench_generate.py --sample --contexts 16,1024      # top-p / top-k / penalty sampling
    python benchmarks/bench_generate.py --device cuda --d-model 1024 --n-layer 24
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_args import HelpFormatter, check_backend, check_cuda_device, int_list, positive_int

from openlm_mamba import MambaConfig, MambaLM, generate
from openlm_mamba.ops.dispatch import BACKENDS, requested_backend


def build_model(args) -> MambaLM:
    cfg = MambaConfig(
        d_model=args.d_model,
        n_layer=args.n_layer,
        vocab_size=args.vocab,
        seq_len=max(2048, max(args.contexts) + args.new_tokens),
        name="bench",
    )
    torch.manual_seed(0)
    return MambaLM(cfg).to(args.device, getattr(torch, args.dtype)).eval()


def hf_model(model: MambaLM, skipped: str = "its columns are skipped"):
    """transformers' MambaForCausalLM holding the same weights, decoding exactly ``max_new_tokens`` like ours (no
    EOS id: nothing stops early or suppresses a token). None if transformers is missing: a ``#`` line on stdout
    says so (and that ``skipped``)."""
    try:
        from openlm_mamba.convert import to_transformers

        hf = to_transformers(model)
    except ImportError as exc:
        print(f"# transformers unavailable ({exc}): {skipped}", flush=True)
        return None
    hf.generation_config.eos_token_id = None  # ours gets none either; min_new_tokens would ban token 0 otherwise
    return hf


class Clock:
    """Records the time each new token arrives (usable as our streamer and as an HF streamer)."""

    def __init__(self, device: str, skip_first_put: bool = False):
        self.device = device
        self.times: list[float] = []
        self.skip_first_put = skip_first_put  # transformers' streamer receives the prompt first
        self.skip = skip_first_put

    def reset(self) -> None:
        self.times.clear()
        self.skip = self.skip_first_put

    def _now(self) -> float:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    def __call__(self, tokens) -> None:
        self.times.append(self._now())

    def put(self, tokens) -> None:  # transformers' BaseStreamer interface
        if self.skip:
            self.skip = False
            return
        self.times.append(self._now())

    def end(self) -> None:
        pass


def timed(run, clock: Clock) -> tuple[float, float]:
    """One run: (time to first token, decode seconds per token after the first)."""
    clock.reset()
    start = clock._now()
    run()
    t = clock.times
    return t[0] - start, (t[-1] - t[0]) / (len(t) - 1)


# A greedy mismatch passes as a near-tie when transformers' own logits put the two tokens within this fraction of
# max(1, largest |logit|) of each other (float rounding in different kernels can swap such a pair).
TIE_RTOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}


def first_difference(ours: torch.Tensor, theirs: torch.Tensor) -> list[int | None]:
    """Per row, the index of the first new token where the two (batch, n) outputs differ (None where they agree)."""
    if ours.shape != theirs.shape:
        raise ValueError(f"output shapes differ: ours {tuple(ours.shape)}, transformers {tuple(theirs.shape)}")
    diff = (ours != theirs).cpu()
    return [int(row.nonzero()[0]) if row.any() else None for row in diff]


def check_greedy(
    ours: torch.Tensor, theirs: torch.Tensor, prompt_len: int, hf, vocab: int, rtol: float
) -> tuple[str | None, str]:
    """Compare greedy outputs (prompt + new tokens, both sides): (error or None, what was found). A row may
    diverge where transformers' logits (over the common prefix) make the two tokens a near-tie (gap <=
    rtol * max(1, max |logit|)), or where transformers picked a padded vocabulary row (id >= ``vocab``), which
    ours never picks; the tokens after such a point are not compared. Any other difference is an error."""
    notes = []
    for b, i in enumerate(first_difference(ours[:, prompt_len:], theirs[:, prompt_len:])):
        if i is None:
            continue
        mine, ref = int(ours[b, prompt_len + i]), int(theirs[b, prompt_len + i])
        where = f"row {b}, new token {i}: ours {mine}, transformers {ref}"
        if ref >= vocab:
            notes.append(f"{where} (a padded vocabulary row, which ours masks)")
            continue
        with torch.no_grad():
            logits = hf(theirs[b : b + 1, : prompt_len + i]).logits[0, -1].float()
        gap, tol = float(logits[ref] - logits[mine]), rtol * max(1.0, float(logits.abs().max()))
        if gap > tol:
            return f"{where} (transformers' logit gap {gap:.3g} > near-tie tolerance {tol:.3g})", ""
        notes.append(f"{where} (a near-tie: transformers' logit gap {gap:.3g} <= {tol:.3g})")
    if not notes:
        return None, "greedy tokens match transformers'"
    return None, "greedy tokens match transformers' up to " + "; ".join(notes) + ", not compared after it"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--d-model", type=positive_int, default=256, help="model width")
    p.add_argument("--n-layer", type=positive_int, default=4, help="layers")
    p.add_argument("--vocab", type=positive_int, default=50277, help="vocabulary size (padded as the model pads it)")
    p.add_argument("--batch", type=positive_int, default=1, help="prompts decoded together")
    p.add_argument(
        "--contexts", type=int_list, default="16,1024,4096", help="comma-separated prompt lengths, one table row each"
    )
    p.add_argument(
        "--new-tokens",
        type=positive_int,
        default=64,
        help="tokens generated per run, at least 2 (decode speed is timed over the tokens after the first)",
    )
    p.add_argument("--repeats", type=positive_int, default=3, help="timed rounds for openlm_mamba (median reported)")
    p.add_argument(
        "--hf-repeats", type=positive_int, default=1, help="timed rounds for transformers (--no-hf skips it)"
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda if torch sees one, else cpu; here: %(default)s)",
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--backend",
        default=None,
        choices=BACKENDS,
        help="op backend of the whole openlm_mamba model (model.set_backend: prefill and decoding step; ops "
        "without it, e.g. the decoding step for cuda, take auto); it must run on --device "
        "(default: auto / $OPENLM_MAMBA_BACKEND)",
    )
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument(
        "--no-cuda-graph",
        action="store_true",
        help="decode eagerly on a GPU (generate(..., cuda_graph=False)); the default captures the step in a CUDA graph",
    )
    p.add_argument(
        "--sample",
        action="store_true",
        help="the model card's sampling (temperature 0.8, top_p 0.8, top_k 50, repetition_penalty 1.1) "
        "instead of greedy decoding, the same seed on both sides",
    )
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("argument --new-tokens: must be at least 2 (decode speed is timed over the tokens after the first)")
    check_cuda_device(p, args.device)
    check_backend(p, args.backend, args.device)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    model = build_model(args)
    model.set_backend(args.backend)  # prompt and decoding step alike (None: auto / $OPENLM_MAMBA_BACKEND)
    hf = None if args.no_hf else hf_model(model)
    n_new = args.new_tokens
    dev = torch.device(args.device)
    print(
        f"# device={args.device} ({torch.get_num_threads()} threads) dtype={args.dtype} d_model={args.d_model} "
        f"n_layer={args.n_layer} vocab={model.cfg.padded_vocab_size} batch={args.batch} new_tokens={n_new} "
        f"backend={requested_backend(args.backend)} decoding={'model-card sampling' if args.sample else 'greedy'} "
        f"cuda_graph={'off' if args.no_cuda_graph else 'auto'} "
        f"torch={torch.__version__} load_average={os.getloadavg()[0]:.1f}"
    )
    decoding = {"do_sample": False}
    if args.sample:
        decoding = {"do_sample": True, "temperature": 0.8, "top_p": 0.8, "top_k": 50, "repetition_penalty": 1.1}
    graph = False if args.no_cuda_graph else None
    runs = {}  # context -> (ours, theirs)
    for ctx in args.contexts:
        ids = torch.randint(0, model.cfg.vocab_size, (args.batch, ctx), device=dev)
        clock, hclock = Clock(args.device), Clock(args.device, skip_first_put=True)

        def ours(ids=ids, clock=clock) -> torch.Tensor:
            return generate(
                model,
                ids,
                max_new_tokens=n_new,
                streamer=clock,
                seed=0,
                cuda_graph=graph,
                **decoding,
            )

        def theirs(ids=ids, hclock=hclock) -> torch.Tensor:
            torch.manual_seed(0)
            return hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                **decoding,
                streamer=hclock,
                pad_token_id=0,
            )

        runs[ctx] = ((ours, clock), (theirs, hclock))
    # Warm-up of both sides at every context: kernel builds for each prompt length (Triton specializes on it),
    # allocator. Its outputs are compared: a fast path that decodes other tokens must not win.
    for ctx in args.contexts:
        out = runs[ctx][0][0]()
        if hf is None:
            continue
        ref = runs[ctx][1][0]()
        if not args.sample:
            error, found = check_greedy(out, ref, ctx, hf, model.cfg.vocab_size, TIE_RTOL[args.dtype])
            if error is not None:
                raise SystemExit(
                    f"bench_generate: error: at context {ctx}, ours and transformers' greedy tokens differ: {error}"
                )
            print(f"# context {ctx}: {found}", flush=True)
            continue
        first = min((i for i in first_difference(out[:, ctx:], ref[:, ctx:]) if i is not None), default=None)
        print(
            f"# context {ctx}: sampled tokens "
            + ("match transformers'" if first is None else f"differ from transformers' (first at new token {first})"),
            flush=True,
        )
    if hf is not None and args.sample:
        padded = model.cfg.padded_vocab_size > model.cfg.vocab_size
        print(
            "# sampled tokens may legitimately differ (the same seed on both sides, but "
            + (
                f"the vocabulary is padded, {model.cfg.padded_vocab_size} rows for {model.cfg.vocab_size} tokens, "
                "and transformers samples over the padded rows while ours masks them; and "
                if padded
                else ""
            )
            + "float rounding in different kernels can move a top-k / top-p cut or a draw): not an error",
            flush=True,
        )
    # Rounds interleave contexts and implementations, so background load hits all of them alike.
    samples = {ctx: {"ours": [], "hf": []} for ctx in args.contexts}
    for r in range(max(args.repeats, 0 if hf is None else args.hf_repeats)):
        for ctx in args.contexts:
            (ours, clock), (theirs, hclock) = runs[ctx]
            if r < args.repeats:
                samples[ctx]["ours"].append(timed(ours, clock))
            if hf is not None and r < args.hf_repeats:
                samples[ctx]["hf"].append(timed(theirs, hclock))
        print(f"# round {r + 1} done", flush=True)
    rows = []
    for ctx in args.contexts:
        row = {"ctx": ctx}
        for who, key in (("ours", ""), ("hf", "hf_")):
            if samples[ctx][who]:
                row[key + "ttft"] = statistics.median(x[0] for x in samples[ctx][who])
                row[key + "tpt"] = statistics.median(x[1] for x in samples[ctx][who])
        rows.append(row)

    base = rows[0]["tpt"]
    hdr = f"| context | ours TTFT ms | ours ms/token | ours tok/s | vs ctx {rows[0]['ctx']} |"
    if hf is not None:
        hdr += " HF TTFT ms | HF ms/token | HF tok/s | TTFT speedup | decode speedup |"
    print()
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        line = (
            f"| {r['ctx']} | {r['ttft'] * 1e3:.2f} | {r['tpt'] * 1e3:.3f} | {args.batch / r['tpt']:.0f} | "
            f"{r['tpt'] / base:.2f}x |"
        )
        if hf is not None:
            line += (
                f" {r['hf_ttft'] * 1e3:.1f} | {r['hf_tpt'] * 1e3:.3f} | {args.batch / r['hf_tpt']:.0f} | "
                f"{r['hf_ttft'] / r['ttft']:.1f}x | {r['hf_tpt'] / r['tpt']:.1f}x |"
            )
        print(line)
    if hf is not None:  # medians above; the fastest runs show the capability when the box is noisy
        print()
        for ctx in args.contexts:
            ours, theirs = (min(x[0] for x in samples[ctx][w]) for w in ("ours", "hf"))
            counts = f"of {len(samples[ctx]['ours'])} and {len(samples[ctx]['hf'])} runs"  # unequal: min favours more
            print(
                f"# fastest TTFT at context {ctx} ({counts}): ours {ours * 1e3:.2f} ms, HF {theirs * 1e3:.1f} ms "
                f"({theirs / ours:.1f}x)"
            )


if __name__ == "__main__":
    main()
