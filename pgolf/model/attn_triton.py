"""The Triton kernels behind ``pgolf.model.attn_kernels`` (imported only when triton imports; no torch.library code).

Two elementwise stretches of an attention, each in one pass forward and one backward (each section below says
its arithmetic): the q/k RMSNorm + partial RoPE (+ the per-head q gain) between the projections and the
attention kernel, and XSA + the output gate between the attention kernel and the output projection; and, on
Hopper, the q, k, v matmul with the first stretch as its epilogue. Everything is computed in fp32 and rounded once,
when stored (the matmul's product is rounded first, as the unfused matmul stores it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pgolf.model.triton_kernels import _TensorDescriptor, _narrow, _tma_usable, persistent_programs


# --------------------------------------------------------------------------------------------------------------
# q/k RMSNorm + partial RoPE (+ the per-head q gain)
# --------------------------------------------------------------------------------------------------------------
# Rows are the heads of the tokens: x [R = T * H, D] (the q or k projection's output, viewed per head). Per row:
#   n = x * rstd,  rstd = 1 / sqrt(mean(x^2) + eps)
#   r_d = n_d c_j + n_{d+half} s_j (d < half),  n_d c_j - n_{d-half} s_j (half <= d < 2 half),  n_d (the rest)
#   out = r * gain[head]
# with j = d mod half and c, s the row's token's cos / sin (forward: the partners by reshaping registers,
# _rope_rotate; backward: the partners loaded, _rope_partners).
# Backward, with g = d loss / d out:
#   d gain[h] = sum over the head's rows and dims of g * r            (per-program partial sums, no atomics)
#   gn_d = gain * (g_d c_j - sign_d g_partner s_j),  sign = +1 below half, -1 in [half, 2 half), s = 0 beyond
#   dx = rstd * (gn - n * mean(gn * n))
# x and dx may be column slices of a wider [T, width] tensor (the fused q/k/v projection's output and its gradient):
# XS / DXS are their token strides in elements (H * D when contiguous); out and g are contiguous. With REP > 1 (the
# k heads repeated for their query heads, ``train.repeat_kv_heads``) out holds each row REP times, rows
# [row * REP, row * REP + REP) of [R * REP, D], and g likewise: the backward sums the REP copies' gradients first.
# HAS_V (the k launch of the fused q/k/v op): the same rows of v, a slice of the same [T, width] tensor with the same
# token stride, are copied along, to vout [R, D] and (REP > 1) REP times to vrep [R * REP, D]; backward, dv = gv +
# the sum of gvrep's REP copies (fp32, rounded once) goes to its slice of dx's tensor (token stride DXS). Why here:
# torch's copy of a strided slice ran at a fraction of the bandwidth (12 ms a step on an H100), and these rows are
# being walked anyway.


@triton.jit
def _rope_rotate(x, cos, sin, R: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr):
    """x [R, D] fp32 with dims d and d + HALF (d < HALF) rotated as a pair by cos, sin [R, HALF]: (lo, hi) ->
    (lo cos + hi sin, hi cos - lo sin); dims from 2 HALF on pass through. The partners are found by reshaping the
    registers (d = b 2 HALF + a HALF + j; only b = 0 rotates), so each row is loaded once, with contiguous loads."""
    nb: tl.constexpr = D // (2 * HALF)
    first = (tl.arange(0, nb) == 0)[None, :, None]  # [1, nb, 1]
    c = tl.where(first, cos[:, None, :], 1.0)  # [R, nb, HALF]
    s = tl.where(first, sin[:, None, :], 0.0)
    lo, hi = tl.split(tl.permute(tl.reshape(x, (R, nb, 2, HALF)), (0, 1, 3, 2)))  # [R, nb, HALF] each
    return tl.reshape(tl.permute(tl.join(lo * c + hi * s, hi * c - lo * s), (0, 1, 3, 2)), (R, D))


@triton.jit
def _qk_rope_tables(tokens, cos_ptr, sin_ptr, rmask, HALF: tl.constexpr):
    """cos, sin [R, HALF] fp32 of each row's token."""
    at = tokens[:, None] * HALF + tl.arange(0, HALF)[None, :]
    c = tl.load(cos_ptr + at, mask=rmask[:, None], other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + at, mask=rmask[:, None], other=0.0).to(tl.float32)
    return c, s


