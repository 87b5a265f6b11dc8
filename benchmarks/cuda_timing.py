"""CUDA-event timing shared by the kernel benchmarks (``mlp_kernel_bench.py``, ``qkv_kernel_bench.py``)."""

from __future__ import annotations

import torch


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
