"""Selective scan in Triton: forward and backward kernels, registered as torch.library custom ops.

Forward: one program per (batch, group, block of channels) walks the sequence in time, keeping
the state (BLOCK_D, d_state) in float32 registers, and saves the state at every chunk boundary
(``CHUNK`` steps). Backward walks the chunks in reverse: it recomputes the chunk's states from
the saved boundary state into a chunk-sized scratch buffer, then runs the adjoint recurrence
backwards in time. No (batch, dim, seqlen, d_state) tensor is ever written.
"""

import math

import torch

from ..triton_utils import HAS_TRITON, acc_dtype, interpreting, next_pow2, tl_dtype

DEFAULT_CHUNK = 128

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _softplus(x):
        # torch's softplus (threshold 20); exp(x) for very negative x, where log(1 + exp(x)) rounds to 0
        return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))

    @triton.jit
    def _scan_fwd_kernel(
        u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
        out_ptr, last_ptr, st_ptr,
        dim, L, dpg, N, nchunks,
        su_b, su_d, su_t, sd_b, sd_d, sd_t, sA_d, sA_n,
        sB_b, sB_g, sB_n, sB_t, sC_b, sC_g, sC_n, sC_t,
        sz_b, sz_d, sz_t, sh_b, sh_d, sh_n, so_b, so_d, so_t,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
        SOFTPLUS: tl.constexpr, SAVE: tl.constexpr, ACC: tl.constexpr,
        CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        g = tl.program_id(1)
        offs = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs < dpg
        d = g * dpg + offs
        n = tl.arange(0, BLOCK_N)
        nmask = n < N
        m2 = dmask[:, None] & nmask[None, :]
        A = tl.load(A_ptr + d[:, None] * sA_d + n[None, :] * sA_n, mask=m2, other=0.0).to(ACC)
        if HAS_D:
            Dv = tl.load(D_ptr + d, mask=dmask, other=0.0).to(ACC)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + d, mask=dmask, other=0.0).to(ACC)
        if HAS_H0:
            h = tl.load(h0_ptr + b * sh_b + d[:, None] * sh_d + n[None, :] * sh_n, mask=m2, other=0.0).to(ACC)
        else:
            h = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
        u_base = u_ptr + b * su_b + d * su_d
        d_base = dl_ptr + b * sd_b + d * sd_d
        z_base = z_ptr + b * sz_b + d * sz_d
        o_base = out_ptr + b * so_b + d * so_d
        B_base = B_ptr + b * sB_b + g * sB_g + n * sB_n
        C_base = C_ptr + b * sC_b + g * sC_g + n * sC_n
        st_base = st_ptr + b * nchunks * dim * N + d[:, None] * N + n[None, :]
        for c in range(nchunks):
            if SAVE:
                tl.store(st_base + c * dim * N, h, mask=m2)
            t_end = tl.minimum(c * CHUNK + CHUNK, L)
            for t in range(c * CHUNK, t_end):
                u = tl.load(u_base + t * su_t, mask=dmask, other=0.0).to(ACC)
                dt = tl.load(d_base + t * sd_t, mask=dmask, other=0.0).to(ACC)
                if HAS_BIAS:
                    dt += bias
                if SOFTPLUS:
                    dt = _softplus(dt)
                Bt = tl.load(B_base + t * sB_t, mask=nmask, other=0.0).to(ACC)
                Ct = tl.load(C_base + t * sC_t, mask=nmask, other=0.0).to(ACC)
                h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
                y = tl.sum(h * Ct[None, :], axis=1)
                if HAS_D:
                    y += Dv * u
                if HAS_Z:
                    zt = tl.load(z_base + t * sz_t, mask=dmask, other=0.0).to(ACC)
                    y = y * zt * tl.sigmoid(zt)
                tl.store(o_base + t * so_t, y.to(out_ptr.dtype.element_ty), mask=dmask)
        tl.store(last_ptr + b * dim * N + d[:, None] * N + n[None, :], h, mask=m2)

    @triton.jit
    def _scan_bwd_kernel(
        u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, st_ptr, go_ptr, gl_ptr, scr_ptr,
        du_ptr, ddl_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
        dim, L, dpg, N, nchunks,
        su_b, su_d, su_t, sd_b, sd_d, sd_t, sA_d, sA_n,
        sB_b, sB_g, sB_n, sB_t, sC_b, sC_g, sC_n, sC_t,
        sz_b, sz_d, sz_t, sgo_b, sgo_d, sgo_t, sgl_b, sgl_d, sgl_n,
        sdu_b, sdu_d, sdu_t, sdd_b, sdd_d, sdd_t, sdz_b, sdz_d, sdz_t,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GL: tl.constexpr,
        SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
        CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        g = tl.program_id(1)
        offs = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs < dpg
        d = g * dpg + offs
        n = tl.arange(0, BLOCK_N)
        nmask = n < N
        m2 = dmask[:, None] & nmask[None, :]
        A = tl.load(A_ptr + d[:, None] * sA_d + n[None, :] * sA_n, mask=m2, other=0.0).to(ACC)
        if HAS_D:
            Dv = tl.load(D_ptr + d, mask=dmask, other=0.0).to(ACC)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + d, mask=dmask, other=0.0).to(ACC)
        if HAS_GL:
            gh = tl.load(gl_ptr + b * sgl_b + d[:, None] * sgl_d + n[None, :] * sgl_n, mask=m2, other=0.0).to(ACC)
        else:
            gh = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
        dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
        dD_acc = tl.zeros((BLOCK_D,), dtype=ACC)
        dbias_acc = tl.zeros((BLOCK_D,), dtype=ACC)
        u_base = u_ptr + b * su_b + d * su_d
        d_base = dl_ptr + b * sd_b + d * sd_d
        z_base = z_ptr + b * sz_b + d * sz_d
        go_base = go_ptr + b * sgo_b + d * sgo_d
        B_base = B_ptr + b * sB_b + g * sB_g + n * sB_n
        C_base = C_ptr + b * sC_b + g * sC_g + n * sC_n
        # dB / dC: this block's partial sums over channels are added to (batch, groups, N, L) buffers
        dB_base = dB_ptr + (b * (dim // dpg) + g) * N * L + n * L
        dC_base = dC_ptr + (b * (dim // dpg) + g) * N * L + n * L
        st_base = st_ptr + b * nchunks * dim * N + d[:, None] * N + n[None, :]
        scr_base = scr_ptr + (b * dim + d[:, None]) * (CHUNK + 1) * BLOCK_N + n[None, :]
        for ci in range(nchunks):
            c = nchunks - 1 - ci
            t0 = c * CHUNK
            t_end = tl.minimum(t0 + CHUNK, L)
            # recompute this chunk's states from its saved start state; slot k holds h_{t0 + k - 1}
            h = tl.load(st_base + c * dim * N, mask=m2, other=0.0)
            tl.store(scr_base, h, mask=m2)
            for t in range(t0, t_end):
                u = tl.load(u_base + t * su_t, mask=dmask, other=0.0).to(ACC)
                dt = tl.load(d_base + t * sd_t, mask=dmask, other=0.0).to(ACC)
                if HAS_BIAS:
                    dt += bias
                if SOFTPLUS:
                    dt = _softplus(dt)
                Bt = tl.load(B_base + t * sB_t, mask=nmask, other=0.0).to(ACC)
                h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
                tl.store(scr_base + (t - t0 + 1) * BLOCK_N, h, mask=m2)
            tl.debug_barrier()
            for i in range(0, t_end - t0):
                t = t_end - 1 - i
                h_t = tl.load(scr_base + (t - t0 + 1) * BLOCK_N, mask=m2, other=0.0)
                h_prev = tl.load(scr_base + (t - t0) * BLOCK_N, mask=m2, other=0.0)
                u = tl.load(u_base + t * su_t, mask=dmask, other=0.0).to(ACC)
                dt_raw = tl.load(d_base + t * sd_t, mask=dmask, other=0.0).to(ACC)
                if HAS_BIAS:
                    dt_raw += bias
                if SOFTPLUS:
                    dt = _softplus(dt_raw)
                else:
                    dt = dt_raw
                Bt = tl.load(B_base + t * sB_t, mask=nmask, other=0.0).to(ACC)
                Ct = tl.load(C_base + t * sC_t, mask=nmask, other=0.0).to(ACC)
                go = tl.load(go_base + t * sgo_t, mask=dmask, other=0.0).to(ACC)
                if HAS_Z:
                    zt = tl.load(z_base + t * sz_t, mask=dmask, other=0.0).to(ACC)
                    y = tl.sum(h_t * Ct[None, :], axis=1)
                    if HAS_D:
                        y += Dv * u
                    sz = tl.sigmoid(zt)
                    dz = go * y * sz * (1.0 + zt * (1.0 - sz))
                    tl.store(dz_ptr + b * sdz_b + d * sdz_d + t * sdz_t, dz.to(dz_ptr.dtype.element_ty), mask=dmask)
                    dy = go * zt * sz
                else:
                    dy = go
                du = tl.zeros((BLOCK_D,), dtype=ACC)
                if HAS_D:
                    du += dy * Dv
                    dD_acc += dy * u
                gh += dy[:, None] * Ct[None, :]
                tl.atomic_add(dC_base + t, tl.sum(dy[:, None] * h_t, axis=0).to(dC_ptr.dtype.element_ty), mask=nmask)
                tl.atomic_add(
                    dB_base + t, tl.sum(gh * (dt * u)[:, None], axis=0).to(dB_ptr.dtype.element_ty), mask=nmask
                )
                gB = tl.sum(gh * Bt[None, :], axis=1)
                du += dt * gB
                dA_t = tl.exp(dt[:, None] * A)
                ghd = gh * h_prev * dA_t
                ddt = u * gB + tl.sum(ghd * A, axis=1)
                dA_acc += ghd * dt[:, None]
                if SOFTPLUS:
                    ddt = ddt * tl.sigmoid(dt_raw)
                dbias_acc += ddt
                tl.store(du_ptr + b * sdu_b + d * sdu_d + t * sdu_t, du.to(du_ptr.dtype.element_ty), mask=dmask)
                tl.store(ddl_ptr + b * sdd_b + d * sdd_d + t * sdd_t, ddt.to(ddl_ptr.dtype.element_ty), mask=dmask)
                gh = gh * dA_t
            tl.debug_barrier()
        tl.store(dh0_ptr + b * dim * N + d[:, None] * N + n[None, :], gh, mask=m2)
        tl.store(dA_ptr + b * dim * N + d[:, None] * N + n[None, :], dA_acc, mask=m2)
        tl.store(dD_ptr + b * dim + d, dD_acc, mask=dmask)
        tl.store(dbias_ptr + b * dim + d, dbias_acc, mask=dmask)


def _block_d(dpg: int, block_d: int | None) -> int:
    if block_d:
        return block_d
    return min(next_pow2(dpg), 64 if interpreting() else 32)


def _bcl(M: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(groups, stride_b, stride_g, stride_n, stride_t) of B or C in either layout."""
    if M.dim() == 3:
        return 1, M.stride(0), 0, M.stride(1), M.stride(2)
    return M.shape[1], M.stride(0), M.stride(1), M.stride(2), M.stride(3)


def _like_bdl(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Empty (batch, dim, L) tensor with dim as the fastest axis (coalesced per-timestep access)."""
    b, d, l = x.shape
    return torch.empty(b, l, d, dtype=dtype, device=x.device).transpose(1, 2)


def _opt(t: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    return fallback if t is None else t


def _strides3(t: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else (t.stride(0), t.stride(1), t.stride(2))


@torch.library.custom_op("openlm_mamba::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    delta_softplus: bool,
    save_states: bool,
    chunk: int,
    block_d: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward: (out, last_state, chunk-boundary states (batch, nchunks, dim, N) or empty)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    groups = max(_bcl(B)[0], _bcl(C)[0])  # an ungrouped B or C is read with group stride 0
    dpg = dim // groups
    acc = acc_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    nchunks = triton.cdiv(L, chunk)
    out = _like_bdl(u, u.dtype)
    last = torch.empty(batch, dim, N, dtype=acc, device=u.device)
    states = torch.empty(batch, nchunks if save_states else 0, dim, N, dtype=acc, device=u.device)
    bd = _block_d(dpg, block_d)
    _, sB_b, sB_g, sB_n, sB_t = _bcl(B)
    _, sC_b, sC_g, sC_n, sC_t = _bcl(C)
    grid = (batch, groups, triton.cdiv(dpg, bd))
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, _opt(D, u), _opt(z, u), _opt(delta_bias, u), _opt(initial_state, u),
        out, last, states if save_states else last,
        dim, L, dpg, N, nchunks,
        *u.stride(), *delta.stride(), *A.stride(),
        sB_b, sB_g, sB_n, sB_t, sC_b, sC_g, sC_n, sC_t,
        *_strides3(z), *_strides3(initial_state), *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_H0=initial_state is not None, SOFTPLUS=delta_softplus, SAVE=save_states, ACC=tl_dtype(acc),
        CHUNK=chunk, BLOCK_D=bd, BLOCK_N=next_pow2(N),
    )  # fmt: skip
    return out, last, states


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_states, chunk, block_d):
    batch, dim, L = u.shape
    acc = acc_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    nchunks = (L + chunk - 1) // chunk if save_states else 0
    out = _like_bdl(u, u.dtype)
    return out, u.new_empty(batch, dim, A.shape[1], dtype=acc), u.new_empty(batch, nchunks, dim, A.shape[1], dtype=acc)


@torch.library.custom_op("openlm_mamba::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    states: torch.Tensor,
    grad_out: torch.Tensor,
    grad_last: torch.Tensor | None,
    delta_softplus: bool,
    chunk: int,
    block_d: int,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """Triton backward: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); absent ones are empty."""
    batch, dim, L = u.shape
    N = A.shape[1]
    groups = max(_bcl(B)[0], _bcl(C)[0])  # an ungrouped B or C is read with group stride 0
    dpg = dim // groups
    acc = acc_dtype(u, delta, A, B, C, D, z, delta_bias)
    nchunks = states.shape[1]
    bd = _block_d(dpg, block_d)
    bn = next_pow2(N)
    dev = u.device
    du = _like_bdl(u, u.dtype)
    ddelta = _like_bdl(delta, delta.dtype)
    dz = _like_bdl(z, z.dtype) if z is not None else u.new_empty(0)
    dB = torch.zeros(batch, groups, N, L, dtype=acc, device=dev)
    dC = torch.zeros(batch, groups, N, L, dtype=acc, device=dev)
    dA = torch.empty(batch, dim, N, dtype=acc, device=dev)
    dD = torch.empty(batch, dim, dtype=acc, device=dev)
    dbias = torch.empty(batch, dim, dtype=acc, device=dev)
    dh0 = torch.empty(batch, dim, N, dtype=acc, device=dev)
    scratch = torch.empty(batch, dim, chunk + 1, bn, dtype=acc, device=dev)  # one chunk of states
    _, sB_b, sB_g, sB_n, sB_t = _bcl(B)
    _, sC_b, sC_g, sC_n, sC_t = _bcl(C)
    grid = (batch, groups, triton.cdiv(dpg, bd))
    _scan_bwd_kernel[grid](
        u, delta, A, B, C, _opt(D, u), _opt(z, u), _opt(delta_bias, u), states, grad_out, _opt(grad_last, u), scratch,
        du, ddelta, dz if z is not None else du, dB, dC, dA, dD, dbias, dh0,
        dim, L, dpg, N, nchunks,
        *u.stride(), *delta.stride(), *A.stride(),
        sB_b, sB_g, sB_n, sB_t, sC_b, sC_g, sC_n, sC_t,
        *_strides3(z), *grad_out.stride(), *_strides3(grad_last),
        *du.stride(), *ddelta.stride(), *_strides3(dz if z is not None else None),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_GL=grad_last is not None,
        SOFTPLUS=delta_softplus, ACC=tl_dtype(acc), CHUNK=chunk, BLOCK_D=bd, BLOCK_N=bn,
    )  # fmt: skip
    dB = (dB.sum(1) if B.dim() == 3 else dB).to(B.dtype)
    dC = (dC.sum(1) if C.dim() == 3 else dC).to(C.dtype)
    return (
        du,
        ddelta,
        dA.sum(0).to(A.dtype),
        dB,
        dC,
        dD.sum(0).to(D.dtype) if D is not None else u.new_empty(0),
        dz,
        dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else u.new_empty(0),
        dh0,
    )


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, states, grad_out, grad_last, delta_softplus, chunk, block_d):
    acc = acc_dtype(u, delta, A, B, C, D, z, delta_bias)
    return (
        _like_bdl(u, u.dtype),
        _like_bdl(delta, delta.dtype),
        torch.empty_like(A),
        B.new_empty(B.shape),
        C.new_empty(C.shape),
        torch.empty_like(D) if D is not None else u.new_empty(0),
        _like_bdl(z, z.dtype) if z is not None else u.new_empty(0),
        torch.empty_like(delta_bias) if delta_bias is not None else u.new_empty(0),
        u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=acc),
    )


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_states, chunk, block_d = inputs
    if not save_states:
        raise RuntimeError("selective_scan (triton): forward ran without saving states, cannot differentiate")
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.has_h0 = initial_state is not None
    ctx.delta_softplus, ctx.chunk, ctx.block_d = delta_softplus, chunk, block_d
    ctx.h0_dtype = initial_state.dtype if initial_state is not None else None


def _backward(ctx, grad_out, grad_last, _grad_states):
    u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(u)
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, states, grad_out, grad_last, ctx.delta_softplus, ctx.chunk, ctx.block_d
    )
    return (
        du,
        ddelta,
        dA,
        dB,
        dC,
        dD if D is not None else None,
        dz if z is not None else None,
        dbias if delta_bias is not None else None,
        dh0.to(ctx.h0_dtype) if ctx.has_h0 else None,
        None,
        None,
        None,
        None,
    )


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_triton(
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
    *,
    chunk: int = DEFAULT_CHUNK,
    block_d: int = 0,
):
    """Triton selective scan (``selective_scan_fn`` semantics); differentiable in every tensor input.

    ``chunk`` is the number of time steps between saved states (memory kept for backward:
    batch * dim * d_state * ceil(seqlen / chunk) floats); ``block_d`` (0 = automatic) the
    channels per program.
    """
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"selective_scan (triton): chunk must be a positive power of two, got {chunk}")
    if block_d < 0 or block_d & (block_d - 1):
        raise ValueError(f"selective_scan (triton): block_d must be 0 (auto) or a power of two, got {block_d}")
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        groups = math.lcm(B.shape[1], C.shape[1])  # divides dim, as both group counts do
        B = B.repeat_interleave(groups // B.shape[1], dim=1)
        C = C.repeat_interleave(groups // C.shape[1], dim=1)
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out, last, _ = selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save, chunk, block_d
    )
    return (out, last) if return_last_state else out
