"""The LM head and its softcapped loss on one GPU at the record's shapes: the separate kernels against the fused op.

T = 98,304 tokens (one micro-batch), d = 512, V = 8,192, bf16 under autocast, upstream gradient 1/8 (8 micro-batches).
Paths timed forward + backward (CUDA events, after warm-up), each with the head's matmuls:

- ``separate``: ``h @ w^T`` then ``kernels.softcapped_cross_entropy`` (the forward kernel reads the logits for the loss,
  the backward kernel reads them again and writes their gradient): ``train.fused_head_loss: false``;
- ``fused``: ``head_loss.head_softcapped_cross_entropy`` (one kernel reads the logits once and writes the loss and
  their gradient; the backward is the two matmuls): ``train.fused_head_loss: true``, at each ``--warps`` count.

Each path's loss and dh are compared with the separate path's (max |diff|). Per training step: x 8 micro-batches.

    python benchmarks/loss_kernel_bench.py [--warps 4 8 16] [--out OUT.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cuda_timing import parse_bench_args, time_ms  # noqa: E402  (benchmarks/, the script's own folder)

from pgolf.model import head_loss, kernels  # noqa: E402

T, D, V, CAP = 98_304, 512, 8192, 30.0
MICRO_BATCHES = 8


def main(argv=None) -> int:
    def add_arguments(parser):
        parser.add_argument("--warps", type=int, nargs="+", default=[head_loss.FUSED_CE_WARPS],
                            help="the fused kernel's warp counts to time (default: FUSED_CE_WARPS)")

    args = parse_bench_args(__doc__, "loss_kernel_bench", argv, add_arguments=add_arguments)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(T, D, device=dev, generator=gen).bfloat16().requires_grad_(True)  # [T, d]
    w = (0.4 * torch.randn(V, D, device=dev, generator=gen)).requires_grad_(True)  # [V, d] fp32 master
    targets = torch.randint(0, V, (T,), device=dev, generator=gen)

    def step(loss_fn):
        def call():
            h.grad = w.grad = None
            with torch.autocast("cuda", torch.bfloat16):
                loss = loss_fn()
            (loss / MICRO_BATCHES).backward()
            return loss
        return call

    separate = step(lambda: kernels.softcapped_cross_entropy(h @ w.t(), targets, CAP))
    fused = step(lambda: head_loss.head_softcapped_cross_entropy(h, w, targets, CAP))
    base_loss = separate().item()
    base_dh = h.grad.float().clone()
    results = {"shape": {"T": T, "d": D, "V": V}, "paths": {}}
    paths = [("separate", separate, None)] + [(f"fused_w{n}", fused, n) for n in args.warps]
    for name, call, warps in paths:
        if warps is not None:
            head_loss.FUSED_CE_WARPS = warps
        loss = call().item()
        diff = {"loss": abs(loss - base_loss), "dh": float((h.grad.float() - base_dh).abs().max())}
        ms = time_ms(call, args.iters)
        results["paths"][name] = {"forward_backward_ms": ms, "ms_per_step": MICRO_BATCHES * ms, "max_abs_diff": diff}
        print(f"{name:<12} forward+backward {ms:.3f} ms  per step {MICRO_BATCHES * ms:.1f} ms  "
              f"|diff| vs separate: loss {diff['loss']:.2e} dh {diff['dh']:.2e}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
