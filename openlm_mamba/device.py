"""Checks shared by ``generate`` and ``eval``, made up front (clear errors instead of torch's deep inside a run):
which torch device to run on, and whether a tokenizer fits a model's vocabulary."""

from __future__ import annotations

from typing import Any

import torch


def check_device(device: str | torch.device | None) -> str:
    """The device to run on (default: cuda if available, else cpu); ValueError saying why torch cannot use it here."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError("not a valid torch device (expected cpu, cuda, cuda:N, mps, ...)") from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"this torch build ({torch.__version__}) has no CUDA; use cpu")
        if not torch.cuda.is_available():
            raise ValueError("no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"only {count} CUDA device(s) visible (cuda:0 .. cuda:{count - 1})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("MPS is not available on this machine")
    elif dev.type == "meta":
        raise ValueError("the meta device holds no data; pick one that can run the model (cpu, cuda)")
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except Exception as e:  # torch raises RuntimeError / AssertionError for devices it was not built for
            raise ValueError(f"torch cannot use it here ({type(e).__name__}: {' '.join(str(e).split())})") from None
    return str(dev)


def check_tokenizer(tokenizer: Any, vocab_size: int) -> None:
    """ValueError if ``tokenizer`` can produce ids outside a model vocabulary of ``vocab_size`` (a tokenizer of
    another model: its ids would index the wrong embeddings, or none)."""
    n = len(tokenizer)
    if n > vocab_size:
        raise ValueError(
            f"the tokenizer has {n} tokens, more than the model's vocabulary of {vocab_size}: "
            "it does not match the checkpoint"
        )
