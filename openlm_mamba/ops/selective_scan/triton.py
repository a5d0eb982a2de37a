"""Selective scan in Triton: forward and backward kernels, registered as torch.library custom ops.

One program per (batch, group, block of channels) walks the sequence in tiles of ``TILE`` time
steps. Each tile is loaded at once, its ``exp(delta * A)`` factors computed in parallel, and the
linear recurrence h_t = a_t * h_{t-1} + b_t solved with an associative scan along time, the state
(BLOCK_D, d_state) carried in float32 registers from tile to tile. The forward saves the state at
every chunk boundary (``CHUNK`` steps). The backward walks the chunks in reverse: it recomputes
the state at each tile start of the chunk (a small scratch buffer), then, tile by tile from the
end, recomputes the tile's states and solves the adjoint recurrence with a reverse scan. No
(batch, dim, seqlen, d_state) tensor is ever written.
"""

import math
import os

import torch

from ..triton_utils import (
    HAS_TRITON,
    acc_dtype,
    interpreting,
    next_pow2,
    on_device,
    tl_dtype,
    vectorize_interpreter_scan,
)

DEFAULT_CHUNK = 128

if HAS_TRITON:
    import triton
    import triton.language as tl

    if interpreting():
        vectorize_interpreter_scan()

    @triton.jit
    def _softplus(x):
        # torch's softplus (threshold 20); exp(x) for very negative x, where log(1 + exp(x)) rounds to 0
        return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))

    @triton.jit
    def _combine(a1, b1, a2, b2):
        # (a1, b1) then (a2, b2): x -> a2 * (a1 * x + b1) + b2
        return a1 * a2, b1 * a2 + b2

    @triton.jit
    def _tile_states(dt, u, Bt, A, h):
        """(exp(dt*A), dt*u, dt*u*B, states) of a (TILE, BLOCK_D, BLOCK_N) tile entered in state h.

        Masked steps have dt = 0: factor 1, input 0, so the state passes through them unchanged.
        bx is an explicit fma: a plain product could be contracted into the backward's hs - bx,
        leaving the product's rounding error where the exact difference is 0.
        """
        dA = tl.exp(dt[:, :, None] * A[None, :, :])
        dtu = dt * u
        bx = tl.fma(dtu[:, :, None], Bt[:, None, :], 0.0)
        ca, cb = tl.associative_scan((dA, bx), 0, _combine)
        return dA, dtu, bx, ca * h[None, :, :] + cb

    @triton.jit
    def _load_dt(d_base, bias, t, m_td, sd_t, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr):
        """(dt after bias and softplus, dt before softplus) for a (TILE, BLOCK_D) tile; 0 where masked."""
        raw = tl.load(d_base[None, :] + t[:, None] * sd_t, mask=m_td, other=0.0).to(ACC)
        if HAS_BIAS:
            raw += bias[None, :]
        dt = raw
        if SOFTPLUS:
            dt = _softplus(raw)
        return tl.where(m_td, dt, 0.0), raw

    @triton.jit
    def _program_block(dpg, N, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        """(batch, group, channels, channel mask, states, state mask) of this program: (batch, group, block of
        BLOCK_D channels). Batch and channel indices are int64: their products with strides pass 2^31."""
        b = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        offs = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs < dpg
        d = (g * dpg + offs).to(tl.int64)
        n = tl.arange(0, BLOCK_N)
        return b, g, d, dmask, n, n < N

    @triton.jit
    def _channel_params(D_ptr, bias_ptr, d, dmask, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
        """(D, delta_bias) of the channels ``d`` (zeros where absent)."""
        Dv = tl.zeros(d.shape, dtype=ACC)
        bias = tl.zeros(d.shape, dtype=ACC)
        if HAS_D:
            Dv = tl.load(D_ptr + d, mask=dmask, other=0.0).to(ACC)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + d, mask=dmask, other=0.0).to(ACC)
        return Dv, bias

    @triton.jit
    def _input_bases(
        u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, b, g, d, n,
        su_b, su_d, sd_b, sd_d, sz_b, sz_d, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n,
    ):  # fmt: skip
        """Pointers to time step 0 of u, delta, z (per channel) and of B, C (per state) for this program."""
        u_base = u_ptr + b * su_b + d * su_d
        d_base = dl_ptr + b * sd_b + d * sd_d
        z_base = z_ptr + b * sz_b + d * sz_d
        B_base = B_ptr + b * sB_b + g * sB_g + n * sB_n
        C_base = C_ptr + b * sC_b + g * sC_g + n * sC_n
        return u_base, d_base, z_base, B_base, C_base

    @triton.jit
    def _dbc_bases(dB_ptr, dC_ptr, b, g, n, dim, dpg, nslots, N, L):
        """Pointers to time step 0 of this program's dB / dC rows: its sums over its channels are added to
        one of nslots (batch, groups, nslots, N, L) buffers (fewer programs contend for each address)."""
        slot = ((b * (dim // dpg) + g) * nslots + tl.program_id(2) % nslots) * N * L
        return dB_ptr + slot + n * L, dC_ptr + slot + n * L

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
        CHUNK: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # Batch, channel and time indices (b, d, tt and so t) are int64: their products with the
        # strides pass 2^31 at Mamba-7B sizes. z is half of a (batch, seqlen, 2 * d_inner) buffer, so
        # its time stride 2 * d_inner does from 131072 steps; a (batch, d_inner, seqlen) u's channel
        # stride is seqlen; the saved states hold batch * seqlen / CHUNK * d_inner * d_state floats.
        b, g, d, dmask, n, nmask = _program_block(dpg, N, BLOCK_D, BLOCK_N)
        m2 = dmask[:, None] & nmask[None, :]
        tt = tl.arange(0, TILE).to(tl.int64)
        last_row = (tt == TILE - 1)[:, None, None]
        A = tl.load(A_ptr + d[:, None] * sA_d + n[None, :] * sA_n, mask=m2, other=0.0).to(ACC)
        Dv, bias = _channel_params(D_ptr, bias_ptr, d, dmask, HAS_D, HAS_BIAS, ACC)
        if HAS_H0:
            h = tl.load(h0_ptr + b * sh_b + d[:, None] * sh_d + n[None, :] * sh_n, mask=m2, other=0.0).to(ACC)
        else:
            h = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
        u_base, d_base, z_base, B_base, C_base = _input_bases(
            u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, b, g, d, n,
            su_b, su_d, sd_b, sd_d, sz_b, sz_d, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n,
        )  # fmt: skip
        o_base = out_ptr + b * so_b + d * so_d
        dn = d[:, None] * N + n[None, :]
        for c in range(nchunks):
            if SAVE:
                tl.store(st_ptr + (b * nchunks + c) * dim * N + dn, h, mask=m2)
            for t0 in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, L), TILE):
                t = t0 + tt
                tmask = t < L
                m_td = tmask[:, None] & dmask[None, :]
                m_tn = tmask[:, None] & nmask[None, :]
                dt, _ = _load_dt(d_base, bias, t, m_td, sd_t, HAS_BIAS, SOFTPLUS, ACC)
                u = tl.load(u_base[None, :] + t[:, None] * su_t, mask=m_td, other=0.0).to(ACC)
                Bt = tl.load(B_base[None, :] + t[:, None] * sB_t, mask=m_tn, other=0.0).to(ACC)
                Ct = tl.load(C_base[None, :] + t[:, None] * sC_t, mask=m_tn, other=0.0).to(ACC)
                _, _, _, hs = _tile_states(dt, u, Bt, A, h)  # the state after each step
                y = tl.sum(hs * Ct[:, None, :], axis=2)
                if HAS_D:
                    y += Dv[None, :] * u
                if HAS_Z:
                    zt = tl.load(z_base[None, :] + t[:, None] * sz_t, mask=m_td, other=0.0).to(ACC)
                    y = y * zt * tl.sigmoid(zt)
                tl.store(o_base[None, :] + t[:, None] * so_t, y.to(out_ptr.dtype.element_ty), mask=m_td)
                h = tl.sum(tl.where(last_row, hs, 0.0), axis=0)
        tl.store(last_ptr + b * dim * N + dn, h, mask=m2)

    @triton.jit
    def _exp2_ftz(x):
        # 2^x as the GPU's MUFU.EX2 computes it with denormal results flushed to zero: two instructions
        # where tl.exp's denormal-safe lowering takes five (native GPU only; the interpreter has no asm)
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )

    @triton.jit
    def _seq_exp(x, FAST_EXP: tl.constexpr, ASM: tl.constexpr):
        """exp(x), or with FAST_EXP 2^x of a log2(e)-scaled x: through _exp2_ftz (ASM, on a GPU) or tl.exp2
        (the interpreter, which has no asm: so the CPU tests cover the scaled path too)."""
        if FAST_EXP:
            if ASM:
                return _exp2_ftz(x)
            return tl.exp2(x)
        return tl.exp(x)

    @triton.jit
    def _seq_step_inputs(
        d_base, u_base, B_base, C_base, bias, dmask, nmask, t, L, sd_t, su_t, sB_t, sC_t,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """One step's (dt, dt before softplus, u, B_t, C_t, channel mask); dt = 0 past the end (a masked step
        leaves the state as it is)."""
        # step masks from tensors (the interpreter rejects a mask made with a 0-d comparison)
        md = dmask & (tl.zeros((BLOCK_D,), tl.int64) + t < L)
        mn = nmask & (tl.zeros((BLOCK_N,), tl.int64) + t < L)
        raw = tl.load(d_base + t * sd_t, mask=md, other=0.0).to(ACC)
        if HAS_BIAS:
            raw += bias
        dt = raw
        if SOFTPLUS:
            dt = _softplus(raw)
        dt = tl.where(md, dt, 0.0)
        u = tl.load(u_base + t * su_t, mask=md, other=0.0).to(ACC)
        Bt = tl.load(B_base + t * sB_t, mask=mn, other=0.0).to(ACC)
        Ct = tl.load(C_base + t * sC_t, mask=mn, other=0.0).to(ACC)
        return dt, raw, u, Bt, Ct, md, mn

    @triton.jit
    def _scan_fwd_seq_kernel(
        u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
        out_ptr, last_ptr, st_ptr,
        dim, L, dpg, N, nchunks,
        su_b, su_d, su_t, sd_b, sd_d, sd_t, sA_d, sA_n,
        sB_b, sB_g, sB_n, sB_t, sC_b, sC_g, sC_n, sC_t,
        sz_b, sz_d, sz_t, sh_b, sh_d, sh_n, so_b, so_d, so_t,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
        SOFTPLUS: tl.constexpr, SAVE: tl.constexpr, ACC: tl.constexpr,
        CHUNK: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        FAST_EXP: tl.constexpr = False, ASM: tl.constexpr = False,
    ):  # fmt: skip
        """The forward as a plain recurrence, one time step after another: the same arguments and results
        as ``_scan_fwd_kernel``. The state is (BLOCK_N, BLOCK_D) with the channels across the threads, so
        each thread keeps d_state in its registers and the sum over it for y is its own; TILE steps are
        unrolled per loop iteration, so their loads are in flight together. Give A and h0 with the
        channels contiguous (sA_d, sh_d = 1): their loads set that layout."""
        tl.static_assert(CHUNK % TILE == 0, "TILE must divide CHUNK (the steps of a chunk come in whole tiles)")
        b, g, d, dmask, n, nmask = _program_block(dpg, N, BLOCK_D, BLOCK_N)
        m2 = nmask[:, None] & dmask[None, :]
        A = tl.load(A_ptr + d[None, :] * sA_d + n[:, None] * sA_n, mask=m2, other=0.0).to(ACC)
        if FAST_EXP:  # float32: exp(dt A) = 2^(dt A log2(e))
            A = A * 1.4426950408889634
        Dv, bias = _channel_params(D_ptr, bias_ptr, d, dmask, HAS_D, HAS_BIAS, ACC)
        if HAS_H0:
            h = tl.load(h0_ptr + b * sh_b + d[None, :] * sh_d + n[:, None] * sh_n, mask=m2, other=0.0).to(ACC)
        else:
            h = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
        u_base, d_base, z_base, B_base, C_base = _input_bases(
            u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, b, g, d, n,
            su_b, su_d, sd_b, sd_d, sz_b, sz_d, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n,
        )  # fmt: skip
        o_base = out_ptr + b * so_b + d * so_d
        nd = d[None, :] * N + n[:, None]  # the saved states' (dim, N) layout, as _scan_fwd_kernel writes it
        for c in range(nchunks):
            if SAVE:
                tl.store(st_ptr + (b * nchunks + c) * dim * N + nd, h, mask=m2)
            for t0 in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, L), TILE):
                for i in tl.static_range(TILE):
                    t = tl.cast(t0 + i, tl.int64)
                    dt, _, u, Bt, Ct, md, _ = _seq_step_inputs(
                        d_base, u_base, B_base, C_base, bias, dmask, nmask, t, L, sd_t, su_t, sB_t, sC_t,
                        HAS_BIAS, SOFTPLUS, ACC, BLOCK_D, BLOCK_N,
                    )  # fmt: skip
                    h = _seq_exp(dt[None, :] * A, FAST_EXP, ASM) * h + (dt * u)[None, :] * Bt[:, None]
                    y = tl.sum(h * Ct[:, None], axis=0)
                    if HAS_D:
                        y += Dv * u
                    if HAS_Z:
                        zt = tl.load(z_base + t * sz_t, mask=md, other=0.0).to(ACC)
                        y = y * zt * tl.sigmoid(zt)
                    tl.store(o_base + t * so_t, y.to(out_ptr.dtype.element_ty), mask=md)
        tl.store(last_ptr + b * dim * N + nd, h, mask=m2)

    @triton.jit
    def _scan_bwd_kernel(
        u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, st_ptr, go_ptr, gl_ptr, scr_ptr,
        du_ptr, ddl_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
        dim, L, dpg, N, nchunks, nslots,
        su_b, su_d, su_t, sd_b, sd_d, sd_t, sA_d, sA_n,
        sB_b, sB_g, sB_n, sB_t, sC_b, sC_g, sC_n, sC_t,
        sz_b, sz_d, sz_t, sgo_b, sgo_d, sgo_t, sgl_b, sgl_d, sgl_n,
        sdu_b, sdu_d, sdu_t, sdd_b, sdd_d, sdd_t, sdz_b, sdz_d, sdz_t,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GL: tl.constexpr,
        SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
        CHUNK: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        b, g, d, dmask, n, nmask = _program_block(dpg, N, BLOCK_D, BLOCK_N)
        m2 = dmask[:, None] & nmask[None, :]
        tt = tl.arange(0, TILE).to(tl.int64)
        last_row = (tt == TILE - 1)[:, None, None]
        first_row = (tt == 0)[:, None, None]
        A = tl.load(A_ptr + d[:, None] * sA_d + n[None, :] * sA_n, mask=m2, other=0.0).to(ACC)
        Dv, bias = _channel_params(D_ptr, bias_ptr, d, dmask, HAS_D, HAS_BIAS, ACC)
        # carry: the gradient reaching the state after the current tile's last step from later steps
        if HAS_GL:
            carry = tl.load(gl_ptr + b * sgl_b + d[:, None] * sgl_d + n[None, :] * sgl_n, mask=m2, other=0.0).to(ACC)
        else:
            carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
        dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
        dD_acc = tl.zeros((BLOCK_D,), dtype=ACC)
        dbias_acc = tl.zeros((BLOCK_D,), dtype=ACC)
        u_base, d_base, z_base, B_base, C_base = _input_bases(
            u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, b, g, d, n,
            su_b, su_d, sd_b, sd_d, sz_b, sz_d, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n,
        )  # fmt: skip
        go_base = go_ptr + b * sgo_b + d * sgo_d
        dB_base, dC_base = _dbc_bases(dB_ptr, dC_ptr, b, g, n, dim, dpg, nslots, N, L)
        dn = d[:, None] * N + n[None, :]
        scr_base = scr_ptr + (b * dim + d[:, None]) * (CHUNK // TILE) * BLOCK_N + n[None, :]
        for ci in range(nchunks):
            c = nchunks - 1 - ci
            t_c = c * CHUNK
            ntiles = tl.cdiv(tl.minimum(t_c + CHUNK, L) - t_c, TILE)
            # the state at each tile start of this chunk, from the chunk's saved start state
            h = tl.load(st_ptr + (b * nchunks + c) * dim * N + dn, mask=m2, other=0.0)
            for k in range(ntiles):
                tl.store(scr_base + k * BLOCK_N, h, mask=m2)
                t = t_c + k * TILE + tt
                tmask = t < L
                m_td = tmask[:, None] & dmask[None, :]
                dt, _ = _load_dt(d_base, bias, t, m_td, sd_t, HAS_BIAS, SOFTPLUS, ACC)
                u = tl.load(u_base[None, :] + t[:, None] * su_t, mask=m_td, other=0.0).to(ACC)
                Bt = tl.load(B_base[None, :] + t[:, None] * sB_t, mask=tmask[:, None] & nmask[None, :], other=0.0)
                _, _, _, hs = _tile_states(dt, u, Bt.to(ACC), A, h)
                h = tl.sum(tl.where(last_row, hs, 0.0), axis=0)
            tl.debug_barrier()
            for kk in range(ntiles):
                k = ntiles - 1 - kk
                t = t_c + k * TILE + tt
                tmask = t < L
                m_td = tmask[:, None] & dmask[None, :]
                m_tn = tmask[:, None] & nmask[None, :]
                h0 = tl.load(scr_base + k * BLOCK_N, mask=m2, other=0.0)
                dt, dt_raw = _load_dt(d_base, bias, t, m_td, sd_t, HAS_BIAS, SOFTPLUS, ACC)
                u = tl.load(u_base[None, :] + t[:, None] * su_t, mask=m_td, other=0.0).to(ACC)
                Bt = tl.load(B_base[None, :] + t[:, None] * sB_t, mask=m_tn, other=0.0).to(ACC)
                Ct = tl.load(C_base[None, :] + t[:, None] * sC_t, mask=m_tn, other=0.0).to(ACC)
                go = tl.load(go_base[None, :] + t[:, None] * sgo_t, mask=m_td, other=0.0).to(ACC)
                dA, dtu, bx, hs = _tile_states(dt, u, Bt, A, h0)  # hs: h_t
                if HAS_Z:
                    zt = tl.load(z_base[None, :] + t[:, None] * sz_t, mask=m_td, other=0.0).to(ACC)
                    y = tl.sum(hs * Ct[:, None, :], axis=2)
                    if HAS_D:
                        y += Dv[None, :] * u
                    sz = tl.sigmoid(zt)
                    dz = go * y * sz * (1.0 + zt * (1.0 - sz))
                    dz_ptrs = dz_ptr + b * sdz_b + d[None, :] * sdz_d + t[:, None] * sdz_t
                    tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=m_td)
                    dy = go * zt * sz
                else:
                    dy = go
                # adjoint: gh_t = dy_t C_t + exp(dt_{t+1} A) gh_{t+1}; the step after the tile is the carry
                t1 = t + 1
                m1 = (t1 < L)[:, None] & dmask[None, :]
                dt1, _ = _load_dt(d_base, bias, t1, m1, sd_t, HAS_BIAS, SOFTPLUS, ACC)
                dA1 = tl.exp(dt1[:, :, None] * A[None, :, :])
                cg = dy[:, :, None] * Ct[:, None, :] + tl.where(last_row, carry[None, :, :], 0.0)
                _, gh = tl.associative_scan((dA1, cg), 0, _combine, reverse=True)
                # relaxed: the partial sums need no ordering with other memory (the default is acq_rel)
                dC_t = tl.sum(dy[:, :, None] * hs, axis=1)
                tl.atomic_add(dC_base[None, :] + t[:, None], dC_t, mask=m_tn, sem="relaxed")
                tl.atomic_add(
                    dB_base[None, :] + t[:, None], tl.sum(gh * dtu[:, :, None], axis=1), mask=m_tn, sem="relaxed"
                )
                gB = tl.sum(gh * Bt[:, None, :], axis=2)
                du = dt * gB
                if HAS_D:
                    du += dy * Dv[None, :]
                    dD_acc += tl.sum(dy * u, axis=0)
                ghd = gh * (hs - bx)  # gh_t * exp(dt_t A) * h_{t-1}
                ddt = u * gB + tl.sum(ghd * A[None, :, :], axis=2)
                dA_acc += tl.sum(ghd * dt[:, :, None], axis=0)
                if SOFTPLUS:
                    ddt = ddt * tl.sigmoid(dt_raw)
                ddt = tl.where(m_td, ddt, 0.0)
                dbias_acc += tl.sum(ddt, axis=0)
                du_ptrs = du_ptr + b * sdu_b + d[None, :] * sdu_d + t[:, None] * sdu_t
                tl.store(du_ptrs, du.to(du_ptr.dtype.element_ty), mask=m_td)
                ddl_ptrs = ddl_ptr + b * sdd_b + d[None, :] * sdd_d + t[:, None] * sdd_t
                tl.store(ddl_ptrs, ddt.to(ddl_ptr.dtype.element_ty), mask=m_td)
                carry = tl.sum(tl.where(first_row, gh * dA, 0.0), axis=0)
            tl.debug_barrier()
        tl.store(dh0_ptr + b * dim * N + dn, carry, mask=m2)
        tl.store(dA_ptr + b * dim * N + dn, dA_acc, mask=m2)
        tl.store(dD_ptr + b * dim + d, dD_acc, mask=dmask)
        tl.store(dbias_ptr + b * dim + d, dbias_acc, mask=dmask)

    @triton.jit
    def _scan_bwd_seq_kernel(
        u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, st_ptr, go_ptr, gl_ptr, scr_ptr,
        du_ptr, ddl_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
        dim, L, dpg, N, nchunks, nslots,
        su_b, su_d, su_t, sd_b, sd_d, sd_t, sA_d, sA_n,
        sB_b, sB_g, sB_n, sB_t, sC_b, sC_g, sC_n, sC_t,
        sz_b, sz_d, sz_t, sgo_b, sgo_d, sgo_t, sgl_b, sgl_d, sgl_n,
        sdu_b, sdu_d, sdu_t, sdd_b, sdd_d, sdd_t, sdz_b, sdz_d, sdz_t,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GL: tl.constexpr,
        SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
        CHUNK: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        FAST_EXP: tl.constexpr = False, ASM: tl.constexpr = False,
    ):  # fmt: skip
        """The backward with the seq forward's layout: the same arguments and results as ``_scan_bwd_kernel``.

        State-shaped values are (BLOCK_N, BLOCK_D) with the channels across the threads, so sums over
        d_state are each thread's own. Per chunk (last first) it recomputes the state at each tile start
        into the scratch buffer, then per tile (last first) recomputes the tile's TILE steps forward,
        keeping them in registers, and walks them backward. Give A and grad_last with the channels
        contiguous (sA_d, sgl_d = 1)."""
        tl.static_assert(CHUNK % TILE == 0, "TILE must divide CHUNK (the steps of a chunk come in whole tiles)")
        b, g, d, dmask, n, nmask = _program_block(dpg, N, BLOCK_D, BLOCK_N)
        m2 = nmask[:, None] & dmask[None, :]
        A = tl.load(A_ptr + d[None, :] * sA_d + n[:, None] * sA_n, mask=m2, other=0.0).to(ACC)
        a_scale = 1.0  # A held as log2(e) A with FAST_EXP (the factors are 2^(dt A)): sums over A scale back
        if FAST_EXP:
            A = A * 1.4426950408889634
            a_scale = 0.6931471805599453
        Dv, bias = _channel_params(D_ptr, bias_ptr, d, dmask, HAS_D, HAS_BIAS, ACC)
        # carry: the gradient reaching the state after the current step from the steps after it
        if HAS_GL:
            carry = tl.load(gl_ptr + b * sgl_b + d[None, :] * sgl_d + n[:, None] * sgl_n, mask=m2, other=0.0).to(ACC)
        else:
            carry = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
        dA_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
        dD_acc = tl.zeros((BLOCK_D,), dtype=ACC)
        dbias_acc = tl.zeros((BLOCK_D,), dtype=ACC)
        u_base, d_base, z_base, B_base, C_base = _input_bases(
            u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, b, g, d, n,
            su_b, su_d, sd_b, sd_d, sz_b, sz_d, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n,
        )  # fmt: skip
        go_base = go_ptr + b * sgo_b + d * sgo_d
        du_base = du_ptr + b * sdu_b + d * sdu_d
        dd_base = ddl_ptr + b * sdd_b + d * sdd_d
        dz_base = dz_ptr + b * sdz_b + d * sdz_d
        dB_base, dC_base = _dbc_bases(dB_ptr, dC_ptr, b, g, n, dim, dpg, nslots, N, L)
        nd = d[None, :] * N + n[:, None]  # (dim, N) layout of the saved states and of dA / dh0
        # scratch: (batch, CHUNK // TILE, BLOCK_N, dim); a barrier per chunk orders its writes and reads (where
        # the block has fewer elements than threads, the layout replicates them and one warp stores for all)
        scr_base = scr_ptr + (b * (CHUNK // TILE) * BLOCK_N + n[:, None]) * dim + d[None, :]
        scr_tile = tl.cast(dim, tl.int64) * BLOCK_N  # from one tile-start state to the next
        for ci in range(nchunks):
            c = nchunks - 1 - ci
            t_c = c * CHUNK
            ntiles = tl.cdiv(tl.minimum(t_c + CHUNK, L) - t_c, TILE)
            h = tl.load(st_ptr + (b * nchunks + c) * dim * N + nd, mask=m2, other=0.0).to(ACC)
            for k in range(ntiles):  # the state at each tile start of the chunk
                tl.store(scr_base + k * scr_tile, h, mask=m2)
                for i in tl.static_range(TILE):
                    t = tl.cast(t_c + k * TILE + i, tl.int64)
                    dt, _, u, Bt, _, _, _ = _seq_step_inputs(
                        d_base, u_base, B_base, C_base, bias, dmask, nmask, t, L, sd_t, su_t, sB_t, sC_t,
                        HAS_BIAS, SOFTPLUS, ACC, BLOCK_D, BLOCK_N,
                    )  # fmt: skip
                    h = _seq_exp(dt[None, :] * A, FAST_EXP, ASM) * h + (dt * u)[None, :] * Bt[:, None]
            tl.debug_barrier()
            for kk in range(ntiles):
                k = ntiles - 1 - kk
                h = tl.load(scr_base + k * scr_tile, mask=m2, other=0.0)
                # the tile's steps forward, kept for the walk back: (state before, factor, dt, raw dt, u, B, C)
                hp, fs, dts, raws, us, Bs, Cs, mds, mns = (), (), (), (), (), (), (), (), ()
                for i in tl.static_range(TILE):
                    t = tl.cast(t_c + k * TILE + i, tl.int64)
                    dt, raw, u, Bt, Ct, md, mn = _seq_step_inputs(
                        d_base, u_base, B_base, C_base, bias, dmask, nmask, t, L, sd_t, su_t, sB_t, sC_t,
                        HAS_BIAS, SOFTPLUS, ACC, BLOCK_D, BLOCK_N,
                    )  # fmt: skip
                    f = _seq_exp(dt[None, :] * A, FAST_EXP, ASM)
                    # tuple concatenation: Triton's frontend builds these tuples, it has no starred unpacking
                    hp, fs, dts, raws, us = hp + (h,), fs + (f,), dts + (dt,), raws + (raw,), us + (u,)  # noqa: RUF005
                    Bs, Cs, mds, mns = Bs + (Bt,), Cs + (Ct,), mds + (md,), mns + (mn,)  # noqa: RUF005
                    h = f * h + (dt * u)[None, :] * Bt[:, None]
                for i in tl.static_range(TILE - 1, -1, -1):  # h: the state after step i
                    t = tl.cast(t_c + k * TILE + i, tl.int64)
                    dt, u, Bt, Ct, md = dts[i], us[i], Bs[i], Cs[i], mds[i]
                    go = tl.load(go_base + t * sgo_t, mask=md, other=0.0).to(ACC)
                    if HAS_Z:
                        zt = tl.load(z_base + t * sz_t, mask=md, other=0.0).to(ACC)
                        y = tl.sum(h * Ct[:, None], axis=0)
                        if HAS_D:
                            y += Dv * u
                        sz = tl.sigmoid(zt)
                        dz = go * y * sz * (1.0 + zt * (1.0 - sz))
                        tl.store(dz_base + t * sdz_t, dz.to(dz_ptr.dtype.element_ty), mask=md)
                        dy = go * zt * sz
                    else:
                        dy = go
                    gh = carry + dy[None, :] * Ct[:, None]  # the gradient reaching h_t
                    tl.atomic_add(dC_base + t, tl.sum(dy[None, :] * h, axis=1), mask=mns[i], sem="relaxed")
                    tl.atomic_add(dB_base + t, tl.sum(gh * (dt * u)[None, :], axis=1), mask=mns[i], sem="relaxed")
                    gB = tl.sum(gh * Bt[:, None], axis=0)
                    du = dt * gB
                    if HAS_D:
                        du += dy * Dv
                        dD_acc += dy * u
                    ghd = gh * fs[i] * hp[i]  # gh_t * exp(dt_t A) * h_{t-1}
                    ddt = u * gB + tl.sum(ghd * A, axis=0) * a_scale
                    dA_acc += ghd * dt[None, :]
                    if SOFTPLUS:
                        ddt = ddt * tl.sigmoid(raws[i])
                    ddt = tl.where(md, ddt, 0.0)
                    dbias_acc += ddt
                    tl.store(du_base + t * sdu_t, du.to(du_ptr.dtype.element_ty), mask=md)
                    tl.store(dd_base + t * sdd_t, ddt.to(ddl_ptr.dtype.element_ty), mask=md)
                    carry = gh * fs[i]
                    h = hp[i]
            tl.debug_barrier()  # this chunk's reads of the scratch before the next chunk's writes
        tl.store(dh0_ptr + b * dim * N + nd, carry, mask=m2)
        tl.store(dA_ptr + b * dim * N + nd, dA_acc, mask=m2)
        tl.store(dD_ptr + b * dim + d, dD_acc, mask=dmask)
        tl.store(dbias_ptr + b * dim + d, dbias_acc, mask=dmask)


# Launch shape on a GPU: time steps per tile, channels per program, warps per program. Measured
# on an H200 at Mamba-7B shapes (benchmarks/sweep_scan.py): wide channel blocks pay off in the
# backward when there are many channels (fewer programs share each dB/dC slot), "bwd_wide" is
# used from WIDE_DPG channels per group up. The interpreter prefers few, large programs.
# A fourth entry "seq" picks the plain-recurrence kernels (_scan_fwd_seq_kernel, _scan_bwd_seq_kernel:
# d_state in each thread's registers; TILE is then the steps unrolled per loop iteration). Compiled
# offline for sm_90 they issue a fraction of the tile kernels' instructions per state update
# (benchmarks/sass_scan.py); they have not been timed on a GPU yet.
# $OPENLM_MAMBA_SCAN_LAUNCH (e.g. "fwd=8x16x4,bwd=4x32x4" or "fwd=seq:1x128x4,bwd=seq:4x128x4") overrides these.
GPU_LAUNCH = {"fwd": (8, 16, 4), "bwd": (4, 16, 2), "bwd_wide": (4, 32, 4)}
CPU_LAUNCH = {"fwd": (32, 64, 1), "bwd": (32, 64, 1)}
WIDE_DPG = 4096
LAUNCH_ENV = "OPENLM_MAMBA_SCAN_LAUNCH"
BWD_SLOTS = 16  # partial dB / dC buffers: programs along the channels spread their atomic adds over these


def parse_launch(text: str) -> tuple:
    """``"[seq:]TILExBLOCK_DxWARPS"`` -> (TILE, BLOCK_D, warps) or (TILE, BLOCK_D, warps, "seq"); ValueError if
    malformed. Every number must be a positive power of two."""
    kernel, _, shape = text.rpartition(":")
    parts = shape.split("x")
    if (":" in text and kernel != "seq") or len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"expected a launch like 16x16x4 or seq:2x128x4 ([seq:]TILE x BLOCK_D x warps), got {text!r}")
    dims = tuple(int(p) for p in parts)
    if any(v & (v - 1) for v in dims):
        raise ValueError(f"launch {text!r}: every number must be a power of two")
    return (*dims, kernel) if kernel == "seq" else dims


def _env_launch(which: str) -> tuple | None:
    """The ``which`` launch set by $OPENLM_MAMBA_SCAN_LAUNCH, or None; every entry is checked, used or not."""
    spec = os.environ.get(LAUNCH_ENV, "")
    found = None
    for item in filter(None, spec.replace(" ", "").split(",")):
        key, _, value = item.partition("=")
        if key not in ("fwd", "bwd"):
            raise ValueError(
                f"${LAUNCH_ENV}: expected entries like fwd=16x16x4 or bwd=seq:1x128x4 ([seq:]TILE x BLOCK_D x warps), "
                f"got {item!r}"
            )
        try:
            shape = parse_launch(value)
        except ValueError as exc:
            raise ValueError(f"${LAUNCH_ENV}: {item!r}: {exc}") from None
        if key == which and found is None:
            found = shape
    return found


def _launch(which: str, dpg: int, chunk: int, tile: int, block_d: int) -> tuple[int, int, int, str]:
    """(TILE, BLOCK_D, num_warps, kernel): explicit values win, then $OPENLM_MAMBA_SCAN_LAUNCH, then the
    defaults (the interpreter's own on CPU)."""
    shape = _env_launch(which)
    if shape is None and interpreting():
        shape = CPU_LAUNCH[which]
    elif shape is None:
        shape = GPU_LAUNCH["bwd_wide" if which == "bwd" and dpg >= WIDE_DPG else which]
    t, bd, warps = shape[:3]
    kernel = shape[3] if len(shape) > 3 else "tile"
    return min(tile or t, chunk), block_d or min(next_pow2(dpg), bd), warps, kernel


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


def _channels_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` (..., dim, N) as a view of a copy with the channels contiguous: the seq kernels take A and the
    (batch, dim, N) states so, since those loads set their layout (channels across threads). Tiny copies."""
    return None if t is None else t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _seq_options(acc: torch.dtype) -> dict:
    """The seq kernels' exp options: 2^x of a log2(e)-scaled argument in float32, the ftz asm on a GPU."""
    return {"FAST_EXP": acc == torch.float32, "ASM": not interpreting()}


def _dense(v: torch.Tensor | None) -> torch.Tensor | None:
    """D / delta_bias as the kernels index them (channel c at offset c): a strided view is copied (tiny)."""
    return None if v is None else v.contiguous()


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
    tile: int = 0,
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
    tile, bd, warps, kernel = _launch("fwd", dpg, chunk, tile, block_d)
    _, sB_b, sB_g, sB_n, sB_t = _bcl(B)
    _, sC_b, sC_g, sC_n, sC_t = _bcl(C)
    grid = (batch, groups, triton.cdiv(dpg, bd))
    D, delta_bias = _dense(D), _dense(delta_bias)
    fn, A_in, h0, extra = _scan_fwd_kernel, A, initial_state, {}
    if kernel == "seq":
        fn, A_in, h0 = _scan_fwd_seq_kernel, _channels_contiguous(A), _channels_contiguous(initial_state)
        extra = _seq_options(acc)
    with on_device(u):
        fn[grid](
            u, delta, A_in, B, C, _opt(D, u), _opt(z, u), _opt(delta_bias, u), _opt(h0, u),
            out, last, states if save_states else last,
            dim, L, dpg, N, nchunks,
            *u.stride(), *delta.stride(), *A_in.stride(),
            sB_b, sB_g, sB_n, sB_t, sC_b, sC_g, sC_n, sC_t,
            *_strides3(z), *_strides3(h0), *out.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            HAS_H0=initial_state is not None, SOFTPLUS=delta_softplus, SAVE=save_states, ACC=tl_dtype(acc),
            CHUNK=chunk, TILE=tile, BLOCK_D=bd, BLOCK_N=next_pow2(N), num_warps=warps, **extra,
        )  # fmt: skip
    return out, last, states


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_states, chunk, block_d, tile=0):
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
    tile: int = 0,
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
    acc = acc_dtype(u, delta, A, B, C, D, z, delta_bias, states)  # states: the forward's (it counts initial_state)
    nchunks = states.shape[1]
    tile, bd, warps, kernel = _launch("bwd", dpg, chunk, tile, block_d)
    bn = next_pow2(N)
    dev = u.device
    du = _like_bdl(u, u.dtype)
    ddelta = _like_bdl(delta, delta.dtype)
    dz = _like_bdl(z, z.dtype) if z is not None else u.new_empty(0)
    nslots = min(BWD_SLOTS, triton.cdiv(dpg, bd))
    dB = torch.zeros(batch, groups, nslots, N, L, dtype=acc, device=dev)
    dC = torch.zeros(batch, groups, nslots, N, L, dtype=acc, device=dev)
    dA = torch.empty(batch, dim, N, dtype=acc, device=dev)
    dD = torch.empty(batch, dim, dtype=acc, device=dev)
    dbias = torch.empty(batch, dim, dtype=acc, device=dev)
    dh0 = torch.empty(batch, dim, N, dtype=acc, device=dev)
    scratch = torch.empty(batch, dim, chunk // tile, bn, dtype=acc, device=dev)  # a chunk's tile-start states
    _, sB_b, sB_g, sB_n, sB_t = _bcl(B)
    _, sC_b, sC_g, sC_n, sC_t = _bcl(C)
    grid = (batch, groups, triton.cdiv(dpg, bd))
    Dc, bias_c = _dense(D), _dense(delta_bias)
    fn, A_in, gl, extra = _scan_bwd_kernel, A, grad_last, {}
    if kernel == "seq":
        fn, A_in, gl = _scan_bwd_seq_kernel, _channels_contiguous(A), _channels_contiguous(grad_last)
        extra = _seq_options(acc)
    with on_device(u):
        fn[grid](
            u, delta, A_in, B, C, _opt(Dc, u), _opt(z, u), _opt(bias_c, u), states, grad_out, _opt(gl, u), scratch,
            du, ddelta, dz if z is not None else du, dB, dC, dA, dD, dbias, dh0,
            dim, L, dpg, N, nchunks, nslots,
            *u.stride(), *delta.stride(), *A_in.stride(),
            sB_b, sB_g, sB_n, sB_t, sC_b, sC_g, sC_n, sC_t,
            *_strides3(z), *grad_out.stride(), *_strides3(gl),
            *du.stride(), *ddelta.stride(), *_strides3(dz if z is not None else None),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_GL=grad_last is not None,
            SOFTPLUS=delta_softplus, ACC=tl_dtype(acc), CHUNK=chunk, TILE=tile, BLOCK_D=bd, BLOCK_N=bn,
            num_warps=warps, **extra,
        )  # fmt: skip
    dB, dC = dB.sum(2), dC.sum(2)
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
def _(u, delta, A, B, C, D, z, delta_bias, states, grad_out, grad_last, delta_softplus, chunk, block_d, tile=0):
    # same strides as the real outputs: the parameter gradients are sums, hence contiguous whatever
    # the inputs' strides (empty_like would keep a transposed A's)
    acc = acc_dtype(u, delta, A, B, C, D, z, delta_bias, states)
    return (
        _like_bdl(u, u.dtype),
        _like_bdl(delta, delta.dtype),
        A.new_empty(A.shape),
        B.new_empty(B.shape),
        C.new_empty(C.shape),
        D.new_empty(D.shape) if D is not None else u.new_empty(0),
        _like_bdl(z, z.dtype) if z is not None else u.new_empty(0),
        delta_bias.new_empty(delta_bias.shape) if delta_bias is not None else u.new_empty(0),
        u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=acc),
    )


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_states, chunk, block_d, tile = inputs
    if not save_states:
        raise RuntimeError("selective_scan (triton): forward ran without saving states, cannot differentiate")
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.has_h0 = initial_state is not None
    ctx.delta_softplus, ctx.chunk, ctx.block_d, ctx.tile = delta_softplus, chunk, block_d, tile
    ctx.h0_dtype = initial_state.dtype if initial_state is not None else None


def _backward(ctx, grad_out, grad_last, _grad_states):
    u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(u)
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, states, grad_out, grad_last, ctx.delta_softplus, ctx.chunk, ctx.block_d,
        ctx.tile,
    )  # fmt: skip
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
    tile: int = 0,
):
    """Triton selective scan (``selective_scan_fn`` semantics); differentiable in every tensor input.

    ``chunk`` is the number of time steps between saved states (memory kept for backward:
    batch * dim * d_state * ceil(seqlen / chunk) floats); ``block_d`` the channels per program and
    ``tile`` the time steps solved at once (0 = automatic; both powers of two).
    """
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"selective_scan (triton): chunk must be a positive power of two, got {chunk}")
    for name, value in (("block_d", block_d), ("tile", tile)):
        if value < 0 or value & (value - 1):
            raise ValueError(f"selective_scan (triton): {name} must be 0 (auto) or a power of two, got {value}")
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        groups = math.lcm(B.shape[1], C.shape[1])  # divides dim, as both group counts do
        B = B.repeat_interleave(groups // B.shape[1], dim=1)
        C = C.repeat_interleave(groups // C.shape[1], dim=1)
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out, last, _ = selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save, chunk, block_d, tile
    )
    return (out, last) if return_last_state else out