@triton.jit
def _qk_norm_rope_fwd_kernel(x_ptr, cos_ptr, sin_ptr, gain_ptr, out_ptr, rstd_ptr, v_ptr, vout_ptr, vrep_ptr, n_rows,
                             eps, XS, H: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, HAS_GAIN: tl.constexpr,
                             REP: tl.constexpr, HAS_V: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
    rmask = rows < n_rows
    d = tl.arange(0, D)  # [D]
    c, s = _qk_rope_tables(rows // H, cos_ptr, sin_ptr, rmask, HALF)  # [R, HALF]
    x_row = (rows // H).to(tl.int64) * XS + (rows % H) * D  # [R]: where the row starts in x
    x = tl.load(x_ptr + x_row[:, None] + d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)  # [R, D]
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # [R]
    r = _rope_rotate(x, c, s, BLOCK_R, D, HALF) * rstd[:, None]
    if HAS_GAIN:
        r = r * tl.load(gain_ptr + rows % H, mask=rmask, other=0.0).to(tl.float32)[:, None]
    for i in tl.static_range(REP):  # the row's copies: rows row * REP + i of out
        out_at = (rows.to(tl.int64) * REP + i)[:, None] * D + d[None, :]
        tl.store(out_ptr + out_at, r.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
    tl.store(rstd_ptr + rows, rstd, mask=rmask)
    if HAS_V:  # the rows of v, copied as they are
        v = tl.load(v_ptr + x_row[:, None] + d[None, :], mask=rmask[:, None], other=0.0)
        tl.store(vout_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], v, mask=rmask[:, None])
        if REP > 1:
            for i in tl.static_range(REP):
                rep_at = (rows.to(tl.int64) * REP + i)[:, None] * D + d[None, :]
                tl.store(vrep_ptr + rep_at, v, mask=rmask[:, None])


@triton.jit
def _rope_partners(tokens, rmask, cos_ptr, sin_ptr, D: tl.constexpr, HALF: tl.constexpr):
    """The rotation as elementwise factors over whole rows, for kernels that load each dim's partner themselves:
    rotate(x)_d = x_d c_d + x_partner(d) s_d. Returns c, s [R, D] fp32 (c = cos_j, s = +sin_j below half, -sin_j in
    [half, 2 half); c = 1, s = 0 beyond), partner [D] and rot [D] (the dims a partner is read for: d < 2 half)."""
    d = tl.arange(0, D)
    rot = d < 2 * HALF
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    mask = rmask[:, None] & rot[None, :]
    at = tokens[:, None] * HALF + (d % HALF)[None, :]
    c = tl.load(cos_ptr + at, mask=mask, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + at, mask=mask, other=0.0).to(tl.float32)
    return c, tl.where((d < HALF)[None, :], s, -s), partner, rot


@triton.jit
def _qk_norm_rope_bwd_kernel(g_ptr, x_ptr, rstd_ptr, cos_ptr, sin_ptr, gain_ptr, dx_ptr, dgain_ptr, gv_ptr, gvrep_ptr,
                             dv_ptr, n_rows, XS, DXS, H: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                             HAS_GAIN: tl.constexpr, REP: tl.constexpr, HAS_V: tl.constexpr, BLOCK_R: tl.constexpr):
    """The rotation's partners are loaded (only for the 2 half rotated dims of a row: the same cache lines as the
    row's own load), not found by reshaping registers as in the forward: the reshapes' layout conversions through
    shared memory cost the backward more than these loads (docs/benchmarks.md)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]; BLOCK_R is a multiple of H, so row i is head i % H
    rmask = rows < n_rows
    d = tl.arange(0, D)
    t, h = (rows // H).to(tl.int64), rows % H
    c, s, partner, rot = _rope_partners(t, rmask, cos_ptr, sin_ptr, D, HALF)  # [R, D], [R, D], [D], [D]
    pmask = rmask[:, None] & rot[None, :]
    g = tl.zeros((BLOCK_R, D), tl.float32)  # [R, D]: the sum of the row's REP copies' gradients
    gp = tl.zeros((BLOCK_R, D), tl.float32)  # the same at each rotated dim's partner (0 beyond 2 half)
    for i in tl.static_range(REP):
        g_row = (rows.to(tl.int64) * REP + i)[:, None] * D
        g += tl.load(g_ptr + g_row + d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        gp += tl.load(g_ptr + g_row + partner[None, :], mask=pmask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)  # [R]
    x_row = (t * XS + h * D)[:, None]
    n = tl.load(x_ptr + x_row + d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    n = n * rstd[:, None]
    gn = g * c - gp * s  # the rotation's transpose
    if HAS_GAIN:
        n_partner = tl.load(x_ptr + x_row + partner[None, :], mask=pmask, other=0.0).to(tl.float32) * rstd[:, None]
        per_row = tl.sum(g * (n * c + n_partner * s), axis=1)  # [R]
        # [H, programs]: the sum over programs then reads contiguous rows (a column sum of [programs, H] took 28 us)
        tl.store(dgain_ptr + tl.arange(0, H) * tl.num_programs(0) + pid,
                 tl.sum(tl.reshape(per_row, (BLOCK_R // H, H)), axis=0))
        gn = gn * tl.load(gain_ptr + h, mask=rmask, other=0.0).to(tl.float32)[:, None]
    dx = rstd[:, None] * (gn - n * (tl.sum(gn * n, axis=1) / D)[:, None])
    tl.store(dx_ptr + (t * DXS + h * D)[:, None] + d[None, :], dx.to(dx_ptr.dtype.element_ty), mask=rmask[:, None])
    if HAS_V:  # dv = gv + the sum of its copies' gradients
        dv = tl.load(gv_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        if REP > 1:
            for i in tl.static_range(REP):
                rep_at = (rows.to(tl.int64) * REP + i)[:, None] * D + d[None, :]
                dv += tl.load(gvrep_ptr + rep_at, mask=rmask[:, None], other=0.0).to(tl.float32)
        tl.store(dv_ptr + (t * DXS + h * D)[:, None] + d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=rmask[:, None])


# (rows a program, warps) of the q/k kernels on a GPU
QK_BLOCK = (64, 4)


def _qk_block_rows(num_heads: int, device: torch.device) -> int:
    """Rows (token heads) per program: a multiple of the head count (the gain's partial sums assume it)."""
    return max(QK_BLOCK[0] if device.type == "cuda" else 16, num_heads)


def qk_norm_rope_programs(num_rows: int, num_heads: int, device: torch.device) -> int:
    """How many programs the launches use for ``num_rows`` rows: the partial-sum buffer's length."""
    return triton.cdiv(num_rows, _qk_block_rows(num_heads, device))


def _token_stride(x: torch.Tensor) -> int:
    """The token stride (elements) of x [T, H, D] whose heads and dims are contiguous (a column slice may be)."""
    T, H, D = x.shape
    if x.stride(2) != 1 or (H > 1 and x.stride(1) != D):
        raise ValueError(f"attn_triton: expected heads and dims contiguous, got strides {x.stride()}")
    return x.stride(0)


def launch_qk_norm_rope_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gain: torch.Tensor | None,
                            out: torch.Tensor, rstd: torch.Tensor, eps: float, v: torch.Tensor | None = None,
                            v_out: torch.Tensor | None = None, v_copies: torch.Tensor | None = None) -> None:
    """x [T, H, D] (heads and dims contiguous: a column slice of a wider tensor is fine), out [T, H * rep, D]
    contiguous (rep >= 1: each head written rep times, head h to heads h * rep .. h * rep + rep - 1); cos, sin
    [T, half] contiguous; gain [H] or None; rstd [T * H] fp32 (out). With ``v`` (shaped and strided like x): its
    rows copied to ``v_out`` [T, H, D] and, when rep > 1, rep times to ``v_copies`` [T, H * rep, D] (both contiguous)."""
    T, H, D = x.shape
    if T == 0:
        return
    rep = _repeats(x, out)
    if v is not None and (v.shape != x.shape or v.stride() != x.stride() or v_out is None
                          or (rep > 1) != (v_copies is not None)):
        raise ValueError("attn_triton: v must be shaped and strided like x, with v_out, and v_copies when rep > 1")
    block = _qk_block_rows(H, x.device)
    _qk_norm_rope_fwd_kernel[(qk_norm_rope_programs(T * H, H, x.device),)](
        x, cos, sin, gain if gain is not None else x, out, rstd, x if v is None else v, out if v_out is None else v_out,
        out if v_copies is None else v_copies, T * H, float(eps), _token_stride(x), H=H, D=D, HALF=cos.shape[1],
        HAS_GAIN=gain is not None, REP=rep, HAS_V=v is not None, BLOCK_R=block, num_warps=QK_BLOCK[1])


def _repeats(x: torch.Tensor, copies: torch.Tensor) -> int:
    """How many times ``copies`` [T, H * rep, D] holds each head of x [T, H, D]."""
    T, H, D = x.shape
    if copies.dim() != 3 or copies.shape[0] != T or copies.shape[2] != D or copies.shape[1] % H:
        raise ValueError(f"attn_triton: expected [{T}, a multiple of {H}, {D}], got {tuple(copies.shape)}")
    return copies.shape[1] // H


def launch_qk_norm_rope_bwd(g: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, gain: torch.Tensor | None, dx: torch.Tensor,
                            dgain_partial: torch.Tensor | None, gv: torch.Tensor | None = None,
                            gv_copies: torch.Tensor | None = None, dv: torch.Tensor | None = None) -> None:
    """g [T, H * rep, D] contiguous (the gradient of the forward's out, rep copies per head); x, dx [T, H, D] with
    heads and dims contiguous (column slices of wider tensors are fine); dgain_partial [H, programs] fp32 (out; None
    without a gain). With ``gv`` [T, H, D] contiguous: ``dv`` (shaped and strided like dx) = gv + the sum of each
    row's rep copies in ``gv_copies`` [T, H * rep, D] (contiguous; given exactly when rep > 1)."""
    T, H, D = x.shape
    if T == 0:
        return
    rep = _repeats(x, g)
    if gv is not None and (dv is None or dv.shape != dx.shape or dv.stride() != dx.stride()
                           or (rep > 1) != (gv_copies is not None)):
        raise ValueError("attn_triton: dv must be shaped and strided like dx, with gv_copies exactly when rep > 1")
    block = _qk_block_rows(H, x.device)
    _qk_norm_rope_bwd_kernel[(qk_norm_rope_programs(T * H, H, x.device),)](
        g, x, rstd, cos, sin, gain if gain is not None else x, dx,
        dgain_partial if dgain_partial is not None else rstd, g if gv is None else gv,
        g if gv_copies is None else gv_copies, dx if dv is None else dv, T * H, _token_stride(x), _token_stride(dx),
        H=H, D=D, HALF=cos.shape[1], HAS_GAIN=gain is not None, REP=rep, HAS_V=gv is not None, BLOCK_R=block,
        num_warps=QK_BLOCK[1])


# --------------------------------------------------------------------------------------------------------------
# The q, k, v matmul with the q/k norm + RoPE (+ gain) and the k / v copies as its epilogue (Hopper, TMA)
# --------------------------------------------------------------------------------------------------------------
# x [T, K] @ w[(H + 2 Hkv) D, K]^T, one output tile = BLOCK_M tokens x HEADS_PER_TILE heads (a tile never mixes q,
# k and v heads: H and Hkv are multiples of HEADS_PER_TILE). Each head's [BLOCK_M, D] product is rounded to the
# activations' dtype first (the value an unfused matmul stores), then, per head:
#   q heads: stored to qk [T, (H + Hkv) D] (the backward's input), normed, rotated, times the gain -> q, rstd_q
#   k heads: the same without the gain -> REP copies in k [T, Hkv REP D], rstd_k
#   v heads: -> v [T, Hkv D] and REP copies in vrep [T, Hkv REP D] (REP > 1)
# The arithmetic is _qk_norm_rope_fwd_kernel's, in the same order; the rotation partners are found by reshaping
# the head's registers: dim d = b 2 HALF + a HALF + j (a = 0, 1; only b = 0 rotates). (Measured on one H100 and
# dropped: the partners as a second product with w's partner-permuted rows, 0.50 ms a call, and as a product with a
# permutation matrix and one accumulator per head, 0.42; these shuffles, 0.35.) The backward is
# _qk_norm_rope_bwd_kernel over qk (token stride (H + Hkv) D). What it saves against the matmul + the q/k/v op: the
# [T, (H + 2 Hkv) D] product is not written and read back whole; only its q and k columns are written, for the
# backward (2.5 KB a token less forward at the record's width).


@triton.jit
def _qkv_gemm_kernel(x_desc, w_desc, qk_desc, q_desc, k_desc, v_desc, vrep_desc, cos_ptr, sin_ptr, gain_ptr,
                     rstd_q_ptr, rstd_k_ptr, T, eps, K: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr,
                     D: tl.constexpr, HALF: tl.constexpr, HAS_GAIN: tl.constexpr, REP: tl.constexpr,
                     HEADS_PER_TILE: tl.constexpr, PERSISTENT: tl.constexpr, BITWISE_ROUND: tl.constexpr,
                     NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    tiles_n: tl.constexpr = (H + 2 * HKV) // HEADS_PER_TILE
    if PERSISTENT:
        # (not flatten=True as in the MLP kernel: Triton 3.6's loop fusion fails on this epilogue's branches)
        for tile in tl.range(tl.program_id(0), tl.cdiv(T, BLOCK_M) * tiles_n, NUM_PROGRAMS):
            _qkv_gemm_tile(x_desc, w_desc, qk_desc, q_desc, k_desc, v_desc, vrep_desc, cos_ptr, sin_ptr, gain_ptr,
                           rstd_q_ptr, rstd_k_ptr, T, eps, tile, K, H, HKV, D, HALF, HAS_GAIN, REP, HEADS_PER_TILE,
                           BITWISE_ROUND, BLOCK_M, BLOCK_K)
    else:  # one program per tile (the interpreter cannot loop from a program id)
        _qkv_gemm_tile(x_desc, w_desc, qk_desc, q_desc, k_desc, v_desc, vrep_desc, cos_ptr, sin_ptr, gain_ptr,
                       rstd_q_ptr, rstd_k_ptr, T, eps, tl.program_id(0), K, H, HKV, D, HALF, HAS_GAIN, REP,
                       HEADS_PER_TILE, BITWISE_ROUND, BLOCK_M, BLOCK_K)


@triton.jit
def _qkv_gemm_tile(x_desc, w_desc, qk_desc, q_desc, k_desc, v_desc, vrep_desc, cos_ptr, sin_ptr, gain_ptr,
                   rstd_q_ptr, rstd_k_ptr, T, eps, tile, K: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr,
                   D: tl.constexpr, HALF: tl.constexpr, HAS_GAIN: tl.constexpr, REP: tl.constexpr,
                   HEADS_PER_TILE: tl.constexpr, BITWISE_ROUND: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """One [BLOCK_M, HEADS_PER_TILE D] tile of :func:`_qkv_gemm_kernel`."""
    tiles_n: tl.constexpr = (H + 2 * HKV) // HEADS_PER_TILE
    row = (tile // tiles_n) * BLOCK_M  # consecutive tiles share a row block of x (w stays in L2)
    head = (tile % tiles_n) * HEADS_PER_TILE  # the tile's first head, counted over q, k, v
    acc = tl.zeros((BLOCK_M, HEADS_PER_TILE * D), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc = tl.dot(x_desc.load([row, k0]), w_desc.load([head * D, k0]).T, acc)  # [BM, BK] @ [BK, HPT D]
    rows = row + tl.arange(0, BLOCK_M)  # [BM]
    rmask = rows < T
    if HEADS_PER_TILE == 1:
        _qkv_head_epilogue(acc, head, row, rows, rmask, qk_desc, q_desc, k_desc, v_desc, vrep_desc, cos_ptr, sin_ptr,
                           gain_ptr, rstd_q_ptr, rstd_k_ptr, eps, H, HKV, D, HALF, HAS_GAIN, REP, BITWISE_ROUND,
                           BLOCK_M)
    else:
        pair = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, D)), (0, 2, 1)))  # 2 x [BM, D]
        for i in tl.static_range(2):
            _qkv_head_epilogue(pair[i], head + i, row, rows, rmask, qk_desc, q_desc, k_desc, v_desc, vrep_desc,
                               cos_ptr, sin_ptr, gain_ptr, rstd_q_ptr, rstd_k_ptr, eps, H, HKV, D, HALF, HAS_GAIN,
                               REP, BITWISE_ROUND, BLOCK_M)


@triton.jit
def _qkv_head_epilogue(c, head, row, rows, rmask, qk_desc, q_desc, k_desc, v_desc, vrep_desc, cos_ptr, sin_ptr,
                       gain_ptr, rstd_q_ptr, rstd_k_ptr, eps, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                       HALF: tl.constexpr, HAS_GAIN: tl.constexpr, REP: tl.constexpr, BITWISE_ROUND: tl.constexpr,
                       BLOCK_M: tl.constexpr):
    """Head ``head`` (over q, k, v) of one row block: c [BM, D] fp32, the product before rounding."""
    xb = _narrow(c, qk_desc.dtype, BITWISE_ROUND)  # [BM, D]
    if head < H + HKV:
        qk_desc.store([row, head * D], xb)
        x = xb.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # [BM]
        cos, sin = _qk_rope_tables(rows, cos_ptr, sin_ptr, rmask, HALF)  # [BM, HALF]
        r = _rope_rotate(x, cos, sin, BLOCK_M, D, HALF) * rstd[:, None]  # [BM, D]
        if head < H:
            if HAS_GAIN:
                r = r * tl.load(gain_ptr + head).to(tl.float32)
            q_desc.store([row, head * D], _narrow(r, q_desc.dtype, BITWISE_ROUND))
            tl.store(rstd_q_ptr + rows * H + head, rstd, mask=rmask)
        else:
            rk = _narrow(r, k_desc.dtype, BITWISE_ROUND)
            for i in tl.static_range(REP):
                k_desc.store([row, ((head - H) * REP + i) * D], rk)
            tl.store(rstd_k_ptr + rows * HKV + (head - H), rstd, mask=rmask)
    else:
        v_desc.store([row, (head - H - HKV) * D], xb)
        if REP > 1:
            for i in tl.static_range(REP):
                vrep_desc.store([row, ((head - H - HKV) * REP + i) * D], xb)


# (BLOCK_M, heads per tile, BLOCK_K, warps, pipeline stages, programs per SM as in triton_kernels.TMA_TILES) at the
# record's shapes (K = 512, D = 64): the fastest of benchmarks/qkv_kernel_bench.py --sweep-tiles on one H100
# (docs/benchmarks.md)
QKV_GEMM_TILE = (128, 2, 64, 8, 3, 0)
# The warp-specialized Gluon form of the kernel (pgolf.model.gluon_qkv) where it applies (an sm_90 GPU, 64-dim heads,
# a triton whose Gluon builds it; never with an explicit ``tile``, which names a Triton tile). One H200, torch
# attention, looping off: 694.5 -> 685.8 ms/step (docs/benchmarks.md, 2026-12-07). Read as source by the bundler
# (pgolf.artifact.fold.left_out_modules): a literal True or False.
QKV_WARP_SPECIALIZED = True


def hopper_tma_available() -> bool:
    """Whether this process's CUDA device can run the TMA kernels (sm90+, and a triton with tensor descriptors)."""
    return _TensorDescriptor is not None and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def qkv_gemm_usable(x: torch.Tensor, w: torch.Tensor, num_heads: int, num_kv_heads: int) -> bool:
    """Whether :func:`launch_qkv_gemm_norm_rope` takes these operands: Hopper TMA (CUDA sm90+, one 16-bit dtype,
    16-byte aligned rows) and head dims of 16 bytes up to 64 dims. Wider heads take the matmul and the q/k kernels:
    QKV_GEMM_TILE's pipeline would not fit in shared memory at 128 dims, nor the TMA box at 256, and no other tile
    was measured."""
    D = w.shape[0] // (num_heads + 2 * num_kv_heads)
    return (x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1] and _tma_usable(x, w)
            and w.shape[0] == (num_heads + 2 * num_kv_heads) * D and D * x.element_size() >= 16 and D <= 64)


def launch_qkv_gemm_norm_rope(x: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                              gain: torch.Tensor | None, eps: float, qk: torch.Tensor, q: torch.Tensor,
                              k: torch.Tensor, v: torch.Tensor, v_copies: torch.Tensor | None, rstd_q: torch.Tensor,
                              rstd_k: torch.Tensor, tile: tuple | None = None, bitwise_round: bool = False) -> None:
    """x [T, K], w [(H + 2 Hkv) D, K] (contiguous, one 16-bit dtype); outputs contiguous: qk [T, (H + Hkv) D], q [T,
    H, D], k [T, Hkv rep, D], v [T, Hkv, D], v_copies [T, Hkv rep, D] (exactly when rep > 1), rstd_q [T * H] and
    rstd_k [T * Hkv] fp32; cos, sin [T, half] and gain [H] in x's dtype. ``tile``: a QKV_GEMM_TILE (0 programs per
    SM: one program per tile, the interpreter's form); ``bitwise_round``: the interpreter's rounding (see
    triton_kernels._narrow)."""
    T, K = x.shape
    _, H, D = q.shape
    hkv = v.shape[1]
    rep = _repeats(v, k)
    if T == 0:
        return
    if (rep > 1) != (v_copies is not None):
        raise ValueError("attn_triton: v_copies is given exactly when k holds more than one copy of each head")
    if tile is None and not bitwise_round and QKV_WARP_SPECIALIZED:
        from pgolf.model import gluon_qkv  # imported only here: a bundle leaves it out while the switch is off

        if gluon_qkv.ws_usable(x, H, hkv, D) and gluon_qkv.launch_or_decline(x, w, cos, sin, gain, eps, qk, q, k, v,
                                                                             v_copies, rstd_q, rstd_k, rep):
            return
    bm, per_tile, bk, warps, stages, per_sm = tile or QKV_GEMM_TILE
    if per_tile not in (1, 2):
        raise ValueError(f"attn_triton: a qkv tile holds 1 or 2 heads, got {per_tile}")
    per_tile = per_tile if H % per_tile == 0 and hkv % per_tile == 0 else 1  # a tile never mixes q, k and v heads
    tiles = triton.cdiv(T, bm) * ((H + 2 * hkv) // per_tile)
    programs = persistent_programs(per_sm, tiles, x.device)
    desc = _TensorDescriptor.from_tensor
    k2 = k.view(T, -1)
    _qkv_gemm_kernel[(programs,)](
        desc(x, [bm, bk]), desc(w, [per_tile * D, bk]), desc(qk, [bm, D]), desc(q.view(T, -1), [bm, D]),
        desc(k2, [bm, D]), desc(v.view(T, -1), [bm, D]),
        desc(k2 if v_copies is None else v_copies.view(T, -1), [bm, D]),
        cos, sin, gain if gain is not None else x, rstd_q, rstd_k, T, float(eps), K=K, H=H, HKV=hkv, D=D,
        HALF=cos.shape[1], HAS_GAIN=gain is not None, REP=rep, HEADS_PER_TILE=per_tile, PERSISTENT=per_sm > 0,
        BITWISE_ROUND=bitwise_round, NUM_PROGRAMS=programs, BLOCK_M=bm, BLOCK_K=bk, num_warps=warps,
        num_stages=stages)


# --------------------------------------------------------------------------------------------------------------
# XSA (the component of each head's output along its own token's unit value vector removed) and the output gate
# --------------------------------------------------------------------------------------------------------------
# Rows are the (token, kv head) pairs: y [R = T * Hkv, G, D] (the G query heads that share the kv head), v [R, D],
# z [R, G] (the gate's pre-activation). Per row, in fp32:
#   vh = v / max(|v|, eps),  p = y . vh  [G],  a = y - p vh  (XSA; a = y without it)
#   g = sigmoid(scale * z)  [G],  out = a * g  (out = a without the gate)
# Backward, with go = d loss / d out:
#   dz = scale * g (1 - g) * (go . a),  da = go * g
#   dy = da - (da . vh) vh,  dvh = -sum over G of ((da . vh) y + p da)
#   dv = (dvh - vh (vh . dvh)) / |v| where |v| >= eps, else dvh / eps   (F.normalize's clamp)


@triton.jit
def _xsa_gate_load(y_ptr, v_ptr, z_ptr, rows, rmask, scale, eps, G: tl.constexpr, D: tl.constexpr,
                   HAS_XSA: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK_R: tl.constexpr):
    """y [R, G, D], v and vh [R, D], |v| [R], p [R, G], a [R, G, D], g [R, G] (fp32) of the rows."""
    gi = tl.arange(0, G)
    d = tl.arange(0, D)
    m3 = rmask[:, None, None]
    y = tl.load(y_ptr + (rows[:, None, None] * G + gi[None, :, None]) * D + d[None, None, :], mask=m3,
                other=0.0).to(tl.float32)
    a = y
    v = tl.zeros((BLOCK_R, D), tl.float32)
    vh = v
    norm = tl.zeros((BLOCK_R,), tl.float32)
    p = tl.zeros((BLOCK_R, G), tl.float32)
    if HAS_XSA:
        v = tl.load(v_ptr + rows[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(v * v, axis=1))
        vh = v / tl.maximum(norm, eps)[:, None]
        p = tl.sum(y * vh[:, None, :], axis=2)
        a = y - p[:, :, None] * vh[:, None, :]
    g = tl.full((BLOCK_R, G), 1.0, tl.float32)
    if HAS_GATE:
        z = tl.load(z_ptr + rows[:, None] * G + gi[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        g = tl.sigmoid(scale * z)
    return y, vh, norm, p, a, g


@triton.jit
def _xsa_gate_fwd_kernel(y_ptr, v_ptr, z_ptr, out_ptr, n_rows, scale, eps, G: tl.constexpr, D: tl.constexpr,
                         HAS_XSA: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    _, _, _, _, a, g = _xsa_gate_load(y_ptr, v_ptr, z_ptr, rows, rmask, scale, eps, G, D, HAS_XSA, HAS_GATE, BLOCK_R)
    out = a * g[:, :, None]
    at = (rows[:, None, None] * G + tl.arange(0, G)[None, :, None]) * D + tl.arange(0, D)[None, None, :]
    tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=rmask[:, None, None])


@triton.jit
def _xsa_gate_bwd_kernel(go_ptr, y_ptr, v_ptr, z_ptr, dy_ptr, dv_ptr, dz_ptr, n_rows, scale, eps,
                         G: tl.constexpr, D: tl.constexpr, HAS_XSA: tl.constexpr, HAS_GATE: tl.constexpr,
                         BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    y, vh, norm, p, a, g = _xsa_gate_load(y_ptr, v_ptr, z_ptr, rows, rmask, scale, eps, G, D, HAS_XSA, HAS_GATE, BLOCK_R)
    gi = tl.arange(0, G)
    d = tl.arange(0, D)
    at = (rows[:, None, None] * G + gi[None, :, None]) * D + d[None, None, :]
    go = tl.load(go_ptr + at, mask=rmask[:, None, None], other=0.0).to(tl.float32)  # [R, G, D]
    da = go
    if HAS_GATE:
        dz = scale * g * (1.0 - g) * tl.sum(go * a, axis=2)  # [R, G]
        tl.store(dz_ptr + rows[:, None] * G + gi[None, :], dz.to(dz_ptr.dtype.element_ty), mask=rmask[:, None])
        da = go * g[:, :, None]
    dy = da
    if HAS_XSA:
        q = tl.sum(da * vh[:, None, :], axis=2)  # [R, G]
        dy = da - q[:, :, None] * vh[:, None, :]
        dvh = -tl.sum(q[:, :, None] * y + p[:, :, None] * da, axis=1)  # [R, D]
        n = tl.maximum(norm, eps)
        radial = tl.where(norm >= eps, tl.sum(vh * dvh, axis=1), 0.0)
        dv = (dvh - vh * radial[:, None]) / n[:, None]
        tl.store(dv_ptr + rows[:, None] * D + d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=rmask[:, None])
    tl.store(dy_ptr + at, dy.to(dy_ptr.dtype.element_ty), mask=rmask[:, None, None])


def _xsa_gate_launch(y: torch.Tensor, v: torch.Tensor | None, z: torch.Tensor | None, device: torch.device):
    """(grid, rows, compile-time arguments) of either XSA + gate kernel: rows are (token, kv head) pairs, 16 per
    program on CUDA (4 query heads of 64 dims: 4,096 elements), 4 in the interpreter."""
    T, H, D = y.shape
    hkv = v.shape[1] if v is not None else H
    block = 16 if device.type == "cuda" else 4
    meta = dict(G=H // hkv, D=D, HAS_XSA=v is not None, HAS_GATE=z is not None, BLOCK_R=block, num_warps=4)
    return (triton.cdiv(T * hkv, block),), T * hkv, meta


def launch_xsa_gate_fwd(y: torch.Tensor, v: torch.Tensor | None, z: torch.Tensor | None, out: torch.Tensor,
                        scale: float, eps: float) -> None:
    """y, out [T, H, D] contiguous; v [T, Hkv, D] contiguous or None (no XSA); z [T, H] contiguous or None."""
    if y.shape[0] == 0:
        return
    grid, rows, meta = _xsa_gate_launch(y, v, z, y.device)
    _xsa_gate_fwd_kernel[grid](y, v if v is not None else y, z if z is not None else y, out, rows, float(scale),
                               float(eps), **meta)


def launch_xsa_gate_bwd(go: torch.Tensor, y: torch.Tensor, v: torch.Tensor | None, z: torch.Tensor | None,
                        dy: torch.Tensor, dv: torch.Tensor | None, dz: torch.Tensor | None, scale: float,
                        eps: float) -> None:
    """go, y, dy [T, H, D]; v, dv [T, Hkv, D] or None; z, dz [T, H] or None; all contiguous."""
    if y.shape[0] == 0:
        return
    grid, rows, meta = _xsa_gate_launch(y, v, z, y.device)
    _xsa_gate_bwd_kernel[grid](go, y, v if v is not None else y, z if z is not None else y, dy,
                               dv if dv is not None else dy, dz if dz is not None else dy, rows, float(scale),
                               float(eps), **meta)


# --------------------------------------------------------------------------------------------------------------
# The output gate's projection: a linear layer with a handful of inputs
# --------------------------------------------------------------------------------------------------------------
# z [T, N] = x [T, K] @ w [N, K]^T with K = the gate window (12) and N = the heads (8): as cuBLAS GEMMs (K = 12)
# it and its two gradients ran as 32 x 32 wmma kernels, 4.1 ms a step looping off on one H100. Per token, in fp32:
#   z = x . w^T;  backward, with g = d loss / d z:  dx = g w,  dw = sum over tokens of g^T x
# dw as per-program partial sums [N * K, programs], summed by torch in program order: deterministic.


@triton.jit
def _gate_linear_tile(x_ptr, w_ptr, T, XS, N: tl.constexpr, K: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr,
                      BLOCK_T: tl.constexpr):
    """The program's tokens [BT], their x [BT, KP] and w [NP, KP] (fp32, zero-padded) and the masks."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    n = tl.arange(0, NP)
    k = tl.arange(0, KP)
    tm = t < T
    x = tl.load(x_ptr + t[:, None].to(tl.int64) * XS + k[None, :], mask=tm[:, None] & (k < K)[None, :],
                other=0.0).to(tl.float32)
    w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=(n < N)[:, None] & (k < K)[None, :],
                other=0.0).to(tl.float32)
    return t, n, k, tm, x, w


@triton.jit
def _gate_linear_fwd_kernel(x_ptr, w_ptr, z_ptr, T, XS, N: tl.constexpr, K: tl.constexpr, NP: tl.constexpr,
                            KP: tl.constexpr, BLOCK_T: tl.constexpr):
    t, n, k, tm, x, w = _gate_linear_tile(x_ptr, w_ptr, T, XS, N, K, NP, KP, BLOCK_T)
    z = tl.sum(x[:, None, :] * w[None, :, :], axis=2)  # [BT, NP]
    tl.store(z_ptr + t[:, None].to(tl.int64) * N + n[None, :], z.to(z_ptr.dtype.element_ty),
             mask=tm[:, None] & (n < N)[None, :])


@triton.jit
def _gate_linear_bwd_kernel(g_ptr, x_ptr, w_ptr, dx_ptr, dw_partial_ptr, T, XS, N: tl.constexpr, K: tl.constexpr,
                            NP: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr):
    t, n, k, tm, x, w = _gate_linear_tile(x_ptr, w_ptr, T, XS, N, K, NP, KP, BLOCK_T)
    g = tl.load(g_ptr + t[:, None].to(tl.int64) * N + n[None, :], mask=tm[:, None] & (n < N)[None, :],
                other=0.0).to(tl.float32)  # [BT, NP]
    dx = tl.sum(g[:, :, None] * w[None, :, :], axis=1)  # [BT, KP]
    tl.store(dx_ptr + t[:, None].to(tl.int64) * K + k[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=tm[:, None] & (k < K)[None, :])
    dw = tl.sum(g[:, :, None] * x[:, None, :], axis=0)  # [NP, KP]
    at = (n[:, None] * K + k[None, :]) * tl.num_programs(0) + tl.program_id(0)  # [N * K, programs]: rows summed
    tl.store(dw_partial_ptr + at, dw, mask=(n < N)[:, None] & (k < K)[None, :])


def _gate_linear_meta(x: torch.Tensor, w: torch.Tensor) -> dict:
    N, K = w.shape
    block = 64 if x.device.type == "cuda" else 8  # 64 x 8 x 16 fp32 products: 64 registers a thread, 4 warps
    return dict(N=N, K=K, NP=triton.next_power_of_2(N), KP=triton.next_power_of_2(K), BLOCK_T=block, num_warps=4)


def gate_linear_programs(x: torch.Tensor, w: torch.Tensor) -> int:
    """How many programs the gate launches use for x [T, K]: the weight gradient's partial-sum count."""
    return triton.cdiv(x.shape[0], _gate_linear_meta(x, w)["BLOCK_T"])


def launch_gate_linear_fwd(x: torch.Tensor, w: torch.Tensor, z: torch.Tensor) -> None:
    """z [T, N] (contiguous, out) = x [T, K] @ w [N, K]^T; x's columns contiguous (a column slice is fine), w
    contiguous."""
    if x.shape[0] == 0:
        return
    _gate_linear_fwd_kernel[(gate_linear_programs(x, w),)](x, w, z, x.shape[0], x.stride(0), **_gate_linear_meta(x, w))


def launch_gate_linear_bwd(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, dx: torch.Tensor,
                           dw_partial: torch.Tensor) -> None:
    """dx [T, K] (contiguous, out) = g [T, N] @ w; dw_partial [N * K, programs] fp32 (out): per program, its
    tokens' g^T x."""
    if x.shape[0] == 0:
        return
    _gate_linear_bwd_kernel[(gate_linear_programs(x, w),)](g, x, w, dx, dw_partial, x.shape[0], x.stride(0),
                                                            **_gate_linear_meta(x, w))
