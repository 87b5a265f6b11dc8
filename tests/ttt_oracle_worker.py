"""Worker for tests/test_record_ttt_oracle.py::test_two_processes_match_record (one rank under torchrun, gloo).

Every rank runs the record's ``eval_val_ttt_phased`` (distributed: dynamic claiming through its /tmp counter file,
the pause flag, all-reduced phase gradients), then pgolf's record variant with lanes = the record's ranks (each
queue entry on the lane of the rank that claimed it), inflight 1 and 2 phase rows, distributed over the same two
processes, and (rank 0's result is what the test reads) once more in one process with both lanes. Writes
``OUT/rank<R>.npz``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import oracle_ttt as ot  # noqa: E402
import record_oracle  # noqa: E402
from pgolf.evaluate.ttt import run_ttt  # noqa: E402
from pgolf.evaluate.ttt_plan import record_doc_lengths  # noqa: E402
from pgolf.evaluate.ttt_record import record_schedule  # noqa: E402
from pgolf.train.distributed import init_distributed, shutdown  # noqa: E402

SEED = 1234
DT = torch.float64


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--run-id", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    mod = record_oracle.load_record()
    cfg = ot.ttt_config(lanes=2, inflight=1, phase_rows=2)
    h = ot.record_hparams(mod, cfg, run_id=args.run_id)
    tokens, nbytes = ot.synthetic_stream(30, seed=0)
    initial = ot.pgolf_model(3, DT)
    rec = ot.record_model(mod, h, initial)
    record = ot.run_record(mod, h, rec, tokens, nbytes, rng_seed=SEED)
    claims = [None] * info.world_size
    dist.all_gather_object(claims, record.processed)
    owner = {q: r for r, qs in enumerate(claims) for q in qs}
    points = [record.phase_points if info.rank == 0 else None]
    dist.broadcast_object_list(points, src=0)
    record_loss = record.loss

    val = ot.pgolf_val(tokens, nbytes)
    doc_len = record_doc_lengths(val.doc_starts, val.score_ends)
    schedule = record_schedule(doc_len, cfg.ttt)
    schedule = dataclasses.replace(schedule, batches=tuple(dataclasses.replace(b, lane=owner[b.queue_index])
                                                           for b in schedule.batches))
    cum = np.cumsum([len(b.docs) for b in schedule.batches])
    record_prefixes = [int(np.searchsorted(cum, p["pd"]) + 1) for p in points[0]]
    assert all(cum[p - 1] == q["pd"] for p, q in zip(record_prefixes, points[0])), "pd is not a queue prefix"

    ours = ot.copy_model(initial)
    out = run_ttt(ours, val, cfg, SEED, device=torch.device("cpu"), dist_info=info, keep_tokens=True, schedule=schedule)
    loss = out.accumulator.result(info).val_loss
    single = ot.copy_model(initial)
    alone = run_ttt(single, val, cfg, SEED, device=torch.device("cpu"), keep_tokens=True, schedule=schedule)
    np.savez(Path(args.out) / f"rank{info.rank}.npz", record_nll=record.token_nll, pgolf_nll=out.accumulator.token_nll,
             single_nll=alone.accumulator.token_nll, owner=np.array([owner[q] for q in range(len(owner))]),
             prefixes=np.array(schedule.prefixes), record_prefixes=np.array(record_prefixes),
             weight_diff=ot.max_weight_diff(ours, rec), single_weight_diff=ot.max_weight_diff(single, rec),
             loss=loss, record_loss=record_loss)
    shutdown(info)


if __name__ == "__main__":
    main()
