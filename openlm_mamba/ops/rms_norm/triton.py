"""Fused residual add + RMSNorm / LayerNorm in Triton, forward and backward.

Each program normalises a (BLOCK_M rows, hidden) tile in float32: r = x + residual is written
once (float32 when ``residual_in_fp32``) and the per-row statistics (mean, rstd) are kept for
the backward, which recomputes r from the inputs. Registered as torch.library custom ops.
"""

import math

import torch

from ..triton_utils import HAS_TRITON, acc_dtype, interpreting, next_pow2, on_device, tl_dtype

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _add_norm_fwd_kernel(
        x_ptr, r_ptr, w_ptr, b_ptr, o_ptr, ro_ptr, mean_ptr, rstd_ptr,
        M, H, eps,
        HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr, STORE_RES: tl.constexpr,
        ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_H)
        cmask = cols < H
        m = (rows < M)[:, None] & cmask[None, :]
        # the block's first element in int64 (row * H passes 2^31 from 2^31 / H rows: 524288 tokens
        # at d_model 4096); offsets within the block stay int32
        start = (tl.program_id(0) * BLOCK_M).to(tl.int64) * H
        offs = tl.arange(0, BLOCK_M)[:, None] * H + cols[None, :]
        r = tl.load(x_ptr + start + offs, mask=m, other=0.0).to(ACC)
        if HAS_RES:
            r += tl.load(r_ptr + start + offs, mask=m, other=0.0).to(ACC)
        if STORE_RES:
            tl.store(ro_ptr + start + offs, r.to(ro_ptr.dtype.element_ty), mask=m)
        if IS_RMS:
            xc = r
        else:
            mean = tl.sum(r, axis=1) / H
            tl.store(mean_ptr + rows, mean, mask=rows < M)
            xc = tl.where(m, r - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / H + eps)
        tl.store(rstd_ptr + rows, rstd, mask=rows < M)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)
        y = xc * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        tl.store(o_ptr + start + offs, y.to(o_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _add_norm_bwd_kernel(
        x_ptr, r_ptr, w_ptr, mean_ptr, rstd_ptr, go_ptr, gr_ptr, dx_ptr, dr_ptr, dw_ptr, db_ptr,
        M, H,
        HAS_RES: tl.constexpr, HAS_GR: tl.constexpr, IS_RMS: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_H)
        cmask = cols < H
        m = (rows < M)[:, None] & cmask[None, :]
        start = (tl.program_id(0) * BLOCK_M).to(tl.int64) * H  # int64 block start, as in the forward
        offs = tl.arange(0, BLOCK_M)[:, None] * H + cols[None, :]
        r = tl.load(x_ptr + start + offs, mask=m, other=0.0).to(ACC)
        if HAS_RES:
            r += tl.load(r_ptr + start + offs, mask=m, other=0.0).to(ACC)
        rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0).to(ACC)
        if IS_RMS:
            xhat = r * rstd[:, None]
        else:
            mean = tl.load(mean_ptr + rows, mask=rows < M, other=0.0).to(ACC)
            xhat = tl.where(m, (r - mean[:, None]) * rstd[:, None], 0.0)
        go = tl.load(go_ptr + start + offs, mask=m, other=0.0).to(ACC)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)
        dy = go * w[None, :]
        c1 = tl.sum(dy * xhat, axis=1) / H
        if IS_RMS:
            dr = (dy - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(dy, axis=1) / H
            dr = (dy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_GR:
            dr += tl.load(gr_ptr + start + offs, mask=m, other=0.0).to(ACC)
        tl.store(dx_ptr + start + offs, dr.to(dx_ptr.dtype.element_ty), mask=m)
        if HAS_RES:
            tl.store(dr_ptr + start + offs, dr.to(dr_ptr.dtype.element_ty), mask=m)
        part = tl.program_id(0).to(tl.int64) * H  # row of the (programs, H) partial sums: int64 as well
        tl.store(dw_ptr + part + cols, tl.sum(go * xhat, axis=0), mask=cmask)
        tl.store(db_ptr + part + cols, tl.sum(go, axis=0), mask=cmask)


def _block_m(H: int) -> int:
    if interpreting():
        return 64
    return max(1, min(16, 4096 // next_pow2(H)))


@torch.library.custom_op("openlm_mamba::add_norm_fwd", mutates_args=())
def add_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    residual_in_fp32: bool,
    is_rms_norm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward on 2-D contiguous (rows, hidden) inputs: (out, new residual, mean, rstd)."""
    M, H = x.shape
    acc = acc_dtype(x)  # from x alone, as the reference: a float64 residual does not widen it
    out = torch.empty_like(x)
    res_out = torch.empty(M, H, dtype=acc if residual_in_fp32 else x.dtype, device=x.device)
    mean = torch.empty(M if not is_rms_norm else 0, dtype=acc, device=x.device)
    rstd = torch.empty(M, dtype=acc, device=x.device)
    if M and H:  # (rows of no width: nothing to normalise)
        bm = _block_m(H)
        with on_device(x):  # weight and bias are read as contiguous (tiny copies of strided ones)
            _add_norm_fwd_kernel[(triton.cdiv(M, bm),)](
                x, x if residual is None else residual, weight.contiguous(), weight if bias is None else bias.contiguous(),
                out, res_out, rstd if is_rms_norm else mean, rstd, M, H, eps,
                HAS_RES=residual is not None, HAS_BIAS=bias is not None, IS_RMS=is_rms_norm, STORE_RES=True,
                ACC=tl_dtype(acc), BLOCK_M=bm, BLOCK_H=next_pow2(H),
            )  # fmt: skip
    return out, res_out, mean, rstd


@add_norm_fwd.register_fake
def _(x, weight, bias, residual, eps, residual_in_fp32, is_rms_norm):
    M, H = x.shape
    acc = acc_dtype(x)  # from x alone, as the reference: a float64 residual does not widen it
    return (
        torch.empty_like(x),
        x.new_empty(M, H, dtype=acc if residual_in_fp32 else x.dtype),
        x.new_empty(M if not is_rms_norm else 0, dtype=acc),
        x.new_empty(M, dtype=acc),
    )


@torch.library.custom_op("openlm_mamba::add_norm_bwd", mutates_args=())
def add_norm_bwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    grad_out: torch.Tensor,
    grad_res: torch.Tensor | None,
    has_bias: bool,
    is_rms_norm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: (dx, dweight, dbias or empty, dresidual or empty)."""
    M, H = x.shape
    acc = acc_dtype(x)  # from x alone, as the reference: a float64 residual does not widen it
    bm = _block_m(H)
    nprog = triton.cdiv(M, bm)
    dx = torch.empty_like(x)
    dres = torch.empty_like(residual) if residual is not None else x.new_empty(0)
    dw = torch.empty(nprog, H, dtype=acc, device=x.device)
    db = torch.empty(nprog, H, dtype=acc, device=x.device)
    if M and H:
        with on_device(x):
            _add_norm_bwd_kernel[(nprog,)](
                x, x if residual is None else residual, weight.contiguous(), rstd if is_rms_norm else mean, rstd,
                grad_out, grad_out if grad_res is None else grad_res, dx, dx if residual is None else dres, dw, db, M, H,
                HAS_RES=residual is not None, HAS_GR=grad_res is not None, IS_RMS=is_rms_norm, ACC=tl_dtype(acc),
                BLOCK_M=bm, BLOCK_H=next_pow2(H),
            )  # fmt: skip
    dbias = db.sum(0) if has_bias else x.new_empty(0)  # in acc: the caller casts it to the bias's own dtype
    return dx, dw.sum(0).to(weight.dtype), dbias, dres


@add_norm_bwd.register_fake
def _(x, weight, residual, mean, rstd, grad_out, grad_res, has_bias, is_rms_norm):
    # dweight / dbias are sums, contiguous whatever weight's strides (as in the real op)
    return (
        torch.empty_like(x),
        weight.new_empty(weight.shape),
        x.new_empty(weight.shape, dtype=acc_dtype(x)) if has_bias else x.new_empty(0),
        torch.empty_like(residual) if residual is not None else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, residual, _eps, _residual_in_fp32, is_rms_norm = inputs
    ctx.save_for_backward(x, weight, residual, output[2], output[3])
    ctx.has_bias, ctx.is_rms_norm = bias is not None, is_rms_norm
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad_out, grad_res, _gm, _gr):
    x, weight, residual, mean, rstd = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    dx, dw, db, dres = add_norm_bwd(
        x, weight, residual, mean, rstd, grad_out.contiguous(), None if grad_res is None else grad_res.contiguous(),
        ctx.has_bias, ctx.is_rms_norm,
    )  # fmt: skip
    return (
        dx,
        dw,
        db.to(ctx.bias_dtype) if ctx.has_bias else None,
        dres if residual is not None else None,
        None,
        None,
        None,
    )


add_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def add_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual_in_fp32: bool = True,
    is_rms_norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``(norm(x + residual), x + residual)``; same semantics as :func:`add_norm_ref`."""
    shape = x.shape
    H = shape[-1]
    rows = math.prod(shape[:-1])  # (not -1: a hidden size of 0 leaves it undetermined)
    x2 = x.reshape(rows, H).contiguous()
    r2 = residual.reshape(rows, H).contiguous() if residual is not None else None
    out, res, _, _ = add_norm_fwd(x2, weight.contiguous(), bias, r2, float(eps), residual_in_fp32, is_rms_norm)
    return out.view(shape), res.view(shape)
