"""Causal depthwise conv1d in Triton (widths 1-4, bias and SiLU fused), forward and backward.

Both kernels tile (channels, time). The inputs before x (``initial_states``) are read in place of
x at negative times, so the padded sequence is never built. The backward recomputes the
pre-activation instead of saving it; weight and bias gradients are summed per tile and reduced
once at the end. Registered as torch.library custom ops so torch.compile sees one opaque op.
"""

import torch

from ..triton_utils import HAS_TRITON, acc_dtype, interpreting, next_pow2, on_device, tl_dtype

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _load_xs(x_base, i_base, e, lo, hi, dmask, sx_t, si_t, W: tl.constexpr, HAS_INIT: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
        """Padded input at positions e of [initial_states, x] (zeros outside), as a (BLOCK_D, BLOCK_T) tile.

        Positions are relative to the tile (see _conv_fwd_kernel): x_base and i_base point at its
        first time step, and x's times [0, L) are the relative ones [lo, hi) = [-t0, L - t0).
        """
        pos = e - (W - 1)
        m = dmask[:, None] & (pos >= lo)[None, :] & (pos < hi)[None, :]
        v = tl.load(x_base[:, None] + pos[None, :] * sx_t, mask=m, other=0.0).to(ACC)
        if HAS_INIT:
            mi = dmask[:, None] & (e >= lo)[None, :] & (e < lo + W - 1)[None, :]
            v += tl.load(i_base[:, None] + e[None, :] * si_t, mask=mi, other=0.0).to(ACC)
        return v

    @triton.jit
    def _conv_fwd_kernel(
        x_ptr, w_ptr, b_ptr, i_ptr, o_ptr,
        dim, L, sx_b, sx_d, sx_t, sw_d, sw_k, si_b, si_d, si_t, so_b, so_d, so_t,
        W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):  # fmt: skip
        # Offsets in int64: batch, channel or time index times its stride passes 2^31 at Mamba-7B
        # sizes (x is half of a (batch, seqlen, 2 * d_inner) buffer: time stride 2 * d_inner). The
        # time index enters once, as the tile's first step t0 in the base pointers; times within the
        # tile are relative and int32 (int64 per-element time offsets make the backward spill).
        # grid (time tiles, channel blocks, batch): axis 0 takes 2^31 - 1 tiles, axes 1 and 2 only 65535
        bb = tl.program_id(2).to(tl.int64)
        d = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
        t0 = tl.program_id(0) * BLOCK_T
        t0l = t0.to(tl.int64)
        lo, hi = -t0, L - t0
        t = tl.arange(0, BLOCK_T)
        dmask = d < dim
        x_base = x_ptr + bb * sx_b + d * sx_d + t0l * sx_t
        i_base = i_ptr + bb * si_b + d * si_d + t0l * si_t
        acc = tl.zeros((BLOCK_D, BLOCK_T), dtype=ACC)
        for k in tl.static_range(W):
            wk = tl.load(w_ptr + d * sw_d + k * sw_k, mask=dmask, other=0.0).to(ACC)
            acc += wk[:, None] * _load_xs(x_base, i_base, t + k, lo, hi, dmask, sx_t, si_t, W, HAS_INIT, ACC)
        if HAS_BIAS:
            acc += tl.load(b_ptr + d, mask=dmask, other=0.0).to(ACC)[:, None]
        if SILU:
            acc = acc * tl.sigmoid(acc)
        m = dmask[:, None] & (t < hi)[None, :]
        o_base = o_ptr + bb * so_b + d * so_d + t0l * so_t
        tl.store(o_base[:, None] + t[None, :] * so_t, acc.to(o_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _dpre(x_base, i_base, go_base, w_ptr, bias, t, lo, hi, d, dmask, sx_t, si_t, sw_d, sw_k, sgo_t,
              W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
        """Gradient at the pre-activation for relative times t (zero outside x's [lo, hi))."""
        m = dmask[:, None] & (t >= lo)[None, :] & (t < hi)[None, :]
        go = tl.load(go_base[:, None] + t[None, :] * sgo_t, mask=m, other=0.0).to(ACC)
        if SILU:
            pre = tl.zeros_like(go)
            for j in tl.static_range(W):
                wj = tl.load(w_ptr + d * sw_d + j * sw_k, mask=dmask, other=0.0).to(ACC)
                pre += wj[:, None] * _load_xs(x_base, i_base, t + j, lo, hi, dmask, sx_t, si_t, W, HAS_INIT, ACC)
            if HAS_BIAS:
                pre += bias[:, None]
            s = tl.sigmoid(pre)
            go = go * s * (1.0 + pre * (1.0 - s))
        return go

    @triton.jit
    def _conv_bwd_kernel(
        x_ptr, w_ptr, b_ptr, i_ptr, go_ptr, dx_ptr, di_ptr, dw_ptr, db_ptr,
        dim, L, sx_b, sx_d, sx_t, sw_d, sw_k, si_b, si_d, si_t, sgo_b, sgo_d, sgo_t,
        sdx_b, sdx_d, sdx_t, sdi_b, sdi_d, sdi_t,
        W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):  # fmt: skip
        # int64 offsets, times relative to the tile's first step t0: as in the forward
        # grid (time tiles, channel blocks, batch): axis 0 takes 2^31 - 1 tiles, axes 1 and 2 only 65535
        bb = tl.program_id(2).to(tl.int64)
        d = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
        t0 = tl.program_id(0) * BLOCK_T
        t0l = t0.to(tl.int64)
        lo, hi = -t0, L - t0
        r = tl.arange(0, BLOCK_T)
        dmask = d < dim
        x_base = x_ptr + bb * sx_b + d * sx_d + t0l * sx_t
        i_base = i_ptr + bb * si_b + d * si_d + t0l * si_t
        go_base = go_ptr + bb * sgo_b + d * sgo_d + t0l * sgo_t
        if HAS_BIAS:
            bias = tl.load(b_ptr + d, mask=dmask, other=0.0).to(ACC)
        else:
            bias = tl.zeros((BLOCK_D,), dtype=ACC)
        # weight / bias gradient over the times r of this tile
        g = _dpre(x_base, i_base, go_base, w_ptr, bias, r, lo, hi, d, dmask, sx_t, si_t, sw_d, sw_k, sgo_t,
                  W, HAS_BIAS, HAS_INIT, SILU, ACC)  # fmt: skip
        part = (bb * tl.num_programs(0) + tl.program_id(0)) * dim
        for j in tl.static_range(W):
            xj = _load_xs(x_base, i_base, r + j, lo, hi, dmask, sx_t, si_t, W, HAS_INIT, ACC)
            tl.store(dw_ptr + (part + d) * W + j, tl.sum(g * xj, axis=1), mask=dmask)
        tl.store(db_ptr + part + d, tl.sum(g, axis=1), mask=dmask)
        # input gradient at positions r of the padded sequence [initial_states, x]
        dxs = tl.zeros((BLOCK_D, BLOCK_T), dtype=ACC)
        for k in tl.static_range(W):
            wk = tl.load(w_ptr + d * sw_d + k * sw_k, mask=dmask, other=0.0).to(ACC)
            gk = _dpre(x_base, i_base, go_base, w_ptr, bias, r - k, lo, hi, d, dmask, sx_t, si_t, sw_d, sw_k, sgo_t,
                       W, HAS_BIAS, HAS_INIT, SILU, ACC)  # fmt: skip
            dxs += wk[:, None] * gk
        pos = r - (W - 1)
        mx = dmask[:, None] & (pos >= lo)[None, :] & (pos < hi)[None, :]
        dx_base = dx_ptr + bb * sdx_b + d * sdx_d + t0l * sdx_t
        tl.store(dx_base[:, None] + pos[None, :] * sdx_t, dxs.to(dx_ptr.dtype.element_ty), mask=mx)
        if HAS_INIT:
            mi = dmask[:, None] & (r < lo + W - 1)[None, :]
            di_base = di_ptr + bb * sdi_b + d * sdi_d + t0l * sdi_t
            tl.store(di_base[:, None] + r[None, :] * sdi_t, dxs.to(di_ptr.dtype.element_ty), mask=mi)


def _blocks(dim: int, L: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_T): long runs along whichever axis is contiguous in memory."""
    if interpreting():
        return min(next_pow2(dim), 64), min(next_pow2(L + 3), 256)
    if channels_last:  # (batch, dim, L) view of a (batch, L, dim) tensor, as the model passes it
        return min(next_pow2(dim), 64), min(next_pow2(L + 3), 32)
    return min(next_pow2(dim), 16), min(next_pow2(L + 3), 128)


def _like(x: torch.Tensor) -> torch.Tensor:
    """Empty tensor shaped like x (batch, dim, L) with x's dtype and, when possible, its memory order."""
    if x.stride(1) == 1:
        b, d, l = x.shape
        return torch.empty(b, l, d, dtype=x.dtype, device=x.device).transpose(1, 2)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _s3(t: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else (t.stride(0), t.stride(1), t.stride(2))


MAX_BATCH = 65535  # the batch is grid axis 2 (the time tiles take axis 0, which has room for 2^31 - 1)


def _check_batch(batch: int) -> None:
    if batch > MAX_BATCH:
        raise ValueError(
            f"causal_conv1d (triton): batch {batch} is more than the {MAX_BATCH} sequences one launch takes; "
            "split the batch"
        )


@torch.library.custom_op("openlm_mamba::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, initial_states: torch.Tensor | None, silu: bool
) -> torch.Tensor:
    """Triton forward of the causal depthwise conv (output in x's dtype)."""
    batch, dim, L = x.shape
    _check_batch(batch)
    W = weight.shape[1]
    out = _like(x)
    if out.numel() == 0:
        return out
    bd, bt = _blocks(dim, L, x.stride(1) == 1 and L > 1)
    has_init = initial_states is not None and W > 1
    grid = (triton.cdiv(L, bt), triton.cdiv(dim, bd), batch)
    with on_device(x):
        _conv_fwd_kernel[grid](
            x, weight, x if bias is None else bias.contiguous(), initial_states if has_init else x, out,
            dim, L, *x.stride(), *weight.stride(), *_s3(initial_states if has_init else None), *out.stride(),
            W=W, HAS_BIAS=bias is not None, HAS_INIT=has_init, SILU=silu, ACC=tl_dtype(acc_dtype(x, weight)),
            BLOCK_D=bd, BLOCK_T=bt,
        )  # fmt: skip
    return out


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, initial_states, silu):
    return _like(x)


@torch.library.custom_op("openlm_mamba::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    grad_out: torch.Tensor,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: (dx, dweight, dbias, dinitial_states); absent ones are empty."""
    batch, dim, L = x.shape
    _check_batch(batch)
    W = weight.shape[1]
    acc = acc_dtype(x, weight)
    has_init = initial_states is not None and W > 1
    dx = _like(x)
    di = torch.zeros_like(initial_states) if initial_states is not None else x.new_empty(0)
    bd, bt = _blocks(dim, L, x.stride(1) == 1 and L > 1)
    nt = triton.cdiv(L + W - 1, bt)
    dw = torch.zeros(batch * nt, dim, W, dtype=acc, device=x.device)
    db = torch.zeros(batch * nt, dim, dtype=acc, device=x.device)
    if L > 0:
        with on_device(x):
            _conv_bwd_kernel[(nt, triton.cdiv(dim, bd), batch)](
                x, weight, x if bias is None else bias.contiguous(), initial_states if has_init else x, grad_out,
                dx, di if has_init else dx, dw, db,
                dim, L, *x.stride(), *weight.stride(), *_s3(initial_states if has_init else None), *grad_out.stride(),
                *dx.stride(), *_s3(di if has_init else None),
                W=W, HAS_BIAS=bias is not None, HAS_INIT=has_init, SILU=silu, ACC=tl_dtype(acc),
                BLOCK_D=bd, BLOCK_T=bt,
            )  # fmt: skip
    dbias = db.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx, dw.sum(0).to(weight.dtype), dbias, di


@causal_conv1d_bwd.register_fake
def _(x, weight, bias, initial_states, grad_out, silu):
    # dweight / dbias are sums, contiguous whatever the inputs' strides (as in the real op)
    return (
        _like(x),
        weight.new_empty(weight.shape),
        bias.new_empty(bias.shape) if bias is not None else x.new_empty(0),
        torch.empty_like(initial_states) if initial_states is not None else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, initial_states, silu = inputs
    ctx.save_for_backward(x, weight, bias, initial_states)
    ctx.silu = silu


def _backward(ctx, grad_out):
    x, weight, bias, initial_states = ctx.saved_tensors
    dx, dw, db, di = causal_conv1d_bwd(x, weight, bias, initial_states, grad_out, ctx.silu)
    return dx, dw, db if bias is not None else None, di if initial_states is not None else None, None


causal_conv1d_fwd.register_autograd(_backward, setup_context=_setup_context)


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
):
    """Triton causal conv1d with ``causal_conv1d_fn`` semantics (see ``ops.causal_conv1d``)."""
    out = causal_conv1d_fwd(x, weight, bias, initial_states, activation in ("silu", "swish"))
    if not return_final_states:
        return out
    width = weight.shape[1]
    if x.shape[2] >= width - 1:
        final = x[:, :, x.shape[2] - (width - 1) :].clone()  # not a view of x, as the reference
    else:
        init = initial_states if initial_states is not None else x.new_zeros(x.shape[0], x.shape[1], width - 1)
        final = torch.cat([init.to(x.dtype), x], dim=-1)[:, :, -(width - 1) :]
    return out, final.to(x.dtype)
