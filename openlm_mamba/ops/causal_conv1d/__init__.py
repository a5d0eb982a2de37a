"""Causal depthwise conv1d: public entry point, argument checks and backend dispatch."""

from __future__ import annotations

import torch

from .. import dispatch
from ..checks import check_shape, check_tensor
from ..cpp import needs_grad
from .cpu import cpp_conv_applies
from .reference import causal_conv1d_ref, causal_conv1d_step_ref, causal_conv1d_torch

OP = "causal_conv1d"
ACTIVATIONS = (None, "silu", "swish")


def _check_activation(activation, op: str = OP) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f'{op}: activation must be None, "silu" or "swish", got {activation!r}')


def _check(x, weight, bias, initial_states, activation) -> None:
    check_tensor(OP, "x", x, 3)
    batch, dim, _ = x.shape
    check_tensor(OP, "weight", weight, 2, device=x.device)
    if weight.shape[0] != dim:
        raise ValueError(f"{OP}: weight must have shape (dim={dim}, width), got {tuple(weight.shape)}")
    if not 1 <= weight.shape[1] <= 4:
        raise ValueError(f"{OP}: weight width must be between 1 and 4, got {weight.shape[1]}")
    if bias is not None:
        check_tensor(OP, "bias", bias, 1, device=x.device)
        check_shape(OP, "bias", bias, (dim,), "(dim,)")
    if initial_states is not None:
        check_tensor(OP, "initial_states", initial_states, 3, device=x.device)
        check_shape(OP, "initial_states", initial_states, (batch, dim, weight.shape[1] - 1), "(batch, dim, width - 1)")
    _check_activation(activation)


def _check_update(x, conv_state, weight, bias, activation) -> None:
    op = "causal_conv1d_update"
    check_tensor(op, "x", x, 2)
    batch, dim = x.shape
    check_tensor(op, "weight", weight, 2, device=x.device)
    if weight.shape[0] != dim or not 1 <= weight.shape[1] <= 4:
        raise ValueError(f"{op}: weight must have shape (dim={dim}, width 1-4), got {tuple(weight.shape)}")
    check_tensor(op, "conv_state", conv_state, 3, device=x.device)
    check_shape(op, "conv_state", conv_state, (batch, dim, weight.shape[1]), "(batch, dim, width), like x and weight")
    if bias is not None:
        check_tensor(op, "bias", bias, 1, device=x.device)
        check_shape(op, "bias", bias, (dim,), "(dim,)")
    _check_activation(activation, op)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
    backend: str | None = None,
):
    """Causal depthwise conv1d with the causal-conv1d package's ``causal_conv1d_fn`` semantics.

    x (batch, dim, seqlen); weight (dim, width); bias (dim,); initial_states
    (batch, dim, width - 1) are the inputs before x. Returns ``out`` (batch, dim, seqlen), or
    ``(out, final_states)`` with ``return_final_states`` (the last width - 1 inputs, for decoding).
    """
    if not torch.compiler.is_compiling():
        _check(x, weight, bias, initial_states, activation)
    _, fn = dispatch.resolve(OP, x.device, backend)
    return fn(x, weight, bias, initial_states, return_final_states, activation)


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """One decoding step: shift ``x`` (batch, dim) into ``conv_state`` (batch, dim, width), the last
    ``width`` inputs newest last, in place, and return the conv output (batch, dim) at that step.

    The C++ kernel runs it on CPU (float32 / float64, eager); elsewhere, and with autograd on and an
    input requiring grad (the kernel has no backward), a few differentiable torch ops that record the
    in-place update of ``conv_state``. One implementation for every device: no ``backend`` choice.
    """
    if not torch.compiler.is_compiling():
        _check_update(x, conv_state, weight, bias, activation)
    if (
        conv_state.is_contiguous()
        and cpp_conv_applies(conv_state, weight)
        and x.dtype == conv_state.dtype
        and (bias is None or bias.dtype == conv_state.dtype)
        and not needs_grad(x, conv_state, weight, bias)
    ):
        silu = activation is not None
        b = None if bias is None else bias.contiguous()
        return torch.ops.openlm_mamba_cpu.conv_step(conv_state, x.contiguous(), weight.contiguous(), b, silu)
    out, window = causal_conv1d_step_ref(x, conv_state, weight, bias, activation)
    conv_state.copy_(window)
    return out


dispatch.register(OP, "torch", causal_conv1d_torch)

__all__ = [
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_step_ref",
    "causal_conv1d_torch",
    "causal_conv1d_update",
]

# Triton kernels (imported on first call: TRITON_INTERPRET may be set until then; the static
# import keeps torch.compile tracing through) and, where one exists, the compiled CUDA package.
from ..triton_utils import triton_available  # noqa: E402
from .cuda import causal_conv1d_cuda, cuda_available  # noqa: E402


def _causal_conv1d_triton(*args, **kwargs):
    from .triton import causal_conv1d_triton

    return causal_conv1d_triton(*args, **kwargs)


dispatch.register(OP, "triton", _causal_conv1d_triton, triton_available)
dispatch.register(OP, "cuda", causal_conv1d_cuda, cuda_available)
