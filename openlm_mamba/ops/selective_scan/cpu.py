"""Fast selective scan for the "torch" backend: a chunked loop over time with a hand-written backward.

The inner loop runs in C++ (``ops/csrc/selective_scan_cpu.cpp``, built on first use by
:mod:`openlm_mamba.ops.cpp`); it works time-major, vectorised over blocks of 16 channels,
parallel over (batch, channel block), with delta_bias + softplus, D and the SiLU(z) gate fused,
and reads strided time-major views in place (the model's projections are never copied). Where it
cannot be built (no compiler, or ``OPENLM_MAMBA_DISABLE_CPP=1``) the same algorithm runs as
vectorised PyTorch, after a one-line warning.

Memory stays linear in the sequence length: the forward keeps only the state entering each chunk
of ``CHUNK`` steps; the backward recomputes one chunk's states at a time and runs the adjoint
recurrence backwards in time. Eager mode runs it through a ``torch.autograd.Function``; under
``torch.compile`` the pair is wrapped as ``torch.library`` custom ops
(``openlm_mamba::torch_scan_fwd`` / ``torch_scan_bwd``) with fake kernels and autograd, so
``torch.compile`` treats the scan as one opaque node without graph breaks.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..checks import compute_dtype
from ..cpp import needs_grad, use_cpp

CHUNK = 64  # time steps between saved states


# -- pure PyTorch implementation of the two kernels (same layouts and results) -------------------------


def _grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, dim, ...) -> (batch, G, dim / G, ...)."""
    return t.view(t.shape[0], groups, t.shape[1] // groups, *t.shape[2:])


def _scan_fwd_torch(u, delta, A, Bt, Ct, D, z, x0, K: int):
    batch, dim, L = u.shape
    N, G = A.shape[1], Bt.shape[1]
    nc = (L + K - 1) // K
    x = u.new_zeros(batch, dim, N) if x0 is None else x0.clone()
    out = torch.empty_like(u)
    ck = u.new_empty(batch, dim, nc, N)
    Ag = A.view(1, G, dim // G, N)
    for c in range(nc):
        t0, t1 = c * K, min(L, c * K + K)
        ck[:, :, c] = x
        dt = _grouped(delta[:, :, t0:t1], G)  # (b, G, dpg, len)
        e = torch.exp(dt.unsqueeze(-1) * Ag.unsqueeze(3))  # (b, G, dpg, len, N)
        inp = (dt * _grouped(u[:, :, t0:t1], G)).unsqueeze(-1) * Bt[:, :, None, t0:t1]
        xg = _grouped(x, G)
        xs = []
        for i in range(t1 - t0):
            xg = e[:, :, :, i] * xg + inp[:, :, :, i]
            xs.append(xg)
        x = xg.reshape(batch, dim, N)
        y = (torch.stack(xs, dim=3) * Ct[:, :, None, t0:t1]).sum(-1).reshape(batch, dim, t1 - t0)
        out[:, :, t0:t1] = y
    if D is not None:
        out = out + u * D[:, None]
    if z is not None:
        out = out * F.silu(z)
    return [out, x, ck]


def _scan_bwd_torch(gout, glast, u, delta, A, Bt, Ct, D, z, ck, K: int):
    batch, dim, L = u.shape
    N, G = A.shape[1], Bt.shape[1]
    dpg = dim // G
    nc = ck.shape[2]
    Ag = A.view(1, G, dpg, N)
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    dA = torch.zeros(batch, G, dpg, N, dtype=u.dtype, device=u.device)
    dB, dC = torch.empty_like(Bt), torch.empty_like(Ct)
    dz = None
    dy_all = gout
    if z is not None:
        # y before the gate, recomputed chunk by chunk below; the gate's derivative needs it
        s = torch.sigmoid(z)
        dy_all = gout * z * s
        dz = torch.empty_like(u)
    h = u.new_zeros(batch, G, dpg, N) if glast is None else _grouped(glast, G).clone()
    for c in reversed(range(nc)):
        t0, t1 = c * K, min(L, c * K + K)
        n = t1 - t0
        dt = _grouped(delta[:, :, t0:t1], G)
        ug = _grouped(u[:, :, t0:t1], G)
        Bc, Cc = Bt[:, :, None, t0:t1], Ct[:, :, None, t0:t1]  # (b, G, 1, len, N)
        e = torch.exp(dt.unsqueeze(-1) * Ag.unsqueeze(3))
        inp = (dt * ug).unsqueeze(-1) * Bc
        xg = _grouped(ck[:, :, c], G)
        xs = [xg]
        for i in range(n):
            xg = e[:, :, :, i] * xg + inp[:, :, :, i]
            xs.append(xg)
        X = torch.stack(xs, dim=3)  # (b, G, dpg, len + 1, N): states before and after each step
        xprev, xcur = X[:, :, :, :-1], X[:, :, :, 1:]
        if z is not None:
            y = (xcur * Cc).sum(-1).reshape(batch, dim, n)
            if D is not None:
                y = y + u[:, :, t0:t1] * D[:, None]
            zc, sc = z[:, :, t0:t1], s[:, :, t0:t1]
            dz[:, :, t0:t1] = gout[:, :, t0:t1] * y * sc * (1 + zc * (1 - sc))
        dy = _grouped(dy_all[:, :, t0:t1], G)  # (b, G, dpg, len)
        hs = [None] * n
        for i in reversed(range(n)):
            h = h + dy[:, :, :, i, None] * Cc[:, :, :, i]
            hs[i] = h
            h = e[:, :, :, i] * h
        H = torch.stack(hs, dim=3)  # (b, G, dpg, len, N)
        dC[:, :, t0:t1] = (dy.unsqueeze(-1) * xcur).sum(2)
        dB[:, :, t0:t1] = (H * (dt * ug).unsqueeze(-1)).sum(2)
        du[:, :, t0:t1] = (dt * (H * Bc).sum(-1)).reshape(batch, dim, n)
        ex = e * xprev
        ddelta[:, :, t0:t1] = (H * (Ag.unsqueeze(3) * ex + Bc * ug.unsqueeze(-1))).sum(-1).reshape(batch, dim, n)
        dA += (H * dt.unsqueeze(-1) * ex).sum(3)
    dD = None
    if D is not None:
        du = du + dy_all * D[:, None]
        dD = (dy_all * u).sum((0, 2))
    return du, ddelta, dA.sum(0).reshape(dim, N), dB, dC, dD, dz, h.reshape(batch, dim, N)


def _fwd_torch_tm(u, delta, At, Bt, Ct, D, z, bias, sp: bool, x0, K: int):
    """The PyTorch kernels behind the C++ kernels' time-major interface."""
    raw = delta.transpose(1, 2) + (0 if bias is None else bias[:, None])
    d = F.softplus(raw) if sp else raw
    x0c = None if x0 is None else x0.transpose(1, 2).contiguous()
    zc = None if z is None else z.transpose(1, 2)
    out, last, ck = _scan_fwd_torch(u.transpose(1, 2), d, At.t(), Bt, Ct, D, zc, x0c, K)
    return out.transpose(1, 2).contiguous(), last.transpose(1, 2).contiguous(), ck.permute(0, 2, 3, 1).contiguous()


def _bwd_torch_tm(gout, glast, u, delta, At, Bt, Ct, D, z, bias, sp: bool, ck, K: int):
    raw = delta.transpose(1, 2) + (0 if bias is None else bias[:, None])
    d = F.softplus(raw) if sp else raw
    gl = None if glast is None else glast.transpose(1, 2).contiguous()
    zc = None if z is None else z.transpose(1, 2)
    ckc = ck.permute(0, 3, 1, 2).contiguous()
    du, dd, dA, dB, dC, dD, dz, dx0 = _scan_bwd_torch(
        gout.transpose(1, 2), gl, u.transpose(1, 2), d, At.t(), Bt, Ct, D, zc, ckc, K
    )
    if sp:
        dd = dd * torch.sigmoid(raw)
    dbias = None if bias is None else dd.sum((0, 2))
    dz = None if dz is None else dz.transpose(1, 2).contiguous()
    return (
        du.transpose(1, 2).contiguous(),
        dd.transpose(1, 2).contiguous(),
        dA.t().contiguous(),
        dB,
        dC,
        dD,
        dbias,
        dz,
        dx0.transpose(1, 2).contiguous(),
    )


# -- dispatch between the C++ and PyTorch kernels ---------------------------------------------------


def _partitions(batch: int, groups: int, blocks: int) -> int:
    """Channel-block ranges per (batch, group) in the C++ backward: enough tasks for every thread."""
    want = 8 * torch.get_num_threads()  # tasks are handed out dynamically: a few per thread
    return max(1, min(blocks, -(-want // (batch * groups))))


def _cpp_runs(u: torch.Tensor, At: torch.Tensor) -> bool:
    """Whether the C++ kernels take these inputs: they need at least one element (empty inputs, whose
    strides are arbitrary, go to the PyTorch kernels, which handle them)."""
    return u.numel() > 0 and At.numel() > 0 and use_cpp(u)


def _fwd_impl(u, delta, At, Bt, Ct, D, z, bias, sp: bool, x0, K: int):
    """(out (batch, L, dim), last state (batch, N, dim), chunk states (batch, nc, N, dim))."""
    if _cpp_runs(u, At):
        out, last, ck = torch.ops.openlm_mamba_cpu.scan_fwd(u, delta, At, Bt, Ct, D, z, bias, sp, x0, K)
        return out, last, ck
    return _fwd_torch_tm(u, delta, At, Bt, Ct, D, z, bias, sp, x0, K)


def _bwd_impl(gout, glast, u, delta, At, Bt, Ct, D, z, bias, sp: bool, ck, K: int):
    """(du, ddelta, dAt, dBt, dCt, dD, dbias, dz, dx0); dD / dbias / dz are None when D / bias / z are None."""
    gout = gout.contiguous()
    glast = None if glast is None else glast.contiguous()
    if not _cpp_runs(u, At):
        return _bwd_torch_tm(gout, glast, u, delta, At, Bt, Ct, D, z, bias, sp, ck, K)
    batch, _, dim = u.shape
    G = Bt.shape[1]
    P = _partitions(batch, G, -(-(dim // G) // 16))
    du, dd, dA_b, dB_p, dC_p, dD_b, db_b, dz, dx0 = torch.ops.openlm_mamba_cpu.scan_bwd(
        gout, glast, u, delta, At, Bt, Ct, D, z, bias, sp, ck, K, P
    )
    return (
        du,
        dd,
        dA_b.sum(0),
        dB_p.sum(2),
        dC_p.sum(2),
        None if D is None else dD_b.sum(0),
        None if bias is None else db_b.sum(0),
        None if z is None else dz,
        dx0,
    )


class _ScanFn(torch.autograd.Function):
    """Eager autograd: forward saves chunk states, backward runs the adjoint scan."""

    @staticmethod
    def forward(ctx, u, delta, At, Bt, Ct, D, z, bias, sp, x0, K):
        out, last, ck = _fwd_impl(u, delta, At, Bt, Ct, D, z, bias, sp, x0, K)
        ctx.save_for_backward(u, delta, At, Bt, Ct, D, z, bias, ck)
        ctx.sp, ctx.K, ctx.has_x0 = sp, K, x0 is not None
        ctx.mark_non_differentiable(ck)
        return out, last, ck

    @staticmethod
    @once_differentiable  # the C++ backward has no autograd: a double backward is an error, not zeros
    def backward(ctx, gout, glast, _gck):
        u, delta, At, Bt, Ct, D, z, bias, ck = ctx.saved_tensors
        if gout is None:
            gout = torch.zeros_like(u)
        grads = _bwd_impl(gout, glast, u, delta, At, Bt, Ct, D, z, bias, ctx.sp, ck, ctx.K)
        du, dd, dA, dB, dC, dD, db, dz, dx0 = grads
        return du, dd, dA, dB, dC, dD, dz, db, None, dx0 if ctx.has_x0 else None, None


# -- custom ops: one opaque node for torch.compile -------------------------------------------------


@torch.library.custom_op("openlm_mamba::torch_scan_fwd", mutates_args=())
def scan_fwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    At: torch.Tensor,
    Bt: torch.Tensor,
    Ct: torch.Tensor,
    D: Optional[torch.Tensor],  # noqa: UP045 (custom_op schema inference wants Optional)
    z: Optional[torch.Tensor],  # noqa: UP045
    bias: Optional[torch.Tensor],  # noqa: UP045
    sp: bool,
    x0: Optional[torch.Tensor],  # noqa: UP045
    K: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward scan on time-major inputs (see the C++ source): (out, last state, chunk states)."""
    return _fwd_impl(u, delta, At, Bt, Ct, D, z, bias, sp, x0, K)


@scan_fwd.register_fake
def _(u, delta, At, Bt, Ct, D, z, bias, sp, x0, K):
    batch, L, dim = u.shape
    N = At.shape[0]
    nc = (L + K - 1) // K
    return u.new_empty(batch, L, dim), u.new_empty(batch, N, dim), u.new_empty(batch, nc, N, dim)


@torch.library.custom_op("openlm_mamba::torch_scan_bwd", mutates_args=())
def scan_bwd(
    gout: torch.Tensor,
    glast: Optional[torch.Tensor],  # noqa: UP045
    u: torch.Tensor,
    delta: torch.Tensor,
    At: torch.Tensor,
    Bt: torch.Tensor,
    Ct: torch.Tensor,
    D: Optional[torch.Tensor],  # noqa: UP045
    z: Optional[torch.Tensor],  # noqa: UP045
    bias: Optional[torch.Tensor],  # noqa: UP045
    sp: bool,
    ck: torch.Tensor,
    K: int,
) -> list[torch.Tensor]:
    """Backward scan: [du, ddelta, dAt, dBt, dCt, dD, dbias, dz, dx0]; empty where D / bias / z are None."""
    grads = _bwd_impl(gout, glast, u, delta, At, Bt, Ct, D, z, bias, sp, ck, K)
    return [u.new_empty(0) if g is None else g for g in grads]


@scan_bwd.register_fake
def _(gout, glast, u, delta, At, Bt, Ct, D, z, bias, sp, ck, K):
    empty = u.new_empty
    return [
        empty(u.shape),
        empty(u.shape),
        empty(At.shape),
        empty(Bt.shape),
        empty(Ct.shape),
        empty(D.shape) if D is not None else empty(0),
        empty(bias.shape) if bias is not None else empty(0),
        empty(u.shape) if z is not None else empty(0),
        empty(u.shape[0], At.shape[0], u.shape[2]),
    ]


def _setup_context(ctx, inputs, output):
    u, delta, At, Bt, Ct, D, z, bias, sp, x0, K = inputs
    ctx.save_for_backward(u, delta, At, Bt, Ct, D, z, bias, output[2])
    ctx.sp, ctx.K = sp, K
    ctx.has = (D is not None, z is not None, bias is not None, x0 is not None)


def _backward(ctx, gout, glast, _gck):
    u, delta, At, Bt, Ct, D, z, bias, ck = ctx.saved_tensors
    if gout is None:
        gout = torch.zeros_like(u)
    du, dd, dA, dB, dC, dD, db, dz, dx0 = scan_bwd(gout, glast, u, delta, At, Bt, Ct, D, z, bias, ctx.sp, ck, ctx.K)
    has_D, has_z, has_b, has_x0 = ctx.has
    return (
        du,
        dd,
        dA,
        dB,
        dC,
        dD if has_D else None,
        dz if has_z else None,
        db if has_b else None,
        None,
        dx0 if has_x0 else None,
        None,
    )


scan_fwd.register_autograd(_backward, setup_context=_setup_context)


# -- public function --------------------------------------------------------------------------------


def selective_scan_cpu(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,  # noqa: UP045
    z: Optional[torch.Tensor] = None,  # noqa: UP045
    delta_bias: Optional[torch.Tensor] = None,  # noqa: UP045
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Optional[torch.Tensor] = None,  # noqa: UP045
):
    """Selective scan with ``selective_scan_ref``'s arguments and results, fast and memory-bounded."""
    dt = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)

    def unit_last(t: torch.Tensor) -> torch.Tensor:  # a view when the last stride is 1 already
        t = t.to(dt).transpose(-1, -2)
        return t if t.stride(-1) == 1 else t.contiguous()

    u_, delta_ = unit_last(u), unit_last(delta)  # (batch, L, dim)
    z_ = None if z is None else unit_last(z)
    At = A.to(dt).t().contiguous()
    Bt = unit_last(B.unsqueeze(1) if B.dim() == 3 else B)  # (batch, G, L, N)
    Ct = unit_last(C.unsqueeze(1) if C.dim() == 3 else C)
    D_ = None if D is None else D.to(dt).contiguous()
    bias = None if delta_bias is None else delta_bias.to(dt).contiguous()
    x0 = None if initial_state is None else initial_state.to(dt).transpose(1, 2).contiguous()
    args = (u_, delta_, At, Bt, Ct, D_, z_, bias, bool(delta_softplus), x0, CHUNK)
    if torch.compiler.is_compiling():
        out, last, _ = scan_fwd(*args)
    elif needs_grad(*args[:8], x0):
        out, last, _ = _ScanFn.apply(*args)
    else:  # nothing to differentiate (inference): skip the autograd machinery
        out, last, _ = _fwd_impl(*args)
    out = out.transpose(1, 2).to(u.dtype)
    return (out, last.transpose(1, 2)) if return_last_state else out


__all__ = ["CHUNK", "selective_scan_cpu"]
