"""``openlm-mamba eval``: lm-evaluation-harness tasks on a checkpoint, scored by MambaLM with our kernels."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HELP = "Evaluate a checkpoint (OpenLM .pt, HF dir or mamba_ssm dir) with lm-evaluation-harness tasks."


def _batch_size(text: str) -> int | str:
    """--batch-size: a positive int, or lm-eval's "auto" / "auto:N" (kept as given: MambaEvalLM reads it as 8)."""
    value = text.strip().lower()
    if value == "auto" or (value.startswith("auto:") and value[5:].isdigit()):
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive int or 'auto', got {text!r}")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="OpenLM .pt (or run dir), HF MambaForCausalLM dir or mamba_ssm dir")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tasks", default=None, help="comma-separated lm-eval task names (e.g. hellaswag,piqa)")
    group.add_argument(
        "--model-card",
        action="store_true",
        help="the Mamba-7B model card's tasks: HellaSwag, PIQA, Winogrande, ARC-E, ARC-C (0-shot), MMLU (5-shot)",
    )
    parser.add_argument(
        "--num-fewshot",
        type=int,
        default=None,
        help="few-shot examples per task (with --tasks; default: each task's own setting, 0 unless its config sets one)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory, tokenizer.json file or HF hub name (default: the checkpoint dir's, else gpt-neox-20b)",
    )
    parser.add_argument("--model", default=None, help="model config the checkpoint must match (name or JSON path)")
    parser.add_argument("--include-path", default=None, help="folder of extra task YAMLs (e.g. local JSONL tasks)")
    parser.add_argument("--only-local-tasks", action="store_true", help="skip indexing lm-eval's built-in tasks")
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        default=8,
        help="requests scored together (default: 8; lm-eval's 'auto' / 'auto:N' also mean 8)",
    )
    parser.add_argument("--max-length", type=int, default=2048, help="context window for scoring (default 2048)")
    parser.add_argument(
        "--no-share-contexts",
        action="store_true",
        help="score every request whole (by default the choices of a question read its context once and continue "
        "from copies of its recurrent state: the same numbers, less work)",
    )
    parser.add_argument(
        "--limit",
        type=float,
        default=None,
        help="for quick checks: examples per task, a whole count N >= 1 or a fraction in (0, 1) of each task",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16", "float64"],
        help="weights and compute dtype (default: the checkpoint's weights in float32, on any device)",
    )
    parser.add_argument(
        "--backend",
        default=None,
        choices=["auto", "torch", "triton", "cuda"],
        help="op backend (default: auto, or $OPENLM_MAMBA_BACKEND)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="write lm-eval's results JSON here (results, groups, n-shot, configs, versions, ...; its "
        "directories are created)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        from ..convert import ConversionError, check_checkpoint
        from ..evaluation import (
            MODEL_CARD_TASKS,
            MambaEvalLM,
            check_device,
            check_limit,
            check_tasks,
            evaluate,
            make_task_manager,
            results_table,
        )
        from ..ops.dispatch import BackendUnavailableError, requested_backend
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.tasks and not args.model_card:
        print("error: give --tasks a,b,c or --model-card", file=sys.stderr)
        return 2
    # the cheap checks first: nothing is loaded before the arguments are known to be usable
    if args.num_fewshot is not None and args.model_card:
        print("error: --num-fewshot with --model-card: the card fixes each task's shots (0, MMLU 5)", file=sys.stderr)
        return 2
    if args.num_fewshot is not None and args.num_fewshot < 0:
        print(f"error: --num-fewshot {args.num_fewshot}: expected a count >= 0", file=sys.stderr)
        return 2
    try:
        limit = check_limit(args.limit)
    except ValueError as e:
        print(f"error: --limit {args.limit:g}: {e}", file=sys.stderr)
        return 2
    try:
        device = check_device(args.device or None)
    except ValueError as e:
        print(f"error: --device {args.device}: {e}", file=sys.stderr)
        return 2
    if args.include_path and not Path(args.include_path).is_dir():
        why = (
            "not a directory (give the folder holding the task YAMLs)"
            if Path(args.include_path).exists()
            else "no such directory"
        )
        print(f"error: --include-path {args.include_path}: {why}", file=sys.stderr)
        return 2
    if args.model_card:
        runs: dict[int | None, list[str]] = {}
        for task, shots, _ in MODEL_CARD_TASKS.values():
            runs.setdefault(shots, []).append(task)
        reference = {task: card for task, _, card in MODEL_CARD_TASKS.values()}
    else:
        runs = {args.num_fewshot: [t.strip() for t in args.tasks.split(",") if t.strip()]}
        reference = None
    if not any(runs.values()):
        print(f"error: --tasks {args.tasks!r}: no task names in it", file=sys.stderr)
        return 2
    try:
        requested_backend(args.backend)  # --backend, else $OPENLM_MAMBA_BACKEND: a bad name fails now
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    output = Path(args.output) if args.output else None
    if output is not None:
        problem = _output_problem(output)
        if problem:
            print(f"error: --output {args.output}: {problem}", file=sys.stderr)
            return 2
    try:
        check_checkpoint(args.checkpoint, args.model)  # a missing or wrong checkpoint: said now, not after tasks
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manager = make_task_manager(args.include_path, include_defaults=not args.only_local_tasks)
    try:
        check_tasks([t for tasks in runs.values() for t in tasks], manager)
    except ValueError as e:
        hint = " (--only-local-tasks skips lm-eval's built-in tasks)" if args.only_local_tasks else ""
        print(f"error: {'--model-card' if args.model_card else '--tasks'}: {e}{hint}", file=sys.stderr)
        return 2
    try:
        lm = MambaEvalLM(
            pretrained=args.checkpoint,
            tokenizer=args.tokenizer,
            model_config=args.model,
            batch_size=args.batch_size,
            max_length=args.max_length,
            device=device,
            dtype=args.dtype,
            backend=args.backend,  # "auto" too: it overrides $OPENLM_MAMBA_BACKEND, as in generate
            check_checkpoint=False,  # checked above: a legacy (non-zip) .pt is not read a third time
            share_contexts=not args.no_share_contexts,
        )
    except (ConversionError, ValueError, BackendUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    merged: dict = {}
    for shots, tasks in runs.items():
        try:
            res = evaluate(lm, tasks, num_fewshot=shots, limit=limit, task_manager=manager)
        except ValueError as e:  # lm-eval refusing the task's settings, e.g. more few-shot examples than it has
            print(f"error: {','.join(tasks)}: lm-eval: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        except (ConnectionError, OSError) as e:  # lm-eval fetching a task's dataset (datasets / huggingface_hub)
            cause = " ".join(str(e).split())
            print(
                f"error: {','.join(tasks)}: lm-eval could not load the data ({type(e).__name__}: {cause}). "
                "Without network access, lm-eval reads datasets from the HF cache only (HF_DATASETS_OFFLINE=1); "
                "local JSONL tasks go through --include-path",
                file=sys.stderr,
            )
            return 2
        for key, value in res.items():  # per-task sections merge across runs; the rest is the last run's
            if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "config":
                merged[key].update(value)
            else:
                merged[key] = value
    print(results_table(merged, reference))
    if output is not None:
        # lm-eval got a ready model object, so its "config" names none of it: record what produced the numbers
        from .. import __version__

        merged["config"] = {
            **(merged.get("config") or {}),
            "model": "openlm-mamba",
            "model_args": {
                "pretrained": str(args.checkpoint),
                "tokenizer": None if args.tokenizer is None else str(args.tokenizer),
                "model": args.model,
                "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
                "backend": args.backend,
                "max_length": lm.max_length,
                "share_contexts": lm.share_contexts,
            },
            "batch_size": lm.batch_size,
            "device": str(lm.device),
            "limit": limit,
            "num_fewshot": {",".join(tasks): shots for shots, tasks in runs.items()},
        }
        merged["model_name"] = str(args.checkpoint)
        merged["openlm_mamba_version"] = __version__
        try:
            tmp = output.with_name(f".{output.name}.partial-{os.getpid()}")
            tmp.write_text(json.dumps(merged, indent=2, default=str) + "\n")
            os.replace(tmp, output)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            print(
                f"error: --output {args.output}: cannot write ({e.strerror or e}); the table above has the results",
                file=sys.stderr,
            )
            return 2
        print(f"wrote {args.output}")
    return 0


def _output_problem(output: Path) -> str | None:
    """Why the results JSON could not be written to ``output`` at the end (checked before hours of evaluation),
    or None; creates its missing parent directories."""
    if output.is_dir():
        return "is a directory (give a file name, e.g. results.json)"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create its directory ({e.strerror or e})"
    if not os.access(output.parent, os.W_OK):
        return f"its directory {output.parent} is not writable"
    return None
