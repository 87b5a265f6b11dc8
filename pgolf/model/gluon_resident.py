"""The Gluon MLP kernel of :mod:`pgolf.model.gluon_mlp` with a's row panel resident in shared memory (sm_90).

Why: at the record's shapes (K = d = 512) a [128, 128] tile's products read 2 x 128 KB of operands through L2, about
9 TB/s at gluon_mlp's speed (0.36 ms a call on an H200), near what L2 delivers. Here a program takes whole row blocks:
their [BM, K] panel of a (128 KB) is loaded once and stays while the ring streams b for every column tile of the
block, so a tile reads only b's 128 KB. The two consumer warpgroups take alternate column tiles and turns on the
tensor cores as in gluon_mlp; the epilogue runs in [BM, BN / 4] column quarters (the panel leaves little shared
memory); backward, a second producer warp streams each tile's pre quarters into its consumer's two-slot ring.

Same arithmetic as gluon_mlp (products in BLOCK_K steps in order, fp32 accumulation, the hardware cast, the same
activation formulas); the GPU test checks the bits against the TMA kernel. Switched by ``gluon_mlp.RESIDENT``;
imported only there, so a bundle leaves this module out while the switch is off.
"""
from __future__ import annotations

import torch
import triton

from pgolf.model.gluon_mlp import (_CONSUMER_REGS, _PRODUCER_REGS, gluon, one_program_an_sm, tma_desc,
                                   try_launch)

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
    from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_wait

    from pgolf.model.gluon_mlp import _ring_barriers, _tma_load, _tma_store

# (BLOCK_M, BLOCK_N, BLOCK_K, ring stages) per direction (backward: True), of the 227 KB: the panel [128, 512] 128 KB,
# the [128, 32] store quarters 32 KB (forward: pre and post, a consumer) or 16 and the pre quarters' slots 32
# (backward), the ring's [128, 64] stages 16 KB each
TILES = {False: (128, 128, 64, 4), True: (128, 128, 64, 3)}
_SHARED_BYTES = 227 * 1024  # an sm_90 block's shared memory
# Why this process's triton could not build the kernel; set once, then gluon_mlp's kernel runs. None: not tried, or
# it built.
unsupported: str | None = None

