"""Worker for tests/test_record_train_oracle.py: the record's training loop and pgolf's on 2 gloo ranks.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_record_train_worker.py --out DIR

Under torchrun the record takes its record-run path: a process group exists, so its Muon shards the banks over
the ranks, averages the clipped local gradients in bf16 by reduce-scatter, and keeps its momentum outside its
state_dict (the warm-up's restore misses it). pgolf runs the record recipe's options (per-rank clipping,
interleaved record stream, warmup_restore: record, bf16 Muon). Each rank writes ``DIR/<case>_rank<R>.json`` with
the differences (record_train_support.compare), for the cases asked: ``fp32`` storage and the record's ``bf16``
storage.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oracle_train as ot  # noqa: E402
import record_oracle as ro  # noqa: E402
import record_train_support as rts  # noqa: E402
from pgolf.train.distributed import DistInfo  # noqa: E402

WARMUP_STEPS = 2  # per loop state (the record: 20)


def run_case(mod, data: Path, out: Path, case: str, world_size: int, rank: int) -> None:
    h = rts.tiny_h(mod, data, world_size, rank, WARMUP_STEPS, distributed=True)
    init = rts.initial_state(mod, h)
    bf16 = case == "bf16"
    record = rts.run_record(mod, h, init, keep_fp32=not bf16)
    if bf16:  # the model-side half of the record's storage (bf16 RoPE frequencies): not the loop's, emulated here
        rounded = ot.cpu_model(mod, h, init)
        for block in rounded.blocks:
            block.attn.rotary.inv_freq = block.attn.rotary.inv_freq.bfloat16()
        init_model = rounded
    else:
        init_model = None
    info = DistInfo(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    pgolf = rts.run_pgolf(mod, h, init, data, out / f"pgolf_{case}", info, model=init_model,
                          param_storage="record" if bf16 else "fp32")
    result = rts.compare(record, pgolf, world_size, rank, sharded=True)
    rts.dump(result, out / f"{case}_rank{rank}.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cases", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    mod = ro.load_record()
    dist.init_process_group("gloo")
    try:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        data = args.out / "data"
        if rank == 0:
            ot.write_positional_shards(data, rts.SHARDS, seed=5, vocab=64)
        dist.barrier()
        for case in args.cases:
            run_case(mod, data, args.out, case, world_size, rank)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
