"""An experiment for issue 16, prepared on CPU: can the MLP keep post and one sign bit per element instead of pre?

Today the MLP up kernel writes pre and post = leaky_relu(pre, s)^2 ([M, 4d] bf16 each, 400 MB a call at the
record's shapes). cuBLAS needs post twice (the down projection and its weight gradient); pre is read once, by the
backward kernel, for act'(pre) = 2 pre (pre > 0) else 2 s^2 pre. Since post is a square, pre's magnitude is
sqrt(post) (pre > 0) or sqrt(post) / s (pre < 0), so act'(pre) = sqrt(post) * (2 if pre > 0 else -2 s): post
and pre's sign suffice. The sign, 8 per byte, is 25 MB a call. The up kernel would then write 425 MB instead of
800 (``up_pre_and_post`` against cuBLAS's pre-only product, 0.484 against 0.313 ms on one H100, says the stores
are what it waits on), and the backward would read 25 MB more. Numerics: act' from sqrt(bf16(post)) instead of
from bf16 pre, a relative difference of at most about 2^-9, below the bf16 rounding of the stored d pre.

Timed (CUDA events, M = 98,304 tokens, d = 512, 4d = 2,048, bf16), each against today's kernel of the same
direction (:func:`pgolf.model.triton_kernels.launch_mlp_up_act` / ``launch_mlp_act_grad``, same tiles):

- :func:`up_signs`: x @ w_up^T with post and the packed signs as its epilogue (no pre);
- :func:`act_grad_signs`: (g @ w_down) * act' with act' from post and the signs.

It prints the ms per call, their sum per step, whether post and the signs are bit for bit today's, and how far
d pre moves (largest difference relative to |d pre|, and the fraction of elements that differ). Not run on a GPU
yet (written in the fifteenth session, after its device time was spent).

    python benchmarks/mlp_signs_bench.py [--iters N] [--out OUT.json]
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
def _pack_signs(c, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """[BM, WIDTH // 8] uint8: bit b of byte j is (c[:, 8 j + b] > 0)."""
    bits = tl.reshape((c > 0).to(tl.int32), (BLOCK_M, WIDTH // 8, 8)) << tl.arange(0, 8)[None, None, :]
    return tl.sum(bits, axis=2).to(tl.uint8)


@triton.jit
def _unpack_signs(packed, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """The [BM, WIDTH] mask of (pre > 0) from :func:`_pack_signs`'s bytes."""
    bits = (packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_M, WIDTH)) != 0


@triton.jit
def _signs_kernel(a_desc, b_desc, post_desc, sign_desc, out_desc, M, N, K: tl.constexpr, slope,
                  B_KN: tl.constexpr, BACKWARD: tl.constexpr, PERSISTENT: tl.constexpr,
                  BITWISE_ROUND: tl.constexpr, NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Forward: post (out) and signs (out) of a @ b^T. Backward: d pre (out_desc) = (a @ b) * act' from post and
    signs (in). Tiles walk as in :func:`pgolf.model.triton_kernels._mlp_tma_kernel`."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tiles_n, NUM_PROGRAMS, flatten=True):
            _signs_tile(a_desc, b_desc, post_desc, sign_desc, out_desc, tile, tiles_n, K, slope, B_KN, BACKWARD,
                        BITWISE_ROUND, BLOCK_M, BLOCK_N, BLOCK_K)
    else:  # one program per tile (the interpreter cannot loop from a program id)
        _signs_tile(a_desc, b_desc, post_desc, sign_desc, out_desc, tl.program_id(0), tiles_n, K, slope, B_KN,
                    BACKWARD, BITWISE_ROUND, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _signs_tile(a_desc, b_desc, post_desc, sign_desc, out_desc, tile, tiles_n, K: tl.constexpr, slope,
                B_KN: tl.constexpr, BACKWARD: tl.constexpr, BITWISE_ROUND: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    HALF: tl.constexpr = BLOCK_N // 2
    row = (tile // tiles_n) * BLOCK_M
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
        c = tk._narrow(halves[i], post_desc.dtype, BITWISE_ROUND)  # the product as an unfused F.linear stores it
        at = col + i * HALF
        if BACKWARD:
            post = post_desc.load([row, at]).to(tl.float32)
            positive = _unpack_signs(sign_desc.load([row, at // 8]), BLOCK_M, HALF)
            grad = tl.sqrt(post) * tl.where(positive, 2.0, -2.0 * slope)  # act'(pre) from post and pre's sign
            out_desc.store([row, at], tk._narrow(c.to(tl.float32) * grad, out_desc.dtype, BITWISE_ROUND))
        else:
            post_desc.store([row, at], tk._narrow(tk._act(c.to(tl.float32), slope), post_desc.dtype, BITWISE_ROUND))
            sign_desc.store([row, at // 8], _pack_signs(c, BLOCK_M, HALF))


def _launch(a, b, b_kn: bool, post, signs, out, backward: bool, tile=None, persistent: bool = True,
            bitwise_round: bool = False) -> None:
    rows, K = a.shape
    N = post.shape[1]
    bm, bn, bk, warps, stages = tile or tk.TMA_TILES[backward]
    tiles = triton.cdiv(rows, bm) * triton.cdiv(N, bn)
    programs = min(torch.cuda.get_device_properties(a.device).multi_processor_count, tiles) if persistent else tiles
    desc = tk._TensorDescriptor.from_tensor
    _signs_kernel[(programs,)](desc(a, [bm, bk]), desc(b, [bk, bn] if b_kn else [bn, bk]), desc(post, [bm, bn // 2]),
                               desc(signs, [bm, bn // 16]), desc(out, [bm, bn // 2]), rows, N, K, SLOPE,
                               B_KN=b_kn, BACKWARD=backward, PERSISTENT=persistent, BITWISE_ROUND=bitwise_round,
                               NUM_PROGRAMS=programs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                               num_stages=stages)


def up_signs(x: torch.Tensor, w_up: torch.Tensor, post: torch.Tensor, signs: torch.Tensor, **launch) -> None:
    """post [M, 4d] = bf16(act(bf16(x @ w_up^T))), signs [M, 4d / 8] uint8 = the product's signs, 8 per byte."""
    _launch(x, w_up, False, post, signs, post, backward=False, **launch)


def act_grad_signs(g: torch.Tensor, w_down: torch.Tensor, post: torch.Tensor, signs: torch.Tensor,
                   dpre: torch.Tensor, **launch) -> None:
    """dpre [M, 4d] = bf16(g @ w_down) * act' with act' = sqrt(post) * (2 where the sign bit is set, else -2 s)."""
    _launch(g, w_down, True, post, signs, dpre, backward=True, **launch)


def signs_of(pre: torch.Tensor) -> torch.Tensor:
    """The packed signs of pre [M, N] (N a multiple of 8) as :func:`up_signs` writes them: [M, N / 8] uint8."""
    bits = (pre > 0).to(torch.int32).view(pre.shape[0], -1, 8) << torch.arange(8, device=pre.device)
    return bits.sum(-1).to(torch.uint8)


def main(argv=None) -> int:
    args = parse_bench_args(__doc__, "mlp_signs_bench", argv, iters=30)
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(M, D, device=dev, generator=gen).to(bf16)  # [M, d]
    g = torch.randn(M, D, device=dev, generator=gen).to(bf16)  # [M, d]: gradient of the MLP output
    w_up = (torch.randn(HIDDEN, D, device=dev, generator=gen) / D**0.5).to(bf16)  # [4d, d]
    w_down = (torch.randn(D, HIDDEN, device=dev, generator=gen) / HIDDEN**0.5).to(bf16)  # [d, 4d]
    pre, post, dpre, post_s, dpre_s = (torch.empty(M, HIDDEN, device=dev, dtype=bf16) for _ in range(5))
    signs = torch.empty(M, HIDDEN // 8, device=dev, dtype=torch.uint8)
    tk.launch_mlp_up_act(x, w_up, pre, post, SLOPE)
    tk.launch_mlp_act_grad(g, w_down, pre, dpre, SLOPE)
    up_signs(x, w_up, post_s, signs)
    act_grad_signs(g, w_down, post_s, signs, dpre_s)
    timings = {
        "up_pre_and_post": time_ms(lambda: tk.launch_mlp_up_act(x, w_up, pre, post, SLOPE), args.iters),
        "up_post_and_signs": time_ms(lambda: up_signs(x, w_up, post_s, signs), args.iters),
        "act_grad_from_pre": time_ms(lambda: tk.launch_mlp_act_grad(g, w_down, pre, dpre, SLOPE), args.iters),
        "act_grad_from_post_and_signs": time_ms(lambda: act_grad_signs(g, w_down, post_s, signs, dpre_s), args.iters),
    }
    today = timings["up_pre_and_post"] + timings["act_grad_from_pre"]
    candidate = timings["up_post_and_signs"] + timings["act_grad_from_post_and_signs"]
    moved = (dpre_s.float() - dpre.float()).abs()
    checks = {"post_bit_exact": bool(torch.equal(post_s, post)), "signs_exact": bool(torch.equal(signs, signs_of(pre))),
              "dpre_max_diff_relative": float((moved / dpre.float().abs().clamp_min(1e-30)).max()),
              "dpre_fraction_differing": float((moved > 0).float().mean())}
    per_step = {name: {loop: MICRO_BATCHES * n * ms for loop, n in APPLICATIONS.items()}
                for name, ms in (("today", today), ("post_and_signs", candidate))}
    for name, ms in timings.items():
        print(f"{name:<30} {ms:.3f} ms", flush=True)
    print(f"per step, looping off / on: today {per_step['today']['off']:.1f} / {per_step['today']['on']:.1f} ms, "
          f"post and signs {per_step['post_and_signs']['off']:.1f} / {per_step['post_and_signs']['on']:.1f} ms; "
          f"{checks}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "ms_per_call": timings, "ms_per_step": per_step, "checks": checks},
                                       indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
