"""CPU side by side: openlm_mamba vs mambapy vs transformers' MambaForCausalLM, same config and weights.

Measures one training step (forward + cross-entropy + backward, fp32) and a forward-only prefill,
each contender in a fresh subprocess so its peak RSS is its own, then a scaling table for
openlm_mamba's training step at growing sequence lengths. Prints one table.
Every contender gets one untimed warm-up run before the timed ones, except transformers at full
size, where one step takes minutes: its first timed run is a cold call (--quick warms it up).

    python benchmarks/bench_cpu.py            # the issue's config (transformers measured once: ~2 min)
    python benchmarks/bench_cpu.py --quick    # tiny shapes, a few seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_args import (
    HelpFormatter,
    add_names_arg,
    int_list,
    nonneg_int,
    output_file,
    positive_int,
    progress,
    write_json,
)

CONTENDERS = ("openlm_mamba", "mambapy", "transformers")
# Defaults of the flags --quick changes (None on the command line: filled from here).
FULL = {
    "d_model": 256,
    "n_layer": 4,
    "d_state": 16,
    "vocab": 1024,
    "batch": 4,
    "seq": 512,
    "prefill": 2048,
    "runs": 5,
    "hf_runs": 1,
    "scaling": [1024, 2048, 4096, 8192],
}
QUICK = {  # measured in-process: no memory columns
    **FULL,
    "d_model": 32,
    "n_layer": 2,
    "vocab": 128,
    "batch": 2,
    "seq": 64,
    "prefill": 128,
    "runs": 2,
    "scaling": [64, 128],
}


def _rss_kib() -> int:
    """Current resident set size of this process in KiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _config(args):
    from openlm_mamba import MambaConfig

    return MambaConfig.load("mamba_tiny").replace(
        d_model=args.d_model,
        n_layer=args.n_layer,
        d_state=args.d_state,
        expand=2,
        vocab_size=args.vocab,
        dt_rank="auto",
        seq_len=max(args.seq, args.prefill),
    )


def _build(name: str, cfg):
    """The contender's model holding openlm_mamba's seeded weights; returns a callable ids -> logits."""
    import torch

    from openlm_mamba import MambaLM

    torch.manual_seed(0)
    ours = MambaLM(cfg)
    ours.set_backend("torch")
    if name == "openlm_mamba":
        from openlm_mamba.ops.cpp import load_extension

        load_extension()  # load (built in the parent) before the baseline RSS is taken
        return ours, lambda ids: ours(ids)[0]
    state = ours.state_dict()
    if name == "transformers":
        from transformers import MambaConfig as HFConfig
        from transformers import MambaForCausalLM

        hf = MambaForCausalLM(
            HFConfig(
                vocab_size=cfg.padded_vocab_size,
                hidden_size=cfg.d_model,
                state_size=cfg.d_state,
                num_hidden_layers=cfg.n_layer,
                conv_kernel=cfg.d_conv,
                expand=cfg.expand,
                time_step_rank=cfg.dt_rank_value,
                use_bias=cfg.bias,
                use_conv_bias=cfg.conv_bias,
                residual_in_fp32=cfg.residual_in_fp32,
                layer_norm_epsilon=cfg.norm_epsilon,
                tie_word_embeddings=cfg.tie_embeddings,
            )
        )
        missing, unexpected = hf.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
        assert not missing and not unexpected, (missing, unexpected)
        return hf, lambda ids: hf(ids).logits
    if name == "mambapy":
        from mambapy.mamba import Mamba
        from mambapy.mamba import MambaConfig as PyConfig
        from mambapy.mamba import RMSNorm as PyRMSNorm

        class MambapyLM(torch.nn.Module):
            """Embedding + mambapy's Mamba + final RMSNorm + tied head (mambapy's own LM needs mamba_ssm)."""

            def __init__(self):
                super().__init__()
                pc = PyConfig(
                    d_model=cfg.d_model,
                    n_layers=cfg.n_layer,
                    dt_rank=cfg.dt_rank_value,
                    d_state=cfg.d_state,
                    expand_factor=cfg.expand,
                    d_conv=cfg.d_conv,
                    rms_norm_eps=cfg.norm_epsilon,
                    bias=cfg.bias,
                    conv_bias=cfg.conv_bias,
                )
                self.embedding = torch.nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
                self.mamba = Mamba(pc)
                self.norm_f = PyRMSNorm(cfg.d_model, cfg.norm_epsilon)

            def forward(self, ids):
                h = self.norm_f(self.mamba(self.embedding(ids)))
                return h @ self.embedding.weight.t()

        m = MambapyLM()
        mapped = {}
        for k, v in state.items():
            k = k.removeprefix("model.backbone.")
            if k.startswith("layers."):
                mapped["mamba." + k] = v
            elif k.startswith(("embedding.", "norm_f.")):
                mapped[k] = v
        missing, unexpected = m.load_state_dict(mapped)
        assert not missing and not unexpected, (missing, unexpected)
        return m, m
    raise ValueError(f"unknown contender {name!r}; expected one of {CONTENDERS}")


