"""The fused MLP kernels alone on one GPU, at the record's shapes: pgolf's against the record script's own.

Forward: pre = x @ w_up^T, post = leaky_relu(pre, 0.5)^2. Backward: dpre = (g @ w_down) * act'(pre). M = 98,304
tokens (one micro-batch), d = 512, hidden 2,048, bf16. Variants timed (CUDA events, after warm-up):

- ``pgolf``: ``launch_mlp_up_act`` / ``launch_mlp_act_grad`` as training calls them (the persistent TMA kernel);
- ``pgolf_bitwise``: the same kernel with the interpreter's bit-level bf16 rounding (what the GPU ran up to
  commit 09bc25f; the values are the same, the epilogue does ~10 more integer ops per element);
- ``record``: the record script's ``linear_leaky_relu_square`` (forward, then backward with ``w_down.T.contiguous()``
  as its autograd function does), when ``--record-script`` imports.

Each variant's outputs are compared with pgolf's bit for bit (``max_abs_diff``). Per training step the kernels run
8 micro-batches x 11 (looping off) or 17 (on) block applications, forward and backward: the printed ms/step
estimates multiply by those counts.

    python benchmarks/mlp_kernel_bench.py [--record-script .ref/pr1855/train_gpt.py] [--out OUT.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pgolf.model import triton_kernels as tk  # noqa: E402

M, D, HIDDEN, SLOPE = 98_304, 512, 2_048, 0.5
APPLICATIONS = {"off": 11, "on": 17}
MICRO_BATCHES = 8


def time_ms(fn, iters: int) -> float:
    """Mean milliseconds of ``fn()`` over ``iters`` calls, after 5 warm-up calls (which also compile)."""
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def load_record_kernel(script: Path):
    """The record's ``linear_leaky_relu_square`` (its module imports FlashAttention 3: the reference's shim)."""
    sys.path.insert(0, str(script.parent.parent / "shim"))
    os.environ.setdefault("FA3_SHIM", "torch")
    spec = importlib.util.spec_from_file_location("pr1855_train_gpt", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.linear_leaky_relu_square


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record-script", type=Path, help="PR #1855 train_gpt.py (its kernel is timed too)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", type=Path, help="JSON of the figures")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("mlp_kernel_bench: needs a CUDA GPU")
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

    variants = {
        "pgolf": (lambda: tk.launch_mlp_up_act(x, w_up, pre, post, SLOPE),
                  lambda: tk.launch_mlp_act_grad(g, w_down, pre, dpre, SLOPE)),
        "pgolf_bitwise": (lambda: tk._launch_mlp_tma(x, w_up, False, pre, post, SLOPE, backward=False, bitwise_round=True),
                          lambda: tk._launch_mlp_tma(g, w_down, True, pre, dpre, SLOPE, backward=True, bitwise_round=True)),
    }
    if args.record_script:
        record_kernel = load_record_kernel(args.record_script)
        box = {}

        def record_fwd():
            box["pre"], box["post"] = record_kernel(x, w_up)

        def record_bwd():  # its autograd backward: w_down transposed into a contiguous copy first
            box["dpre"] = record_kernel(g, w_down.T.contiguous(), aux=pre)

        variants["record"] = (record_fwd, record_bwd)

    tk.launch_mlp_up_act(x, w_up, pre, post, SLOPE)
    tk.launch_mlp_act_grad(g, w_down, pre, dpre, SLOPE)
    reference = {"pre": pre.clone(), "post": post.clone(), "dpre": dpre.clone()}
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [M, D, HIDDEN], "variants": {}}
    for name, (fwd, bwd) in variants.items():
        fwd_ms, bwd_ms = time_ms(fwd, args.iters), time_ms(bwd, args.iters)
        fwd(), bwd()
        torch.cuda.synchronize()
        outputs = box if name == "record" else {"pre": pre, "post": post, "dpre": dpre}
        diffs = {k: float((outputs[k].float() - reference[k].float()).abs().max()) for k in reference}
        per_step = {loop: MICRO_BATCHES * n * (fwd_ms + bwd_ms) for loop, n in APPLICATIONS.items()}
        results["variants"][name] = {"forward_ms": fwd_ms, "backward_ms": bwd_ms, "ms_per_step": per_step,
                                     "max_abs_diff_vs_pgolf": diffs}
        print(f"{name:<14} forward {fwd_ms:.3f} ms  backward {bwd_ms:.3f} ms  per step: looping off "
              f"{per_step['off']:.1f} ms, on {per_step['on']:.1f} ms  max |diff| vs pgolf {diffs}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
