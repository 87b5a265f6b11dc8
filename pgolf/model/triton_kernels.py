"""The Triton kernels behind ``pgolf.model.kernels`` (imported only when triton imports; no torch.library code here).

Each ``launch_*`` function fills preallocated outputs. Launch parameters are chosen here, in Python, from the
shapes and the device: on CUDA the matmul is autotuned over a few Hopper-sized tiles (keyed on N, K and the direction
only, so a new token count does not re-tune), on CPU (Triton's interpreter, ``TRITON_INTERPRET=1``, used by the tests)
small fixed tiles keep the numpy emulation fast. ``pgolf.model.kernels`` wraps the launchers in opaque custom ops, so
``torch.compile`` never traces into them (it calls them as they are, with their own autotuning cache).

Numerics: every kernel accumulates and evaluates transcendentals in fp32 and rounds only when storing.
``tanh(u)`` is computed as ``2 * sigmoid(2u) - 1`` (Triton has no portable tanh): its absolute error is about
1e-7, i.e. about 3e-6 on a logit after the softcap of 30, far below bf16 resolution.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

IGNORE_INDEX = -100

try:  # host-side tensor descriptors (TMA), triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except Exception:  # pragma: no cover - depends on the triton build
    _TensorDescriptor = None

from pgolf.model import gluon_mlp

try:  # the interpreter's function class (absent from some triton builds)
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except Exception:  # pragma: no cover - depends on the triton build
    _InterpretedFunction = ()


def is_interpreted() -> bool:
    """True when triton was imported with the interpreter on (kernels then run on CPU tensors, via numpy)."""
    return isinstance(_mlp_up_act_kernel, _InterpretedFunction)


# --------------------------------------------------------------------------------------------------------------
# (1) MLP up-projection with the squared leaky-ReLU in the epilogue, and its backward twin
# --------------------------------------------------------------------------------------------------------------
# One matmul kernel, two epilogues (BACKWARD is a compile-time switch):
#   forward:  acc = x @ w_up^T;   pre = acc, post = leaky_relu(acc, s)^2
#   backward: acc = g @ w_down;   dpre = acc * act'(pre), act'(p) = 2p (p > 0) else 2 s^2 p
# In the backward the kernel's "w" [N, K] is w_down^T, read through w_down's swapped strides (no copy), so both
# directions have N = 4d and K = d. The backward never writes g @ w_down ([M, 4d]) to memory, nor reads it back.


@triton.jit
def _mlp_up_act_kernel(
    x_ptr,  # [M, K]: the MLP input (forward) or the gradient of the MLP output (backward)
    w_ptr,  # [N, K] through its strides (nn.Linear layout: the kernel computes x @ w^T)
    pre_ptr,  # [M, N]: out, x @ w^T (kept for backward); BACKWARD: in, the forward's pre-activation
    post_ptr,  # [M, N] out: leaky_relu(pre, slope)^2; BACKWARD: d loss / d pre
    M,
    N,
    K: tl.constexpr,  # constexpr: loop bounds must be Python ints in triton <= 3.6's interpreter with numpy >= 2.4
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    slope,
    IEEE_FP32: tl.constexpr,  # fp32 inputs: exact fp32 products instead of TF32
    BACKWARD: tl.constexpr,  # the backward epilogue (see above)
    UPCAST: tl.constexpr,  # interpreter only: its tl.dot mishandles bf16 operands (triton 3.6), so feed it fp32;
    # its casts truncate, so bf16 outputs are rounded on the bits (_narrow)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles share each column-tile while it is hot in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    group = pid // tiles_per_group
    first_m = group * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    ks = tl.arange(0, BLOCK_K)  # [BK]
    rows_ok = rows < M
    cols_ok = cols < N
    x_tile = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk  # [BM, BK]
    w_tile = w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk  # [BK, BN] = w^T tile

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(x_tile, mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_tile, mask=k_ok[:, None] & cols_ok[None, :], other=0.0)
        if UPCAST:  # bf16 x bf16 products are exact in fp32: same math as the tensor cores' fp32 accumulation
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE_FP32 or UPCAST:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_tile += BLOCK_K * stride_xk
        w_tile += BLOCK_K * stride_wk

    # epilogue, from the fp32 accumulator (pre, post and dpre share one [M, N] layout)
    out_offsets = rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on
    out_mask = rows_ok[:, None] & cols_ok[None, :]
    out_dtype = post_ptr.dtype.element_ty
    c = _narrow(acc, out_dtype, UPCAST)  # the product rounded to the output dtype first, as an unfused F.linear
    if BACKWARD:
        p = tl.load(pre_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
        dpre = _act_grad(c.to(tl.float32), p, slope)
        tl.store(post_ptr + out_offsets, _narrow(dpre, out_dtype, UPCAST), mask=out_mask)
    else:
        tl.store(pre_ptr + out_offsets, c, mask=out_mask)
        tl.store(post_ptr + out_offsets, _narrow(_act(c.to(tl.float32), slope), out_dtype, UPCAST), mask=out_mask)


@triton.jit
def _narrow(x, dtype: tl.constexpr, BITWISE: tl.constexpr):
    """An fp32 tile in ``dtype``, rounded to nearest even. On the GPU that is the hardware cast. In Triton's
    interpreter (``BITWISE``), whose casts round toward zero, bf16 is rounded on the bits first, so that it computes
    what the GPU does; the final cast is then exact. NaN stays NaN. (The bit path costs ~10 integer ops per element:
    measurable in an epilogue after only K = 512 of products, hence not on the GPU.)"""
    if BITWISE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True)).to(dtype)
    elif dtype == tl.float32:
        return x
    else:
        return x.to(dtype)


@triton.jit
def _act(c, slope):
    """leaky_relu(c, slope)^2 of an fp32 tile."""
    a = tl.where(c > 0, c, c * slope)
    return a * a


@triton.jit
def _act_grad(c, p, slope):
    """c * d/dp leaky_relu(p, slope)^2 for fp32 tiles c (incoming gradient) and p (pre-activation)."""
    return c * tl.where(p > 0, 2.0 * p, (2.0 * slope * slope) * p)


# The same two epilogues on Hopper's tensor-memory accelerator (TMA): a persistent kernel (TMA_TILES' programs per
# SM walk the output tiles) or one program per tile, operands and outputs moved by tensor descriptors, the epilogue
# stored in two column halves (half the registers live at once). Used on CUDA for 16-bit operands whose rows are
# 16-byte aligned; the kernel above is the fallback and the interpreter's. B is read as [N, K] (forward: w_up) or
# [K, N] (backward: w_down, no transposed copy).


@triton.jit
def _mlp_tma_kernel(
    a_desc,  # [M, K] blocks [BM, BK]
    b_desc,  # B_KN: [K, N] blocks [BK, BN]; else [N, K] blocks [BN, BK]
    pre_desc,  # [M, N] blocks [BM, BN // 2]: out (forward) / in (backward)
    out_desc,  # [M, N] blocks [BM, BN // 2]: post (forward) / dpre (backward)
    M,
    N,
    K: tl.constexpr,  # constexpr: see _mlp_up_act_kernel
    slope,
    B_KN: tl.constexpr,
    BACKWARD: tl.constexpr,
    PERSISTENT: tl.constexpr,  # False: one program per tile (the interpreter cannot loop from a program id)
    BITWISE_ROUND: tl.constexpr,  # interpreter only: see _narrow
    NUM_PROGRAMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tiles_n = tl.cdiv(N, BLOCK_N)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tiles_n, NUM_PROGRAMS, flatten=True):
            _mlp_tma_tile(a_desc, b_desc, pre_desc, out_desc, tile, tiles_n, K, slope, B_KN, BACKWARD,
                          BITWISE_ROUND, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _mlp_tma_tile(a_desc, b_desc, pre_desc, out_desc, tl.program_id(0), tiles_n, K, slope, B_KN, BACKWARD,
                      BITWISE_ROUND, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _mlp_tma_tile(a_desc, b_desc, pre_desc, out_desc, tile, tiles_n, K: tl.constexpr, slope, B_KN: tl.constexpr,
                  BACKWARD: tl.constexpr, BITWISE_ROUND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """One [BM, BN] output tile of :func:`_mlp_tma_kernel`."""
    HALF: tl.constexpr = BLOCK_N // 2
    out_dtype = out_desc.dtype
    row = (tile // tiles_n) * BLOCK_M  # consecutive tiles share a row block of A (B stays in L2)
    col = (tile % tiles_n) * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = a_desc.load([row, k0])  # [BM, BK]
        if B_KN:
            acc = tl.dot(a, b_desc.load([k0, col]), acc)  # [BK, BN]
        else:
            acc = tl.dot(a, b_desc.load([col, k0]).T, acc)  # [BN, BK] -> [BK, BN]
    halves = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))  # 2 x [BM, HALF]
    for i in tl.static_range(2):
        c = _narrow(halves[i], out_dtype, BITWISE_ROUND)
        at = col + i * HALF
        if BACKWARD:
            p = pre_desc.load([row, at]).to(tl.float32)
            dpre = _act_grad(c.to(tl.float32), p, slope)
            out_desc.store([row, at], _narrow(dpre, out_dtype, BITWISE_ROUND))
        else:
            pre_desc.store([row, at], c)
            out_desc.store([row, at], _narrow(_act(c.to(tl.float32), slope), out_dtype, BITWISE_ROUND))


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, pipeline stages, programs per SM) per direction, for N = 4d and K = d at
# d = 512: the fastest of benchmarks/mlp_kernel_bench.py --sweep-tiles on one H100 (docs/benchmarks.md); BLOCK_K
# fixes the summation order. Programs per SM: the persistent grid's size (0: one program per tile, no loop). Two
# resident programs let one's epilogue stores overlap the other's products, where registers and shared memory allow.
TMA_TILES = {False: (128, 256, 64, 8, 4, 1), True: (128, 128, 32, 4, 4, 0)}


# Per direction (backward: True): the warp-specialized Gluon kernel (pgolf.model.gluon_mlp) where it applies (an
# sm_90 GPU and a triton whose Gluon builds it), instead of the TMA kernel. Same bits (GPU test); the choice is
# speed only: 0.36 against 0.43 ms a call each way on an H200 (docs/benchmarks.md).
MLP_WARP_SPECIALIZED = {False: True, True: True}


def persistent_programs(programs_per_sm: int, tiles: int, device: torch.device) -> int:
    """The grid of a persistent kernel: ``programs_per_sm`` per SM (never more than the tiles); 0: one per tile."""
    if programs_per_sm == 0:
        return tiles
    return min(programs_per_sm * torch.cuda.get_device_properties(device).multi_processor_count, tiles)


def _tma_usable(*tensors: torch.Tensor) -> bool:
    """Whether the TMA kernel can take these operands: CUDA sm90+, one 16-bit dtype, 16-byte aligned rows."""
    a = tensors[0]
    if a.device.type != "cuda" or _TensorDescriptor is None or torch.cuda.get_device_capability(a.device)[0] < 9:
        return False
    return (
        all(t.dtype in (torch.bfloat16, torch.float16) and t.dtype == a.dtype for t in tensors)
        and all(t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)
        and all(t.data_ptr() % 16 == 0 for t in tensors)
    )


def _launch_mlp_tma(a: torch.Tensor, b: torch.Tensor, b_kn: bool, pre: torch.Tensor, out: torch.Tensor,
                    slope: float, backward: bool, bitwise_round: bool = False, tile: Optional[tuple] = None):
    """``bitwise_round``: the interpreter's rounding on the GPU too (same values; benchmarks/mlp_kernel_bench.py);
    ``tile`` (a TMA_TILES entry; 0 programs per SM in the interpreter's tests, which cannot loop). Returns the
    launched kernel (its registers and shared memory, for the benchmark)."""
    M, K = a.shape
    N = out.shape[1]
    bm, bn, bk, warps, stages, per_sm = tile or TMA_TILES[backward]
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    programs = persistent_programs(per_sm, tiles, a.device)
    persistent = per_sm > 0
    desc = _TensorDescriptor.from_tensor
    return _mlp_tma_kernel[(programs,)](
        desc(a, [bm, bk]),
        desc(b, [bk, bn] if b_kn else [bn, bk]),
        desc(pre, [bm, bn // 2]),
        desc(out, [bm, bn // 2]),
        M, N, K, float(slope),
        B_KN=b_kn, BACKWARD=backward, PERSISTENT=persistent, BITWISE_ROUND=bitwise_round,
        NUM_PROGRAMS=programs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages,
    )


def _mlp_configs() -> list:
    """Hopper tiles for M in the tens of thousands, N = 4d, K = d (d = 512 in the record)."""
    tiles = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (256, 128, 64, 8, 3),
        (64, 256, 64, 4, 4),
        (128, 256, 128, 8, 2),  # K = 512 is only 4 steps of 128: fewer, fatter pipeline stages
        (128, 128, 128, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in tiles
    ]


_mlp_up_act_autotuned = triton.autotune(configs=_mlp_configs(), key=["N", "K", "BACKWARD"])(_mlp_up_act_kernel)

# interpreter tiles: small, and not multiples of the test shapes so the masks are exercised
INTERPRET_MLP_TILE = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2}


def _launch_mlp(a: torch.Tensor, w: torch.Tensor, w_strides: tuple[int, int], pre: torch.Tensor,
                out: torch.Tensor, slope: float, backward: bool) -> None:
    M, K = a.shape
    N = out.shape[1]
    args = dict(
        x_ptr=a,
        w_ptr=w,
        pre_ptr=pre,
        post_ptr=out,
        M=M,
        N=N,
        K=K,
        stride_xm=a.stride(0),
        stride_xk=a.stride(1),
        stride_wn=w_strides[0],
        stride_wk=w_strides[1],
        stride_om=out.stride(0),
        stride_on=out.stride(1),
        slope=float(slope),
        IEEE_FP32=a.dtype == torch.float32,
        BACKWARD=backward,
    )
    if a.device.type == "cuda":

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        _mlp_up_act_autotuned[grid](**args, UPCAST=False)
    else:
        tile = INTERPRET_MLP_TILE
        grid = (triton.cdiv(M, tile["BLOCK_M"]) * triton.cdiv(N, tile["BLOCK_N"]),)
        _mlp_up_act_kernel[grid](**args, **tile, UPCAST=True)


def launch_mlp_up_act(x: torch.Tensor, w: torch.Tensor, pre: torch.Tensor, post: torch.Tensor, slope: float) -> None:
    """pre = x @ w^T, post = leaky_relu(pre, slope)^2. x [M, K], w [N, K], pre/post [M, N] preallocated."""
    if pre.stride() != post.stride():
        raise ValueError("launch_mlp_up_act: pre and post must share one layout")
    if _tma_usable(x, w, pre, post):
        if not (MLP_WARP_SPECIALIZED[False] and gluon_mlp.ws_usable(x, post, backward=False)
                and gluon_mlp.launch_or_decline(x, w, False, pre, post, slope, backward=False)):
            _launch_mlp_tma(x, w, False, pre, post, slope, backward=False)
        return
    _launch_mlp(x, w, (w.stride(0), w.stride(1)), pre, post, slope, backward=False)


def launch_mlp_act_grad(
    g: torch.Tensor, w_down: torch.Tensor, pre: torch.Tensor, dpre: torch.Tensor, slope: float
) -> None:
    """dpre = (g @ w_down) * act'(pre) in one pass. g [M, K], w_down [K, N] (nn.Linear layout of the down
    projection: K = d outputs, N = 4d inputs), pre and dpre [M, N] of one layout."""
    if pre.stride() != dpre.stride():
        raise ValueError("launch_mlp_act_grad: pre and dpre must share one layout")
    if _tma_usable(g, w_down, pre, dpre):  # both kernels read w_down as [K, N]
        if not (MLP_WARP_SPECIALIZED[True] and gluon_mlp.ws_usable(g, dpre, backward=True)
                and gluon_mlp.launch_or_decline(g, w_down, True, pre, dpre, slope, backward=True)):
            _launch_mlp_tma(g, w_down, True, pre, dpre, slope, backward=True)
        return
    # the kernel reads w[n, k] = w_down[k, n]: w_down^T through swapped strides
    _launch_mlp(g, w_down, (w_down.stride(1), w_down.stride(0)), pre, dpre, slope, backward=True)


# --------------------------------------------------------------------------------------------------------------
# (2) Softcapped cross-entropy, streaming the vocabulary
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _softcap(z, cap, HAS_CAP: tl.constexpr):
    """(cap * tanh(z / cap), tanh(z / cap)); the identity and 0 when the cap is off. z times the scalar 2 / cap, not
    divided by cap: a division per element is one more special-function instruction (``div.full.f32``) beside the
    sigmoid's and the softmax's, and those instructions, not memory, set the forward kernel's time."""
    if HAS_CAP:
        t = 2.0 * tl.sigmoid(z * (2.0 / cap)) - 1.0
        return cap * t, t
    else:
        return z, tl.zeros_like(z)


