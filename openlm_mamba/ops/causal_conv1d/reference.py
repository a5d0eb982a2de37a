"""Depthwise causal conv1d as its definition: out[t] = bias + sum_k w[k] * x[t - (W-1) + k]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import compute_dtype
from .cpu import causal_conv1d_cpu, cpp_conv_applies


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
):
    """Reference causal conv1d (same arguments and layouts as the causal-conv1d package's
    ``causal_conv1d_fn``): x (batch, dim, seqlen), weight (dim, width), initial_states
    (batch, dim, width - 1)."""
    dt = compute_dtype(x, weight, bias, initial_states)
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    if initial_states is None:
        initial_states = x.new_zeros(batch, dim, width - 1)
    xs = torch.cat([initial_states.to(dt), x.to(dt)], dim=-1)  # (batch, dim, width - 1 + seqlen)
    w = weight.to(dt)
    out = sum(w[:, k, None] * xs[:, :, k : k + seqlen] for k in range(width))
    if bias is not None:
        out = out + bias.to(dt)[:, None]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    out = out.to(x.dtype)
    if return_final_states:
        return out, xs[:, :, xs.shape[-1] - (width - 1) :].to(x.dtype)
    return out


def causal_conv1d_step_ref(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step without side effects: ``(out (batch, dim), new_state)``, where new_state is
    ``conv_state`` (batch, dim, width; the last inputs, newest last) shifted left by ``x`` (batch, dim).
    ``conv_state`` itself is left as it is; differentiable in every input."""
    window = torch.cat([conv_state[:, :, 1:], x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)
    out = (window * weight).sum(-1)
    out = out if bias is None else out + bias
    if activation in ("silu", "swish"):
        out = F.silu(out)
    return out.to(x.dtype), window


def causal_conv1d_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
):
    """PyTorch backend: the C++ kernel on CPU (see ``cpu.py``), else one grouped ``F.conv1d`` call
    (same semantics as the reference). Empty inputs (batch, dim or seqlen 0) take the reference, which
    returns empty outputs (and the initial states as the final ones) and has a backward."""
    if x.numel() == 0:
        return causal_conv1d_ref(x, weight, bias, initial_states, return_final_states, activation)
    if cpp_conv_applies(x, weight):
        silu = activation in ("silu", "swish")
        return causal_conv1d_cpu(x, weight, bias, initial_states, return_final_states, silu)
    dim = x.shape[1]
    width = weight.shape[1]
    dt = compute_dtype(x, weight, bias, initial_states)  # as the reference: 16-bit inputs computed in float32
    if initial_states is None:
        xs = F.pad(x.to(dt), (width - 1, 0))
    else:
        xs = torch.cat([initial_states.to(dt), x.to(dt)], dim=-1)
    out = F.conv1d(xs, weight.to(dt).unsqueeze(1), None if bias is None else bias.to(dt), groups=dim)
    if activation in ("silu", "swish"):
        out = F.silu(out)
    out = out.to(x.dtype)
    if return_final_states:
        return out, xs[:, :, xs.shape[-1] - (width - 1) :].to(x.dtype)
    return out
