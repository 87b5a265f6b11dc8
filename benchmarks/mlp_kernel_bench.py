"""The fused MLP kernels alone on one GPU, at the record's shapes: pgolf's against the record script's own.

Forward: pre = x @ w_up^T, post = leaky_relu(pre, 0.5)^2. Backward: dpre = (g @ w_down) * act'(pre). M = 98,304
tokens (one micro-batch), d = 512, hidden 2,048, bf16. Variants timed (CUDA events, after warm-up):

- ``pgolf``: ``launch_mlp_up_act`` / ``launch_mlp_act_grad`` as training calls them (on sm_90 the Gluon kernel of
  ``pgolf_ws``, elsewhere the persistent TMA kernel);
- ``pgolf_tma``: the persistent TMA kernel at ``TMA_TILES`` (the default before the Gluon kernel);
- ``pgolf_bitwise``: the same kernel with the interpreter's bit-level bf16 rounding (what the GPU ran up to
  commit 09bc25f; the values are the same, the epilogue does ~10 more integer ops per element);
- ``pgolf_ws``: the warp-specialized Gluon kernel (``pgolf.model.gluon_mlp``, two consumer warpgroups taking
  turns) at its ``WS_TILES``, where it applies (Gluon, sm_90);
- ``record``: the record script's ``linear_leaky_relu_square`` (forward, then backward with ``w_down.T.contiguous()``
  as its autograd function does), when ``--record-script`` imports.

Each variant's outputs are compared with the TMA kernel's bit for bit (``max_abs_diff_vs_tma``). Per training step the kernels run
8 micro-batches x 11 (looping off) or 17 (on) block applications, forward and backward: the printed ms/step
estimates multiply by those counts.

``--sweep-tiles`` then times the TMA kernel with each candidate tile and grid of :data:`SWEEP_TILES` in each
direction (the others at ``TMA_TILES``), fastest first, with each one's largest difference from the default tile's
outputs (a different BLOCK_K sums in another order), its registers and shared memory, and the ms/step it would save:
how ``TMA_TILES`` is chosen on a new GPU (``with_sweep_tiles.py`` then times the step with the fastest tiles).
``--sweep-ws`` times the Gluon kernel at each tile of :data:`WS_SWEEP_TILES` (``ws_tile_sweep`` in the JSON).

    python benchmarks/mlp_kernel_bench.py [--record-script .ref/pr1855/train_gpt.py] [--sweep-tiles] [--sweep-ws]
        [--out OUT.json]
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cuda_timing import parse_bench_args, time_ms  # noqa: E402  (benchmarks/, the script's own folder)

from pgolf.model import gluon_mlp  # noqa: E402
from pgolf.model import triton_kernels as tk  # noqa: E402

M, D, HIDDEN, SLOPE = 98_304, 512, 2_048, 0.5
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, pipeline stages, programs per SM; 0: one program per tile). The 128 x 128 and
# 64 x 256 tiles with at most 3 stages (2 in the backward, which also holds a pre block) fit twice in an H100's
# shared memory, and the 128 x 128 x 32 ones three times: one program's epilogue stores can then overlap another's
# products.
SWEEP_TILES = [
    (128, 256, 64, 8, 4, 1), (128, 256, 64, 8, 3, 1), (128, 256, 64, 8, 4, 0), (128, 256, 64, 8, 3, 0),
    (128, 128, 64, 8, 2, 2), (128, 128, 64, 8, 3, 2), (128, 128, 64, 4, 2, 2), (64, 256, 64, 4, 2, 2),
    (128, 128, 32, 4, 4, 2), (128, 128, 32, 4, 3, 3), (128, 128, 64, 8, 2, 0), (64, 256, 64, 4, 2, 0),
    (128, 128, 32, 4, 4, 0),
]
# The Gluon kernel's (BLOCK_M, BLOCK_N, BLOCK_K, ring stages, store buffer sets); those past 227 KB of shared
# memory fail to launch and are listed with their error.
WS_SWEEP_TILES = [(128, 128, 64, 5, 1), (128, 128, 64, 4, 1), (128, 128, 64, 3, 2), (128, 128, 64, 3, 1),
                  (128, 128, 32, 8, 1), (128, 128, 32, 6, 2)]
APPLICATIONS = {"off": 11, "on": 17}
MICRO_BATCHES = 8


def load_record_kernel(script: Path):
    """The record's ``linear_leaky_relu_square`` (its module imports FlashAttention 3: the reference's shim)."""
    sys.path.insert(0, str(script.parent.parent / "shim"))
    os.environ.setdefault("FA3_SHIM", "torch")
    spec = importlib.util.spec_from_file_location("pr1855_train_gpt", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.linear_leaky_relu_square


def main(argv=None) -> int:
    def add_arguments(parser):
        parser.add_argument("--record-script", type=Path, help="PR #1855 train_gpt.py (its kernel is timed too)")
        parser.add_argument("--sweep-tiles", action="store_true", help="time the TMA kernel with each SWEEP_TILES tile")
        parser.add_argument("--sweep-ws", action="store_true",
                            help="time the Gluon kernel with each WS_SWEEP_TILES tile")

    args = parse_bench_args(__doc__, "mlp_kernel_bench", argv, add_arguments=add_arguments)
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(M, D, device=dev, dtype=bf16, generator=gen)  # [M, d]
    g = torch.randn(M, D, device=dev, dtype=bf16, generator=gen)  # [M, d]: gradient of the MLP output
    w_up = (torch.randn(HIDDEN, D, device=dev, generator=gen) / D**0.5).to(bf16)  # [4d, d]
    w_down = (torch.randn(D, HIDDEN, device=dev, generator=gen) / HIDDEN**0.5).to(bf16)  # [d, 4d]
    empty = lambda: torch.empty(M, HIDDEN, device=dev, dtype=bf16)  # noqa: E731
    pre, post, dpre = empty(), empty(), empty()
    if not tk._tma_usable(x, w_up, pre, post):
        sys.exit("mlp_kernel_bench: the TMA kernel does not apply here (needs sm90+ and aligned bf16)")

    tma = (lambda: tk._launch_mlp_tma(x, w_up, False, pre, post, SLOPE, backward=False),
           lambda: tk._launch_mlp_tma(g, w_down, True, pre, dpre, SLOPE, backward=True))
    variants = {
        "pgolf": (lambda: tk.launch_mlp_up_act(x, w_up, pre, post, SLOPE),
                  lambda: tk.launch_mlp_act_grad(g, w_down, pre, dpre, SLOPE)),
        "pgolf_tma": tma,
        "pgolf_bitwise": (lambda: tk._launch_mlp_tma(x, w_up, False, pre, post, SLOPE, backward=False, bitwise_round=True),
                          lambda: tk._launch_mlp_tma(g, w_down, True, pre, dpre, SLOPE, backward=True, bitwise_round=True)),
    }
    if gluon_mlp.ws_usable(x, post, backward=False):
        variants["pgolf_ws"] = (lambda: gluon_mlp.launch_mlp_ws(x, w_up, False, pre, post, SLOPE, backward=False),
                                lambda: gluon_mlp.launch_mlp_ws(g, w_down, True, pre, dpre, SLOPE, backward=True))
    if args.record_script:
        record_kernel = load_record_kernel(args.record_script)
        box = {}

        def record_fwd():
            box["pre"], box["post"] = record_kernel(x, w_up)

        def record_bwd():  # its autograd backward: w_down transposed into a contiguous copy first
            box["dpre"] = record_kernel(g, w_down.T.contiguous(), aux=pre)

        variants["record"] = (record_fwd, record_bwd)

    tma[0](), tma[1]()
    reference = {"pre": pre.clone(), "post": post.clone(), "dpre": dpre.clone()}  # the TMA kernel's outputs
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [M, D, HIDDEN], "variants": {}}
    for name, (fwd, bwd) in variants.items():
        fwd_ms, bwd_ms = time_ms(fwd, args.iters), time_ms(bwd, args.iters)
        fwd(), bwd()
        torch.cuda.synchronize()
        outputs = box if name == "record" else {"pre": pre, "post": post, "dpre": dpre}
        diffs = {k: float((outputs[k].float() - reference[k].float()).abs().max()) for k in reference}
        per_step = {loop: MICRO_BATCHES * n * (fwd_ms + bwd_ms) for loop, n in APPLICATIONS.items()}
        results["variants"][name] = {"forward_ms": fwd_ms, "backward_ms": bwd_ms, "ms_per_step": per_step,
                                     "max_abs_diff_vs_tma": diffs}
        print(f"{name:<14} forward {fwd_ms:.3f} ms  backward {bwd_ms:.3f} ms  per step: looping off "
              f"{per_step['off']:.1f} ms, on {per_step['on']:.1f} ms  max |diff| vs TMA {diffs}", flush=True)
    operands = {False: (x, w_up, False, pre, post), True: (g, w_down, True, pre, dpre)}
    if args.sweep_tiles:
        results["tile_sweep"] = {d: sweep_tiles(operands[d == "backward"], d == "backward", reference, args.iters)
                                 for d in ("forward", "backward")}
    if args.sweep_ws and "pgolf_ws" in variants:
        results["ws_tile_sweep"] = {d: sweep_ws_tiles(operands[d == "backward"], d == "backward", reference,
                                                      args.iters) for d in ("forward", "backward")}
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def sweep_tiles(operands: tuple, backward: bool, reference: dict, iters: int) -> list[dict]:
    """Each tile of SWEEP_TILES for one direction: ms per call, the saving per step against the default tile
    (looping off / on) and the largest difference from the default tile's output; fastest first. A tile that does
    not compile or launch (shared memory, registers) is listed with its error."""
    a, b, b_kn, pre, out = operands
    name = "dpre" if backward else "post"
    default = tk.TMA_TILES[backward]
    rows = []
    try:
        for tile in SWEEP_TILES:
            tk.TMA_TILES[backward] = tile
            try:
                ms = time_ms(lambda: tk._launch_mlp_tma(a, b, b_kn, pre, out, SLOPE, backward=backward), iters)
                kernel = tk._launch_mlp_tma(a, b, b_kn, pre, out, SLOPE, backward=backward)
                torch.cuda.synchronize()
            except Exception as exc:  # out of resources, an unsupported layout: report and go on
                rows.append({"tile": list(tile), "error": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            diff = float((out.float() - reference[name].float()).abs().max())
            rows.append({"tile": list(tile), "ms": ms, "max_abs_diff_vs_default": diff,
                         "registers": getattr(kernel, "n_regs", None),
                         "shared_bytes": getattr(getattr(kernel, "metadata", None), "shared", None)})
    finally:
        tk.TMA_TILES[backward] = default
    base = next((r["ms"] for r in rows if r["tile"] == list(default) and "ms" in r), None)
    for r in rows:
        if "ms" in r and base is not None:
            r["saving_ms_per_step"] = {loop: MICRO_BATCHES * n * (base - r["ms"]) for loop, n in APPLICATIONS.items()}
    rows.sort(key=lambda r: r.get("ms", float("inf")))
    direction = "backward" if backward else "forward"
    for r in rows:
        if "ms" in r:
            saving = r.get("saving_ms_per_step", {})
            print(f"{direction:<8} tile {r['tile']}  {r['ms']:.3f} ms  saves {saving.get('off', 0):.1f} / "
                  f"{saving.get('on', 0):.1f} ms per step  max |diff| vs default {r['max_abs_diff_vs_default']:.3g}"
                  f"  {r['registers']} registers, {r['shared_bytes']} B shared"
                  + ("  (default)" if r["tile"] == list(default) else ""), flush=True)
        else:
            print(f"{direction:<8} tile {r['tile']}  {r['error']}", flush=True)
    return rows



def sweep_ws_tiles(operands: tuple, backward: bool, reference: dict, iters: int) -> list[dict]:
    """The Gluon kernel at each WS_SWEEP_TILES tile for one direction: ms per call and the largest difference from
    the TMA kernel's output (0: the same bits); fastest first; a tile that does not launch is listed with its error."""
    a, b, b_kn, pre, out = operands
    name = "dpre" if backward else "post"
    rows = []
    for tile in WS_SWEEP_TILES:
        try:
            ms = time_ms(lambda: gluon_mlp.launch_mlp_ws(a, b, b_kn, pre, out, SLOPE, backward, tile=tile), iters)
            gluon_mlp.launch_mlp_ws(a, b, b_kn, pre, out, SLOPE, backward, tile=tile)
            torch.cuda.synchronize()
        except Exception as exc:  # shared memory past the limit: report and go on
            rows.append({"tile": list(tile), "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        diff = float((out.float() - reference[name].float()).abs().max())
        rows.append({"tile": list(tile), "ms": ms, "max_abs_diff_vs_tma": diff})
    rows.sort(key=lambda r: r.get("ms", float("inf")))
    for r in rows:
        print(f"{'backward' if backward else 'forward':<8} ws tile {r['tile']}  "
              + (f"{r['ms']:.3f} ms  max |diff| vs TMA {r['max_abs_diff_vs_tma']:.3g}" if "ms" in r else r["error"]),
              flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())

