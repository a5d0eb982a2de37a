"""Selective state update (one decoding step): public entry point, argument checks and dispatch."""

from __future__ import annotations

import torch

from .. import dispatch
from ..checks import check_shape, check_tensor, match_groups
from ..cpp import needs_grad
from .reference import selective_state_step_ref, selective_state_update_ref, selective_state_update_torch

OP = "selective_state_update"


def _check(state, x, dt, A, B, C, D, z, dt_bias) -> None:
    check_tensor(OP, "state", state, 3)
    dev = state.device
    batch, dim, dstate = state.shape
    if torch._debug_has_internal_overlap(state) == 1:  # e.g. expand()ed: the rows would overwrite each other
        raise ValueError(
            f"{OP}: state is updated in place, so its elements must not share memory; got shape "
            f"{tuple(state.shape)} with strides {state.stride()} (an expand()ed tensor?): pass a tensor of its own, "
            "such as state.clone()"
        )
    for name, t in (("x", x), ("dt", dt)):
        check_tensor(OP, name, t, 2, device=dev)
        check_shape(OP, name, t, (batch, dim), "(batch, dim), like state's first two dims")
    check_tensor(OP, "A", A, 2, device=dev)
    check_shape(OP, "A", A, (dim, dstate), "(dim, d_state)")
    if A.is_complex():
        raise TypeError(f"{OP}: complex A is not supported")
    for name, M in (("B", B), ("C", C)):
        check_tensor(OP, name, M, (2, 3), device=dev)
        if M.dim() == 2:
            check_shape(OP, name, M, (batch, dstate), "(batch, d_state)")
        else:
            groups = M.shape[1]
            check_shape(OP, name, M, (batch, groups, dstate), "(batch, groups, d_state)")
            if groups == 0 or dim % groups:
                raise ValueError(f"{OP}: {name} has {groups} groups, which must divide dim={dim}")
    if z is not None:
        check_tensor(OP, "z", z, 2, device=dev)
        check_shape(OP, "z", z, (batch, dim), "(batch, dim), like x")
    for name, v in (("D", D), ("dt_bias", dt_bias)):
        if v is not None:
            check_tensor(OP, name, v, 1, device=dev)
            check_shape(OP, name, v, (dim,), "(dim,)")


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """One step of the selective scan with mamba_ssm's ``selective_state_update`` semantics.

    state (batch, dim, d_state), updated in place (keep it float32); x, dt, z (batch, dim);
    A (dim, d_state); B, C (batch, d_state) or grouped (batch, groups, d_state); D, dt_bias (dim,).
    Returns out (batch, dim) in x's dtype.

    Differentiable: with autograd on and an input requiring grad, every backend runs the PyTorch
    reference step (the kernels have no backward), which records the in-place update of ``state``.
    """
    if not torch.compiler.is_compiling():
        _check(state, x, dt, A, B, C, D, z, dt_bias)
    B, C = match_groups(B, C, 3)
    _, fn = dispatch.resolve(OP, state.device, backend)
    if needs_grad(state, x, dt, A, B, C, D, z, dt_bias):
        return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return fn(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


dispatch.register(OP, "torch", selective_state_update_torch)

# Triton kernel, imported on first call (TRITON_INTERPRET may be set any time before that).
from ..triton_utils import lazy, triton_available  # noqa: E402

dispatch.register(OP, "triton", lazy(__name__ + ".triton", "selective_state_update_triton"), triton_available)

__all__ = [
    "selective_state_step_ref",
    "selective_state_update",
    "selective_state_update_ref",
    "selective_state_update_torch",
]
