"""``backend="cuda"``: the causal-conv1d package's ``causal_conv1d_fn`` (used only when it imports)."""

from __future__ import annotations

import importlib.util

import torch

HAS_CAUSAL_CONV1D = importlib.util.find_spec("causal_conv1d") is not None


def cuda_available(device: torch.device) -> str | None:
    """None when causal-conv1d's CUDA kernel can run on ``device``, else the reason."""
    if not HAS_CAUSAL_CONV1D:
        return "causal_conv1d is not installed (pip install causal-conv1d)"
    if device.type != "cuda":
        return "causal-conv1d's kernel needs CUDA tensors"
    return None


def causal_conv1d_cuda(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
):
    """Call ``causal_conv1d.causal_conv1d_fn`` (widths 2-4)."""
    if not 2 <= weight.shape[1] <= 4:
        raise ValueError(f'causal_conv1d: backend="cuda" supports widths 2-4, got {weight.shape[1]}')
    from causal_conv1d import causal_conv1d_fn

    return causal_conv1d_fn(
        x,
        weight,
        bias,
        initial_states=initial_states,
        return_final_states=return_final_states,
        activation=activation,
    )
