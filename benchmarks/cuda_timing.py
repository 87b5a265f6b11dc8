"""What the kernel benchmarks share (``mlp_kernel_bench.py``, ``qkv_kernel_bench.py``, ``fa4_config_bench.py``): the
command line and CUDA-event timing."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def parse_bench_args(doc: str, name: str, argv=None, iters: int = 50, add_arguments=None) -> argparse.Namespace:
    """``--iters`` and ``--out`` (plus what ``add_arguments(parser)`` adds), described by the script's docstring's
    first paragraph; exits with a message when there is no CUDA GPU."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=iters)
    parser.add_argument("--out", type=Path, help="JSON of the figures")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(f"{name}: needs a CUDA GPU")
    return args


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
