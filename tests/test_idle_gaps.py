"""The idle-gap reading of a profiler trace (pgolf.model.idle_gaps), on hand-made traces with known answers."""

from pgolf.model.idle_gaps import busy_intervals, idle_gaps, is_sync_call

MAIN, WORKER = 10, 11  # host threads


def _x(cat, name, ts, dur, tid=MAIN, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}


def _trace():
    # host: a step annotation around everything; an optimizer op that launches k3 late; a sync before k4
    return [
        _x("user_annotation", "step", 0, 1000),
        _x("cpu_op", "aten::mm", 1, 5),
        _x("cuda_runtime", "cudaLaunchKernel", 2, 2, correlation=1),
        _x("cpu_op", "aten::mm", 6, 5),
        _x("cuda_runtime", "cudaLaunchKernel", 7, 2, correlation=2),
        _x("cpu_op", "Optimizer.step#Muon.step", 200, 300),
        _x("cpu_op", "aten::add_", 390, 10),
        _x("cuda_runtime", "cudaLaunchKernel", 395, 3, correlation=3),
        _x("cuda_runtime", "cudaStreamSynchronize", 420, 35),  # waits for add_kernel, then the host is slow
        _x("cuda_runtime", "cudaLaunchKernel", 850, 3, correlation=4),
        _x("kernel", "gemm_a", 10, 100, correlation=1),
        _x("kernel", "gemm_b", 105, 95, correlation=2),   # overlaps gemm_a: one busy span 10-200
        _x("kernel", "add_kernel", 400, 50, correlation=3),  # 200 us idle before it
        _x("kernel", "triton_x", 860, 40, correlation=4),    # 410 us idle, a sync spans its start
    ]


def test_busy_spans_merge_overlapping_kernels():
    kernels = [e for e in _trace() if e["cat"] == "kernel"]
    spans = busy_intervals(sorted(kernels, key=lambda e: e["ts"]))
    assert [(s, e) for s, e, _, _ in spans] == [(10.0, 200.0), (400.0, 450.0), (860.0, 900.0)]


def test_gaps_are_attributed_to_the_launching_host_op_and_the_sync():
    out = idle_gaps(_trace(), min_gap_us=5.0)
    assert out["window"] == "all"
    assert out["window_us"] == 890.0 and out["busy_us"] == 280.0 and out["idle_us"] == 610.0
    assert out["gaps"] == 2
    largest = out["largest"][0]
    assert largest["idle_us"] == 410.0 and largest["kernel_after"] == "triton_x"
    assert largest["sync_call_spanning_gap"] == "cudaStreamSynchronize"
    second = out["largest"][1]
    assert second["kernel_before"] == "gemm_b" and second["launch_to_start_us"] == 5.0
    assert second["host_ops"] == ["step", "Optimizer.step#Muon.step", "aten::add_"]
    assert second["sync_call_spanning_gap"] is None
    by_op = {row["host_op"]: row["idle_us"] for row in out["by_host_op"]}
    assert by_op == {"cudaStreamSynchronize <- step": 410.0, "aten::add_": 200.0}


def test_a_launch_in_flight_is_no_sync_and_other_threads_are_not_the_launchers_ops():
    trace = [
        _x("cpu_op", "aten::add_", 0, 5),
        _x("cuda_runtime", "cudaLaunchKernel", 1, 2, correlation=1),
        _x("cpu_op", "aten::mul_", 90, 20),
        _x("cuda_runtime", "cudaLaunchKernel", 95, 60, correlation=2),  # a slow launch spanning the gap's start
        _x("cpu_op", "aten::_pin_memory", 80, 100, tid=WORKER),  # another thread, busy at the same time
        _x("kernel", "k1", 5, 95, correlation=1),
        _x("kernel", "k2", 160, 10, correlation=2),
    ]
    gap = idle_gaps(trace)["largest"][0]
    assert gap["idle_us"] == 60.0 and gap["sync_call_spanning_gap"] is None
    assert gap["host_ops"] == ["aten::mul_"]
    assert is_sync_call("cudaDeviceSynchronize") and is_sync_call("cudaMemcpy") and not is_sync_call("cudaMemcpyAsync")


def test_the_window_starts_at_the_second_marked_step():
    # step 0 starts on a drained queue (a 300 us gap before its second kernel); step 1 has a 20 us gap
    trace = [
        _x("user_annotation", "mark_0", 0, 400),
        _x("cuda_runtime", "cudaLaunchKernel", 1, 1, correlation=1),
        _x("cuda_runtime", "cudaLaunchKernel", 310, 1, correlation=2),
        _x("user_annotation", "mark_1", 400, 400),
        _x("cuda_runtime", "cudaLaunchKernel", 401, 1, correlation=3),
        _x("cuda_runtime", "cudaLaunchKernel", 402, 1, correlation=4),
        _x("kernel", "a", 5, 5, correlation=1),
        _x("kernel", "b", 310, 100, correlation=2),
        _x("kernel", "c", 410, 50, correlation=3),
        _x("kernel", "d", 480, 50, correlation=4),
    ]
    whole = idle_gaps(trace)
    assert whole["window"] == "all" and whole["idle_us"] == 320.0
    steady = idle_gaps(trace, window_annotation="mark_")
    assert steady["window"] == "second profiled step"
    assert steady["window_us"] == 120.0 and steady["idle_us"] == 20.0 and steady["gaps"] == 1
    assert idle_gaps(trace, window_annotation="missing_")["window"] == "all"


def test_a_trace_without_kernels_or_names_reports_no_gaps():
    out = idle_gaps([_x("cpu_op", "aten::mm", 0, 5), {"ph": "X", "cat": "cpu_op", "ts": 1, "dur": 1, "args": None}])
    assert out["gaps"] == 0 and out["idle_us"] == 0.0
