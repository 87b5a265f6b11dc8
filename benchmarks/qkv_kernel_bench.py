"""The attention's q, k, v projection and its q/k kernels alone on one GPU, at the record's shapes: the matmul
with the kernels as its epilogue (one Triton kernel, ``pgolf::qkv_linear_norm_rope`` on Hopper) against the
cuBLAS matmul followed by ``pgolf::qkv_norm_rope`` (what pgolf ran before, and still runs without TMA).

x [98,304, 512] (one micro-batch) @ w [(8 + 2 x 4) x 64, 512]^T, bf16, 2 x 8 of 64 dims rotated, the q gain, k and
v repeated twice per query head (``train.repeat_kv_heads``). Timed with CUDA events after warm-up:

- ``forward``: the forward alone;
- ``forward_backward``: forward and backward (the backward is the same kernels and matmuls on both paths, so the
  difference is the forward's).

Both paths' outputs are compared (``max_abs_diff``: the matmuls sum their products in different orders). The
printed ms/step multiplies by 8 micro-batches x 11 (looping off) or 17 (on) block applications. ``--sweep-tiles``
times the fused forward with each tile of :data:`SWEEP_TILES` (BLOCK_M, heads per tile, BLOCK_K, warps, stages,
programs per SM):
how ``attn_triton.QKV_GEMM_TILE`` is chosen. ``--ws`` times the warp-specialized Gluon kernel
(``pgolf.model.gluon_qkv``) at each tile of :data:`WS_SWEEP_TILES` against the Triton kernel at ``QKV_GEMM_TILE``,
forward kernel alone, and counts the outputs that differ from the Triton kernel's (``ws``).

    python benchmarks/qkv_kernel_bench.py [--sweep-tiles] [--ws] [--iters N] [--out OUT.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cuda_timing import parse_bench_args, time_ms  # noqa: E402  (benchmarks/, the script's own folder)

from pgolf.model import attn_kernels, attn_triton  # noqa: E402
from pgolf.model.rope import rope_buffers  # noqa: E402

T, K, H, HKV, D, HALF, REP = 98_304, 512, 8, 4, 64, 8, 2
APPLICATIONS = {"off": 11, "on": 17}
MICRO_BATCHES = 8
# (BLOCK_M, heads per tile, BLOCK_K, warps, stages, programs per SM; 0: one program per tile)
SWEEP_TILES = [
    (256, 2, 64, 8, 4, 1), (256, 2, 64, 8, 4, 0), (128, 2, 64, 8, 3, 2), (128, 2, 64, 4, 3, 2), (128, 2, 64, 8, 2, 2),
    (128, 2, 64, 8, 3, 0),
]
# the Gluon kernel's (BLOCK_M, BLOCK_K, ring stages, store buffer sets)
WS_SWEEP_TILES = [(128, 64, 5, 1), (128, 64, 4, 1), (128, 64, 3, 2), (128, 32, 8, 1)]


def main(argv=None) -> int:
    def add_arguments(parser):
        parser.add_argument("--sweep-tiles", action="store_true", help="time the fused forward with each SWEEP_TILES tile")
        parser.add_argument("--ws", action="store_true", help="time the Gluon kernel at each WS_SWEEP_TILES tile")

    args = parse_bench_args(__doc__, "qkv_kernel_bench", argv, add_arguments=add_arguments)
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(T, K, device=dev, generator=gen).to(bf16)  # [T, K]
    w = (torch.randn((H + 2 * HKV) * D, K, device=dev, generator=gen) / K**0.5).to(bf16)  # [(H + 2 Hkv) D, K]
    _, cos, sin = (t.to(dev) for t in rope_buffers(2 * HALF, 10000.0, T))
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, half], as the model hands them
    gain = torch.rand(H, device=dev, generator=gen) + 0.5
    if not attn_triton.qkv_gemm_usable(x, w, H, HKV):
        sys.exit("qkv_kernel_bench: the TMA kernel does not apply here (needs sm90+ and aligned bf16)")
    grads = [torch.randn(T, h, D, device=dev, generator=gen).to(bf16) for h in (H, HKV * REP, HKV, HKV * REP)]

    paths = {
        "matmul_then_kernels": lambda xx, ww: attn_kernels.qkv_norm_rope(F.linear(xx, ww), H, HKV, cos, sin, gain, REP),
        "fused_epilogue": lambda xx, ww: attn_kernels.qkv_linear_norm_rope(xx, ww, H, HKV, cos, sin, gain, REP),
    }
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tile": attn_triton.QKV_GEMM_TILE,
               "shape": {"T": T, "K": K, "H": H, "Hkv": HKV, "D": D, "rotated": 2 * HALF, "rep": REP}, "paths": {}}
    outputs = {}
    for name, fn in paths.items():
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

        def forward_backward():
            outs = fn(xg, wg)
            torch.autograd.backward(outs, grads)

        with torch.no_grad():
            fwd_ms = time_ms(lambda: fn(x, w), args.iters)
        both_ms = time_ms(forward_backward, args.iters)
        with torch.no_grad():
            outputs[name] = [o.float() for o in fn(x, w)]
        per_step = {loop: MICRO_BATCHES * n * both_ms for loop, n in APPLICATIONS.items()}
        results["paths"][name] = {"forward_ms": fwd_ms, "forward_backward_ms": both_ms, "ms_per_step": per_step}
        print(f"{name:<20} forward {fwd_ms:.3f} ms  forward+backward {both_ms:.3f} ms  per step: looping off "
              f"{per_step['off']:.1f} ms, on {per_step['on']:.1f} ms", flush=True)
    diffs = {n: float((a - b).abs().max()) for n, a, b in zip("qkva", *outputs.values())}
    results["max_abs_diff"] = diffs
    print(f"max |fused - matmul then kernels| per output: {diffs}", flush=True)
    if args.sweep_tiles:
        results["tile_sweep"] = sweep_tiles(x, w, cos, sin, gain, args.iters)
    if args.ws:
        results["ws"] = compare_ws(x, w, cos, sin, gain, args.iters)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def sweep_tiles(x, w, cos, sin, gain, iters: int) -> list[dict]:
    """The fused forward's kernel with each tile of SWEEP_TILES: ms per call and per step (forward only), fastest
    first; a tile the GPU cannot hold is reported with its error."""
    dtype = x.dtype
    cos2, sin2, gain2 = attn_kernels._kernel_tables(cos, sin, gain, dtype)
    outs = attn_kernels._qkv_linear_outputs(x, w, H, HKV, REP)
    q, k, v, v_copies, qk, rstd_q, rstd_k = outs
    rows = []
    for tile in SWEEP_TILES:
        def call():
            attn_triton.launch_qkv_gemm_norm_rope(x, w, cos2, sin2, gain2, attn_kernels.QK_EPS, qk, q, k, v, v_copies,
                                                  rstd_q, rstd_k, tile=tile)
        try:
            ms = time_ms(call, iters)
        except Exception as error:  # noqa: BLE001 - a tile past the GPU's shared memory or registers
            rows.append({"tile": list(tile), "error": f"{type(error).__name__}: {str(error)[:160]}"})
            print(f"tile {list(tile)}  {rows[-1]['error']}", flush=True)
            continue
        rows.append({"tile": list(tile), "forward_ms": ms, "default": tile == attn_triton.QKV_GEMM_TILE,
                     "forward_ms_per_step": {loop: MICRO_BATCHES * n * ms for loop, n in APPLICATIONS.items()}})
    rows.sort(key=lambda r: r.get("forward_ms", float("inf")))
    for r in rows:
        if "forward_ms" in r:
            print(f"tile {r['tile']}  {r['forward_ms']:.3f} ms{'  (default)' if r['default'] else ''}", flush=True)
    return rows


def compare_ws(x, w, cos, sin, gain, iters: int) -> dict:
    """The Triton kernel (QKV_GEMM_TILE) and the Gluon kernel at each WS_SWEEP_TILES tile, forward kernel alone: ms
    a call, and per output the fraction of elements that differ from the Triton kernel's and the largest
    difference (outputs start as NaN, so an element a kernel does not write counts)."""
    from pgolf.model import gluon_qkv

    cos2, sin2, gain2 = attn_kernels._kernel_tables(cos, sin, gain, x.dtype)
    names = ("q", "k", "v", "v_copies", "qk", "rstd_q", "rstd_k")

    def fresh():  # (q, k, v, v_copies, qk, rstd_q, rstd_k), NaN
        outs = attn_kernels._qkv_linear_outputs(x, w, H, HKV, REP)
        for o in outs:
            o.fill_(float("nan"))
        return outs

    ref = fresh()
    rq, rk, rv, rvc, rqk, rsq, rsk = ref
    triton_call = lambda: attn_triton.launch_qkv_gemm_norm_rope(  # noqa: E731
        x, w, cos2, sin2, gain2, attn_kernels.QK_EPS, rqk, rq, rk, rv, rvc, rsq, rsk, tile=attn_triton.QKV_GEMM_TILE)
    result = {"triton_ms": time_ms(triton_call, iters), "tiles": []}
    print(f"ws: Triton kernel {attn_triton.QKV_GEMM_TILE}  {result['triton_ms']:.3f} ms", flush=True)
    for tile in WS_SWEEP_TILES:
        outs = fresh()
        q, k, v, v_copies, qk, rstd_q, rstd_k = outs
        call = lambda: gluon_qkv.launch_qkv_ws(  # noqa: E731
            x, w, cos2, sin2, gain2, attn_kernels.QK_EPS, qk, q, k, v, v_copies, rstd_q, rstd_k, REP, tile=tile)
        try:
            ms = time_ms(call, iters)
            torch.cuda.synchronize()
        except Exception as error:  # noqa: BLE001 - a tile past the shared memory
            result["tiles"].append({"tile": list(tile), "error": f"{type(error).__name__}: {str(error)[:160]}"})
            print(f"ws tile {list(tile)}  {result['tiles'][-1]['error']}", flush=True)
            continue
        diffs = {}
        for name, a, b in zip(names, outs, ref):
            a, b = a.float(), b.float()
            diffs[name] = {"unequal": float((a != b).float().mean()),
                           "max_abs_diff": float((a - b).abs().nan_to_num(float("inf")).max())}
        result["tiles"].append({"tile": list(tile), "ms": ms, "vs_triton": diffs})
        print(f"ws tile {list(tile)}  {ms:.3f} ms  unequal fraction per output "
              f"{ {n: round(d['unequal'], 6) for n, d in diffs.items()} }", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
