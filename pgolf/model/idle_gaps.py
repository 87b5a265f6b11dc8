"""Where the GPU waits for the host: idle gaps in a torch.profiler Chrome trace, and what the host was doing.

Why: a step whose kernels sum to less than its wall time loses the difference to the host (launch overhead, a
synchronizing call, Python work between launches). The kernel categories of :func:`pgolf.model.device.
profile_breakdown` cannot show that time; the trace can. Each gap between busy spans of the GPU is attributed to the
launch that ended it: the kernel after the gap, its launching runtime call (matched by ``correlation``), and the
host operations (``cpu_op`` / ``user_annotation`` events of the launching thread) that enclosed that launch. A
synchronizing runtime call (``cudaStreamSynchronize``, a pageable ``cudaMemcpy``, ...) the host was blocked in when
the GPU ran dry is named too.

The window: a profile starts with the GPU's queue drained (the caller synchronizes to time it), so the first step's
start shows costs a steady-state step hides. With ``window_annotation`` (the prefix of ``record_function`` names
that mark each profiled step), the window starts at the first kernel the SECOND marked step launched; without it,
or with fewer than two marks, at the first kernel.

Pure functions over the trace's event list (``json.load(trace)["traceEvents"]``); times in microseconds.
"""

from __future__ import annotations

import bisect
from typing import Any, Iterable, Optional

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
HOST_CATEGORIES = ("cpu_op", "user_annotation")
LONG_HOST_US = 2000.0  # host events at least this long are checked on every lookup, the rest in a window
# runtime calls that wait for the device (or for earlier work on a stream); launches and event records do not
SYNC_CALLS = ("cudaMemcpy", "cudaMemcpy2D", "cudaMemset", "cudaFree", "cudaFreeHost", "cudaHostAlloc",
              "cudaMallocHost", "cuMemcpyDtoH", "cuMemcpyHtoD", "cuMemFree")


def is_sync_call(name: str) -> bool:
    return "Synchronize" in name or name in SYNC_CALLS


def _name(e: dict) -> str:
    return str(e.get("name") or "")


def _args(e: dict) -> dict:
    args = e.get("args")
    return args if isinstance(args, dict) else {}


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


class _HostTimeline:
    """The host events of each (pid, tid), for "which operations enclosed time t on this thread"."""

    def __init__(self, host: list[dict]):
        self.by_thread: dict[tuple, tuple[list[dict], list[float], list[dict]]] = {}
        for e in host:
            self.by_thread.setdefault((e.get("pid"), e.get("tid")), ([], [], []))[0].append(e)
        for events, starts, long_events in self.by_thread.values():
            starts.extend(float(e["ts"]) for e in events)
            long_events.extend(e for e in events if float(e["dur"]) >= LONG_HOST_US)

    def enclosing(self, thread: tuple, t: float) -> list[str]:
        """Names of the events of ``thread`` that contain time ``t``, outermost first."""
        if thread not in self.by_thread:
            return []
        events, starts, long_events = self.by_thread[thread]
        i = bisect.bisect_right(starts, t)
        inside = {id(e): e for e in events[max(0, i - 4096):i] + long_events
                  if float(e["ts"]) <= t <= float(e["ts"]) + float(e["dur"])}
        return [_name(e) for e in sorted(inside.values(), key=lambda e: (float(e["ts"]), -float(e["dur"])))]


def _window_start(kernels: list[dict], launches: dict, host: list[dict], annotation: Optional[str]) -> float:
    """GPU time the analysed window starts at (see the module docstring)."""
    if annotation:
        marks = sorted(float(e["ts"]) for e in host if e.get("cat") == "user_annotation"
                       and _name(e).startswith(annotation))
        if len(marks) >= 2:
            for k in kernels:
                launch = launches.get(_args(k).get("correlation"))
                if launch is not None and float(launch["ts"]) >= marks[1]:
                    return float(k["ts"])
    return float(kernels[0]["ts"]) if kernels else 0.0


def idle_gaps(events: list[dict], min_gap_us: float = 5.0, top: int = 12,
              window_annotation: Optional[str] = None) -> dict[str, Any]:
    """Summarize the GPU's idle time in one profiled window (see the module docstring).

    Returns ``window`` (what the window starts at), ``window_us`` (its first kernel's start to the last kernel's
    end), ``busy_us``, ``idle_us`` (every gap), and for gaps of at least ``min_gap_us``: their count and idle sum,
    the ``top`` largest (before/after kernel, the launch call, the host events around the launch, a synchronizing
    call the host was in when the GPU ran dry), and ``by_host_op``: idle time summed by the innermost host event
    around the launch that ended each gap, largest first.
    """
    launch_events = _spans(events, LAUNCH_CATEGORIES)
    launches = {_args(e).get("correlation"): e for e in launch_events}
    host = _spans(events, HOST_CATEGORIES)
    all_kernels = _spans(events, GPU_CATEGORIES)
    start = _window_start(all_kernels, launches, host, window_annotation)
    kernels = [k for k in all_kernels if float(k["ts"]) >= start]
    window = "second profiled step" if kernels and all_kernels and start > float(all_kernels[0]["ts"]) else "all"
    if not kernels:
        return {"window": window, "window_us": 0.0, "busy_us": 0.0, "idle_us": 0.0, "gaps": 0, "gaps_idle_us": 0.0,
                "largest": [], "by_host_op": []}
    syncs = [e for e in launch_events if is_sync_call(_name(e))]
    sync_starts = [float(e["ts"]) for e in syncs]
    timeline = _HostTimeline(host)
    busy = busy_intervals(kernels)
    busy_us = sum(end - begin for begin, end, _, _ in busy)
    gaps = []
    for (_, prev_end, _, prev_k), (next_start, _, next_k, _) in zip(busy, busy[1:]):
        idle = next_start - prev_end
        if idle < min_gap_us:
            continue
        launch = launches.get(_args(next_k).get("correlation"))
        around = timeline.enclosing((launch.get("pid"), launch.get("tid")), float(launch["ts"])) if launch else []
        blocking = None
        j = bisect.bisect_right(sync_starts, prev_end)
        for e in syncs[max(0, j - 64):j]:  # a sync the host was blocked in when the GPU ran dry
            if float(e["ts"]) + float(e["dur"]) >= prev_end:
                blocking = _name(e)
        gaps.append({
            "idle_us": idle,
            "kernel_before": _name(prev_k)[:120],
            "kernel_after": _name(next_k)[:120],
            "launch": _name(launch) if launch else None,
            "launch_to_start_us": next_start - float(launch["ts"]) if launch else None,
            "host_ops": around[:3] + (["..."] + around[-3:] if len(around) > 6 else around[3:]),
            "sync_call_spanning_gap": blocking,
        })
    by_op: dict[str, list[float]] = {}
    for g in gaps:
        ops = [op for op in g["host_ops"] if op != "..."]
        key = (g["sync_call_spanning_gap"] + " <- " if g["sync_call_spanning_gap"] else "") + (
            ops[-1] if ops else "(no host op)")
        total = by_op.setdefault(key, [0.0, 0])
        total[0] += g["idle_us"]
        total[1] += 1
    window_us = busy[-1][1] - busy[0][0]
    return {
        "window": window,
        "window_us": window_us,
        "busy_us": busy_us,
        "idle_us": window_us - busy_us,
        "gaps": len(gaps),
        "gaps_idle_us": sum(g["idle_us"] for g in gaps),
        "largest": sorted(gaps, key=lambda g: -g["idle_us"])[:top],
        "by_host_op": [{"host_op": k, "idle_us": v[0], "gaps": v[1]}
                       for k, v in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]],
    }
