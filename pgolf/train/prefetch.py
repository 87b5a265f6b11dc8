"""Micro-batches prepared ahead, on a background thread, in pinned memory (as the record's loader does).

Why: reading a micro-batch (memory-mapped shard -> int64), cutting its segments (``cu_seqlens``) and pinning it
for an asynchronous copy take milliseconds of host time. On the training thread they are hidden while the GPU
still has queued work; but whenever the queue has run dry (a step that synchronizes: a multi-GPU run's per-step
stop broadcast, as the record's; before 230fec4 Muon's index copies), the next micro-batch's preparation is idle
GPU time. A profile of ``pgolf bench train --trace`` whose first step started on a drained queue showed 10.8 ms
of it (two pinning copies of 3.4 and 6.9 ms). Here one worker thread prepares the next ``depth`` calls of the
stream while the GPU works; the training thread only issues the copies.

The data are exactly what the loader and :func:`pgolf.train.step.micro_batch_segments` give for that call
(``call`` = step * accumulation + index); a call other than the one expected (a compile pass reading call 0, the
first call after a resume) is prepared on the spot and the read-ahead restarts after it. The training loop closes it
however the warm-up or the loop ends (``try``/``finally``): reads not started are cancelled, the worker is joined.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

import torch


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    inputs: torch.Tensor  # int64 [n], on CPU (pinned when the device is CUDA)
    targets: torch.Tensor  # int64 [n]
    cu_seqlens: torch.Tensor  # int32 [padded segments + 1]
    max_seqlen: int


class MicroBatchPrefetcher:
    """``get(call)``: the micro-batch of stream call ``call``; meanwhile calls ``call + 1 .. call + depth`` are
    prepared on one worker thread. ``prepare(call) -> MicroBatch`` must be a pure function of ``call``."""

    def __init__(self, prepare: Callable[[int], MicroBatch], depth: int = 2, pin: bool = False):
        if depth < 0:
            raise ValueError(f"prefetch depth: expected >= 0, got {depth}")
        self._prepare = prepare
        self._depth = depth
        self._pin = pin
        self._pending: dict[int, Future] = {}
        self._pool: Optional[ThreadPoolExecutor] = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgolf-prefetch") if depth > 0 else None
        )

    def _ready(self, call: int) -> MicroBatch:
        batch = self._prepare(call)
        if not self._pin:
            return batch
        return dataclasses.replace(batch, inputs=batch.inputs.pin_memory(), targets=batch.targets.pin_memory(),
                                   cu_seqlens=batch.cu_seqlens.pin_memory())

    def get(self, call: int) -> MicroBatch:
        future = self._pending.pop(call, None)
        if future is None:  # not the call read ahead: drop the read-ahead, prepare this one here
            for stale in self._pending.values():
                stale.cancel()
            self._pending.clear()
            batch = self._ready(call)
        else:
            batch = future.result()  # re-raises the worker's exception, naming its file and position
        if self._pool is not None:
            for ahead in range(call + 1, call + 1 + self._depth):
                if ahead not in self._pending:
                    self._pending[ahead] = self._pool.submit(self._ready, ahead)
        return batch

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "MicroBatchPrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
