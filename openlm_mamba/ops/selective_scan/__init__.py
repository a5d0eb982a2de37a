"""Selective scan: public entry point, argument checks and backend dispatch."""

from __future__ import annotations

import torch

from .. import dispatch
from ..checks import check_shape, check_tensor, match_groups
from .cpu import selective_scan_cpu
from .reference import selective_scan_ref

OP = "selective_scan"


def _check(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    check_tensor(OP, "u", u, 3)
    dev = u.device
    batch, dim, seqlen = u.shape
    check_tensor(OP, "delta", delta, 3, device=dev)
    check_shape(OP, "delta", delta, u.shape, "(batch, dim, seqlen), like u")
    check_tensor(OP, "A", A, 2, device=dev)
    if A.shape[0] != dim:
        raise ValueError(f"{OP}: A must have shape (dim={dim}, d_state), got {tuple(A.shape)}")
    if A.is_complex():
        raise TypeError(f"{OP}: complex A is not supported")
    dstate = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        check_tensor(OP, name, M, (3, 4), device=dev)
        if M.dim() == 3:
            check_shape(OP, name, M, (batch, dstate, seqlen), "(batch, d_state, seqlen)")
        else:
            groups = M.shape[1]
            check_shape(OP, name, M, (batch, groups, dstate, seqlen), "(batch, groups, d_state, seqlen)")
            if groups == 0 or dim % groups:
                raise ValueError(f"{OP}: {name} has {groups} groups, which must divide dim={dim}")
    if D is not None:
        check_tensor(OP, "D", D, 1, device=dev)
        check_shape(OP, "D", D, (dim,), "(dim,)")
    if z is not None:
        check_tensor(OP, "z", z, 3, device=dev)
        check_shape(OP, "z", z, u.shape, "(batch, dim, seqlen), like u")
    if delta_bias is not None:
        check_tensor(OP, "delta_bias", delta_bias, 1, device=dev)
        check_shape(OP, "delta_bias", delta_bias, (dim,), "(dim,)")
    if initial_state is not None:
        check_tensor(OP, "initial_state", initial_state, 3, device=dev)
        check_shape(OP, "initial_state", initial_state, (batch, dim, dstate), "(batch, dim, d_state)")


def selective_scan(
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
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan with mamba_ssm's ``selective_scan_fn`` semantics, plus an optional initial state.

    Shapes: u, delta, z (batch, dim, seqlen); A (dim, d_state); B, C (batch, d_state, seqlen) or
    grouped (batch, groups, d_state, seqlen); D, delta_bias (dim,); initial_state
    (batch, dim, d_state). Returns ``out`` (dtype of u), or ``(out, last_state)`` with
    ``return_last_state`` (last_state in float32, or float64 for float64 inputs).
    """
    if not torch.compiler.is_compiling():
        _check(u, delta, A, B, C, D, z, delta_bias, initial_state)
    B, C = match_groups(B, C, 4)
    _, fn = dispatch.resolve(OP, u.device, backend)
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)


dispatch.register(OP, "torch", selective_scan_cpu)  # chunked scan, C++ inner loop (pure PyTorch fallback)

__all__ = ["selective_scan", "selective_scan_ref"]

# Triton kernels (imported on first call: TRITON_INTERPRET may be set until then; the static
# import keeps torch.compile tracing through) and, where one exists, the compiled CUDA package.
from ..triton_utils import triton_available  # noqa: E402
from .cuda import cuda_available, selective_scan_cuda  # noqa: E402


def _selective_scan_triton(*args, **kwargs):
    from .triton import selective_scan_triton

    return selective_scan_triton(*args, **kwargs)


dispatch.register(OP, "triton", _selective_scan_triton, triton_available)
dispatch.register(OP, "cuda", selective_scan_cuda, cuda_available)
