"""The ``openlm-mamba`` command: one sub-command per module in ``openlm_mamba.commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``, and
imports torch and the rest only inside ``run``: building the parser (``--help``) takes milliseconds, and
Ctrl-C while a command starts up reaches :func:`main`'s handler.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Iterator

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
    from . import __version__

    parser.add_argument("--version", action="version", version=f"openlm-mamba {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _load(name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


class Terminated(BaseException):
    """SIGTERM (``kill``, ``timeout``, Slurm, systemd), raised in the main thread like Ctrl-C's KeyboardInterrupt so
    that cleanups run: a conversion removes its partial output."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within: SIGTERM raises :class:`Terminated`, unless the process already handles it (or this is not the main
    thread, which cannot set handlers)."""
    try:
        previous = signal.getsignal(signal.SIGTERM)
        if previous != signal.SIG_DFL:
            previous = None
        else:
            signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    try:
        with _sigterm_raises():
            parser = build_parser()  # inside: Ctrl-C while the commands' modules import is an interrupt too
            args = parser.parse_args(argv)
            if not getattr(args, "_run", None):
                parser.print_help()
                return 2
            return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except SystemExit as e:  # a command's `raise SystemExit("error: ...")`: the message, and 2 like the others
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise
    except BrokenPipeError:  # `openlm-mamba ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1


if __name__ == "__main__":
    sys.exit(main())
