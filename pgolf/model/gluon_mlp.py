"""The fused MLP kernels of :mod:`pgolf.model.triton_kernels` as a warp-specialized Hopper kernel (Gluon).

Why: at the record's shapes (K = d = 512) a tile's products take about as long as its epilogue (rounding, the
activation, two [BM, BN] stores), and Triton's persistent kernel runs the two one after the other. Here, as in
CUTLASS's "ping-pong" kernels, two consumer warpgroups take alternate output tiles: while one runs its epilogue,
the other's products run, and a one-warp producer keeps a ring of TMA loads ahead of both. The consumers take turns
on the tensor cores (an mbarrier pair), so each tile's products run at full rate and the epilogues overlap them.

Same arithmetic as the Triton kernels: products in BLOCK_K steps in order, fp32 accumulation, the hardware cast to
bf16 (round to nearest even), the same activation formulas; the GPU test checks the bits against them.

Forward: pre = a @ b^T (b = w_up [N, K]), post = leaky_relu(pre)^2. Backward: dpre = (a @ b) * act'(pre) (b =
w_down [K, N], read without a transposed copy); the producer also loads the tile's ``pre``.
"""
from __future__ import annotations

import warnings

import torch
import triton

try:  # Gluon ships with triton >= 3.5; without it the Triton kernels run
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
    from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # the TMA copies' names: triton 3.6 (torch 2.11) and triton >= 3.7
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
except ImportError:  # pragma: no cover - depends on the installed triton
    gluon = None

# (BLOCK_M, BLOCK_N, BLOCK_K, ring stages, store buffer sets) a consumer tile, per direction (backward: True). A
# [128, 128] fp32 accumulator is 128 registers a thread of a warpgroup; 227 KB of shared memory hold the ring, the
# store buffers and, backward, the two consumers' pre tiles.
WS_TILES = {False: (128, 128, 64, 5, 1), True: (128, 128, 64, 4, 1)}
_CONSUMER_REGS = 232
_PRODUCER_REGS = 40
# Why this process's triton could not build the kernel (Gluon is experimental: its names and signatures move
# between releases); set once, then the TMA kernel runs. None: not tried, or it built.
unsupported: str | None = None

