"""The selective scan exactly as written in the Mamba paper: a loop over time.

    x_t = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t
    y_t = <C_t, x_t> + D * u_t,   out_t = y_t * silu(z_t)

Slow and simple on purpose: every faster backend is tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import compute_dtype


def expand_groups(M: torch.Tensor, dim: int, ungrouped_ndim: int = 3) -> torch.Tensor:
    """(batch, N, L) -> (batch, 1, N, L); grouped (batch, G, N, L) -> (batch, dim, N, L).

    ``ungrouped_ndim=2`` does the same for one step: (batch, N) or grouped (batch, G, N).
    """
    if M.dim() == ungrouped_ndim:
        return M.unsqueeze(1)
    return M.repeat_interleave(dim // M.shape[1], dim=1)


def selective_scan_ref(
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
    """Reference selective scan (same arguments and layouts as mamba_ssm's ``selective_scan_fn``)."""
    dt = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dim = u.shape[1]
    u_, delta_ = u.to(dt), delta.to(dt)
    if delta_bias is not None:
        delta_ = delta_ + delta_bias.to(dt)[:, None]
    if delta_softplus:
        delta_ = F.softplus(delta_)
    A_ = A.to(dt)
    B_, C_ = expand_groups(B.to(dt), dim), expand_groups(C.to(dt), dim)
    if initial_state is None:
        x = u_.new_zeros(u.shape[0], dim, A.shape[1])
    else:
        x = initial_state.to(dt)
    ys = []
    for t in range(u.shape[2]):
        d_t = delta_[:, :, t, None]  # (batch, dim, 1)
        x = torch.exp(d_t * A_) * x + d_t * B_[..., t] * u_[:, :, t, None]
        ys.append((x * C_[..., t]).sum(-1))
    if ys:
        y = torch.stack(ys, dim=-1)
    else:  # no time step: an empty output that is still part of every input's autograd graph
        y = u_ * delta_ + (A_.sum() + B_.sum() + C_.sum()) * 0
    if D is not None:
        y = y + u_ * D.to(dt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(dt))
    out = y.to(u.dtype)
    return (out, x) if return_last_state else out
