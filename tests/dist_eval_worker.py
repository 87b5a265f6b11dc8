"""Worker for tests/test_ttt.py: evaluation and TTT as one rank under torchrun (CPU, gloo).

``python -m torch.distributed.run --nproc_per_node=2 tests/dist_eval_worker.py --out DIR`` makes every rank build
the same tiny model and validation set, run plain scoring, LoRA TTT (documents independent: no warm start, no
phases), phased LoRA TTT and chunked TTT, and write ``DIR/rank<R>.npz`` with its per-position NLL (NaN where
another rank scored), the all-reduced sums and its LoRA steps per slot length. The test compares them with one process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_fixtures import copy_model, eval_config, random_docs, tiny_model, val_from_docs  # noqa: E402
from pgolf.train.distributed import init_distributed, max_floats, shutdown  # noqa: E402
from pgolf.evaluate.stage import score_documents  # noqa: E402
from pgolf.io import atomic_path  # noqa: E402
from pgolf.evaluate.ttt import run_ttt  # noqa: E402

DOC_LENGTHS = [5, 33, 18, 70, 0, 41, 9, 26, 12, 3, 50]
CASES = {
    "plain": ("none", {}),
    "lora": ("lora", dict(warm_start_a=False)),
    "phased": ("lora", dict(phase_boundaries_docs=(3, 6), slot_lengths=(8, 16, 24))),
    "chunked": ("chunked", {}),
    # chunks of 2 tokens, one per rank: some rank's part is a lone leading BOS, which nothing scores there
    "chunked_pairs": ("chunked", dict(stream_chunk_tokens=2)),
}


def run_case(name: str, dist_info=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(token_nll [N], sums [loss, tokens, bytes], scored counts [N], LoRA steps per slot length [K, 2]) of one
    case on this process."""
    mode, changes = CASES[name]
    val = val_from_docs(random_docs(DOC_LENGTHS, seed=5))
    model = copy_model(tiny_model(seed=3))
    cfg = eval_config(mode, **changes)
    slot_steps = np.zeros((0, 2), dtype=np.int64)
    if mode == "none":
        result, acc, ledger = score_documents(model, val, cfg, dist_info=dist_info, keep_tokens=True)
    else:
        out = run_ttt(model, val, cfg, 0, device=torch.device("cpu"), dist_info=dist_info, keep_tokens=True)
        acc, ledger = out.accumulator, out.ledger
        result = acc.result(dist_info)
        timing = out.summary.get("slot_timing", {})
        slot_steps = np.array([[int(L), v["steps"]] for L, v in sorted(timing.items(), key=lambda kv: int(kv[0]))],
                              dtype=np.int64).reshape(-1, 2)
    counts = ledger.scored_counts(dist_info)
    ledger.check_complete(val.target_mask(), counts)
    sums = np.array([result.loss_sum, result.token_count, result.byte_sum], dtype=np.float64)
    return acc.token_nll, sums, counts, slot_steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    info = init_distributed("cpu")
    arrays = {}
    for name in CASES:
        nll, sums, counts, slot_steps = run_case(name, info)
        arrays[f"{name}_nll"], arrays[f"{name}_sums"], arrays[f"{name}_counts"] = nll, sums, counts
        arrays[f"{name}_slot_steps"] = slot_steps
    # the evaluation stage's timings: each rank's own clock in, the slowest rank's out, the same on every rank
    arrays["max_floats"] = np.array(max_floats([1.5 + info.rank, 2.0 - info.rank], info))
    with atomic_path(Path(args.out) / f"rank{info.rank}.npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    shutdown(info)


if __name__ == "__main__":
    main()
