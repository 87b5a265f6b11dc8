"""The q/k RMSNorm + partial RoPE kernels alone on one GPU, at the record's shapes, forward and backward.

x is a column slice of the fused q, k, v projection's [T, 1024] output, as training passes it: q (8 heads of 64, the
q gain) and k (4 heads, v's rows copied along; ``rep`` 1: FlashAttention's GQA, 2: the heads repeated,
``train.repeat_kv_heads``). T = 98,304 tokens (one micro-batch), 16 rotated dims, bf16. CUDA events after warm-up.
Per training step each runs 8 micro-batches x 11 (looping off) or 17 (on) attention applications.

``--sweep-blocks`` times each (rows, warps) of :data:`SWEEP_BLOCKS` as ``attn_triton.QK_BLOCK``. ``--against FILE``
also times another version of ``pgolf/model/attn_triton.py`` (for example an older commit's,
``git show REV:pgolf/model/attn_triton.py > FILE``) on the same tensors and compares their outputs.

    python benchmarks/qk_kernel_bench.py [--sweep-blocks] [--against FILE] [--out OUT.json]
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cuda_timing import parse_bench_args, time_ms  # noqa: E402  (benchmarks/, the script's own folder)

from pgolf.model import attn_triton  # noqa: E402
from pgolf.model.rope import rope_buffers  # noqa: E402

T, D, HALF, WIDTH = 98_304, 64, 8, 1024  # tokens, head dim, rotated pairs, q + k + v columns
APPLICATIONS = {"off": 11, "on": 17}
MICRO_BATCHES = 8
# (name, heads, first column, with the gain, rep, with v)
CASES = [("q", 8, 0, True, 1, False), ("k", 4, 512, False, 1, True), ("k_rep2", 4, 512, False, 2, True)]
SWEEP_BLOCKS = [(32, 2), (32, 4), (64, 2), (64, 4), (64, 8), (128, 4), (128, 8), (256, 8)]


def load_module(path: Path):
    """Another attn_triton.py, imported under its own name (its kernels compile separately)."""
    spec = importlib.util.spec_from_file_location("attn_triton_against", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Inputs:
    """One micro-batch's tensors, shared by every timed version."""

    def __init__(self, dev: torch.device):
        gen = torch.Generator(device=dev).manual_seed(0)
        self.qkv = torch.randn(T, WIDTH, device=dev, generator=gen).bfloat16()  # [T, 1024]
        self.grad_qkv = torch.empty_like(self.qkv)
        _, cos, sin = (t.to(dev) for t in rope_buffers(2 * HALF, 10000.0, T))
        self.cos, self.sin = cos.contiguous(), sin.contiguous()  # [T, 8]
        self.gain = torch.rand(8, device=dev, generator=gen) + 0.5


def time_case(module, inputs: Inputs, case, iters: int) -> tuple[float, float, list[torch.Tensor]]:
    """(forward ms, backward ms, outputs) of one case with ``module``'s launchers."""
    _, heads, first, with_gain, rep, with_v = case
    dev, bf16 = inputs.qkv.device, torch.bfloat16
    x = inputs.qkv[:, first:first + heads * D].view(T, heads, D)  # a column slice: token stride 1024
    v = inputs.qkv[:, 768:].view(T, heads, D) if with_v else None
    gain = inputs.gain if with_gain else None
    out = torch.empty(T, heads * rep, D, device=dev, dtype=bf16)
    rstd = torch.empty(T * heads, device=dev, dtype=torch.float32)
    v_out = torch.empty(T, heads, D, device=dev, dtype=bf16) if with_v else None
    v_copies = torch.empty_like(out) if with_v and rep > 1 else None
    forward = lambda: module.launch_qk_norm_rope_fwd(x, inputs.cos, inputs.sin, gain, out, rstd, 1e-6, v, v_out,
                                                     v_copies)
    forward()
    gen = torch.Generator(device=dev).manual_seed(heads * rep)  # the same gradients for every version
    g = torch.randn(out.shape, device=dev, generator=gen).to(bf16)
    gv = torch.randn(T, heads, D, device=dev, generator=gen).to(bf16) if with_v else None
    gv_copies = torch.randn(out.shape, device=dev, generator=gen).to(bf16) if with_v and rep > 1 else None
    dx = inputs.grad_qkv[:, first:first + heads * D].view(T, heads, D)
    dv = inputs.grad_qkv[:, 768:].view(T, heads, D) if with_v else None
    programs = module.qk_norm_rope_programs(T * heads, heads, dev)
    dgain = torch.empty(heads, programs, device=dev) if with_gain else None
    backward = lambda: module.launch_qk_norm_rope_bwd(g, x, rstd, inputs.cos, inputs.sin, gain, dx, dgain, gv,
                                                      gv_copies, dv)
    backward()
    outputs = [out.float(), dx.float()] + ([dgain.sum(1)] if with_gain else []) + ([dv.float()] if with_v else [])
    return time_ms(forward, iters), time_ms(backward, iters), outputs


def per_step(fwd_ms: float, bwd_ms: float) -> dict:
    return {loop: MICRO_BATCHES * n * (fwd_ms + bwd_ms) for loop, n in APPLICATIONS.items()}


def main(argv=None) -> int:
    def add_arguments(parser):
        parser.add_argument("--sweep-blocks", action="store_true", help="time each SWEEP_BLOCKS (rows, warps)")
        parser.add_argument("--against", type=Path, help="another attn_triton.py to time on the same tensors")

    args = parse_bench_args(__doc__, "qk_kernel_bench", argv, add_arguments=add_arguments)
    inputs = Inputs(torch.device("cuda"))
    versions = [("pgolf", attn_triton)] + ([("against", load_module(args.against))] if args.against else [])
    results = {"qk_block": list(attn_triton.QK_BLOCK), "cases": {}}
    for case in CASES:
        row, outputs = {}, {}
        for name, module in versions:
            fwd, bwd, outputs[name] = time_case(module, inputs, case, args.iters)
            row[name] = {"forward_ms": fwd, "backward_ms": bwd, "ms_per_step": per_step(fwd, bwd)}
            print(f"{case[0]:<7} {name:<8} forward {fwd:.3f} ms  backward {bwd:.3f} ms  per step (both, one of q / k): "
                  f"looping off {row[name]['ms_per_step']['off']:.1f} ms", flush=True)
        if "against" in outputs:
            row["max_abs_diff"] = [float((a - b).abs().max()) for a, b in zip(outputs["pgolf"], outputs["against"])]
            print(f"{case[0]:<7} max |pgolf - against| (out, dx, [dgain], [dv]): {row['max_abs_diff']}", flush=True)
        results["cases"][case[0]] = row
    if args.sweep_blocks:
        default, results["block_sweep"] = attn_triton.QK_BLOCK, []
        try:
            for block in SWEEP_BLOCKS:
                attn_triton.QK_BLOCK = block
                timed = {case[0]: time_case(attn_triton, inputs, case, args.iters)[:2] for case in CASES[:2]}
                results["block_sweep"].append({"block": list(block), **timed})
                print(f"QK_BLOCK {block}: " + ", ".join(f"{n} {f:.3f} / {b:.3f} ms" for n, (f, b) in timed.items()),
                      flush=True)
        finally:
            attn_triton.QK_BLOCK = default
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
