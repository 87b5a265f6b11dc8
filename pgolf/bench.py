"""``pgolf bench train`` and ``pgolf bench eval``: how fast a recipe's model trains and scores on this device.

Why a separate benchmark: the training stage is time-capped (600 s), so every millisecond per step is steps
lost. This measures the step in isolation, at full size, on synthetic packed tokens, and reports the figures
gpu.md compares against (ms/step, tokens/s, MFU, peak memory, compile time), for depth recurrence off and on.

``bench train`` runs the training step of ``pgolf.train`` built from the same pieces (bf16 autocast on CUDA,
``torch.compile(fullgraph=True, dynamic=False)``, cu_seqlens padded to power-of-two buckets, gradient
accumulation, global-norm clipping, Muon + AdamW). It cannot call ``pgolf.train``'s step directly (that one
is a closure inside ``train``), so :func:`train_step` mirrors it line for line; keep the two in step.

Synthetic data: random token ids with a BOS (id 1) starting a document every 1,000-3,000 tokens (uniform),
cut into micro-batch rows exactly as the loader does (``targets`` = inputs shifted by one). A few distinct rows
are generated once and cycled, so host work does not pollute the timing.

FLOPs convention (gpu.md), per token, forward:
  2 x (q, k, v, o, up, down parameters) x block applications + 2 x d x V (LM head)
  + attention: 4 x heads x head_dim x mean causal context per block application (QK^T and AV, each 2 FLOPs per
    multiply-add; the mean context of a causal segment of L tokens is (L + 1) / 2, measured on the batch).
Training = 3 x forward. MFU = training FLOPs/s over the device's dense bf16 peak (table below, ``--peak-tflops``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

BOS_ID = 1
MIN_DOC_TOKENS = 1000
MAX_DOC_TOKENS = 3000
DISTINCT_ROWS = 4
RECORD_VAL_TOKENS = 47_851_520  # target tokens the record scores over 50,000 validation documents (data.md)

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


def peak_tflops_for(device_name: str) -> Optional[float]:
    """Dense bf16 peak of a device from its name, or None when the table does not know it (CPU included)."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


# --------------------------------------------------------------------------------------------------------------
# FLOPs (pure functions)
# --------------------------------------------------------------------------------------------------------------


def block_matrix_params(cfg) -> int:
    """Parameters of one block's q, k, v, o, up and down matrices (2,883,584 for the record)."""
    d, h, hkv, hd, hidden = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_hidden
    return d * h * hd + 2 * d * hkv * hd + h * hd * d + 2 * d * hidden