@triton.jit
def _softcap_ce_fwd_kernel(
    z_ptr,  # [T, V] logits before the cap (bf16/fp16/fp32)
    target_ptr,  # [T] int64
    nll_ptr,  # [T] fp32 out: -log softmax(c)[target], 0 where ignored
    lse_ptr,  # [T] fp32 out: logsumexp(c), kept for backward
    V: tl.constexpr,  # constexpr: see K in _mlp_up_act_kernel
    stride_zt,
    cap,
    HAS_CAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # One program per token row: one pass over V in blocks with an online max / rescaled sum of exponentials.
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_zt
    offs = tl.arange(0, BLOCK_V)
    running_max = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)  # scalar -inf
    running_sum = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)  # scalar 0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        ok = cols < V
        z = tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32)
        c, _ = _softcap(z, cap, HAS_CAP)
        c = tl.where(ok, c, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(c, axis=0))  # finite: every block has a valid column
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(c - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)

    # ignore_index -100 scores 0; any other id outside [0, V) scores NaN (visible in the loss, no stray read)
    target = tl.load(target_ptr + row)
    in_range = (target >= 0) & (target < V)
    safe_target = tl.where(in_range, target, 0)
    z_target = tl.load(z_row + safe_target).to(tl.float32)
    c_target, _ = _softcap(z_target, cap, HAS_CAP)
    nll = tl.where(in_range, lse - c_target, float("nan"))
    tl.store(nll_ptr + row, tl.where(target == -100, 0.0, nll))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _softcap_ce_bwd_kernel(
    grad_nll_ptr,  # [T] fp32: dLoss/dnll
    z_ptr,  # [T, V]
    target_ptr,  # [T] int64
    lse_ptr,  # [T] fp32
    dz_ptr,  # [T, V] out, z's dtype
    V: tl.constexpr,
    stride_zt,
    stride_dzt,
    cap,
    HAS_CAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # dz = g * (softmax(c) - onehot(target)) * dc/dz with dc/dz = 1 - tanh^2(z / cap); recomputed from z.
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row)
    g = tl.load(grad_nll_ptr + row).to(tl.float32)
    g = tl.where(target != -100, g, 0.0)
    lse = tl.load(lse_ptr + row)
    z_row = z_ptr + row * stride_zt
    dz_row = dz_ptr + row * stride_dzt
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        ok = cols < V
        z = tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32)
        c, t = _softcap(z, cap, HAS_CAP)
        d = tl.exp(c - lse) - tl.where(cols == target, 1.0, 0.0)
        if HAS_CAP:
            d = d * (1.0 - t * t)
        tl.store(dz_row + cols, (g * d).to(dz_ptr.dtype.element_ty), mask=ok)


