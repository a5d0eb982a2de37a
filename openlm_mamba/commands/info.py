"""``openlm-mamba info``: sizes, parameter count and FLOPs per token of a model config."""

from __future__ import annotations

import argparse
import json

HELP = "Show a model config's sizes, parameter count and training FLOPs per token."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="config name (e.g. mamba_7b) or path to a JSON file")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--list", action="store_true", help="list the shipped configs")


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError, MambaConfig, available_configs

    if args.list or args.model is None:
        for name in available_configs():
            cfg = MambaConfig.load(name)
            print(
                f"{name:12s} d_model={cfg.d_model:<5d} n_layer={cfg.n_layer:<3d} params={cfg.num_parameters() / 1e9:.3f}B"
            )
        return 0
    try:
        cfg = MambaConfig.load(args.model)
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    info = cfg.to_dict()
    info.update(
        d_inner=cfg.d_inner,
        dt_rank=cfg.dt_rank_value,
        padded_vocab_size=cfg.padded_vocab_size,
        parameters=cfg.num_parameters(),
        train_flops_per_token=cfg.flops_per_token(),
    )
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:{width}s}  {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k:{width}s}  {v}")
    return 0
