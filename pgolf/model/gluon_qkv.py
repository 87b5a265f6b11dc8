"""The q, k, v matmul with the q/k norm, RoPE, q gain and the k / v copies as its epilogue
(:func:`pgolf.model.attn_triton.launch_qkv_gemm_norm_rope`) as a warp-specialized Hopper kernel (Gluon).

Why: as in the MLP kernel (:mod:`pgolf.model.gluon_mlp`, whose producer warp and turn-taking consumer warpgroups
this kernel reuses), K = 512 makes a tile's products as short as its epilogue, which here writes up to six
[BM, D] blocks a head; with two consumers taking turns, one's epilogue runs under the other's products.

The epilogue is the Triton kernel's, operation for operation (``attn_triton._qkv_head_epilogue``): the product
rounded to bf16 and stored (qk, or v and its copies), its row norm, the rotation of the first 2 HALF dims by the
row's cos / sin, the q gain, then q or the k copies and the rstd rows. A tile is two heads ([BM, 2 D]) that are
all q, all k or all v (H and Hkv even).
"""
from __future__ import annotations

import torch
import triton

from pgolf.model import gluon_mlp as _ws

if _ws.gluon is not None:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

    _tma_store = _ws._tma_store

# (BLOCK_M, BLOCK_K, ring stages, store buffer sets a consumer: two [BM, D] buffers a set)
WS_QKV_TILE = (128, 64, 5, 1)
unsupported: str | None = None  # as gluon_mlp.unsupported

