"""Argument checks shared by the public ops: errors name the argument, expected vs got."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def check_tensor(
    op: str,
    name: str,
    t: object,
    ndim: int | Sequence[int],
    *,
    device: torch.device | None = None,
    floating: bool = True,
) -> torch.Tensor:
    """Check that ``t`` is a tensor with ``ndim`` dims (one of, if a sequence) on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if t.dim() not in dims:
        want = " or ".join(str(d) for d in dims)
        raise ValueError(f"{op}: {name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {device}")
    return t


def check_shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    """Check ``t.shape == expected``; ``what`` spells out the expected layout, e.g. "(batch, dim, seqlen)"."""
    if tuple(t.shape) != tuple(expected):
        layout = f" {what}" if what else ""
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}{layout}, got {tuple(t.shape)}")


def match_groups(B: torch.Tensor, C: torch.Tensor, grouped_ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B and C with one group layout: the kernels take the group count from B and index C with it. Unchanged
    when they agree (the usual case); else both grouped (dim 1, an ungrouped one counting as 1 group) into
    the least common multiple of their group counts, each group repeated. ``grouped_ndim``: a grouped
    tensor's number of dimensions."""
    gb = B.shape[1] if B.dim() == grouped_ndim else 1
    gc = C.shape[1] if C.dim() == grouped_ndim else 1
    if gb == gc and B.dim() == C.dim():
        return B, C
    g = math.lcm(gb, gc)

    def widen(M: torch.Tensor, gm: int) -> torch.Tensor:
        M = M if M.dim() == grouped_ndim else M.unsqueeze(1)
        return M if gm == g else M.repeat_interleave(g // gm, dim=1)

    return widen(B, gb), widen(C, gc)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64, else float32 (state always accumulates in >= fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
