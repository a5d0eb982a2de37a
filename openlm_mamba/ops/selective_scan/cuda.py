"""``backend="cuda"``: mamba-ssm's compiled ``selective_scan_fn`` (used only when mamba_ssm imports)."""

from __future__ import annotations

import importlib.util

import torch

HAS_MAMBA_SSM = importlib.util.find_spec("mamba_ssm") is not None


def cuda_available(device: torch.device) -> str | None:
    """None when mamba-ssm's CUDA kernel can run on ``device``, else the reason."""
    if not HAS_MAMBA_SSM:
        return "mamba_ssm is not installed (pip install mamba-ssm)"
    if device.type != "cuda":
        return "mamba-ssm's selective scan kernel needs CUDA tensors"
    return None


def selective_scan_cuda(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
):
    """Call ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` (no initial state support)."""
    if initial_state is not None:
        raise ValueError('selective_scan: initial_state is not supported by backend="cuda" (mamba-ssm); use "triton"')
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(
        u,
        delta,
        A,
        B,
        C,
        None if D is None else D.float(),
        z,
        None if delta_bias is None else delta_bias.float(),
        delta_softplus,
        return_last_state,
    )
