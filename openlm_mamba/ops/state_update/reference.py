"""One recurrent decoding step of the selective SSM, written as the recurrence itself.

    state <- exp(dt * A) * state + dt * B * x
    out    = <C, state> + D * x,   out *= silu(z)

The same math as one time step of ``selective_scan_ref``; every faster backend is tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import compute_dtype
from ..cpp import needs_grad, use_cpp
from ..selective_scan.reference import expand_groups


def selective_state_step_ref(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference step without side effects: returns ``(out, new_state)`` and leaves ``state`` as it is.

    Differentiable in every input (``state`` included); ``new_state`` is in the compute dtype
    (float64 if any input is float64, else float32). Arguments as in :func:`selective_state_update_ref`.
    """
    ct = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    dim = x.shape[1]
    dt_ = dt.to(ct)
    if dt_bias is not None:
        dt_ = dt_ + dt_bias.to(ct)
    if dt_softplus:
        dt_ = F.softplus(dt_)
    x_ = x.to(ct)
    B_, C_ = expand_groups(B.to(ct), dim, 2), expand_groups(C.to(ct), dim, 2)
    dA = torch.exp(dt_[..., None] * A.to(ct))  # (batch, dim, d_state)
    new_state = state.to(ct) * dA + (dt_ * x_)[..., None] * B_
    out = (new_state * C_).sum(-1)
    if D is not None:
        out = out + x_ * D.to(ct)
    if z is not None:
        out = out * F.silu(z.to(ct))
    return out.to(x.dtype), new_state


def selective_state_update_ref(
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
) -> torch.Tensor:
    """Reference step (mamba_ssm's ``selective_state_update`` semantics); updates ``state`` in place.

    state (batch, dim, d_state); x, dt, z (batch, dim); A (dim, d_state); B, C (batch, d_state)
    or grouped (batch, groups, d_state); D, dt_bias (dim,). Returns out (batch, dim), dtype of x.
    Differentiable: with autograd on, the step reads a copy of ``state`` (autograd saves what it reads,
    and the in-place update would otherwise overwrite it), and the update of ``state`` is recorded.
    """
    old = state.clone() if needs_grad(state, x, dt, A, B, C, D, z, dt_bias) else state
    out, new_state = selective_state_step_ref(old, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    state.copy_(new_state)
    return out


def selective_state_update_torch(
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
) -> torch.Tensor:
    """PyTorch backend: the C++ step kernel on CPU (float32 / float64 state), else the reference with
    fewer temporaries (in-place state update when fp32). With autograd on and an input requiring grad,
    the differentiable reference (the kernel and the in-place fast path have no backward)."""
    if needs_grad(state, x, dt, A, B, C, D, z, dt_bias):
        return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    if not torch.compiler.is_compiling() and state.is_contiguous() and use_cpp(state):
        ct = state.dtype

        def c(t):
            return None if t is None else t.to(ct).contiguous()

        Bg = B if B.dim() == 3 else B.unsqueeze(1)
        Cg = C if C.dim() == 3 else C.unsqueeze(1)
        out = torch.ops.openlm_mamba_cpu.state_step(
            state, c(x), c(dt), c(A), c(Bg), c(Cg), c(D), c(z), c(dt_bias), bool(dt_softplus)
        )
        return out.to(x.dtype)
    if state.dtype not in (torch.float32, torch.float64) or B.dim() != 2 or x.dtype == torch.float64:
        return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    ct = state.dtype
    dt_ = dt.to(ct)
    if dt_bias is not None:
        dt_ = dt_ + dt_bias.to(ct)
    if dt_softplus:
        dt_ = F.softplus(dt_)
    x_ = x.to(ct)
    state.mul_(torch.exp(dt_.unsqueeze(-1) * A.to(ct)))
    state.addcmul_((dt_ * x_).unsqueeze(-1), B.to(ct).unsqueeze(1))
    out = torch.bmm(state, C.to(ct).unsqueeze(-1)).squeeze(-1)
    if D is not None:
        out = torch.addcmul(out, x_, D.to(ct))
    if z is not None:
        out = out * F.silu(z.to(ct))
    return out.to(x.dtype)
