"""Facts and helpers about the device a model runs on, shared by the training and evaluation benchmarks.

Dense bf16 peaks by device name (for MFU), synchronisation, memory peaks, compile counters, library versions, timed
loops and a torch.profiler breakdown of GPU time by kernel category. Why one place: ``pgolf bench train`` and
``pgolf bench eval`` must measure the same way, so that their figures compare.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

# Dense bf16 peak TFLOP/s by device-name substring, most specific first (no sparsity).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)


# Signs of a GPU driver torch.cuda could use: device nodes (NVIDIA's, WSL2's, ROCm's), the NVIDIA kernel module,
# and the driver's user-space libraries (present even before a first CUDA call creates the nodes after a boot).
GPU_DRIVER_NODES = ("/dev/nvidiactl", "/dev/dxg", "/dev/kfd", "/proc/driver/nvidia", "/sys/module/nvidia")
GPU_DRIVER_LIBRARIES = ("cuda", "amdhip64")


def _gpu_driver_present() -> bool:
    import ctypes.util

    return (any(os.path.exists(node) for node in GPU_DRIVER_NODES)
            or any(ctypes.util.find_library(name) for name in GPU_DRIVER_LIBRARIES))


def visible_gpus() -> int:
    """GPUs this machine shows torch (CUDA_VISIBLE_DEVICES is honoured by torch itself); 0 on CPU. Without any sign
    of a GPU driver there is no GPU to count and torch is not imported: the Snakefile calls this in every plan,
    where importing torch was ~2 s of a CPU machine's ``snakemake -n``."""
    if not _gpu_driver_present():
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def peak_tflops_for(device_name: str) -> Optional[float]:
    """Dense bf16 peak of a device from its name, or None when the table does not know it (CPU included)."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


# --------------------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------------------


def resolve_device(kind: str):
    import torch

    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available")
    return torch.device(kind)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def reset_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_gib(device) -> tuple[Optional[float], Optional[float]]:
    import torch

    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30


class CompileCounter:
    """Deltas of torch._dynamo's counters: graphs compiled (a recompile is one more) and graph breaks."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))

    def delta(self) -> dict[str, int]:
        graphs, breaks = self._read()
        return {"graphs_compiled": graphs - self.start[0], "graph_breaks": breaks - self.start[1]}


def inductor_options(backend: str, max_fusion_io_buffers: int = 0, mix_order_reduction: bool = True,
                     add_into_matmul: bool = True) -> Optional[dict[str, Any]]:
    """torch.compile ``options`` for ``train.compile_max_fusion_io_buffers`` (0: none),
    ``train.compile_mix_order_reduction`` and ``train.compile_add_into_matmul`` (True: inductor's default, no
    option); None when none asks for one. Only inductor takes them: other backends (aot_eager on CPU) generate no
    kernels, so they have nothing to act on there."""
    if backend != "inductor":
        return None
    options: dict[str, Any] = {}
    if max_fusion_io_buffers:
        options["max_fusion_unique_io_buffers"] = max_fusion_io_buffers
    if not mix_order_reduction:
        options["triton.mix_order_reduction"] = False
    if not add_into_matmul:
        from pgolf.model.compile_passes import SplitResidualAddmm

        options["post_grad_custom_post_pass"] = SplitResidualAddmm()
    return options or None


def recorded_options(options: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """``options`` as results record them (JSON): a graph pass by its name."""
    if options is None:
        return None
    return {key: value if isinstance(value, (bool, int, float, str)) else repr(value) for key, value in options.items()}


def compile_model(model, enabled: bool, backend: str, max_fusion_io_buffers: int = 0, mix_order_reduction: bool = True,
                  add_into_matmul: bool = True):
    """``torch.compile(fullgraph=True, dynamic=False)`` as training and the benchmarks compile (``enabled`` False:
    the model itself), with the fusion options of :func:`inductor_options`."""
    import torch

    if not enabled:
        return model
    options = inductor_options(backend, max_fusion_io_buffers, mix_order_reduction, add_into_matmul)
    return torch.compile(model, fullgraph=True, dynamic=False, backend=backend, options=options)


def versions() -> dict[str, Optional[str]]:
    import torch

    from pgolf.model import kernels

    triton_version = None
    if kernels.TRITON_AVAILABLE:
        import triton

        triton_version = triton.__version__
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda}