if gluon is not None:

    @gluon.jit
    def _producer(a_desc, b_desc, pre_desc, a_ring, b_ring, pre_bufs, ready, empty, pre_ready, pre_free, M, N,
                  K: gl.constexpr, B_KN: gl.constexpr, BACKWARD: gl.constexpr, NUM_PROGRAMS: gl.constexpr,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """One warp: every k-step of this program's tiles through the ring, in tile order; backward, each tile's
        ``pre`` into its consumer's buffer once that consumer has read the previous one."""
        tiles_n = gl.cdiv(N, BLOCK_N)
        tiles = gl.cdiv(M, BLOCK_M) * tiles_n
        KT: gl.constexpr = K // BLOCK_K
        HALF: gl.constexpr = BLOCK_N // 2
        step_bytes: gl.constexpr = (BLOCK_M + BLOCK_N) * BLOCK_K * 2
        local = 0
        for tile in range(gl.program_id(0), tiles, NUM_PROGRAMS):
            row = (tile // tiles_n) * BLOCK_M
            col = (tile % tiles_n) * BLOCK_N
            for kk in gl.static_range(KT):
                g = local * KT + kk
                s = g % STAGES
                mbarrier.wait(empty.index(s), ((g // STAGES) & 1) ^ 1)  # the first pass finds every stage free
                mbarrier.expect(ready.index(s), step_bytes)
                _tma_load(a_desc, [row, kk * BLOCK_K], ready.index(s), a_ring.index(s))
                if B_KN:
                    _tma_load(b_desc, [kk * BLOCK_K, col], ready.index(s), b_ring.index(s))
                else:
                    _tma_load(b_desc, [col, kk * BLOCK_K], ready.index(s), b_ring.index(s))
            if BACKWARD:
                c = local % 2
                turn = local // 2
                mbarrier.wait(pre_free.index(c), (turn & 1) ^ 1)
                mbarrier.expect(pre_ready.index(c), BLOCK_M * BLOCK_N * 2)
                _tma_load(pre_desc, [row, col], pre_ready.index(c), pre_bufs.index(2 * c))
                _tma_load(pre_desc, [row, col + HALF], pre_ready.index(c), pre_bufs.index(2 * c + 1))
            local += 1

    @gluon.jit
    def _ring_barriers(STAGES: gl.constexpr):
        """The ring's ``ready`` (loaded) and ``empty`` (read) mbarriers, a pair a stage, and the consumers'
        ``turns`` pair, all initialized for one arrival a phase."""
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)
        for c in gl.static_range(2):
            mbarrier.init(turns.index(c), count=1)
        return ready, empty, turns

    @gluon.jit
    def _tile_products(a_ring, b_ring, ready, empty, turns, local, turn, CONSUMER: gl.constexpr, B_KN: gl.constexpr,
                       KT: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        """A consumer's products of its ``turn``-th tile (the program's ``local``-th): wait for the turn, sum the KT
        k-steps from the ring (one wgmma in flight; each stage freed once read), hand the turn over. [BM, BN] fp32.
        Consumer 0 waits for consumer 1's products of the tile before (none before its first tile), consumer 1
        for consumer 0's."""
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, BLOCK_N, 16])
        if CONSUMER == 0:
            mbarrier.wait(turns.index(0), (turn & 1) ^ 1, pred=turn > 0)
        else:
            mbarrier.wait(turns.index(1), turn & 1)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
        for kk in gl.static_range(KT):
            g = local * KT + kk
            s = g % STAGES
            mbarrier.wait(ready.index(s), (g // STAGES) & 1)
            if B_KN:
                b = b_ring.index(s)  # [BK, BN]
            else:
                b = b_ring.index(s).permute((1, 0))  # [BN, BK] -> [BK, BN]
            acc = warpgroup_mma(a_ring.index(s), b, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])
            if kk > 0:
                mbarrier.arrive(empty.index((g - 1) % STAGES))  # the step before has been read
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
        mbarrier.arrive(empty.index((local * KT + KT - 1) % STAGES))
        mbarrier.arrive(turns.index(1 - CONSUMER))
        return acc

    @gluon.jit
    def _consumer(a_ring, b_ring, pre_bufs, out_bufs, ready, empty, pre_ready, pre_free, turns, pre_desc, out_desc,
                  M, N, slope, CONSUMER: gl.constexpr, K: gl.constexpr, B_KN: gl.constexpr, BACKWARD: gl.constexpr,
                  NUM_PROGRAMS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  BLOCK_K: gl.constexpr, STAGES: gl.constexpr, EPI_BUFS: gl.constexpr):
        """One warpgroup: this program's tiles CONSUMER, CONSUMER + 2, ... (local order): wait for its turn, run
        the tile's products, hand the tensor cores to the other consumer, then the epilogue."""
        tiles_n = gl.cdiv(N, BLOCK_N)
        tiles = gl.cdiv(M, BLOCK_M) * tiles_n
        KT: gl.constexpr = K // BLOCK_K
        HALF: gl.constexpr = BLOCK_N // 2
        turn = 0
        for tile in range(gl.program_id(0) + CONSUMER * NUM_PROGRAMS, tiles, 2 * NUM_PROGRAMS):
            local = 2 * turn + CONSUMER
            row = (tile // tiles_n) * BLOCK_M
            col = (tile % tiles_n) * BLOCK_N
            acc = _tile_products(a_ring, b_ring, ready, empty, turns, local, turn, CONSUMER, B_KN, KT, STAGES,
                                 BLOCK_M, BLOCK_N)
            # epilogue, in two column halves (half the registers live at once); EPI_BUFS sets of half buffers a
            # consumer: with two, neither half waits for a store of this tile
            halves = gl.split(gl.permute(gl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))  # 2 x [BM, HALF]
            OUTS: gl.constexpr = 1 if BACKWARD else 2
            if BACKWARD:
                mbarrier.wait(pre_ready.index(CONSUMER), turn & 1)
                p0 = pre_bufs.index(2 * CONSUMER).load(halves[0].type.layout).to(gl.float32)
                p1 = pre_bufs.index(2 * CONSUMER + 1).load(halves[1].type.layout).to(gl.float32)
                fence_async_shared()  # these reads before the producer's next TMA write into the buffers
                mbarrier.arrive(pre_free.index(CONSUMER))
            for i in gl.static_range(2):
                buf = (CONSUMER * EPI_BUFS + i % EPI_BUFS) * OUTS
                if i % EPI_BUFS == 0:
                    tma.store_wait(pendings=0)  # this consumer's earlier stores have read their buffers
                c = halves[i].to(gl.bfloat16)
                if BACKWARD:
                    p = p0 if i == 0 else p1
                    x = c.to(gl.float32)
                    dpre = x * gl.where(p > 0, 2.0 * p, (2.0 * slope * slope) * p)
                    out_bufs.index(buf).store(dpre.to(gl.bfloat16))
                else:
                    x = c.to(gl.float32)
                    y = gl.where(x > 0, x, x * slope)
                    out_bufs.index(buf).store(c)
                    out_bufs.index(buf + 1).store((y * y).to(gl.bfloat16))
                fence_async_shared()
                if BACKWARD:
                    _tma_store(out_desc, [row, col + i * HALF], out_bufs.index(buf))
                else:
                    _tma_store(pre_desc, [row, col + i * HALF], out_bufs.index(buf))
                    _tma_store(out_desc, [row, col + i * HALF], out_bufs.index(buf + 1))
            turn += 1
        tma.store_wait(pendings=0)

    @gluon.jit
    def _mlp_ws_kernel(a_desc, b_desc, pre_desc, out_desc, M, N, slope, K: gl.constexpr, B_KN: gl.constexpr,
                       BACKWARD: gl.constexpr, NUM_PROGRAMS: gl.constexpr, BLOCK_M: gl.constexpr,
                       BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, EPI_BUFS: gl.constexpr,
                       CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        HALF: gl.constexpr = BLOCK_N // 2
        a_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
        if B_KN:
            b_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_K, BLOCK_N], b_desc.layout)
        else:
            b_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
        # per consumer, EPI_BUFS sets of half-tile buffers for the stores (forward: pre and post; backward: dpre)
        OUTS: gl.constexpr = 1 if BACKWARD else 2
        out_bufs = gl.allocate_shared_memory(gl.bfloat16, [2 * EPI_BUFS * OUTS, BLOCK_M, HALF], out_desc.layout)
        if BACKWARD:
            pre_bufs = gl.allocate_shared_memory(gl.bfloat16, [4, BLOCK_M, HALF], pre_desc.layout)
        else:
            pre_bufs = out_bufs  # unused
        ready, empty, turns = _ring_barriers(STAGES)
        pre_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        pre_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for c in gl.static_range(2):
            mbarrier.init(pre_ready.index(c), count=1)
            mbarrier.init(pre_free.index(c), count=1)
        gl.warp_specialize([
            (_consumer, (a_ring, b_ring, pre_bufs, out_bufs, ready, empty, pre_ready, pre_free, turns, pre_desc,
                         out_desc, M, N, slope, 0, K, B_KN, BACKWARD, NUM_PROGRAMS, BLOCK_M, BLOCK_N, BLOCK_K, STAGES,
                         EPI_BUFS)),
            (_consumer, (a_ring, b_ring, pre_bufs, out_bufs, ready, empty, pre_ready, pre_free, turns, pre_desc,
                         out_desc, M, N, slope, 1, K, B_KN, BACKWARD, NUM_PROGRAMS, BLOCK_M, BLOCK_N, BLOCK_K, STAGES,
                         EPI_BUFS)),
            (_producer, (a_desc, b_desc, pre_desc, a_ring, b_ring, pre_bufs, ready, empty, pre_ready, pre_free, M, N,
                         K, B_KN, BACKWARD, NUM_PROGRAMS, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def on_gluon_sm90(x: torch.Tensor) -> bool:
    """Whether ``x`` lives where the Gluon kernels can run: a triton with Gluon, an sm_90 GPU (wgmma and the
    register hand-off are Hopper's)."""
    return gluon is not None and x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) == (9, 0)


def tma_desc(t: torch.Tensor, block: list) -> "TensorDescriptor":
    """A bf16 tensor descriptor of ``t`` with ``block`` boxes in the default (widest-swizzle) shared layout."""
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16))


def one_program_an_sm(device: torch.device, tiles: int) -> int:
    """The persistent grid of the Gluon kernels: one program an SM, never more than the tiles."""
    return min(torch.cuda.get_device_properties(device).multi_processor_count, tiles)


def ws_usable(a: torch.Tensor, out: torch.Tensor, backward: bool) -> bool:
    """Whether the warp-specialized kernel can take these operands (the TMA kernel's conditions hold):
    :func:`on_gluon_sm90`, a kernel this triton builds, bf16, K and N whole tiles."""
    if unsupported is not None or not on_gluon_sm90(a):
        return False
    _, bn, bk, _, _ = WS_TILES[backward]
    return a.dtype == torch.bfloat16 and a.shape[1] % bk == 0 and out.shape[1] % bn == 0


def launch_mlp_ws(a: torch.Tensor, b: torch.Tensor, b_kn: bool, pre: torch.Tensor, out: torch.Tensor, slope: float,
                  backward: bool, tile: tuple | None = None):
    """Forward (``backward`` False): pre = a @ b^T, out = post. Backward: out = dpre from a = g, b = w_down read as
    [K, N], and pre. ``tile``: a WS_TILES entry (benchmarks). Returns the launched kernel."""
    M, K = a.shape
    N = out.shape[1]
    bm, bn, bk, stages, epi_bufs = tile or WS_TILES[backward]
    programs = one_program_an_sm(a.device, triton.cdiv(M, bm) * triton.cdiv(N, bn))
    desc = tma_desc
    return _mlp_ws_kernel[(programs,)](
        desc(a, [bm, bk]), desc(b, [bk, bn] if b_kn else [bn, bk]), desc(pre, [bm, bn // 2]), desc(out, [bm, bn // 2]),
        M, N, float(slope), K=K, B_KN=b_kn, BACKWARD=backward, NUM_PROGRAMS=programs, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, STAGES=stages, EPI_BUFS=epi_bufs, CONSUMER_REGS=_CONSUMER_REGS, PRODUCER_REGS=_PRODUCER_REGS,
        num_warps=4,
    )


def try_launch(launch, what: str, args: tuple, kwargs: dict) -> tuple[bool, str | None]:
    """``launch(*args, **kwargs)``: (True, None), or (False, why) with one warning when this triton's Gluon cannot
    compile the kernel; the caller then runs the Triton kernel. Compilation fails before anything is launched, so
    nothing was written."""
    try:
        launch(*args, **kwargs)
        return True, None
    except (triton.CompilationError, TypeError, AttributeError, NotImplementedError) as exc:
        why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}"
        warnings.warn(f"pgolf: the warp-specialized {what} kernel does not build with triton {triton.__version__} "
                      f"({why}); the Triton kernel runs instead", stacklevel=3)
        return False, why


def launch_or_decline(*args, **kwargs) -> bool:
    """:func:`launch_mlp_ws`, or False where this triton's Gluon cannot build it (then never tried again)."""
    global unsupported
    ok, unsupported = try_launch(launch_mlp_ws, "MLP", args, kwargs)
    return ok
