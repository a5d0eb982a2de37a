"""Causal conv1d for the "torch" backend on CPU: the C++ kernel (``ops/csrc/causal_conv1d_cpu.cpp``).

Works time-major: ``x`` (batch, dim, L) that is a transposed view of a (batch, L, dim) tensor (as
the model's in_proj output is) is read in place, and ``out`` comes back as the same kind of view.
Forward and backward are fused (bias, SiLU); eager autograd goes through a
``torch.autograd.Function``. Under ``torch.compile``, or where the kernels cannot be built, the
plain PyTorch version (one grouped ``F.conv1d``) runs instead.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..cpp import needs_grad, use_cpp


def _conv_fwd(x_tm, weight, bias, init, silu: bool) -> torch.Tensor:
    return torch.ops.openlm_mamba_cpu.conv_fwd(x_tm, weight, bias, init, silu)


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_tm, weight, bias, init, silu: bool):
        out = _conv_fwd(x_tm, weight, bias, init, silu)
        ctx.save_for_backward(x_tm, weight, bias, init)
        ctx.silu = silu
        return out

    @staticmethod
    @once_differentiable  # the C++ backward has no autograd: a double backward is an error, not zeros
    def backward(ctx, gout):
        x_tm, weight, bias, init = ctx.saved_tensors
        dx, dw_b, dbias_b, dinit = torch.ops.openlm_mamba_cpu.conv_bwd(
            gout.contiguous(), x_tm, weight, bias, init, ctx.silu
        )
        return (
            dx,
            dw_b.sum(0),
            None if bias is None else dbias_b.sum(0),
            None if init is None else dinit,
            None,
        )


def cpp_conv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the C++ kernel runs these inputs (eager CPU float32/float64, kernels built)."""
    return not torch.compiler.is_compiling() and weight.dtype == x.dtype and use_cpp(x)


def causal_conv1d_cpu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    return_final_states: bool,
    silu: bool,
):
    """The C++ path of ``causal_conv1d_torch`` (same arguments; see :func:`cpp_conv_applies`)."""
    width = weight.shape[1]
    x_tm = x.transpose(1, 2)  # (batch, L, dim)
    if x_tm.stride(-1) != 1 and x_tm.shape[-1] != 1:
        x_tm = x_tm.contiguous()
    b = None if bias is None else bias.to(x.dtype).contiguous()
    init = None if initial_states is None or width == 1 else initial_states.to(x.dtype).contiguous()
    args = (x_tm, weight.to(x.dtype).contiguous(), b, init)
    if needs_grad(*args):
        out = _ConvFn.apply(*args, silu).transpose(1, 2)
    else:  # nothing to differentiate (inference): skip the autograd machinery
        out = _conv_fwd(*args, silu).transpose(1, 2)
    if not return_final_states:
        return out
    L, keep = x.shape[-1], width - 1
    if keep <= L:
        final = x[:, :, L - keep :].clone()  # not a view of x, as the reference
    else:
        before = initial_states if initial_states is not None else x.new_zeros(x.shape[0], x.shape[1], keep)
        final = torch.cat([before[:, :, L:].to(x.dtype), x], dim=-1)
    return out, final
