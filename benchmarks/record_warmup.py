"""The record script's compile warm-up on one GPU, timed (issue 16: pgolf's warm-up must not exceed it).

The record's ``train_model`` builds its training loader, runs its warm-up (a forward/backward per ``cu_seqlens``
bucket, looping off and on: one compile each under its ``dynamic=False``; then ``WARMUP_STEPS`` steps per loop
state), restores the initial weights and builds a fresh loader for the timed run. The warm-up is the time between
those two loader constructions; this script hooks the loader's ``__init__``, runs the record's own ``main()`` with
the record run's environment, writes the figure and exits before training (``--then-train`` lets it go on).

    # one GPU, the record reference in .ref/ (FlashAttention 4 installed: FA3_SHIM=fa4, else torch's kernels)
    python benchmarks/record_warmup.py --record-script .ref/pr1855/train_gpt.py --data /tmp/syn --out OUT.json

``--compile-cache`` (default ``cold``: empty inductor and Triton caches, ``benchmarks/compile_cache.py``),
``--warmup-steps`` (default 20, the record run's) and ``--dynamic-cu`` (what shared/reference/profile_anchor.py
does to fit a 10-minute call: ``cu_seqlens`` sizes dynamic, ~3 compiles instead of 8; not the record's setting).
Compare with pgolf's ``compile_warmup_by_loop_state`` in train_summary.json or ``warmup_seconds`` of
``pgolf bench train --warmup 20`` (both loop states).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from compile_cache import MODES, compile_cache_env  # noqa: E402


def install_warmup_clock(record, on_done: Callable[[float], None]) -> None:
    """Time from the record's first ``DocumentPackingLoader`` to its second (the warm-up between them) and call
    ``on_done(seconds)`` once the second is built (after a device sync, so queued kernels count)."""
    loader_cls = record.DocumentPackingLoader
    real_init = loader_cls.__init__
    starts: list[float] = []

    def timed_init(self, *a, **k):
        if len(starts) == 1:
            sync = getattr(getattr(record, "torch", None), "cuda", None)
            if sync is not None and sync.is_available():
                sync.synchronize()
            on_done(time.perf_counter() - starts[0])
        real_init(self, *a, **k)
        starts.append(time.perf_counter())

    loader_cls.__init__ = timed_init


def dynamic_cu_compile(torch) -> None:
    """profile_anchor.py's setting: a ``dynamic=False`` compile becomes ``dynamic=None`` (sizes marked dynamic)."""
    real = torch.compile

    def compile_(model=None, **kw):
        if kw.get("dynamic") is False:
            kw["dynamic"] = None
        return real(**kw) if model is None else real(model, **kw)

    torch.compile = compile_


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record-script", type=Path, required=True, help="PR #1855 train_gpt.py")
    parser.add_argument("--data", type=Path, default=Path("/tmp/syn"),
                        help="shards (written by benchmarks/synthetic_shards.py when missing, as side_by_side.sh does)")
    parser.add_argument("--out", type=Path, required=True, help="JSON of the figure")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--dynamic-cu", action="store_true", help="profile_anchor.py's dynamic cu_seqlens (fewer compiles)")
    parser.add_argument("--then-train", action="store_true", help="do not exit after the warm-up")
    parser.add_argument("--compile-cache", choices=MODES, default="cold",
                        help="cold (default): empty inductor and Triton caches, as pgolf_warmup.py starts; inherit: "
                             "whatever the environment points at")
    args = parser.parse_args(argv)
    cache_env = compile_cache_env(args.compile_cache, "record_warmup_cache_")
    os.environ.update(cache_env)  # before anything imports torch
    from import_side_by_side import RECORD_ENV
    from synthetic_shards import ensure_harness_shards

    ensure_harness_shards(args.data)
    script = args.record_script.resolve()
    os.environ.update(RECORD_ENV)
    os.environ.update({"DATA_PATH": str(args.data), "DATA_DIR": str(args.data.parent), "ITERATIONS": "20000",
                       "TOKENIZER_PATH": str(script.parent / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"),
                       "WARMUP_STEPS": str(args.warmup_steps), "MAX_WALLCLOCK_SECONDS": "600", "FUSED_CE_ENABLED": "1",
                       "ARTIFACT_DIR": str(args.out.resolve().parent / "record_warmup_logs"), "RUN_ID": "record_warmup"})
    os.environ.setdefault("FA3_SHIM", "torch")
    sys.path.insert(0, str(script.parent.parent / "shim"))
    import torch

    if args.dynamic_cu:
        dynamic_cu_compile(torch)
    spec = importlib.util.spec_from_file_location("train_gpt", script)
    record = importlib.util.module_from_spec(spec)
    sys.modules["train_gpt"] = record
    spec.loader.exec_module(record)

    def done(seconds: float) -> None:
        result = {"record_warmup_seconds": seconds, "warmup_steps_per_loop_state": args.warmup_steps,
                  "dynamic_cu": args.dynamic_cu, "fa3_shim": os.environ["FA3_SHIM"],
                  "compile_cache": args.compile_cache, "compile_cache_dirs": cache_env,
                  "device": torch.cuda.get_device_name(), "torch": torch.__version__}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"record_warmup: {seconds:.1f} s ({json.dumps(result)})", flush=True)
        if not args.then_train:
            sys.stdout.flush()
            os._exit(0)  # before the record's training loop (and its 600 s of steps)

    install_warmup_clock(record, done)
    record.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
