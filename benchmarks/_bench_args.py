"""Command-line helpers shared by the benchmark scripts.

Typed converters for argparse (a bad value ends in one ``error: argument --flag: expected ...``
line and exit code 2, before anything is built or measured), a help formatter that keeps the
module docstring's layout and shows each flag's default, the one-line refusal the GPU
benchmarks give on a machine without CUDA, and the results file every ``--json`` writes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


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


def output_file(text: str) -> str:
    """argparse type: a file path whose directory exists and is writable (checked before a long run, not after)."""
    path = Path(text)
    parent = path.parent
    if not text or path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a file path, got {text!r}" + (" (a directory)" if text else ""))
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"directory {str(parent)!r} of {text!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"directory {str(parent)!r} of {text!r} is not writable")
    return text


def finite_json(value: Any) -> Any:
    """``value`` with every NaN / infinite float (nested in dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_json(path: str, value: Any) -> None:
    """Write ``value`` to ``path`` as valid JSON: a non-finite float (no GPU memory on CPU) becomes null."""
    Path(path).write_text(json.dumps(finite_json(value), indent=1, allow_nan=False) + "\n")


def check_backend(
    parser: argparse.ArgumentParser,
    backend: str | None,
    device: str,
    ops: Iterable[str] = ("selective_scan", "causal_conv1d"),
) -> None:
    """``parser.error`` when the model-wide op ``backend`` (None: $OPENLM_MAMBA_BACKEND's) cannot run a model's
    ``ops`` (those with no other backend to fall back on: the scan and the conv) on ``device``."""
    import torch

    from openlm_mamba.ops import available_backends, dispatch

    source = "argument --backend" if backend is not None else f"${dispatch.ENV_VAR}"
    try:
        name = dispatch.requested_backend(backend)
    except ValueError as exc:
        parser.error(str(exc))
    if name == "auto":
        return
    dev = torch.device(device)
    for op in ops:
        if name in available_backends(op, dev):
            continue
        reason = f"{op}: backend {name!r} is unavailable on {dev}"
        try:
            dispatch.resolve(op, dev, name)
        except dispatch.BackendUnavailableError as exc:
            reason = str(exc)
        parser.error(f"{source}: {reason}")


def needs_gpu(prog: str, hint: str = "--quick runs a tiny CPU smoke test through the Triton interpreter") -> int:
    """Print the one-line refusal of a GPU benchmark run without --quick on a machine without CUDA; returns 2."""
    print(f"{prog}: needs a CUDA GPU (torch sees none); {hint}", file=sys.stderr)
    return 2


def progress(line: str) -> None:
    """One progress line on stderr, flushed (stdout keeps only the tables)."""
    print(line, file=sys.stderr, flush=True)
