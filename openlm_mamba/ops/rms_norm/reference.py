"""Residual add + RMSNorm (or LayerNorm) with the residual stream kept in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual_in_fp32: bool = True,
    is_rms_norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(norm(x + residual), x + residual)``.

    The sum and the normalisation are computed in float32 (float64 for float64 inputs); the
    normalised output has x's dtype; the new residual is float32 when ``residual_in_fp32``,
    else x's dtype.
    """
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    r = x.to(dt) if residual is None else x.to(dt) + residual.to(dt)
    if is_rms_norm:
        out = r * torch.rsqrt(r.square().mean(-1, keepdim=True) + eps) * weight.to(dt)
        if bias is not None:
            out = out + bias.to(dt)
    else:
        out = F.layer_norm(r, r.shape[-1:], weight.to(dt), None if bias is None else bias.to(dt), eps)
    return out.to(x.dtype), (r if residual_in_fp32 else r.to(x.dtype))


def add_norm_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual_in_fp32: bool = True,
    is_rms_norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch backend: :func:`add_norm_ref`'s math with torch's fused ``F.rms_norm`` (one kernel
    instead of five on CPU)."""
    if not is_rms_norm:
        return add_norm_ref(x, weight, bias, residual, eps, residual_in_fp32, is_rms_norm)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    r = x.to(dt) if residual is None else x.to(dt) + residual.to(dt)
    out = F.rms_norm(r, r.shape[-1:], weight.to(dt), eps)
    if bias is not None:
        out = out + bias.to(dt)
    return out.to(x.dtype), (r if residual_in_fp32 else r.to(x.dtype))