if _ws.gluon is not None:

    @gluon.jit
    def _qkv_head(c, head, row, T, bufs, buf: gl.constexpr, qk_desc, q_desc, k_desc, v_desc, vrep_desc, cos_ptr,
                  sin_ptr, gain_ptr, rstd_q_ptr, rstd_k_ptr, eps, H: gl.constexpr, HKV: gl.constexpr,
                  D: gl.constexpr, HALF: gl.constexpr, HAS_GAIN: gl.constexpr, REP: gl.constexpr,
                  BLOCK_M: gl.constexpr):
        """Head ``head`` (over q, k, v) of one row block: c [BM, D] fp32, the product before rounding; its stores
        go through ``bufs`` ``buf`` (the rounded product) and ``buf + 1`` (the normed, rotated q or k)."""
        L: gl.constexpr = c.type.layout
        xb = c.to(gl.bfloat16)  # [BM, D]
        bufs.index(buf).store(xb)
        fence_async_shared()
        if head < H + HKV:
            _tma_store(qk_desc, [row, head * D], bufs.index(buf))
            x = xb.to(gl.float32)
            rstd = 1.0 / gl.sqrt(gl.sum(x * x, axis=1) / D + eps)  # [BM]
            nb: gl.constexpr = D // (2 * HALF)
            lo, hi = gl.split(gl.permute(gl.reshape(x, (BLOCK_M, nb, 2, HALF)), (0, 1, 3, 2)))  # [BM, nb, HALF]
            L3: gl.constexpr = lo.type.layout
            rows3 = row + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))  # [BM]
            j3 = gl.arange(0, HALF, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))  # [HALF]
            b3 = gl.arange(0, nb, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))  # [nb]
            rows_e = gl.expand_dims(gl.expand_dims(rows3, 1), 2)  # [BM, 1, 1]
            at = rows_e * HALF + gl.expand_dims(gl.expand_dims(j3, 0), 1)  # [BM, 1, HALF]
            cos = gl.load(cos_ptr + at, mask=rows_e < T, other=1.0).to(gl.float32)
            sin = gl.load(sin_ptr + at, mask=rows_e < T, other=0.0).to(gl.float32)
            first = gl.expand_dims(gl.expand_dims(b3 == 0, 0), 2)  # [1, nb, 1]: only dims below 2 HALF rotate
            cos, sin = gl.where(first, cos, 1.0), gl.where(first, sin, 0.0)  # [BM, nb, HALF]
            rstd3 = gl.expand_dims(gl.expand_dims(gl.convert_layout(rstd, rows3.type.layout), 1), 2)  # [BM, 1, 1]
            r_lo = (lo * cos + hi * sin) * rstd3
            r_hi = (hi * cos - lo * sin) * rstd3
            r = gl.reshape(gl.permute(gl.join(r_lo, r_hi), (0, 1, 3, 2)), (BLOCK_M, D))  # [BM, D]
            rows = row + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, L))  # [BM], rstd's layout
            if head < H:
                if HAS_GAIN:
                    r = r * gl.load(gain_ptr + head).to(gl.float32)
                bufs.index(buf + 1).store(r.to(gl.bfloat16))
                fence_async_shared()
                _tma_store(q_desc, [row, head * D], bufs.index(buf + 1))
                gl.store(rstd_q_ptr + rows * H + head, rstd, mask=rows < T)
            else:
                bufs.index(buf + 1).store(r.to(gl.bfloat16))
                fence_async_shared()
                for i in gl.static_range(REP):
                    _tma_store(k_desc, [row, ((head - H) * REP + i) * D], bufs.index(buf + 1))
                gl.store(rstd_k_ptr + rows * HKV + (head - H), rstd, mask=rows < T)
        else:
            _tma_store(v_desc, [row, (head - H - HKV) * D], bufs.index(buf))
            if REP > 1:
                for i in gl.static_range(REP):
                    _tma_store(vrep_desc, [row, ((head - H - HKV) * REP + i) * D], bufs.index(buf))

    @gluon.jit
    def _qkv_consumer(a_ring, b_ring, bufs, ready, empty, turns, qk_desc, q_desc, k_desc, v_desc, vrep_desc, cos_ptr,
                      sin_ptr, gain_ptr, rstd_q_ptr, rstd_k_ptr, T, eps, CONSUMER: gl.constexpr, K: gl.constexpr,
                      H: gl.constexpr, HKV: gl.constexpr, D: gl.constexpr, HALF: gl.constexpr,
                      HAS_GAIN: gl.constexpr, REP: gl.constexpr, NUM_PROGRAMS: gl.constexpr,
                      BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, EPI_BUFS: gl.constexpr):
        """One warpgroup: this program's tiles CONSUMER, CONSUMER + 2, ...: its turn at the products, then the two
        heads' epilogues."""
        tiles_n: gl.constexpr = (H + 2 * HKV) // 2
        tiles = gl.cdiv(T, BLOCK_M) * tiles_n
        KT: gl.constexpr = K // BLOCK_K
        turn = 0
        for tile in range(gl.program_id(0) + CONSUMER * NUM_PROGRAMS, tiles, 2 * NUM_PROGRAMS):
            row = (tile // tiles_n) * BLOCK_M
            head = (tile % tiles_n) * 2  # the tile's first head, counted over q, k, v
            acc = _ws._tile_products(a_ring, b_ring, ready, empty, turns, 2 * turn + CONSUMER, turn, CONSUMER,
                                     False, KT, STAGES, BLOCK_M, 2 * D)
            pair = gl.split(gl.permute(gl.reshape(acc, (BLOCK_M, 2, D)), (0, 2, 1)))  # 2 x [BM, D]
            for i in gl.static_range(2):
                if i % EPI_BUFS == 0:
                    tma.store_wait(pendings=0)  # this consumer's earlier stores have read their buffers
                _qkv_head(pair[i], head + i, row, T, bufs, (CONSUMER * EPI_BUFS + i % EPI_BUFS) * 2, qk_desc, q_desc,
                          k_desc, v_desc, vrep_desc, cos_ptr, sin_ptr, gain_ptr, rstd_q_ptr, rstd_k_ptr, eps, H, HKV,
                          D, HALF, HAS_GAIN, REP, BLOCK_M)
            turn += 1
        tma.store_wait(pendings=0)

    @gluon.jit
    def _qkv_ws_kernel(x_desc, w_desc, qk_desc, q_desc, k_desc, v_desc, vrep_desc, cos_ptr, sin_ptr, gain_ptr,
                       rstd_q_ptr, rstd_k_ptr, T, eps, K: gl.constexpr, H: gl.constexpr, HKV: gl.constexpr,
                       D: gl.constexpr, HALF: gl.constexpr, HAS_GAIN: gl.constexpr, REP: gl.constexpr,
                       NUM_PROGRAMS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr,
                       STAGES: gl.constexpr, EPI_BUFS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                       PRODUCER_REGS: gl.constexpr):
        a_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        b_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, 2 * D, BLOCK_K], w_desc.layout)
        bufs = gl.allocate_shared_memory(gl.bfloat16, [4 * EPI_BUFS, BLOCK_M, D], qk_desc.layout)
        ready, empty, turns = _ws._ring_barriers(STAGES)
        N = (H + 2 * HKV) * D
        gl.warp_specialize([
            (_qkv_consumer, (a_ring, b_ring, bufs, ready, empty, turns, qk_desc, q_desc, k_desc, v_desc, vrep_desc,
                             cos_ptr, sin_ptr, gain_ptr, rstd_q_ptr, rstd_k_ptr, T, eps, 0, K, H, HKV, D, HALF,
                             HAS_GAIN, REP, NUM_PROGRAMS, BLOCK_M, BLOCK_K, STAGES, EPI_BUFS)),
            (_qkv_consumer, (a_ring, b_ring, bufs, ready, empty, turns, qk_desc, q_desc, k_desc, v_desc, vrep_desc,
                             cos_ptr, sin_ptr, gain_ptr, rstd_q_ptr, rstd_k_ptr, T, eps, 1, K, H, HKV, D, HALF,
                             HAS_GAIN, REP, NUM_PROGRAMS, BLOCK_M, BLOCK_K, STAGES, EPI_BUFS)),
            # the MLP kernel's producer, forward form (no pre tiles: its barriers and buffers are not touched)
            (_ws._producer, (x_desc, w_desc, qk_desc, a_ring, b_ring, bufs, ready, empty, turns, turns, T, N, K,
                             False, False, NUM_PROGRAMS, BLOCK_M, 2 * D, BLOCK_K, STAGES)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def ws_usable(x: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the warp-specialized kernel takes these operands (attn_triton.qkv_gemm_usable holds): Gluon that
    builds it, an sm_90 GPU, bf16, 64-dim heads two to a tile (even head counts), K whole 64-wide steps."""
    if unsupported is not None or not _ws.on_gluon_sm90(x):
        return False
    return (x.dtype == torch.bfloat16 and head_dim == 64 and num_heads % 2 == 0 and num_kv_heads % 2 == 0
            and x.shape[1] % WS_QKV_TILE[1] == 0)


def launch_qkv_ws(x, w, cos, sin, gain, eps, qk, q, k, v, v_copies, rstd_q, rstd_k, rep: int, tile=None):
    """attn_triton.launch_qkv_gemm_norm_rope's outputs (the same arguments, already checked there; ``rep``: the
    copies of each k / v head) from the Gluon kernel; ``tile``: a WS_QKV_TILE (benchmarks). Returns the kernel."""
    T, K = x.shape
    _, H, D = q.shape
    hkv = v.shape[1]
    bm, bk, stages, epi_bufs = tile or WS_QKV_TILE
    programs = _ws.one_program_an_sm(x.device, triton.cdiv(T, bm) * (H + 2 * hkv) // 2)
    desc = _ws.tma_desc
    k2 = k.view(T, -1)
    return _qkv_ws_kernel[(programs,)](
        desc(x, [bm, bk]), desc(w, [2 * D, bk]), desc(qk, [bm, D]), desc(q.view(T, -1), [bm, D]), desc(k2, [bm, D]),
        desc(v.view(T, -1), [bm, D]), desc(k2 if v_copies is None else v_copies.view(T, -1), [bm, D]),
        cos, sin, gain if gain is not None else x, rstd_q, rstd_k, T, float(eps), K=K, H=H, HKV=hkv, D=D,
        HALF=cos.shape[1], HAS_GAIN=gain is not None, REP=rep, NUM_PROGRAMS=programs, BLOCK_M=bm, BLOCK_K=bk,
        STAGES=stages, EPI_BUFS=epi_bufs, CONSUMER_REGS=_ws._CONSUMER_REGS, PRODUCER_REGS=_ws._PRODUCER_REGS,
        num_warps=4,
    )


def launch_or_decline(*args, **kwargs) -> bool:
    """:func:`launch_qkv_ws`, or False (one warning) where this triton's Gluon cannot build it: as
    :func:`pgolf.model.gluon_mlp.launch_or_decline`."""
    global unsupported
    ok, unsupported = _ws.try_launch(launch_qkv_ws, "q, k, v", args, kwargs)
    return ok
