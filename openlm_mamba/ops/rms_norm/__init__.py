"""Fused residual add + RMSNorm: public entry point and backend dispatch."""

from __future__ import annotations

import torch

from .. import dispatch
from ..checks import check_shape, check_tensor
from .cpu import add_norm_cpu
from .reference import add_norm_ref, add_norm_torch

OP = "add_norm"


def add_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual_in_fp32: bool = True,
    is_rms_norm: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual), x + residual)`` over the last dim; see :func:`add_norm_ref`."""
    if not torch.compiler.is_compiling():
        check_tensor(OP, "x", x, (2, 3))
        check_tensor(OP, "weight", weight, 1, device=x.device)
        check_shape(OP, "weight", weight, (x.shape[-1],), "(hidden,)")
        if bias is not None:
            check_tensor(OP, "bias", bias, 1, device=x.device)
            check_shape(OP, "bias", bias, (x.shape[-1],), "(hidden,)")
        if residual is not None:
            check_tensor(OP, "residual", residual, x.dim(), device=x.device)
            check_shape(OP, "residual", residual, x.shape, "like x")
    _, fn = dispatch.resolve(OP, x.device, backend)
    return fn(x, weight, bias, residual, eps, residual_in_fp32, is_rms_norm)


# "torch": the C++ kernel for eager CPU float32/float64 RMSNorm, else add_norm_torch.
dispatch.register(OP, "torch", add_norm_cpu)

__all__ = ["add_norm", "add_norm_cpu", "add_norm_ref", "add_norm_torch"]

# Triton kernels (imported on first call: TRITON_INTERPRET may be set until then; the static
# import keeps torch.compile tracing through) and, where one exists, the compiled CUDA package.
from ..triton_utils import triton_available  # noqa: E402


def _add_norm_triton(*args, **kwargs):
    from .triton import add_norm_triton

    return add_norm_triton(*args, **kwargs)


dispatch.register(OP, "triton", _add_norm_triton, triton_available)
