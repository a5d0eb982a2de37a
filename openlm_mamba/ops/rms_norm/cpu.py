"""Residual add + RMSNorm for the "torch" backend on CPU: the C++ kernel (``ops/csrc/add_norm_cpu.cpp``).

One pass over each row (sum, sum of squares, scaled output) instead of torch's add and rms_norm
kernels (three passes over memory, an extra temporary), all rows on torch's threads. Inference
calls the C++ op directly; with a gradient to compute it runs through a ``torch.autograd.Function``
with a fused C++ backward. LayerNorm, other dtypes, other devices, ``torch.compile`` tracing, or
kernels that cannot be built: :func:`add_norm_torch`.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..cpp import needs_grad, use_cpp
from .reference import add_norm_torch


class _AddNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps: float):
        out, r = torch.ops.openlm_mamba_cpu.add_norm_fwd(x, residual, weight, bias, eps, True)
        if residual is None:
            r = x  # r is x itself (as in the reference); autograd sees an identity of x
        ctx.save_for_backward(r, weight)
        ctx.eps, ctx.has_bias, ctx.has_residual = eps, bias is not None, residual is not None
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zeros to add)
        return out, r

    @staticmethod
    @once_differentiable
    def backward(ctx, gout, gres):
        r, weight = ctx.saved_tensors
        gout = torch.zeros_like(r) if gout is None else gout
        dr, dw, db = torch.ops.openlm_mamba_cpu.add_norm_bwd(gout, gres, r, weight, ctx.has_bias, ctx.eps)
        return dr, (dr if ctx.has_residual else None), dw, (db if ctx.has_bias else None), None


def cpp_add_norm_applies(x: torch.Tensor, is_rms_norm: bool) -> bool:
    """True when the C++ kernel runs these inputs (eager CPU float32/float64 RMSNorm, kernels built)."""
    return not torch.compiler.is_compiling() and is_rms_norm and x.numel() > 0 and use_cpp(x)


def add_norm_cpu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual_in_fp32: bool = True,
    is_rms_norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`add_norm_torch` with the C++ kernel where it applies (see :func:`cpp_add_norm_applies`).

    For float32 / float64 ``x`` the new residual is in x's dtype whatever ``residual_in_fp32`` says.
    """
    if not cpp_add_norm_applies(x, is_rms_norm):
        return add_norm_torch(x, weight, bias, residual, eps, residual_in_fp32, is_rms_norm)
    if needs_grad(x, residual, weight, bias):  # convert here, where autograd sees it
        dt = x.dtype
        w = weight.to(dt).contiguous()
        b = None if bias is None else bias.to(dt).contiguous()
        res = None if residual is None else residual.to(dt)
        return _AddNormFn.apply(x, res, w, b, float(eps))
    # inference: the op converts weight, bias and residual to x's dtype itself (cheaper than here)
    out, r = torch.ops.openlm_mamba_cpu.add_norm_fwd(x, residual, weight, bias, float(eps), residual_in_fp32)
    return out, (x if residual is None else r)


__all__ = ["add_norm_cpu", "cpp_add_norm_applies"]
