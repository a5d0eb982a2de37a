"""``openlm-mamba convert``: move checkpoints between OpenLM, HF transformers and mamba_ssm formats."""

from __future__ import annotations

import argparse
import sys

HELP = "Convert a checkpoint between OpenLM (.pt), HF transformers (dir) and mamba_ssm (dir) formats."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="source: an OpenLM .pt (or a dir with epoch_N.pt), an HF dir or a mamba_ssm dir")
    parser.add_argument("dst", help="destination: a directory for hf / mamba_ssm, a .pt file for openlm")
    parser.add_argument("--to", required=True, choices=["hf", "openlm", "mamba_ssm"], help="output format")
    parser.add_argument(
        "--model",
        default=None,
        help="model config (name or JSON path) the source must match; "
        "also supplies seq_len and fields a bare state dict cannot tell",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16", "float64"],
        help="cast floating tensors to this dtype (default: keep the source's dtypes)",
    )
    parser.add_argument("--shard-size", default="5GB", help="largest safetensors shard for --to hf (default 5GB)")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="seq_len to record (HF / mamba_ssm configs have none)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing destination that holds only what this conversion writes (tokenizer files in it "
        "are kept); refused when it holds anything else or the source (converting an HF / mamba_ssm dir or a .pt "
        "in place is allowed)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..convert import ConversionError, convert

    try:
        out = convert(
            args.src,
            args.dst,
            to=args.to,
            model=args.model,
            dtype=args.dtype,
            shard_size=args.shard_size,
            seq_len=args.seq_len,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
