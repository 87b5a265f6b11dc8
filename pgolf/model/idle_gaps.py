"""Where the GPU waits for the host: idle gaps in a torch.profiler Chrome trace, and what the host was doing.

Why: a step whose kernels sum to less than its wall time loses the difference to the host (launch overhead, a
synchronizing call, Python work between launches). The kernel categories of :func:`pgolf.model.device.
profile_breakdown` cannot show that time; the trace can. Each gap between busy spans of the GPU is attributed to the
launch that ended it: the kernel after the gap, its launching runtime call (matched by ``correlation``), and the
host operations (``cpu_op`` / ``user_annotation`` events) that enclosed that launch. A runtime call that spans the
start of the gap (``cudaStreamSynchronize``, a pageable ``cudaMemcpy``) is named too: that is a sync.

Pure functions over the trace's event list (``json.load(trace)["traceEvents"]``); times in microseconds.
"""

from __future__ import annotations

import bisect
from typing import Any, Iterable

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
HOST_CATEGORIES = ("cpu_op", "user_annotation")


def _spans(events: Iterable[dict], categories: tuple[str, ...]) -> list[dict]:
    """Complete events ("ph": "X") of ``categories`` with a start and a duration, sorted by start."""
    out = [e for e in events if e.get("ph") == "X" and e.get("cat") in categories and "ts" in e and "dur" in e]
    out.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
    return out


def busy_intervals(kernels: list[dict]) -> list[tuple[float, float, dict, dict]]:
    """Union of the GPU's busy time over all streams: (start, end, first kernel, last kernel), sorted."""
    merged: list[list[Any]] = []
    for k in kernels:
        start, end = float(k["ts"]), float(k["ts"]) + float(k["dur"])
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1][1], merged[-1][3] = end, k
        else:
            merged.append([start, end, k, k])
    return [tuple(m) for m in merged]  # type: ignore[misc]


LONG_HOST_US = 2000.0  # host events at least this long are checked on every lookup, the rest in a window


def _enclosing(host: list[dict], starts: list[float], long_host: list[dict], t: float) -> list[str]:
    """Names of the host events that contain time ``t``, outermost first."""
    i = bisect.bisect_right(starts, t)
    inside = {id(e): e for e in host[max(0, i - 4096):i] + long_host
              if float(e["ts"]) <= t <= float(e["ts"]) + float(e["dur"])}
    return [e["name"] for e in sorted(inside.values(), key=lambda e: (float(e["ts"]), -float(e["dur"])))]


def idle_gaps(events: list[dict], min_gap_us: float = 5.0, top: int = 12) -> dict[str, Any]:
    """Summarize the GPU's idle time in one profiled window (see the module docstring).

    Returns ``window_us`` (first kernel start to last kernel end), ``busy_us``, ``idle_us`` (every gap), and for
    gaps of at least ``min_gap_us``: their count, the ``top`` largest (before/after kernel, the launch call, the
    host events around the launch, a runtime call spanning the gap's start), and ``by_host_op``: idle time summed
    by the innermost host event around the launch that ended each gap, largest first.
    """
    kernels = _spans(events, GPU_CATEGORIES)
    if not kernels:
        return {"window_us": 0.0, "busy_us": 0.0, "idle_us": 0.0, "gaps": 0, "gaps_idle_us": 0.0, "largest": [],
                "by_host_op": []}
    launches = {e.get("args", {}).get("correlation"): e for e in _spans(events, LAUNCH_CATEGORIES)}
    runtime = _spans(events, LAUNCH_CATEGORIES)
    runtime_starts = [float(e["ts"]) for e in runtime]
    host = _spans(events, HOST_CATEGORIES)
    host_starts = [float(e["ts"]) for e in host]
    long_host = [e for e in host if float(e["dur"]) >= LONG_HOST_US]
    busy = busy_intervals(kernels)
    window = busy[-1][1] - busy[0][0]
    busy_us = sum(end - start for start, end, _, _ in busy)
    gaps = []
    for (_, prev_end, _, prev_k), (next_start, _, next_k, _) in zip(busy, busy[1:]):
        idle = next_start - prev_end
        if idle < min_gap_us:
            continue
        launch = launches.get(next_k.get("args", {}).get("correlation"))
        around = _enclosing(host, host_starts, long_host, float(launch["ts"])) if launch else []
        blocking = None
        j = bisect.bisect_right(runtime_starts, prev_end)
        for e in runtime[max(0, j - 64):j]:  # a call the host was blocked in when the GPU ran dry: a sync
            if float(e["ts"]) + float(e["dur"]) >= prev_end:
                blocking = e["name"]
        gaps.append({
            "idle_us": idle,
            "kernel_before": prev_k["name"][:120],
            "kernel_after": next_k["name"][:120],
            "launch": launch["name"] if launch else None,
            "launch_to_start_us": next_start - float(launch["ts"]) if launch else None,
            "host_ops": around[:3] + (["..."] + around[-3:] if len(around) > 6 else around[3:]),
            "runtime_call_spanning_gap": blocking,
        })
    by_op: dict[str, list[float]] = {}
    for g in gaps:
        ops = [op for op in g["host_ops"] if op != "..."]
        key = (g["runtime_call_spanning_gap"] + " <- " if g["runtime_call_spanning_gap"] else "") + (
            ops[-1] if ops else "(no host op)")
        total = by_op.setdefault(key, [0.0, 0])
        total[0] += g["idle_us"]
        total[1] += 1
    return {
        "window_us": window,
        "busy_us": busy_us,
        "idle_us": window - busy_us,
        "gaps": len(gaps),
        "gaps_idle_us": sum(g["idle_us"] for g in gaps),
        "largest": sorted(gaps, key=lambda g: -g["idle_us"])[:top],
        "by_host_op": [{"host_op": k, "idle_us": v[0], "gaps": v[1]}
                       for k, v in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]],
    }