def worker(args) -> dict:
    """Time one contender on one task in this (fresh) process; returns a JSON-able dict."""
    import torch
    import torch.nn.functional as F

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _config(args)
    model, fwd = _build(args.worker, cfg)
    g = torch.Generator().manual_seed(1)
    if args.task == "train":
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
        inp, tgt = ids[:, :-1], ids[:, 1:]
        model.train()

        def step():
            logits = fwd(inp)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1))
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss.item()

    else:
        ids = torch.randint(0, cfg.vocab_size, (1, args.prefill), generator=g)
        model.eval()

        def step():
            with torch.no_grad():
                return float(fwd(ids).float()[0, -1].logsumexp(-1))

    base = _rss_kib()
    times, value = [], None
    for i in range(args.warmup + args.runs):
        t0 = time.perf_counter()
        value = step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "name": args.worker,
        "task": args.task,
        "times": times,
        "median_s": statistics.median(times),
        "peak_rss_mib": peak / 1024,
        "act_mib": max(0, peak - base) / 1024,
        "value": value,
    }


def run_worker(args, name: str, task: str, runs: int, warmup: int, **over) -> dict | None:
    """Run one measurement in a fresh subprocess; None (with the reason printed) if it failed."""
    if args.quick:  # smoke test: in this process (no memory numbers), to stay within seconds
        sub = argparse.Namespace(**{**vars(args), **over, "worker": name, "task": task, "runs": runs, "warmup": warmup})
        try:
            r = worker(sub)
        except Exception as exc:
            print(f"  {name} {task}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return None
        r["peak_rss_mib"] = r["act_mib"] = float("nan")
        return r
    cmd = [sys.executable, __file__, "--worker", name, "--task", task, "--runs", str(runs), "--warmup", str(warmup)]
    for key in ("d_model", "n_layer", "d_state", "vocab", "batch", "seq", "prefill", "threads"):
        cmd += [f"--{key.replace('_', '-')}", str(over.get(key, getattr(args, key)))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {name} {task}: failed: {tail}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)

    def default(key: str) -> str:
        q, f = QUICK[key], FULL[key]
        q, f = (",".join(map(str, v)) if isinstance(v, list) else v for v in (q, f))
        return f"default {f}" + (f"; --quick: {q}" if q != f else "")

    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes, few runs, in-process, no memory columns (CI smoke test); fills only the flags not given",
    )
    p.add_argument("--d-model", type=positive_int, help=f"model width ({default('d_model')})")
    p.add_argument("--n-layer", type=positive_int, help=f"layers ({default('n_layer')})")
    p.add_argument("--d-state", type=positive_int, help=f"SSM state size ({default('d_state')})")
    p.add_argument("--vocab", type=positive_int, help=f"vocabulary size ({default('vocab')})")
    p.add_argument("--batch", type=positive_int, help=f"training batch size ({default('batch')})")
    p.add_argument("--seq", type=positive_int, help=f"training sequence length ({default('seq')})")
    p.add_argument("--prefill", type=positive_int, help=f"prefill length, batch 1, forward only ({default('prefill')})")
    p.add_argument("--runs", type=positive_int, help=f"timed runs per measurement, median reported ({default('runs')})")
    p.add_argument(
        "--hf-runs",
        type=positive_int,
        help=f"timed runs for transformers, slow; without --quick no warm-up run before them, so the first is a "
        f"cold call ({default('hf_runs')})",
    )
    p.add_argument(
        "--scaling",
        type=int_list,
        help=f"comma-separated seq lengths for the scaling table, batch 1 ({default('scaling')})",
    )
    add_names_arg(p, "--contenders", CONTENDERS)
    p.add_argument(
        "--threads",
        type=nonneg_int,
        default=0,
        help="torch threads per contender (0: torch's default, one per core)",
    )
    p.add_argument("--json", type=output_file, help="also write the results here (its directory must exist)")
    # worker mode (internal)
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--task", choices=("train", "prefill"), help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=nonneg_int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:  # --quick fills only what was not given
            setattr(args, key, value)

    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    # build the C++ kernel once up front so no contender's timing includes the compile
    from openlm_mamba.ops.cpp import load_extension

    load_extension()

    import torch

    names = args.contenders
    threads = args.threads or torch.get_num_threads()
    print(
        f"# bench_cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{threads} threads, load average {os.getloadavg()[0]:.1f} at start"
    )
    print(
        f"# config: d_model {args.d_model}, n_layer {args.n_layer}, d_state {args.d_state}, expand 2, "
        f"vocab {args.vocab}; train batch {args.batch} x {args.seq}; prefill 1 x {args.prefill}; fp32"
    )
    hf_warmup = 1 if args.quick else 0  # at full size one transformers step takes minutes
    if "transformers" in names and not hf_warmup:
        print(
            "# transformers: no warm-up run at this size (a step takes minutes), so its times include "
            "first-call costs; the other contenders get one warm-up run"
        )
    results: dict[str, dict] = {}
    for task in ("train", "prefill"):
        for name in names:
            slow = name == "transformers"
            r = run_worker(args, name, task, args.hf_runs if slow else args.runs, hf_warmup if slow else 1)
            if r is not None:
                results[f"{task}/{name}"] = r
                progress(f"# {name} {task}: {r['median_s']:.3f} s (median of {len(r['times'])})")
    rows = []
    for task in ("train", "prefill"):
        ours = results.get(f"{task}/openlm_mamba")
        for name in names:
            r = results.get(f"{task}/{name}")
            if r is None:
                rows.append((task, name, "failed", "", "", "", ""))
                continue
            ratio = f"{r['median_s'] / ours['median_s']:.1f}x" if ours else "-"
            rows.append(
                (
                    task,
                    name,
                    f"{r['median_s']:.3f}",
                    str(len(r["times"])),
                    ratio,
                    _mib(r["peak_rss_mib"]),
                    _mib(r["act_mib"]),
                )
            )
    head = ("task", "contender", "median s", "runs", "vs openlm_mamba", "peak RSS MiB", "activation MiB")
    print()
    _table(head, rows)
    for task in ("train", "prefill"):
        vals = {n: results[f"{task}/{n}"]["value"] for n in names if f"{task}/{n}" in results}
        if len(vals) > 1:
            spread = max(vals.values()) - min(vals.values())
            print(f"# {task}: same weights, result spread across contenders {spread:.2e} ({vals})")

    srows, prev = [], None
    for L in args.scaling:
        r = run_worker(args, "openlm_mamba", "train", args.runs, 1, batch=1, seq=L)
        if r is None:
            srows.append((str(L), "failed", "", "", ""))
            continue
        progress(f"# scaling: openlm_mamba train, batch 1 x {L}: {r['median_s']:.3f} s (median of {len(r['times'])})")
        results[f"scaling/{L}"] = r
        tr = f"{r['median_s'] / prev['median_s']:.2f}" if prev else "-"
        mr = f"{r['act_mib'] / prev['act_mib']:.2f}" if prev and prev["act_mib"] > 0 else "-"  # nan > 0 is False
        srows.append((str(L), f"{r['median_s']:.3f}", tr, _mib(r["act_mib"]), mr))
        prev = r
    if srows:
        print()
        print("# scaling: openlm_mamba training step, batch 1 (ratios vs the previous row)")
        _table(("seq", "median s", "time ratio", "activation MiB", "memory ratio"), srows)
    if args.json:
        write_json(args.json, results)
    failed = [r for r in rows if r[2] == "failed"] + [r for r in srows if r[1] == "failed"]
    return 1 if failed else 0


def _mib(v: float) -> str:
    return "-" if v != v else f"{v:.0f}"  # nan (in-process quick mode) -> "-"


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |")


if __name__ == "__main__":
    sys.exit(main())