def time_steps(fn, count: int, device) -> tuple[float, list[float]]:
    """(total seconds, per-call seconds) of ``count`` calls; the device is synchronized around the whole run."""
    sync(device)
    start = time.perf_counter()
    per_call = []
    for i in range(count):
        t0 = time.perf_counter()
        fn(i)
        per_call.append(time.perf_counter() - t0)
    sync(device)
    return time.perf_counter() - start, per_call


# Kernel-name patterns of each time category in a profile, checked in order (the first match wins).
KERNEL_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "matmul", "_mm_", "cublas")),
    ("fused_triton_kernels", ("_mlp_up_act", "_mlp_tma", "_mlp_ws", "_softcap_ce")),  # triton_kernels, gluon_mlp
    ("communication", ("nccl",)),
    ("memory_copy", ("memcpy", "memset")),
    ("inductor_triton", ("triton",)),
)


def kernel_category(name: str) -> str:
    """The time category of a GPU kernel, from its name (``other`` when no pattern matches)."""
    lowered = name.lower()
    for category, patterns in KERNEL_CATEGORIES:
        if any(p in lowered for p in patterns):
            return category
    return "other"


def kernel_times(events, device_type) -> dict[str, float]:
    """Milliseconds per kernel name over profiler ``events`` on ``device_type``. Annotations on the GPU timeline
    (``record_function`` ranges such as ``Optimizer.step#Muon.step``) are left out: they span kernels that are
    counted on their own, so adding them would count that time twice."""
    kernels: dict[str, float] = {}
    for event in events:
        kind = str(getattr(event, "activity_type", ""))  # "gpu_user_annotation" for a range on the GPU timeline
        annotation = getattr(event, "is_user_annotation", False) or "annotation" in kind
        if event.device_type == device_type and not annotation:
            kernels[event.name] = kernels.get(event.name, 0.0) + event.device_time / 1000.0  # us -> ms
    return kernels


STEP_MARK = "pgolf_profiled_step_"  # record_function name prefix of each profiled step


def profile_breakdown(fn, steps: int, device, top: int = 60, trace_path: Optional[str] = None) -> dict[str, Any]:
    """Run ``fn(i)`` ``steps`` times under torch.profiler; where the GPU time goes, per step.

    Returns wall ms/step, GPU-busy ms/step (sum of kernel times; the rest is the GPU waiting for the host), ms per
    category (:data:`KERNEL_CATEGORIES`) and the ``top`` kernels by time. Why: a step slower than the target is
    either kernels (which ones) or launch/host overhead (busy << wall); the two need different fixes.
    ``trace_path``: also write the Chrome trace there and add ``idle_gaps`` (:func:`pgolf.model.idle_gaps.
    idle_gaps`: where the GPU waited, and for which host operation, from the second profiled step on: the first
    starts on the queue this function drained to time it).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for i in range(steps):
            with record_function(f"{STEP_MARK}{i}"):  # step bounds for idle_gaps' steady-state window
                fn(i)
        sync(device)
        wall_s = time.perf_counter() - start
    kernels = kernel_times(prof.events(), torch.autograd.DeviceType.CUDA)
    by_category: dict[str, float] = {}
    for name, ms in kernels.items():
        category = kernel_category(name)
        by_category[category] = by_category.get(category, 0.0) + ms / steps
    busy_ms = sum(by_category.values())
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    gaps = None
    if trace_path is not None:
        from pgolf.model.idle_gaps import idle_gaps

        prof.export_chrome_trace(str(trace_path))
        with open(trace_path, encoding="utf-8") as f:
            gaps = idle_gaps(json.load(f).get("traceEvents", []), window_annotation=STEP_MARK)
    return {
        "profiled_steps": steps,
        "wall_ms_per_step": 1000.0 * wall_s / steps,
        "gpu_busy_ms_per_step": busy_ms,
        "gpu_idle_fraction": max(0.0, 1.0 - busy_ms / (1000.0 * wall_s / steps)) if busy_ms else None,
        "ms_per_step_by_category": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "top_kernels": [{"name": n[:160], "ms_per_step": ms / steps} for n, ms in ranked],
        **({"idle_gaps": gaps} if gaps is not None else {}),
    }