def mean_causal_context(cu_seqlens: np.ndarray) -> float:
    """Mean number of keys a query attends to in causal segments: sum L(L+1)/2 over segments / tokens."""
    lengths = np.diff(np.asarray(cu_seqlens, dtype=np.int64))
    tokens = int(lengths.sum())
    if tokens == 0:
        return 0.0
    return float((lengths * (lengths + 1) // 2).sum() / tokens)


def forward_flops_per_token(cfg, block_applications: int, mean_context: float) -> float:
    """Forward FLOPs per token under gpu.md's convention (see the module docstring)."""
    matrices = 2.0 * block_applications * block_matrix_params(cfg)
    head = 2.0 * cfg.model_dim * cfg.vocab_size
    attention = block_applications * 4.0 * cfg.num_heads * cfg.head_dim * mean_context
    return matrices + head + attention


def mfu(train_flops_per_token: float, tokens_per_s: float, peak_tflops: Optional[float]) -> Optional[float]:
    """Model FLOPs utilization in [0, 1], or None without a known peak."""
    if not peak_tflops:
        return None
    return train_flops_per_token * tokens_per_s / (peak_tflops * 1e12)


# --------------------------------------------------------------------------------------------------------------
# Synthetic packed rows
# --------------------------------------------------------------------------------------------------------------


def synthetic_stream(num_tokens: int, vocab_size: int, seed: int) -> np.ndarray:
    """int64 [num_tokens]: random ids in [2, vocab) with BOS opening a document every 1,000-3,000 tokens."""
    if vocab_size < 3:
        raise ValueError(f"synthetic_stream: vocab_size must be >= 3, got {vocab_size}")
    rng = np.random.default_rng(seed)
    stream = rng.integers(2, vocab_size, size=num_tokens, dtype=np.int64)
    position = 0
    while position < num_tokens:
        stream[position] = BOS_ID
        position += int(rng.integers(MIN_DOC_TOKENS, MAX_DOC_TOKENS + 1))
    return stream


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """CPU tensors of a few micro-batch rows, with cu_seqlens already padded to their bucket (as in training)."""

    inputs: list  # [rows] of int64 [T]
    targets: list  # [rows] of int64 [T]
    cu_seqlens: list  # [rows] of int32 [bucket]
    max_seqlen: int
    mean_context: float  # over all rows, for the FLOPs count

    @property
    def tokens(self) -> int:
        return int(self.inputs[0].numel())

    @property
    def cu_shapes(self) -> list[int]:
        return sorted({int(c.numel()) for c in self.cu_seqlens})


def packed_rows(
    row_tokens: int, vocab_size: int, max_seqlen: int, seed: int, rows: int = DISTINCT_ROWS, bucketed: bool = True
) -> PackedRows:
    """``rows`` consecutive rows of one synthetic stream, segmented like the training loader's micro-batches."""
    import torch

    from pgolf.attention import build_cu_seqlens, pad_cu_seqlens
    from pgolf.train import cu_seqlens_bucket

    stream = torch.from_numpy(synthetic_stream(rows * row_tokens + 1, vocab_size, seed))
    inputs, targets, cus, contexts = [], [], [], []
    for r in range(rows):
        row = stream[r * row_tokens : (r + 1) * row_tokens + 1]
        cu, _ = build_cu_seqlens(row[:-1], bos_id=BOS_ID, max_seqlen=max_seqlen)
        contexts.append(mean_causal_context(cu.numpy()))
        if bucketed:
            cu = pad_cu_seqlens(cu, cu_seqlens_bucket(cu.numel()))
        inputs.append(row[:-1].clone())
        targets.append(row[1:].clone())
        cus.append(cu)
    return PackedRows(inputs, targets, cus, max_seqlen, float(np.mean(contexts)))


# --------------------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------------------


def _device(kind: str):
    import torch

    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available")
    return torch.device(kind)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def _reset_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _memory_gib(device) -> tuple[Optional[float], Optional[float]]:
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


def _compile(model, enabled: bool, backend: str):
    import torch

    if not enabled:
        return model
    return torch.compile(model, fullgraph=True, dynamic=False, backend=backend)


def _versions() -> dict[str, Optional[str]]:
    import torch

    from pgolf import kernels

    triton_version = None
    if kernels.TRITON_AVAILABLE:
        import triton

        triton_version = triton.__version__
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda}


# --------------------------------------------------------------------------------------------------------------
# bench train
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainBench:
    """Everything one training step touches."""

    model: Any
    step_model: Any
    optimizers: list
    params: list
    device: Any
    grad_accum_steps: int
    grad_clip_norm: float
    rows: PackedRows
    compiled: bool  # step_model is torch.compile'd: cu_seqlens lengths are marked dynamic


def train_step(bench: TrainBench, step: int):
    """One optimizer step through the training stage's own functions (one process, so no all-reduce)."""
    import torch

    from pgolf.train import forward_backward, optimizer_step

    loss_sum = torch.zeros((), device=bench.device)
    for accum_index in range(bench.grad_accum_steps):
        r = (step * bench.grad_accum_steps + accum_index) % len(bench.rows.inputs)
        rows = bench.rows
        loss_sum += forward_backward(
            bench.step_model, rows.inputs[r], rows.targets[r], rows.cu_seqlens[r], rows.max_seqlen,
            bench.grad_accum_steps, bench.device, bench.compiled,
        )
    optimizer_step(bench.params, bench.optimizers, bench.grad_clip_norm, None)
    return loss_sum / bench.grad_accum_steps


def _time_steps(fn, count: int, device) -> tuple[float, list[float]]:
    """(total seconds, per-call seconds) of ``count`` calls; the device is synchronized around the whole run."""
    _sync(device)
    start = time.perf_counter()
    per_call = []
    for i in range(count):
        t0 = time.perf_counter()
        fn(i)
        per_call.append(time.perf_counter() - t0)
    _sync(device)
    return time.perf_counter() - start, per_call


def bench_train(
    run_cfg,
    *,
    steps: int,
    warmup: int = 3,
    grad_accum: Optional[int] = None,
    micro_batch_tokens: Optional[int] = None,
    fused: bool = True,
    compile: Optional[bool] = None,
    compile_backend: Optional[str] = None,
    looping: str = "both",
    device_kind: str = "auto",
    peak_tflops: Optional[float] = None,
    seed: int = 0,
    profile_steps: int = 0,
) -> dict[str, Any]:
    """Time the training step of ``run_cfg`` (a RunConfig); returns the JSON-ready result (see module docstring).

    ``profile_steps`` > 0 adds, per phase, a torch.profiler breakdown of that many more steps
    (:func:`profile_breakdown`)."""
    import torch

    from pgolf import kernels
    from pgolf.model import GPT, param_groups
    from pgolf.optim import build_optimizers

    if steps < 1 or warmup < 0:
        raise ValueError(f"bench train: expected steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if profile_steps < 0:
        raise ValueError(f"bench train: --profile-steps expects >= 0, got {profile_steps}")
    if looping not in ("on", "off", "both"):
        raise ValueError(f"bench train: --looping expects on, off or both, got {looping!r}")
    model_cfg, train_cfg = run_cfg.model, run_cfg.train
    device = _device(device_kind)
    compile = train_cfg.compile if compile is None else compile
    compile_backend = compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    micro = micro_batch_tokens if micro_batch_tokens is not None else train_cfg.micro_batch_tokens
    if micro < train_cfg.train_seq_len:
        raise ValueError(
            f"bench train: --micro-batch-tokens must be >= train_seq_len ({train_cfg.train_seq_len}), got {micro}"
        )
    accum = grad_accum if grad_accum is not None else max(train_cfg.train_batch_tokens // micro, 1)
    if accum < 1:
        raise ValueError(f"bench train: --grad-accum must be >= 1, got {accum}")

    torch.manual_seed(seed)
    model = GPT(model_cfg, train_seq_len=train_cfg.train_seq_len, bos_id=BOS_ID).to(device)
    model.use_fused_kernels = fused
    optimizers = build_optimizers(param_groups(model), run_cfg.optim, muon_average_grads=False)
    rows = packed_rows(micro, model_cfg.vocab_size, train_cfg.train_seq_len, seed)
    bench = TrainBench(
        model=model,
        step_model=_compile(model, compile, compile_backend),
        optimizers=optimizers,
        params=list(model.parameters()),
        device=device,
        grad_accum_steps=accum,
        grad_clip_norm=train_cfg.grad_clip_norm,
        rows=rows,
        compiled=bool(compile),
    )
    tokens_per_step = accum * rows.tokens
    peak = peak_tflops if peak_tflops is not None else peak_tflops_for(_device_name(device))
    can_loop = model_cfg.loop_count > 1
    states = {"off": [False], "on": [True], "both": [False, True]}[looping]
    if not can_loop:
        states = [False]  # nothing to switch on: one phase

    phases = []
    for loop_on in states:
        model.looping = loop_on
        counter = CompileCounter()
        warm_s, warm_calls = _time_steps(lambda i: train_step(bench, i), warmup, device)
        warm_counts = counter.delta()
        _reset_memory(device)
        timed = CompileCounter()
        losses = []
        total_s, _ = _time_steps(lambda i: losses.append(train_step(bench, warmup + i)), steps, device)
        timed_counts = timed.delta()
        alloc, reserved = _memory_gib(device)
        applications = len(model.virtual_layers())
        fwd = forward_flops_per_token(model_cfg, applications, rows.mean_context)
        tokens_per_s = steps * tokens_per_step / total_s
        loss = float(losses[-1].item())
        profiled = (
            profile_breakdown(lambda i: train_step(bench, warmup + steps + i), profile_steps, device)
            if profile_steps > 0 else None
        )
        phases.append(
            {
                "looping": loop_on,
                "block_applications": applications,
                "warmup_steps": warmup,
                "warmup_seconds": warm_s,
                "first_step_seconds": warm_calls[0] if warm_calls else None,
                "steps": steps,
                "ms_per_step": 1000.0 * total_s / steps,
                "tokens_per_s": tokens_per_s,
                "forward_flops_per_token": fwd,
                "train_flops_per_token": 3.0 * fwd,
                "mean_attention_context": rows.mean_context,
                "achieved_tflops": 3.0 * fwd * tokens_per_s / 1e12,
                "mfu": mfu(3.0 * fwd, tokens_per_s, peak),
                "peak_memory_allocated_gib": alloc,
                "peak_memory_reserved_gib": reserved,
                "graphs_compiled_in_warmup": warm_counts["graphs_compiled"],
                "graph_breaks_in_warmup": warm_counts["graph_breaks"],
                "recompiles_in_timed_steps": timed_counts["graphs_compiled"],
                "loss": loss,
                "loss_finite": math.isfinite(loss),
                "profile": profiled,
            }
        )
    return {
        "bench": "train",
        "run": run_cfg.run,
        "device": _device_name(device),
        "device_type": device.type,
        **_versions(),
        "fused_kernels": bool(model.use_fused_kernels),
        "fused_kernels_active": bool(model.use_fused_kernels and device.type == "cuda" and kernels.TRITON_AVAILABLE),
        "compile": bool(compile),
        "compile_backend": compile_backend if compile else None,
        "params": sum(p.numel() for p in model.parameters()),
        "micro_batch_tokens": rows.tokens,
        "grad_accum_steps": accum,
        "tokens_per_step": tokens_per_step,
        "train_seq_len": train_cfg.train_seq_len,
        "cu_seqlens_shapes": rows.cu_shapes,
        "peak_tflops": peak,
        "seed": seed,
        "phases": phases,
    }


# Kernel-name patterns of each time category in a profile, checked in order (the first match wins).
KERNEL_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "matmul", "_mm_", "cublas")),
    ("fused_triton_kernels", ("_mlp_up_act", "_softcap_ce")),  # pgolf/triton_kernels.py
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


def profile_breakdown(fn, steps: int, device, top: int = 25) -> dict[str, Any]:
    """Run ``fn(i)`` ``steps`` times under torch.profiler; where the GPU time goes, per step.

    Returns wall ms/step, GPU-busy ms/step (sum of kernel times; the rest is the GPU waiting for the host), ms per
    category (:data:`KERNEL_CATEGORIES`) and the ``top`` kernels by time. Why: a step slower than the target is
    either kernels (which ones) or launch/host overhead (busy << wall); the two need different fixes.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for i in range(steps):
            fn(i)
        _sync(device)
        wall_s = time.perf_counter() - start
    kernels: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] = kernels.get(event.name, 0.0) + event.device_time / 1000.0  # us -> ms
    by_category: dict[str, float] = {}
    for name, ms in kernels.items():
        category = kernel_category(name)
        by_category[category] = by_category.get(category, 0.0) + ms / steps
    busy_ms = sum(by_category.values())
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return {
        "profiled_steps": steps,
        "wall_ms_per_step": 1000.0 * wall_s / steps,
        "gpu_busy_ms_per_step": busy_ms,
        "gpu_idle_fraction": max(0.0, 1.0 - busy_ms / (1000.0 * wall_s / steps)) if busy_ms else None,
        "ms_per_step_by_category": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "top_kernels": [{"name": n[:160], "ms_per_step": ms / steps} for n, ms in ranked],
    }


# --------------------------------------------------------------------------------------------------------------
# bench eval
# --------------------------------------------------------------------------------------------------------------


def _token_nll(model, input_ids, target_ids, cu_seqlens, max_seqlen: int):
    """Per-token NLL [T] fp32 through the model's pieces and the (fused when enabled) softcapped CE."""
    from pgolf import kernels

    h = model.forward_hidden(input_ids, cu_seqlens, max_seqlen)  # [T, d]
    logits = model.lm_head(h)  # [T, V]
    if model.use_fused_kernels:
        return kernels.softcapped_token_nll(logits, target_ids, model.cfg.logit_softcap)
    return kernels.softcapped_token_nll_reference(logits, target_ids, model.cfg.logit_softcap)


def bench_eval(
    run_cfg,
    *,
    steps: int = 5,
    warmup: int = 2,
    batch_tokens: Optional[int] = None,
    fused: bool = True,
    compile: Optional[bool] = None,
    compile_backend: Optional[str] = None,
    device_kind: str = "auto",
    val_tokens: int = RECORD_VAL_TOKENS,
    seed: int = 0,
) -> dict[str, Any]:
    """Scoring throughput (no grad) and a TTT-like forward+backward throughput on packed rows, looping on."""
    import torch

    from pgolf import kernels
    from pgolf.model import GPT
    from pgolf.train import autocast_for

    if steps < 1 or warmup < 0:
        raise ValueError(f"bench eval: expected steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    model_cfg, eval_cfg = run_cfg.model, run_cfg.evaluate
    device = _device(device_kind)
    compile = eval_cfg.compile if compile is None else compile
    compile_backend = compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    row_tokens = batch_tokens or eval_cfg.eval_batch_tokens
    torch.manual_seed(seed)
    model = GPT(model_cfg, train_seq_len=eval_cfg.eval_seq_len, bos_id=BOS_ID).to(device)
    model.use_fused_kernels = fused
    model.looping = model_cfg.loop_count > 1  # always on at evaluation (record.md)
    rows = packed_rows(row_tokens, model_cfg.vocab_size, eval_cfg.eval_seq_len, seed)
    fn = _compile(lambda i, t, c, m: _token_nll(model, i, t, c, m), compile, compile_backend)

    def call(i: int, backward: bool):
        r = i % len(rows.inputs)
        args = [x[r].to(device, non_blocking=True) for x in (rows.inputs, rows.targets, rows.cu_seqlens)]
        with autocast_for(device):
            nll = fn(*args, rows.max_seqlen)
        if backward:
            nll.sum().backward()
        return nll

    results = {}
    for name, grad in (("score", False), ("ttt_step", True)):
        counter = CompileCounter()
        with torch.set_grad_enabled(grad):
            warm_s, _ = _time_steps(lambda i: call(i, grad), warmup, device)
            warm_counts = counter.delta()
            _reset_memory(device)
            timed = CompileCounter()
            total_s, _ = _time_steps(lambda i: call(warmup + i, grad), steps, device)
            timed_counts = timed.delta()
        model.zero_grad(set_to_none=True)
        alloc, reserved = _memory_gib(device)
        tokens_per_s = steps * rows.tokens / total_s
        results[name] = {
            "warmup_seconds": warm_s,
            "graphs_compiled_in_warmup": warm_counts["graphs_compiled"],
            "graph_breaks_in_warmup": warm_counts["graph_breaks"],
            "recompiles_in_timed_steps": timed_counts["graphs_compiled"],
            "ms_per_row": 1000.0 * total_s / steps,
            "tokens_per_s": tokens_per_s,
            "peak_memory_allocated_gib": alloc,
            "peak_memory_reserved_gib": reserved,
        }
    score_tps, ttt_tps = results["score"]["tokens_per_s"], results["ttt_step"]["tokens_per_s"]
    return {
        "bench": "eval",
        "run": run_cfg.run,
        "device": _device_name(device),
        "device_type": device.type,
        **_versions(),
        "fused_kernels": bool(model.use_fused_kernels),
        "fused_kernels_active": bool(model.use_fused_kernels and device.type == "cuda" and kernels.TRITON_AVAILABLE),
        "compile": bool(compile),
        "compile_backend": compile_backend if compile else None,
        "looping": bool(model.looping),
        "row_tokens": rows.tokens,
        "eval_seq_len": eval_cfg.eval_seq_len,
        "cu_seqlens_shapes": rows.cu_shapes,
        "steps": steps,
        "warmup_steps": warmup,
        "score": results["score"],
        "ttt_step": results["ttt_step"],
        "val_tokens": val_tokens,
        # one pass of scoring over the validation tokens, and scoring + one forward/backward per token (TTT)
        "projected_scoring_seconds": val_tokens / score_tps,
        "projected_ttt_seconds": val_tokens / score_tps + val_tokens / ttt_tps,
        "seed": seed,
    }


# --------------------------------------------------------------------------------------------------------------
# Reporting and CLI
# --------------------------------------------------------------------------------------------------------------


def _fmt(value: Optional[float], spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def train_summary_line(result: dict[str, Any]) -> str:
    head = (
        f"bench train {result['run']} on {result['device']}: fused {'on' if result['fused_kernels_active'] else 'off'}, "
        f"compile {result['compile_backend'] or 'off'}, {result['tokens_per_step']:,} tokens/step (accum {result['grad_accum_steps']})"
    )
    parts = []
    for p in result["phases"]:
        mfu_pct = None if p["mfu"] is None else 100 * p["mfu"]
        parts.append(
            f"loop {'on' if p['looping'] else 'off'}: {p['ms_per_step']:.1f} ms/step, {p['tokens_per_s'] / 1e3:,.0f}K tok/s, "
            f"MFU {_fmt(mfu_pct, '.1f')}%, peak {_fmt(p['peak_memory_allocated_gib'], '.1f')} GiB, "
            f"warm-up {p['warmup_seconds']:.1f}s, recompiles {p['recompiles_in_timed_steps']}"
        )
    return " | ".join([head, *parts])


def eval_summary_line(result: dict[str, Any]) -> str:
    s, t = result["score"], result["ttt_step"]
    return (
        f"bench eval {result['run']} on {result['device']}: fused {'on' if result['fused_kernels_active'] else 'off'}, "
        f"compile {result['compile_backend'] or 'off'}, rows of {result['row_tokens']:,} | score {s['tokens_per_s'] / 1e3:,.0f}K tok/s "
        f"| fwd+bwd {t['tokens_per_s'] / 1e3:,.0f}K tok/s | projected over {result['val_tokens']:,} tokens: "
        f"scoring {result['projected_scoring_seconds']:.0f}s, scoring + one TTT pass {result['projected_ttt_seconds']:.0f}s"
    )


def _emit(result: dict[str, Any], line: str, out: Optional[str]) -> None:
    print(line, file=sys.stderr, flush=True)
    print(json.dumps(result), flush=True)
    if out:
        from pgolf.io import atomic_write_json

        atomic_write_json(Path(out), result)


def _compile_flag(args: argparse.Namespace) -> Optional[bool]:
    if args.no_compile:
        return False
    return True if args.compile else None


def _train_cmd(args: argparse.Namespace) -> int:
    from pgolf.config import load_run_config

    result = bench_train(
        load_run_config(args.config),
        steps=args.steps,
        warmup=args.warmup,
        grad_accum=args.grad_accum,
        micro_batch_tokens=args.micro_batch_tokens,
        fused=not args.no_fused,
        compile=_compile_flag(args),
        compile_backend=args.compile_backend,
        looping=args.looping,
        device_kind=args.device,
        peak_tflops=args.peak_tflops,
        seed=args.seed,
        profile_steps=args.profile_steps,
    )
    _emit(result, train_summary_line(result), args.out)
    return 0


def _eval_cmd(args: argparse.Namespace) -> int:
    from pgolf.config import load_run_config

    result = bench_eval(
        load_run_config(args.config),
        steps=args.steps,
        warmup=args.warmup,
        batch_tokens=args.batch_tokens,
        fused=not args.no_fused,
        compile=_compile_flag(args),
        compile_backend=args.compile_backend,
        device_kind=args.device,
        val_tokens=args.val_tokens,
        seed=args.seed,
    )
    _emit(result, eval_summary_line(result), args.out)
    return 0


def _common(p: argparse.ArgumentParser, steps: int, warmup: int) -> None:
    p.add_argument("--config", required=True, help="recipe YAML (its model/optim/train/evaluate sections are used)")
    p.add_argument("--steps", type=int, default=steps, help=f"timed steps per phase (default {steps})")
    p.add_argument(
        "--warmup", type=int, default=warmup, help=f"untimed steps first: compile and autotune (default {warmup})"
    )
    p.add_argument("--no-fused", action="store_true", help="pure PyTorch MLP activation and loss (no Triton kernels)")
    compile_group = p.add_mutually_exclusive_group()
    compile_group.add_argument("--no-compile", action="store_true", help="eager mode")
    compile_group.add_argument("--compile", action="store_true", help="compile even if the recipe says not to")
    p.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (default inductor on CUDA, aot_eager on CPU)"
    )
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON result to this file")


def _add_subcommands(bench_sub: argparse._SubParsersAction) -> None:
    train = bench_sub.add_parser("train", help="ms/step, tokens/s, MFU, memory, compile time; looping off and on")
    _common(train, steps=10, warmup=3)
    train.add_argument(
        "--grad-accum",
        type=int,
        default=None,
        help="micro-batches per step (default: train_batch_tokens / micro-batch tokens)",
    )
    train.add_argument(
        "--micro-batch-tokens", type=int, default=None, help="tokens per forward (default: train.micro_batch_tokens)"
    )
    train.add_argument(
        "--looping", choices=["on", "off", "both"], default="both", help="depth recurrence phases to time"
    )
    train.add_argument(
        "--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by device name)"
    )
    train.add_argument(
        "--profile-steps", type=int, default=0,
        help="after timing, profile this many more steps per phase: GPU time by kernel category, top kernels",
    )
    train.set_defaults(func=_train_cmd)

    ev = bench_sub.add_parser("eval", help="scoring and TTT-like forward+backward throughput, looping on")
    _common(ev, steps=5, warmup=2)
    ev.add_argument(
        "--batch-tokens", type=int, default=None, help="tokens per packed row (default: evaluate.eval_batch_tokens)"
    )
    ev.add_argument("--val-tokens", type=int, default=RECORD_VAL_TOKENS, help="tokens for the time projections")
    ev.set_defaults(func=_eval_cmd)


def register(sub: argparse._SubParsersAction) -> None:
    """``pgolf bench {train,eval}``."""
    parser = sub.add_parser("bench", help="training and evaluation throughput on this device (synthetic tokens)")
    _add_subcommands(parser.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND"))


def main(argv: list[str] | None = None) -> int:
    """``python -m pgolf.bench {train,eval}``: the same commands without importing every other command group
    (the GPU machine lacks some of their dependencies, e.g. brotli)."""
    from pgolf.config import ConfigError

    parser = argparse.ArgumentParser(prog="python -m pgolf.bench", description=__doc__.splitlines()[0])
    _add_subcommands(parser.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"pgolf bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
