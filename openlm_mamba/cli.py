"""The ``openlm-mamba`` command: one sub-command per module in ``openlm_mamba.commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module under openlm_mamba.commands
COMMANDS = {
    "info": "info",
    "convert": "convert",
    "generate": "generate",
    "eval": "evaluate",
}


def _load(name: str):
    return importlib.import_module(f"openlm_mamba.commands.{COMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openlm-mamba",
        description="Mamba language models for OpenLM: inspect configs, convert checkpoints, generate, evaluate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _load(name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