def _ce_launch_params(V: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps): 4096-wide blocks (2 passes for V = 8192) on CUDA; small blocks in the interpreter."""
    if device.type == "cuda":
        return min(4096, triton.next_power_of_2(V)), 8
    return min(256, triton.next_power_of_2(V)), 1


def launch_softcap_ce_fwd(
    z: torch.Tensor, targets: torch.Tensor, nll: torch.Tensor, lse: torch.Tensor, cap: float
) -> None:
    T, V = z.shape
    if T == 0:
        return
    block_v, warps = _ce_launch_params(V, z.device)
    _softcap_ce_fwd_kernel[(T,)](
        z,
        targets,
        nll,
        lse,
        V=V,
        stride_zt=z.stride(0),
        cap=float(cap),
        HAS_CAP=cap > 0,
        BLOCK_V=block_v,
        num_warps=warps,
    )


def launch_softcap_ce_bwd(
    grad_nll: torch.Tensor, z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, dz: torch.Tensor, cap: float
) -> None:
    T, V = z.shape
    if T == 0:
        return
    block_v, warps = _ce_launch_params(V, z.device)
    _softcap_ce_bwd_kernel[(T,)](
        grad_nll,
        z,
        targets,
        lse,
        dz,
        V=V,
        stride_zt=z.stride(0),
        stride_dzt=dz.stride(0),
        cap=float(cap),
        HAS_CAP=cap > 0,
        BLOCK_V=block_v,
        num_warps=warps,
    )
