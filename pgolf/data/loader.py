"""Deterministic, rank-sharded document-packing batches over the training shards.

The training token stream is the concatenation of ``fineweb_train_*.bin`` in name order (every document already
starts with BOS). Optimizer step ``s`` consumes the next ``train_batch_tokens`` tokens of the stream, cut into
``n_micro = train_batch_tokens / micro_batch_tokens`` contiguous micro-batches; with ``order="blocked"`` (pgolf's
default) micro-batch ``j`` of the step goes to rank ``j // accum`` as its accumulation step ``j % accum``, with
``order="interleaved"`` (the record's dealing) to rank ``j % world_size`` as accumulation step ``j // world_size``.
The union over ranks is therefore identical on 1 or N processes, and the data order never depends on the seed (as
in the record). PR #1855's own stream (spans inside one shard, tails dropped) is :mod:`pgolf.data.record_stream`. Each micro-batch is one packed row:
``inputs = stream[a : a + n]``, ``targets = stream[a + 1 : a + n + 1]``; attention is confined to documents by
``cu_seqlens`` built from BOS positions (see pgolf.model.attention).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from pgolf.data.shards import list_shards, read_shard


class TokenStream:
    """Random access into the concatenation of several shards (memory-mapped, nothing loaded up front)."""

    def __init__(self, paths: list[Path]):
        if not paths:
            raise FileNotFoundError("no training shards given")
        self.paths = list(paths)
        self.shards = [read_shard(p) for p in self.paths]
        sizes = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.total_tokens = int(self.starts[-1])

    def read(self, offset: int, length: int) -> np.ndarray:
        """Tokens [offset, offset+length) of the stream, wrapping around at the end (a second epoch)."""
        out = np.empty(length, dtype=np.uint16)
        filled = 0
        offset %= self.total_tokens
        while filled < length:
            i = int(np.searchsorted(self.starts, offset, side="right") - 1)
            local = offset - int(self.starts[i])
            take = min(length - filled, len(self.shards[i]) - local)
            out[filled : filled + take] = self.shards[i][local : local + take]
            filled += take
            offset = (offset + take) % self.total_tokens
        return out


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    train_batch_tokens: int
    micro_batch_tokens: int
    world_size: int

    @property
    def micro_batches_per_step(self) -> int:
        return self.train_batch_tokens // self.micro_batch_tokens

    @property
    def grad_accum_steps(self) -> int:
        return self.micro_batches_per_step // self.world_size

    def __post_init__(self) -> None:
        n = self.train_batch_tokens // self.micro_batch_tokens
        if self.train_batch_tokens % self.micro_batch_tokens or n % self.world_size:
            raise ValueError(
                f"train_batch_tokens={self.train_batch_tokens} must split into micro-batches of "
                f"{self.micro_batch_tokens} tokens evenly over {self.world_size} processes"
            )


MICRO_BATCH_ORDERS = ("blocked", "interleaved")


def micro_batch_slot(plan: BatchPlan, rank: int, accum_index: int, order: str) -> int:
    """Position, in stream order, of (rank, accumulation index)'s micro-batch among the step's micro-batches."""
    if order == "blocked":
        return rank * plan.grad_accum_steps + accum_index
    if order == "interleaved":
        return accum_index * plan.world_size + rank
    raise ValueError(f"micro-batch order: expected one of {MICRO_BATCH_ORDERS}, got {order!r}")


class PackedBatchLoader:
    """Yields (inputs, targets) int64 tensors [micro_batch_tokens] for (step, accumulation index) on one rank."""

    def __init__(self, data_dir: str | Path, plan: BatchPlan, rank: int, start_offset: int = 0, order: str = "blocked"):
        self.stream = TokenStream(list_shards(Path(data_dir), "train"))
        self.plan = plan
        self.rank = rank
        self.start_offset = start_offset
        micro_batch_slot(plan, rank, 0, order)  # refuse an unknown order now, not at the first step
        self.order = order

    def micro_batch(self, step: int, accum_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self.plan
        j = micro_batch_slot(plan, self.rank, accum_index, self.order)  # micro-batch index within the step
        offset = self.start_offset + step * plan.train_batch_tokens + j * plan.micro_batch_tokens
        row = torch.from_numpy(self.stream.read(offset, plan.micro_batch_tokens + 1).astype(np.int64))
        return row[:-1], row[1:]  # inputs [n], targets [n]
