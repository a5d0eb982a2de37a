"""Multiple-choice scoring through lm-eval: openlm_mamba's ``MambaEvalLM`` vs transformers' ``MambaForCausalLM``
under lm-eval's own ``HFLM``, on the same random weights.

Two synthetic workloads shaped like the model card's tasks (random token ids; only the shapes matter):
``mmlu`` (5-shot: 400 tokens of examples every context starts with, then a 112-token question, four 1-token
choices) and ``hellaswag`` (zero-shot: an 80-token context, four 24-token endings). Contenders, each scoring the
same requests through ``_loglikelihood_tokens`` (the method lm-eval calls for multiple-choice tasks):

- ``ours``: the default: a batch's common few-shot prefix read once, each context read once, and their
  recurrent states forked for what follows;
- ``ours-whole``: ``share_contexts=False``, every request scored whole (context + choice);
- ``hf``: lm-eval's ``HFLM`` (needs ``accelerate``) around transformers' Mamba, which without mamba-ssm runs
  its PyTorch path. HFLM shares a context only for 1-token choices (its logits cache).

Prints ms per request (median of --repeats passes), the speedups against HF and against scoring whole, and the largest log-likelihood
difference from HF (the same numbers, or the comparison would mean nothing). ``ours`` must give ``ours-whole``'s
log-likelihoods (within 1e-3): otherwise the run stops with an ``error:`` line and exit code 1. The tokenizer
needs transformers and tokenizers even with --no-hf (without them: an ``error:`` line, exit code 2).

    python benchmarks/bench_eval.py                          # d_model 256 x 4 layers, CPU
    python benchmarks/bench_eval.py --questions 8 --no-hf    # quick
    python benchmarks/bench_eval.py --device cuda --d-model 768 --n-layer 24 --batch-size 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_args import HelpFormatter, add_names_arg, check_cuda_device, positive_int

from openlm_mamba import MambaConfig, MambaLM

# workload -> (few-shot tokens every question's context starts with, the question's own tokens, choices,
# tokens per choice)
WORKLOADS = {"mmlu": (400, 112, 4, 1), "hellaswag": (0, 80, 4, 24)}
WHOLE_TOL = 1e-3  # largest log-likelihood difference allowed between ours (shared contexts) and ours-whole
MIN_VOCAB = 257  # the tokenizer's 256 byte tokens and its end-of-text token


def tokenizer(vocab: int):
    """A small byte-level BPE tokenizer built offline (MambaEvalLM and HFLM need one; ids come from the workload)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab, 300),
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog."] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def requests(workload: str, questions: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token pairs: every question's context with each of its choices."""
    shots, own, choices, cont_len = WORKLOADS[workload]
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(1, vocab, (shots,), generator=g).tolist()
    out = []
    for _ in range(questions):
        ctx = prefix + torch.randint(1, vocab, (own,), generator=g).tolist()
        out += [(ctx, torch.randint(1, vocab, (cont_len,), generator=g).tolist()) for _ in range(choices)]
    return out


def timed(fn, reqs, repeats: int) -> tuple[float, list[float]]:
    """(median seconds over ``repeats`` scoring passes, log-likelihoods), after a warm-up on the first question."""
    fn(reqs[:4])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(reqs)
        times.append(time.perf_counter() - start)
    return statistics.median(times), [ll for ll, _ in out]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--d-model", type=positive_int, default=256, help="model width")
    p.add_argument("--n-layer", type=positive_int, default=4, help="layers")
    p.add_argument("--vocab", type=positive_int, default=1024, help=f"vocabulary size, at least {MIN_VOCAB}")
    p.add_argument("--questions", type=positive_int, default=16, help="questions per workload (4 requests each)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="lm-eval batch size, both sides")
    add_names_arg(p, "--workloads", WORKLOADS, "; each runs once")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed passes per contender (median)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (and lm-eval's HFLM)")
    args = p.parse_args(argv)
    check_cuda_device(p, args.device)
    if args.vocab < MIN_VOCAB:
        p.error(
            f"argument --vocab: expected at least {MIN_VOCAB} (the benchmark's byte-level tokenizer), got {args.vocab}"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from openlm_mamba.evaluation import MambaEvalLM
    except ImportError as e:
        sys.exit(f"error: bench_eval needs lm-eval ({e})")

    cfg = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab, name="bench")
    torch.manual_seed(0)
    model = MambaLM(cfg).to(args.device).eval()
    try:
        tok = tokenizer(args.vocab)
    except ImportError as e:  # even with --no-hf: MambaEvalLM takes a transformers tokenizer
        print(
            f"error: bench_eval needs transformers and tokenizers for its tokenizer, also with --no-hf ({e})",
            file=sys.stderr,
        )
        return 2
    kw = {"model": model, "tokenizer": tok, "batch_size": args.batch_size, "max_length": 2048}
    ours = MambaEvalLM(**kw)
    whole = MambaEvalLM(**kw, share_contexts=False)
    hf = None
    if not args.no_hf:
        try:
            from lm_eval.models.huggingface import HFLM

            from openlm_mamba.convert import to_transformers

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hf_model = to_transformers(model).to(args.device).eval()
                hf = HFLM(pretrained=hf_model, tokenizer=tok, batch_size=args.batch_size, device=args.device)
        except ImportError as e:
            print(f"# transformers / lm-eval HFLM unavailable ({e}): --no-hf", file=sys.stderr)

    print(
        f"# d_model {args.d_model} x {args.n_layer} layers, vocab {cfg.padded_vocab_size}, {args.device}, "
        f"batch size {args.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        "| workload | requests | ours ms/req | ours-whole ms/req | HF ms/req | vs HF | vs whole | max ll diff vs HF |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.workloads:
        pairs = requests(name, args.questions, args.vocab)
        t_ours, ll_ours = timed(
            lambda r: ours._loglikelihood_tokens([(None, c, x) for c, x in r], True), pairs, args.repeats
        )
        t_whole, ll_whole = timed(
            lambda r: whole._loglikelihood_tokens([(None, c, x) for c, x in r], True), pairs, args.repeats
        )
        whole_diff = max((abs(a - b) for a, b in zip(ll_ours, ll_whole)), default=0.0)
        if len(ll_ours) != len(ll_whole) or not whole_diff < WHOLE_TOL:  # NaN fails too
            print(
                f"error: {name}: ours and ours-whole log-likelihoods differ by {whole_diff:.1e} (tolerance "
                f"{WHOLE_TOL:g}): sharing contexts changed the scores",
                file=sys.stderr,
            )
            return 1
        n = len(pairs)
        row = f"| {name} | {n} | {t_ours / n * 1e3:.2f} | {t_whole / n * 1e3:.2f} | "
        if hf is not None:
            t_hf, ll_hf = timed(
                lambda r: hf._loglikelihood_tokens([(("", ""), c, x) for c, x in r], True), pairs, args.repeats
            )
            diff = max(abs(a - b) for a, b in zip(ll_ours, ll_hf))
            row += f"{t_hf / n * 1e3:.2f} | **{t_hf / t_ours:.1f}x** | {t_whole / t_ours:.1f}x | {diff:.1e} |"
        else:
            row += f"- | - | {t_whole / t_ours:.1f}x | - |"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
