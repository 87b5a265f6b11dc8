"""PR #1855's training token stream, as random access by (step, accumulation index, rank).

The record's loader (``DocumentPackingLoader`` in its train_gpt.py) is a cursor that every call advances. Its rule,
restated: with ``n`` tokens per micro-batch and ``W`` ranks, each call takes ONE span of ``W * (n + 1)`` tokens
from the current shard; rank ``r`` gets the window ``[cursor + r * (n + 1), cursor + (r + 1) * (n + 1))``, whose
first ``n`` tokens are its inputs and last ``n`` its targets (inputs and targets from one window, so consecutive
windows do not overlap as pgolf's contiguous windows do). When the rest of a shard cannot hold a whole span, that
tail is dropped and the next shard starts at its FIRST BOS (the partial document at a shard's head is dropped too);
after the last shard the files start over. A step takes ``A`` calls (its accumulation steps), so a step's ``W * A``
windows are dealt to ranks interleaved: slot ``a * W + r``.

Consequences worth knowing: no window ever crosses a shard boundary; how many windows a shard serves depends on
``W`` (``(shard_tokens - first_bos) // (W * (n + 1))``), so the stream depends on the GPU count; at the record's
batch about 122,000 tokens of each 100 M-token shard are never read.

Random access replaces the cursor: call ``m = step * A + accum_index`` lies in the shard ``k`` whose cumulative
window count passes ``m`` (modulo one epoch), at ``first_bos_k + j * W * (n + 1)`` for its index ``j`` in that shard.
Verified equal, window for window, to the record's own loader on 1 and 2 ranks across shard boundaries and an
epoch wrap (tests/test_record_train_oracle.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pgolf.data.loader import BatchPlan
from pgolf.data.shards import BOS_ID, list_shards, read_shard

FIRST_BOS_SEARCH_TOKENS = 1 << 16  # scan a shard's head in chunks: its first BOS is near the start


def first_index_of(tokens: np.ndarray, value: int, chunk: int = FIRST_BOS_SEARCH_TOKENS) -> int | None:
    """Position of the first ``value`` in ``tokens`` (None if absent), reading only as far as needed."""
    for start in range(0, len(tokens), chunk):
        hits = np.flatnonzero(np.asarray(tokens[start : start + chunk]) == value)
        if hits.size:
            return start + int(hits[0])
    return None


class RecordStreamLoader:
    """Yields (inputs, targets) int64 tensors [n] for (step, accumulation index) on one rank, as PR #1855's loader.

    ``plan.world_size`` is the W of the stream (the windows depend on it). Memory-mapped shards; nothing is read
    up front but the head of each shard up to its first BOS.
    """

    def __init__(self, data_dir: str | Path, plan: BatchPlan, rank: int, bos_id: int = BOS_ID):
        paths = list_shards(Path(data_dir), "train")
        if not paths:
            raise FileNotFoundError(f"{data_dir}: no fineweb_train_*.bin shards")
        self.plan = plan
        self.rank = rank
        self.window_tokens = plan.micro_batch_tokens + 1  # n + 1: inputs and targets from one window
        self.span_tokens = plan.world_size * self.window_tokens  # one call, all ranks
        self.shards = [read_shard(p) for p in paths]
        self.first_bos: list[int] = []
        calls = []
        for path, tokens in zip(paths, self.shards):
            first = first_index_of(tokens, bos_id)
            if first is None:
                raise ValueError(f"{path}: no BOS token ({bos_id}); the record stream starts each shard at its first BOS")
            self.first_bos.append(first)
            calls.append((len(tokens) - first) // self.span_tokens)
        self.calls_per_shard = np.array(calls, dtype=np.int64)
        self.calls_per_epoch = int(self.calls_per_shard.sum())
        if self.calls_per_epoch == 0:
            raise ValueError(
                f"{data_dir}: no shard holds one span of {self.span_tokens} tokens after its first BOS "
                f"({plan.world_size} ranks x {self.window_tokens}); the record stream has nothing to read"
            )
        self.first_call = np.concatenate([[0], np.cumsum(self.calls_per_shard)])  # [shards + 1]

    def dropped_tail_tokens(self) -> list[int]:
        """Per shard, the tokens after its last span (never read); the head before the first BOS is not counted."""
        return [
            len(tokens) - first - int(count) * self.span_tokens
            for tokens, first, count in zip(self.shards, self.first_bos, self.calls_per_shard)
        ]

    def locate(self, call: int, rank: int) -> tuple[int, int, int]:
        """(epoch, shard index, first token of ``rank``'s window) of loader call ``call`` (0-based)."""
        epoch, index = divmod(call, self.calls_per_epoch)
        shard = int(np.searchsorted(self.first_call, index, side="right") - 1)
        cursor = self.first_bos[shard] + (index - int(self.first_call[shard])) * self.span_tokens
        return epoch, shard, cursor + rank * self.window_tokens

    def micro_batch_at_call(self, call: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, shard, start = self.locate(call, self.rank)
        window = torch.from_numpy(np.asarray(self.shards[shard][start : start + self.window_tokens]).astype(np.int64))
        return window[:-1], window[1:]  # inputs [n], targets [n]

    def micro_batch(self, step: int, accum_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.micro_batch_at_call(step * self.plan.grad_accum_steps + accum_index)
