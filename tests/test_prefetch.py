"""Micro-batches read ahead on a worker thread (pgolf.train.prefetch): the same batches, in any call order."""

import threading

import pytest
import torch

from pgolf.train.prefetch import MicroBatch, MicroBatchPrefetcher


def _prepare_log():
    calls = []

    def prepare(call: int) -> MicroBatch:
        calls.append((call, threading.current_thread().name))
        inputs = torch.arange(call * 10, call * 10 + 8)
        return MicroBatch(inputs, inputs + 1, torch.tensor([0, 8], dtype=torch.int32), 8)

    return prepare, calls


def test_calls_in_order_are_prepared_ahead_on_the_worker():
    prepare, calls = _prepare_log()
    with MicroBatchPrefetcher(prepare, depth=2) as prefetcher:
        got = [prefetcher.get(c) for c in range(5)]
    assert [int(b.inputs[0]) for b in got] == [0, 10, 20, 30, 40]
    assert all(torch.equal(b.targets, b.inputs + 1) for b in got)
    by_call = dict(calls)
    assert by_call[0] == threading.current_thread().name  # nothing read ahead yet: prepared here
    assert all(by_call[c].startswith("pgolf-prefetch") for c in range(1, 5))
    prepared = sorted(c for c, _ in calls)
    assert prepared[:5] == [0, 1, 2, 3, 4] and len(set(prepared)) == len(prepared)  # each once
    assert set(prepared) <= set(range(7))  # at most two read ahead past the last call (closing cancels the rest)


def test_an_unexpected_call_is_prepared_on_the_spot_and_the_read_ahead_restarts():
    prepare, calls = _prepare_log()
    with MicroBatchPrefetcher(prepare, depth=1) as prefetcher:
        assert int(prefetcher.get(7).inputs[0]) == 70
        assert int(prefetcher.get(0).inputs[0]) == 0  # a compile pass's call 0: not the one read ahead
        assert int(prefetcher.get(1).inputs[0]) == 10
        assert int(prefetcher.get(1).inputs[0]) == 10  # asked twice: prepared again, the same batch


def test_the_workers_error_reaches_the_training_thread():
    def prepare(call: int) -> MicroBatch:
        if call == 2:
            raise ValueError("shard_000.bin: no BOS")
        return MicroBatch(torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                          torch.tensor([0, 2], dtype=torch.int32), 2)

    with MicroBatchPrefetcher(prepare, depth=2) as prefetcher:
        prefetcher.get(0)
        prefetcher.get(1)
        with pytest.raises(ValueError, match="shard_000.bin: no BOS"):
            prefetcher.get(2)


def test_depth_zero_prepares_every_call_here():
    prepare, calls = _prepare_log()
    with MicroBatchPrefetcher(prepare, depth=0) as prefetcher:
        for c in range(3):
            prefetcher.get(c)
    assert [c for c, _ in calls] == [0, 1, 2]
    assert {name for _, name in calls} == {threading.current_thread().name}
    with pytest.raises(ValueError, match="depth"):
        MicroBatchPrefetcher(prepare, depth=-1)
