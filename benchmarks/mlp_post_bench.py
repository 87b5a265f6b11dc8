"""An experiment for issue 16, prepared on CPU: can the MLP stop storing ``post``?

Today the MLP up kernel writes pre and post = leaky_relu(pre, 0.5)^2 ([M, 4d] bf16 each, 400 MB a call at the
record's shapes); cuBLAS reads post twice, for the down projection (out = post @ w_down^T) and for its weight
gradient (dw_down = g^T @ post). Since post = bf16(act(float(pre))) exactly, both could read pre and apply the
activation as they load it, and the up kernel would write only pre: 400 MB less written per call, 88 calls a
step looping off. Whether that pays depends on two Triton kernels keeping up with cuBLAS while they apply the
activation to an operand; this script measures that before anything enters the model. Timed (CUDA events, M =
98,304 tokens, d = 512, 4d = 2,048, bf16):

- ``today``: cuBLAS's down projection and its weight gradient, both reading post;
- ``act_on_load``: :func:`_down_act_kernel` (the activation applied to each pre tile before the product) and
  :func:`_down_wgrad_act_kernel` (the weight gradient over ``--splits`` token ranges into an fp32 workspace,
  summed by torch in a fixed order: deterministic, unlike atomic adds), both reading pre;
- the up kernel as it is (pre and post) against cuBLAS's plain x @ w_up^T writing pre alone: a proxy for the up
  kernel without its post store, which does not exist yet.

It prints the ms per call of each, their sum per step, and the largest differences of out and dw_down from
today's (the products are summed in another order). Its first GPU run (one H100, 2026-12-06, fifteenth session,
docs/benchmarks.md) said no: the down projection 0.664 ms against cuBLAS's 0.279, its weight gradient 0.438 against
0.270, so act-on-load costs 124.5 ms a step against today's 90.8 looping off. The MLP keeps storing post.

    python benchmarks/mlp_post_bench.py [--iters N] [--splits S] [--out OUT.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cuda_timing import parse_bench_args, time_ms  # noqa: E402  (benchmarks/, the script's own folder)
from pgolf.model import triton_kernels as tk  # noqa: E402

M, D, HIDDEN, SLOPE = 98_304, 512, 2_048, 0.5
APPLICATIONS = {"off": 11, "on": 17}
MICRO_BATCHES = 8


@triton.jit
def _down_act_kernel(pre_desc, w_desc, out_desc, M, N, K: tl.constexpr, slope, PERSISTENT: tl.constexpr,
                     NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """out [M, N] = bf16(act(pre)) [M, K] @ w [N, K]^T: the down projection reading pre, not post."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tiles_n, NUM_PROGRAMS, flatten=True):
            _down_act_tile(pre_desc, w_desc, out_desc, tile, tiles_n, K, slope, BLOCK_M, BLOCK_N, BLOCK_K)
    else:  # one program per tile (the interpreter cannot loop from a program id)
        _down_act_tile(pre_desc, w_desc, out_desc, tl.program_id(0), tiles_n, K, slope, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _down_act_tile(pre_desc, w_desc, out_desc, tile, tiles_n, K: tl.constexpr, slope, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = (tile // tiles_n) * BLOCK_M
    col = (tile % tiles_n) * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        pre = pre_desc.load([row, k0]).to(tl.float32)  # [BM, BK]
        post = tk._act(pre, slope).to(pre_desc.dtype)  # the up kernel's post, bit for bit
        acc = tl.dot(post, w_desc.load([col, k0]).T, acc)  # [BN, BK] -> [BK, BN]
    out_desc.store([row, col], acc.to(out_desc.dtype))


@triton.jit
def _down_wgrad_act_kernel(g_desc, pre_desc, ws_ptr, M, N, H, rows_per_split, slope, BLOCK_N: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """ws[split] [N, H] (fp32) = g[rows]^T [N, rows] @ bf16(act(pre[rows])) [rows, H] over one token range."""
    tiles_h = tl.cdiv(H, BLOCK_H)
    n0 = (tl.program_id(0) // tiles_h) * BLOCK_N
    h0 = (tl.program_id(0) % tiles_h) * BLOCK_H
    split = tl.program_id(1)
    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    first = split * rows_per_split  # a multiple of BLOCK_K: the ranges do not overlap
    last = tl.minimum(first + rows_per_split, M)
    for m0 in range(first, last, BLOCK_K):
        g = g_desc.load([m0, n0])  # [BK, BN]; rows past M read as zeros
        post = tk._act(pre_desc.load([m0, h0]).to(tl.float32), slope).to(pre_desc.dtype)  # [BK, BH]
        acc = tl.dot(g.T, post, acc)
    n = n0 + tl.arange(0, BLOCK_N)
    h = h0 + tl.arange(0, BLOCK_H)
    at = split.to(tl.int64) * N * H + n[:, None] * H + h[None, :]
    tl.store(ws_ptr + at, acc, mask=(n[:, None] < N) & (h[None, :] < H))


def down_act(pre: torch.Tensor, w_down: torch.Tensor, tile=(128, 128, 64, 8, 4), persistent: bool = True):
    """out [M, N] = bf16(act(pre)) @ w_down^T; pre [M, K], w_down [N, K] (16-bit, contiguous)."""
    rows, K = pre.shape
    N = w_down.shape[0]
    bm, bn, bk, warps, stages = tile
    out = pre.new_empty((rows, N))
    tiles = triton.cdiv(rows, bm) * triton.cdiv(N, bn)
    programs = min(torch.cuda.get_device_properties(pre.device).multi_processor_count, tiles) if persistent else tiles
    desc = tk._TensorDescriptor.from_tensor
    _down_act_kernel[(programs,)](desc(pre, [bm, bk]), desc(w_down, [bn, bk]), desc(out, [bm, bn]), rows, N, K,
                                  SLOPE, PERSISTENT=persistent, NUM_PROGRAMS=programs, BLOCK_M=bm, BLOCK_N=bn,
                                  BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return out


def down_wgrad_act(g: torch.Tensor, pre: torch.Tensor, splits: int, tile=(128, 128, 64, 8, 3)) -> torch.Tensor:
    """dw [N, H] = g^T @ bf16(act(pre)) in g's dtype; g [M, N], pre [M, H]: ``splits`` token ranges, their fp32
    partial products summed in split order (deterministic)."""
    rows, N = g.shape
    H = pre.shape[1]
    bn, bh, bk, warps, stages = tile
    per_split = triton.cdiv(triton.cdiv(rows, splits), bk) * bk
    ws = torch.empty((splits, N, H), dtype=torch.float32, device=g.device)
    desc = tk._TensorDescriptor.from_tensor
    grid = (triton.cdiv(N, bn) * triton.cdiv(H, bh), splits)
    _down_wgrad_act_kernel[grid](desc(g, [bk, bn]), desc(pre, [bk, bh]), ws, rows, N, H, per_split, SLOPE,
                                 BLOCK_N=bn, BLOCK_H=bh, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return ws.sum(0).to(g.dtype)


def main(argv=None) -> int:
    def add_arguments(parser):
        parser.add_argument("--splits", type=int, default=8, help="token ranges of the weight gradient")

    args = parse_bench_args(__doc__, "mlp_post_bench", argv, iters=30, add_arguments=add_arguments)
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(M, D, device=dev, generator=gen).to(bf16)  # [M, d]
    g = torch.randn(M, D, device=dev, generator=gen).to(bf16)  # [M, d]: gradient of the MLP output
    w_up = (torch.randn(HIDDEN, D, device=dev, generator=gen) / D**0.5).to(bf16)  # [4d, d]
    w_down = (torch.randn(D, HIDDEN, device=dev, generator=gen) / HIDDEN**0.5).to(bf16)  # [d, 4d]
    pre, post = (torch.empty(M, HIDDEN, device=dev, dtype=bf16) for _ in range(2))
    tk.launch_mlp_up_act(x, w_up, pre, post, SLOPE)
    timings = {
        "up_pre_and_post": time_ms(lambda: tk.launch_mlp_up_act(x, w_up, pre, post, SLOPE), args.iters),
        "up_pre_only_proxy_cublas": time_ms(lambda: torch.mm(x, w_up.t()), args.iters),
        "down_cublas": time_ms(lambda: post @ w_down.t(), args.iters),
        "down_act_on_load": time_ms(lambda: down_act(pre, w_down), args.iters),
        "wgrad_cublas": time_ms(lambda: g.t() @ post, args.iters),
        "wgrad_act_on_load": time_ms(lambda: down_wgrad_act(g, pre, args.splits), args.iters),
    }
    today = timings["up_pre_and_post"] + timings["down_cublas"] + timings["wgrad_cublas"]
    candidate = timings["up_pre_only_proxy_cublas"] + timings["down_act_on_load"] + timings["wgrad_act_on_load"]
    diffs = {"out": float((down_act(pre, w_down).float() - (post @ w_down.t()).float()).abs().max()),
             "dw_down": float((down_wgrad_act(g, pre, args.splits).float() - (g.t() @ post).float()).abs().max())}
    per_step = {name: {loop: MICRO_BATCHES * n * ms for loop, n in APPLICATIONS.items()}
                for name, ms in (("today", today), ("act_on_load", candidate))}
    for name, ms in timings.items():
        print(f"{name:<26} {ms:.3f} ms", flush=True)
    print(f"per step, looping off / on: today {per_step['today']['off']:.1f} / {per_step['today']['on']:.1f} ms, "
          f"act on load {per_step['act_on_load']['off']:.1f} / {per_step['act_on_load']['on']:.1f} ms; "
          f"max |diff| {diffs}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "splits": args.splits, "ms_per_call": timings, "ms_per_step": per_step,
                                        "max_abs_diff": diffs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