if gluon is not None:

    @gluon.jit
    def _producer(a_desc, b_desc, a_panel, b_ring, a_ready, a_free, ready, empty, M, N, K: gl.constexpr,
                  B_KN: gl.constexpr, NUM_PROGRAMS: gl.constexpr, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """One warp: per row block, its a panel (once the block before has been read: ``a_free``), chunk kk just
        before b's k-step kk of the first column tile; b's k-steps of every column tile through the ring."""
        tiles_n = N // BLOCK_N
        KT: gl.constexpr = K // BLOCK_K
        g = 0
        panel = 0
        for block in range(gl.program_id(0), gl.cdiv(M, BLOCK_M), NUM_PROGRAMS):
            for j in range(tiles_n):
                for kk in gl.static_range(KT):
                    if j == 0:
                        if kk == 0:
                            mbarrier.wait(a_free.index(0), (panel & 1) ^ 1)  # the first panel finds it free
                        mbarrier.expect(a_ready.index(kk), BLOCK_M * BLOCK_K * 2)
                        _tma_load(a_desc, [block * BLOCK_M, kk * BLOCK_K], a_ready.index(kk), a_panel.index(kk))
                    s = g % STAGES
                    mbarrier.wait(empty.index(s), ((g // STAGES) & 1) ^ 1)
                    mbarrier.expect(ready.index(s), BLOCK_N * BLOCK_K * 2)
                    if B_KN:
                        _tma_load(b_desc, [kk * BLOCK_K, j * BLOCK_N], ready.index(s), b_ring.index(s))
                    else:
                        _tma_load(b_desc, [j * BLOCK_N, kk * BLOCK_K], ready.index(s), b_ring.index(s))
                    g += 1
            panel += 1

    @gluon.jit
    def _pre_producer(pre_desc, pre_bufs, pre_ready, pre_free, M, N, BACKWARD: gl.constexpr,
                      NUM_PROGRAMS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        """One warp (backward; forward, it has nothing to do): each tile's pre in four [BM, BN / 4] quarters, in
        tile order, into the two-slot ring of the tile's consumer (slot c * 2 + n % 2 for its n-th quarter)."""
        if BACKWARD:
            tiles_n = N // BLOCK_N
            Q: gl.constexpr = BLOCK_N // 4
            turn = 0  # tiles per consumer so far (both consumers' n-th tiles come in one pass of the loop below)
            for block in range(gl.program_id(0), gl.cdiv(M, BLOCK_M), NUM_PROGRAMS):
                for j in range(0, tiles_n, 2):
                    for c in gl.static_range(2):
                        for i in gl.static_range(4):
                            n = turn * 4 + i
                            slot = c * 2 + n % 2
                            mbarrier.wait(pre_free.index(slot), ((n // 2) & 1) ^ 1)
                            mbarrier.expect(pre_ready.index(slot), BLOCK_M * Q * 2)
                            _tma_load(pre_desc, [block * BLOCK_M, (j + c) * BLOCK_N + i * Q],
                                      pre_ready.index(slot), pre_bufs.index(slot))
                    turn += 1

    @gluon.jit
    def _consumer(a_panel, b_ring, out_bufs, pre_bufs, a_ready, a_free, ready, empty, turns, pre_ready,
                  pre_free, pre_desc, out_desc, M, N, slope, CONSUMER: gl.constexpr, K: gl.constexpr,
                  B_KN: gl.constexpr, BACKWARD: gl.constexpr, NUM_PROGRAMS: gl.constexpr,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                  STAGES: gl.constexpr):
        """One warpgroup: column tiles CONSUMER, CONSUMER + 2, ... of this program's row blocks, the tensor cores
        taken in turns as in gluon_mlp's consumers; the epilogue in quarters. The consumer of a block's last tile
        frees the panel."""
        tiles_n = N // BLOCK_N
        KT: gl.constexpr = K // BLOCK_K
        Q: gl.constexpr = BLOCK_N // 4
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, BLOCK_N, 16])
        turn = 0
        panel = 0
        for block in range(gl.program_id(0), gl.cdiv(M, BLOCK_M), NUM_PROGRAMS):
            for j in range(CONSUMER, tiles_n, 2):
                if CONSUMER == 0:
                    mbarrier.wait(turns.index(0), (turn & 1) ^ 1, pred=turn > 0)
                else:
                    mbarrier.wait(turns.index(1), turn & 1)
                acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
                for kk in range(KT):
                    g = (panel * tiles_n + j) * KT + kk
                    s = g % STAGES
                    mbarrier.wait(a_ready.index(kk), panel & 1)
                    mbarrier.wait(ready.index(s), (g // STAGES) & 1)
                    if B_KN:
                        b = b_ring.index(s)  # [BK, BN]
                    else:
                        b = b_ring.index(s).permute((1, 0))  # [BN, BK] -> [BK, BN]
                    acc = warpgroup_mma(a_panel.index(kk), b, acc, is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])
                    if kk > 0:
                        mbarrier.arrive(empty.index((g - 1) % STAGES))
                acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
                mbarrier.arrive(empty.index(((panel * tiles_n + j) * KT + KT - 1) % STAGES))
                if j == tiles_n - 1:
                    mbarrier.arrive(a_free.index(0))
                mbarrier.arrive(turns.index(1 - CONSUMER))
                lo, hi = _halves(acc, BLOCK_M, BLOCK_N)
                q0, q1 = _halves(lo, BLOCK_M, BLOCK_N // 2)
                q2, q3 = _halves(hi, BLOCK_M, BLOCK_N // 2)
                quarters = (q0, q1, q2, q3)  # 4 x [BM, BN / 4]
                at = [block * BLOCK_M, j * BLOCK_N]
                for i in gl.static_range(4):
                    x = quarters[i].to(gl.bfloat16).to(gl.float32)
                    if BACKWARD:
                        n = turn * 4 + i
                        slot = CONSUMER * 2 + n % 2
                        mbarrier.wait(pre_ready.index(slot), (n // 2) & 1)
                        p = pre_bufs.index(slot).load(x.type.layout).to(gl.float32)
                        fence_async_shared()  # these reads before the producer's next TMA write into the slot
                        mbarrier.arrive(pre_free.index(slot))
                        tma.store_wait(pendings=0)  # this consumer's store before has read its buffer
                        out_bufs.index(CONSUMER).store((x * gl.where(p > 0, 2.0 * p, (2.0 * slope * slope) * p))
                                                       .to(gl.bfloat16))
                        fence_async_shared()
                        _tma_store(out_desc, [at[0], at[1] + i * Q], out_bufs.index(CONSUMER))
                    else:
                        y = gl.where(x > 0, x, x * slope)
                        tma.store_wait(pendings=0)  # this consumer's stores before have read the buffers
                        out_bufs.index(2 * CONSUMER).store(x.to(gl.bfloat16))
                        out_bufs.index(2 * CONSUMER + 1).store((y * y).to(gl.bfloat16))
                        fence_async_shared()
                        _tma_store(pre_desc, [at[0], at[1] + i * Q], out_bufs.index(2 * CONSUMER))
                        _tma_store(out_desc, [at[0], at[1] + i * Q], out_bufs.index(2 * CONSUMER + 1))
                turn += 1
            panel += 1
        tma.store_wait(pendings=0)

    @gluon.jit
    def _halves(x, ROWS: gl.constexpr, WIDTH: gl.constexpr):
        """x [ROWS, WIDTH] -> its left and right [ROWS, WIDTH / 2] column halves."""
        return gl.split(gl.permute(gl.reshape(x, (ROWS, 2, WIDTH // 2)), (0, 2, 1)))

    @gluon.jit
    def _mlp_resident_kernel(a_desc, b_desc, pre_desc, out_desc, M, N, slope, K: gl.constexpr,
                             B_KN: gl.constexpr, BACKWARD: gl.constexpr, NUM_PROGRAMS: gl.constexpr,
                             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                             STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        KT: gl.constexpr = K // BLOCK_K
        Q: gl.constexpr = BLOCK_N // 4
        a_panel = gl.allocate_shared_memory(gl.bfloat16, [KT, BLOCK_M, BLOCK_K], a_desc.layout)
        if B_KN:
            b_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_K, BLOCK_N], b_desc.layout)
        else:
            b_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
        OUTS: gl.constexpr = 1 if BACKWARD else 2  # a consumer's store buffers: dpre; pre and post
        out_bufs = gl.allocate_shared_memory(gl.bfloat16, [2 * OUTS, BLOCK_M, Q], out_desc.layout)
        if BACKWARD:
            pre_bufs = gl.allocate_shared_memory(gl.bfloat16, [4, BLOCK_M, Q], pre_desc.layout)  # 2 slots a consumer
        else:
            pre_bufs = out_bufs  # unused
        ready, empty, turns = _ring_barriers(STAGES)
        a_ready = gl.allocate_shared_memory(gl.int64, [KT, 1], mbarrier.MBarrierLayout())
        a_free = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        pre_ready = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
        pre_free = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
        for kk in gl.static_range(KT):
            mbarrier.init(a_ready.index(kk), count=1)
        mbarrier.init(a_free.index(0), count=1)
        for slot in gl.static_range(4):
            mbarrier.init(pre_ready.index(slot), count=1)
            mbarrier.init(pre_free.index(slot), count=1)
        gl.warp_specialize([
            (_consumer, (a_panel, b_ring, out_bufs, pre_bufs, a_ready, a_free, ready, empty, turns, pre_ready,
                         pre_free, pre_desc, out_desc, M, N, slope, 0, K, B_KN, BACKWARD, NUM_PROGRAMS, BLOCK_M,
                         BLOCK_N, BLOCK_K, STAGES)),
            (_consumer, (a_panel, b_ring, out_bufs, pre_bufs, a_ready, a_free, ready, empty, turns, pre_ready,
                         pre_free, pre_desc, out_desc, M, N, slope, 1, K, B_KN, BACKWARD, NUM_PROGRAMS, BLOCK_M,
                         BLOCK_N, BLOCK_K, STAGES)),
            (_producer, (a_desc, b_desc, a_panel, b_ring, a_ready, a_free, ready, empty, M, N, K, B_KN, NUM_PROGRAMS,
                         BLOCK_M, BLOCK_N, BLOCK_K, STAGES)),
            (_pre_producer, (pre_desc, pre_bufs, pre_ready, pre_free, M, N, BACKWARD, NUM_PROGRAMS, BLOCK_M,
                             BLOCK_N)),
        ], [4, 1, 1], [CONSUMER_REGS, PRODUCER_REGS, PRODUCER_REGS])


def fits(a: torch.Tensor, out: torch.Tensor, backward: bool, tile: tuple | None = None) -> bool:
    """Whether the resident kernel takes these operands: the [BM, K] panel, the ring and the epilogue's buffers
    (store quarters; backward, the pre quarters' slots too) within shared memory, and an even number of column
    tiles (the two consumers take alternate ones within a row block)."""
    bm, bn, bk, stages = tile or TILES[backward]
    K, N = a.shape[1], out.shape[1]
    epilogue = bm * bn * (3 if backward else 2) // 2  # elements: [BM, BN / 4] buffers, 6 backward, 4 forward
    shared = (K * bm + stages * bn * bk + epilogue) * 2 + 1024  # bf16, and the barriers
    return K % bk == 0 and N % (2 * bn) == 0 and shared <= _SHARED_BYTES


def launch(a: torch.Tensor, b: torch.Tensor, b_kn: bool, pre: torch.Tensor, out: torch.Tensor, slope: float,
           backward: bool, tile: tuple | None = None):
    """:func:`pgolf.model.gluon_mlp.launch_mlp_ws`'s operands and results, with a's row panel resident. ``tile``: a
    TILES-like tuple (benchmarks)."""
    M, K = a.shape
    N = out.shape[1]
    bm, bn, bk, stages = tile or TILES[backward]
    programs = one_program_an_sm(a.device, triton.cdiv(M, bm))
    return _mlp_resident_kernel[(programs,)](
        tma_desc(a, [bm, bk]), tma_desc(b, [bk, bn] if b_kn else [bn, bk]), tma_desc(pre, [bm, bn // 4]),
        tma_desc(out, [bm, bn // 4]), M, N, float(slope), K=K, B_KN=b_kn, BACKWARD=backward, NUM_PROGRAMS=programs,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, CONSUMER_REGS=_CONSUMER_REGS,
        PRODUCER_REGS=_PRODUCER_REGS, num_warps=4,
    )


def usable(a: torch.Tensor, out: torch.Tensor, backward: bool) -> bool:
    """:func:`fits`, and this process has not found that its triton cannot build the kernel."""
    return unsupported is None and fits(a, out, backward)


def launch_or_decline(*args) -> bool:
    """:func:`launch`, or False (one warning) where this triton's Gluon cannot build it (then never tried again;
    gluon_mlp's kernel runs)."""
    global unsupported
    ok, unsupported = try_launch(launch, "resident MLP", args, {}, instead="the Gluon MLP kernel without it")
    return ok
