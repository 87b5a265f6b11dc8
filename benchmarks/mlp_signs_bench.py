"""Issue 16: ``train.mlp_saved_activation: post_signs`` against ``pre``, the MLP kernels alone.

Today the MLP up kernel writes pre and post = leaky_relu(pre, s)^2 ([M, 4d] bf16 each, 400 MB a call at the
record's shapes). cuBLAS needs post twice (the down projection and its weight gradient); pre is read once, by the
backward kernel, for act'(pre) = 2 pre (pre > 0) else 2 s^2 pre. Since post is a square, pre's magnitude is
sqrt(post) (pre > 0) or sqrt(post) / |s| (pre < 0), so act'(pre) = sqrt(post) * (2 if pre > 0 else -2 |s|): post
and pre's sign suffice. The sign, 8 per byte, is 25 MB a call. The up kernel would then write 425 MB instead of
800 (``up_pre_and_post`` against cuBLAS's pre-only product, 0.484 against 0.313 ms on one H100, says the stores
are what it waits on), and the backward would read 25 MB more. Numerics: act' from sqrt(bf16(post)) instead of
from bf16 pre, a relative difference of at most about 2^-9, below the bf16 rounding of the stored d pre.

Timed (CUDA events, M = 98,304 tokens, d = 512, 4d = 2,048, bf16): the kernels of each direction as training
calls them (:func:`pgolf.model.triton_kernels.launch_mlp_up_act` / ``launch_mlp_act_grad``), with pre and with
signs (``signs=``). It prints the ms per call, their sum per step, whether post and the signs are bit for bit the
pre path's, and how far d pre moves (largest difference relative to |d pre|, the fraction of elements that
differ). Not run on a GPU yet (written in the fifteenth session, after its device time was spent).

    python benchmarks/mlp_signs_bench.py [--iters N] [--out OUT.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cuda_timing import parse_bench_args, time_ms  # noqa: E402  (benchmarks/, the script's own folder)
from pgolf.model import kernels, triton_kernels as tk  # noqa: E402

M, D, HIDDEN, SLOPE = 98_304, 512, 2_048, 0.5
APPLICATIONS = {"off": 11, "on": 17}
MICRO_BATCHES = 8


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
    tk.launch_mlp_up_act(x, w_up, None, post_s, SLOPE, signs=signs)
    tk.launch_mlp_act_grad(g, w_down, post_s, dpre_s, SLOPE, signs=signs)
    timings = {
        "up_pre_and_post": time_ms(lambda: tk.launch_mlp_up_act(x, w_up, pre, post, SLOPE), args.iters),
        "up_post_and_signs": time_ms(lambda: tk.launch_mlp_up_act(x, w_up, None, post_s, SLOPE, signs=signs),
                                     args.iters),
        "act_grad_from_pre": time_ms(lambda: tk.launch_mlp_act_grad(g, w_down, pre, dpre, SLOPE), args.iters),
        "act_grad_from_post_and_signs": time_ms(
            lambda: tk.launch_mlp_act_grad(g, w_down, post_s, dpre_s, SLOPE, signs=signs), args.iters),
    }
    today = timings["up_pre_and_post"] + timings["act_grad_from_pre"]
    candidate = timings["up_post_and_signs"] + timings["act_grad_from_post_and_signs"]
    moved = (dpre_s.float() - dpre.float()).abs()
    checks = {"post_bit_exact": bool(torch.equal(post_s, post)), "signs_exact": bool(torch.equal(signs, kernels.pack_signs(pre))),
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
