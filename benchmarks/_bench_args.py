"""Command-line helpers shared by the benchmark scripts.

Typed converters for argparse (a bad value ends in one ``error: argument --flag: expected ...``
line and exit code 2, before anything is built or measured), a help formatter that keeps the
module docstring's layout and shows each flag's default, and the one-line refusal the GPU
benchmarks give on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (the whole module docstring), and "(default: X)" after each
    flag's help unless the help already names its default or there is none worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and default is not None
            and default is not False
            and default is not argparse.SUPPRESS
            and "default" not in text
        ):
            text += " (default: %(default)s)"
        return text


def _int(text: str, what: str, low: int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _int(text, "a positive int", 1)


def nonneg_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _int(text, "an int >= 0", 0)


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive ints, e.g. ``16,1024,4096``."""
    items = [s.strip() for s in str(text).split(",")]
    if not all(s.isdigit() and int(s) > 0 for s in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}")
    return [int(s) for s in items]


_SHAPE = re.compile(r"^(seq:)?(\d+)x(\d+)x(\d+)$")


def shape_list(text: str) -> list[tuple]:
    """argparse type: comma-separated launch shapes TILExBLOCK_DxWARPS, e.g. ``16x16x4,8x16x4``; a ``seq:``
    prefix picks the scan's plain-recurrence kernels: ``seq:2x128x4`` -> (2, 128, 4, "seq")."""
    shapes = []
    for item in str(text).split(","):
        m = _SHAPE.match(item.strip())
        if m is None or not all(int(v) > 0 for v in m.groups()[1:]):
            raise argparse.ArgumentTypeError(
                "expected comma-separated shapes [seq:]TILExBLOCK_DxWARPS of positive ints (e.g. 16x16x4 or "
                f"seq:2x128x4), got {item!r}"
            )
        dims = tuple(int(v) for v in m.groups()[1:])
        shapes.append((*dims, "seq") if m.group(1) else dims)
    return shapes


def name_list(choices: Iterable[str]) -> Callable[[str], list[str]]:
    """argparse type factory: comma-separated names, each one of ``choices`` (order kept, repeats dropped)."""
    choices = tuple(choices)

    def names(text: str) -> list[str]:
        items = [s.strip() for s in str(text).split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated names from {', '.join(choices)}; got {text!r}"
                + (f" (unknown: {', '.join(bad)})" if bad else "")
            )
        return list(dict.fromkeys(items))

    names.__name__ = "name_list"
    return names


def add_names_arg(parser: argparse.ArgumentParser, flag: str, names: Iterable[str], note: str = "") -> None:
    """``flag``: comma-separated names from ``names`` (all by default), validated by :func:`name_list`."""
    names = tuple(names)
    parser.add_argument(
        flag,
        type=name_list(names),
        default=",".join(names),
        help=f"comma-separated, from: {', '.join(names)}{note} (default: %(default)s)",
    )


def check_cuda_device(parser: argparse.ArgumentParser, device: str) -> None:
    """``parser.error`` when ``device`` is a CUDA device and this torch cannot use one."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        parser.error(f"argument --device: not a torch device: {device!r} (e.g. cpu, cuda, cuda:1)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"argument --device: {device!r} asked for, but torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})"
        )


def needs_gpu(prog: str, hint: str = "--quick runs a tiny CPU smoke test through the Triton interpreter") -> int:
    """Print the one-line refusal of a GPU benchmark run without --quick on a machine without CUDA; returns 2."""
    print(f"{prog}: needs a CUDA GPU (torch sees none); {hint}", file=sys.stderr)
    return 2


def progress(line: str) -> None:
    """One progress line on stderr, flushed (stdout keeps only the tables)."""
    print(line, file=sys.stderr, flush=True)
