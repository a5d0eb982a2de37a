"""Triton backend of ``selective_state_update``: one program per (sequence, block of channels).

Runs on a GPU, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported).
The state is read and written once; the math is in float32, or float64 when an input is float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_utils import acc_dtype, interpreting, on_device, tl_dtype

# Channels per program: small blocks give a GPU many programs; the CPU interpreter prefers few.
_MAX_BLOCK_D = 1024 if interpreting() else 64


@triton.jit
def _state_update_kernel(
    state_ptr,
    x_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    dt_bias_ptr,
    out_ptr,
    dim,
    dstate,
    ratio,
    s_sb,
    s_sd,
    s_sn,
    s_xb,
    s_xd,
    s_tb,
    s_td,
    s_ad,
    s_an,
    s_bb,
    s_bg,
    s_bn,
    s_cb,
    s_cg,
    s_cn,
    s_zb,
    s_zd,
    s_ob,
    s_od,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
):
    # batch on grid axis 0 (axis 1 stops at 65535 programs); int64, as b * state's batch stride
    # (dim * d_state) passes 2^31 from 16384 sequences at Mamba-7B sizes
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_2d = mask_d[:, None] & (offs_n < dstate)[None, :]

    state_ptrs = state_ptr + b * s_sb + offs_d[:, None] * s_sd + offs_n[None, :] * s_sn
    state = tl.load(state_ptrs, mask=mask_2d, other=0.0).to(ACC)
    x = tl.load(x_ptr + b * s_xb + offs_d * s_xd, mask=mask_d, other=0.0).to(ACC)
    dt = tl.load(dt_ptr + b * s_tb + offs_d * s_td, mask=mask_d, other=0.0).to(ACC)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    if DT_SOFTPLUS:
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    A = tl.load(A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=mask_2d, other=0.0).to(ACC)
    g = offs_d // ratio
    Bm = tl.load(B_ptr + b * s_bb + g[:, None] * s_bg + offs_n[None, :] * s_bn, mask=mask_2d, other=0.0)
    Cm = tl.load(C_ptr + b * s_cb + g[:, None] * s_cg + offs_n[None, :] * s_cn, mask=mask_2d, other=0.0)

    state = state * tl.exp(A * dt[:, None]) + Bm.to(ACC) * (dt * x)[:, None]
    tl.store(state_ptrs, state.to(state_ptr.dtype.element_ty), mask=mask_2d)

    # padded d_state lanes held 0 * inf = NaN for an infinite x: they must not reach the sum
    out = tl.sum(tl.where(mask_2d, state * Cm.to(ACC), 0.0), axis=1)
    if HAS_D:
        out += x * tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    if HAS_Z:
        z = tl.load(z_ptr + b * s_zb + offs_d * s_zd, mask=mask_d, other=0.0).to(ACC)
        out *= z * tl.sigmoid(z)
    tl.store(out_ptr + b * s_ob + offs_d * s_od, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def selective_state_update_triton(
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
    """Triton step with the reference's semantics; updates ``state`` in place, returns out (batch, dim)."""
    batch, dim, dstate = state.shape
    # Ungrouped B/C (batch, N) are handled as one group with a zero group stride.
    Bg = B.unsqueeze(1) if B.dim() == 2 else B
    Cg = C.unsqueeze(1) if C.dim() == 2 else C
    ratio = dim // Bg.shape[1]
    s_bg = Bg.stride(1) if Bg.shape[1] > 1 else 0
    s_cg = Cg.stride(1) if Cg.shape[1] > 1 else 0
    out = torch.empty_like(x)
    block_n = max(triton.next_power_of_2(dstate), 2)
    block_d = max(2, min(triton.next_power_of_2(dim), 4096 // block_n, _MAX_BLOCK_D))
    zz = z if z is not None else x
    grid = (batch, triton.cdiv(dim, block_d))
    with on_device(state):
        _state_update_kernel[grid](
            state,
            x,
            dt,
            A,
            Bg,
            Cg,
            D.contiguous() if D is not None else x,  # D and dt_bias are read as contiguous (tiny copies)
            zz,
            dt_bias.contiguous() if dt_bias is not None else x,
            out,
            dim,
            dstate,
            ratio,
            *state.stride(),
            *x.stride(),
            *dt.stride(),
            *A.stride(),
            Bg.stride(0),
            s_bg,
            Bg.stride(2),
            Cg.stride(0),
            s_cg,
            Cg.stride(2),
            *zz.stride(),
            *out.stride(),
            HAS_D=D is not None,
            HAS_Z=z is not None,
            HAS_DT_BIAS=dt_bias is not None,
            DT_SOFTPLUS=bool(dt_softplus),
            BLOCK_D=block_d,
            BLOCK_N=block_n,
            ACC=tl_dtype(acc_dtype(state, x, dt, A, B, C, D, z, dt_bias)),
        )
    return out
