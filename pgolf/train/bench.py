"""``pgolf bench train``: how fast a recipe's model trains on this device.

Why a separate benchmark: the training stage is time-capped (600 s), so every millisecond per step is steps
lost. This measures the step in isolation, at full size, on synthetic packed tokens, and reports the figures
gpu.md compares against (ms/step, tokens/s, MFU, peak memory, compile time), for depth recurrence off and on.

``bench train`` runs the training step of ``pgolf.train.loop`` built from the same pieces (bf16 autocast on CUDA,
``torch.compile(fullgraph=True, dynamic=False)``, cu_seqlens padded to power-of-two buckets, gradient
accumulation, global-norm clipping, Muon + AdamW). It cannot call ``pgolf.train.loop``'s step directly (that one
is a closure inside ``train``), so :func:`train_step` mirrors it line for line; keep the two in step.

Synthetic data: random token ids with a BOS (id 1) starting a document every 1,000-3,000 tokens (uniform),
cut into micro-batch rows exactly as the loader does (``targets`` = inputs shifted by one). A few distinct rows
are generated once and cycled, so host work does not pollute the timing. Attention's cost follows the document
lengths, so a comparison with another trainer must give both the same documents: ``data_dir`` (``--data DIR``)
takes the rows from the start of DIR's training shards instead (one step's worth of distinct rows), e.g. the
shards the record script reads in ``shared/reference/side_by_side.sh``.

FLOPs convention (gpu.md), per token, forward:
  2 x (q, k, v, o, up, down parameters) x block applications + 2 x d x V (LM head)
  + attention: 4 x heads x head_dim x mean causal context per block application (QK^T and AV, each 2 FLOPs per
    multiply-add; the mean context of a causal segment of L tokens is (L + 1) / 2, measured on the batch).
Training = 3 x forward. MFU = training FLOPs/s over the device's dense bf16 peak (table below, ``--peak-tflops``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import numpy as np

from pgolf.model.device import (
    CompileCounter,
    compile_model,
    device_name,
    inductor_options,
    recorded_options,
    memory_gib,
    peak_tflops_for,
    profile_breakdown,
    reset_memory,
    resolve_device,
    time_steps,
    versions,
)
from pgolf.model.rope import extend_rope_cache

BOS_ID = 1
MIN_DOC_TOKENS = 1000
MAX_DOC_TOKENS = 3000
DISTINCT_ROWS = 4
RECORD_VAL_TOKENS = 47_851_520  # target tokens the record scores over 50,000 validation documents (data.md)

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


def shard_stream(data_dir, num_tokens: int, vocab_size: int) -> np.ndarray:
    """int64 [num_tokens]: the first tokens of ``data_dir``'s training shards, in shard order."""
    from pathlib import Path

    from pgolf.data.shards import list_shards, read_shard

    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"{data_dir}: no such folder (bench train --data)")
    paths = list_shards(data_dir, "train")
    if not paths:
        raise FileNotFoundError(f"{data_dir}: no fineweb_train_*.bin shards (bench train --data)")
    parts, have = [], 0
    for path in paths:
        part = np.asarray(read_shard(path)[: num_tokens - have], dtype=np.int64)
        parts.append(part)
        have += len(part)
        if have == num_tokens:
            break
    if have < num_tokens:
        raise ValueError(f"{data_dir}: the training shards hold {have:,} tokens; the bench needs {num_tokens:,}")
    stream = np.concatenate(parts)
    if stream[0] != BOS_ID:
        raise ValueError(f"{paths[0]}: expected a document start (BOS id {BOS_ID}) first, got {int(stream[0])}")
    if int(stream.max()) >= vocab_size:
        raise ValueError(f"{data_dir}: token id {int(stream.max())} >= model.vocab_size {vocab_size}")
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
    row_tokens: int, vocab_size: int, max_seqlen: int, seed: int, rows: int = DISTINCT_ROWS, bucketed: bool = True,
    pad: str = "pow2", stream: Optional[np.ndarray] = None,
) -> PackedRows:
    """``rows`` consecutive rows of one stream (``stream``, at least ``rows * row_tokens + 1`` tokens; default the
    synthetic one of ``seed``), segmented like the training loader's micro-batches (cu_seqlens padded as
    ``train.cu_seqlens_pad`` says when ``bucketed``)."""
    import torch

    from pgolf.model.attention import build_cu_seqlens, pad_cu_seqlens
    from pgolf.train.step import cu_seqlens_padded_length

    if stream is None:
        stream = synthetic_stream(rows * row_tokens + 1, vocab_size, seed)
    if len(stream) < rows * row_tokens + 1:
        raise ValueError(f"packed_rows: {rows} rows of {row_tokens} tokens need {rows * row_tokens + 1:,} tokens, "
                         f"the stream has {len(stream):,}")
    stream = torch.from_numpy(np.asarray(stream, dtype=np.int64))
    inputs, targets, cus, contexts = [], [], [], []
    for r in range(rows):
        row = stream[r * row_tokens : (r + 1) * row_tokens + 1]
        cu, _ = build_cu_seqlens(row[:-1], bos_id=BOS_ID, max_seqlen=max_seqlen)
        contexts.append(mean_causal_context(cu.numpy()))
        if bucketed:
            cu = pad_cu_seqlens(cu, cu_seqlens_padded_length(cu.numel(), pad))
        inputs.append(row[:-1].clone())
        targets.append(row[1:].clone())
        cus.append(cu)
    return PackedRows(inputs, targets, cus, max_seqlen, float(np.mean(contexts)))


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
    graphs: Any = None  # pgolf.train.graphs.MicroBatchGraphs under --cuda-graphs on CUDA, else None
    micro_batches: Any = None  # what runs a micro-batch: ``graphs``, else pgolf.train.step.EagerMicroBatches


def trace_file(trace_dir: Optional[str], loop_on: bool) -> Optional[str]:
    """Where a phase's profiler trace goes (None: no trace)."""
    if trace_dir is None:
        return None
    import os

    os.makedirs(trace_dir, exist_ok=True)
    return os.path.join(trace_dir, f"trace_looping_{'on' if loop_on else 'off'}.json")


def train_step(bench: TrainBench, step: int):
    """One optimizer step through the training stage's own functions (one process, so no all-reduce)."""
    import torch

    from pgolf.train.loop import optimizer_step

    loss_sum = torch.zeros((), device=bench.device)
    for accum_index in range(bench.grad_accum_steps):
        r = (step * bench.grad_accum_steps + accum_index) % len(bench.rows.inputs)
        rows = bench.rows
        loss_sum += bench.micro_batches(rows.inputs[r], rows.targets[r], rows.cu_seqlens[r], rows.max_seqlen)
    optimizer_step(bench.params, bench.optimizers, bench.grad_clip_norm, None)
    return loss_sum / bench.grad_accum_steps


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
    attention_backend: Optional[str] = None,
    max_fusion_io_buffers: Optional[int] = None,
    mix_order_reduction: Optional[bool] = None,
    qk_kernel: Optional[bool] = None,
    xsa_kernel: Optional[bool] = None,
    fold_scales: Optional[bool] = None,
    qkv_matmul: Optional[bool] = None,
    repeat_kv: Optional[bool] = None,
    data_dir: Optional[str] = None,
    trace_dir: Optional[str] = None,
    cuda_graphs: Optional[bool] = None,
    fused_grad_accumulation: Optional[bool] = None,
) -> dict[str, Any]:
    """Time the training step of ``run_cfg`` (a RunConfig); returns the JSON-ready result (see module docstring).

    ``profile_steps`` > 0 adds, per phase, a torch.profiler breakdown of that many more steps
    (:func:`profile_breakdown`). ``attention_backend`` (auto, fa3, fa4, torch) overrides the recipe's
    ``model.attention_backend``; the result records what it resolved to. ``max_fusion_io_buffers`` overrides
    ``train.compile_max_fusion_io_buffers`` (0: no cap) and ``mix_order_reduction``
    ``train.compile_mix_order_reduction``; ``train.compile_add_into_matmul`` as the recipe says; the result records
    the options used (``compile_options``).
    ``qk_kernel`` and ``xsa_kernel`` override ``train.fused_qk_norm_rope`` and ``train.fused_xsa_gate`` (the
    result's ``attention_kernels``), ``qkv_matmul`` ``train.fused_qkv_matmul`` (its ``qkv_matmul``), ``repeat_kv``
    ``train.repeat_kv_heads`` (its ``repeat_kv``); ``fold_scales`` overrides ``train.fold_output_scales``
    (``fold_output_scales``).
    ``data_dir``: micro-batch rows from that folder's training shards (one step's worth), not synthetic ones.
    ``trace_dir``: the profiled steps' Chrome trace goes there (``trace_looping_<off|on>.json``) and the profile
    gains ``idle_gaps`` (where the GPU waited for the host).
    ``cuda_graphs`` overrides ``train.cuda_graphs`` (CUDA only): micro-batches replay CUDA graphs
    (pgolf.train.graphs); a phase then also reports the graphs' pool, where the activations live
    (``graph_pool_gib``; ``peak_memory_allocated_gib`` of a replayed step leaves it out).
    ``fused_grad_accumulation`` overrides ``train.fused_grad_accumulation`` (pgolf.train.grad_fusion; the result's
    ``fused_grad_accumulation``)."""
    import torch

    from pgolf.model import attn_kernels, kernels
    from pgolf.model.gpt import GPT, param_groups
    from pgolf.train.loop import build_step_model, micro_batch_graphs
    from pgolf.train.optim import build_optimizers
    from pgolf.train.step import EagerMicroBatches
    from pgolf.train.storage import apply_param_storage

    if steps < 1 or warmup < 0:
        raise ValueError(f"bench train: expected steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if profile_steps < 0:
        raise ValueError(f"bench train: --profile-steps expects >= 0, got {profile_steps}")
    if looping not in ("on", "off", "both"):
        raise ValueError(f"bench train: --looping expects on, off or both, got {looping!r}")
    model_cfg, train_cfg = run_cfg.model, run_cfg.train
    if attention_backend is not None:
        model_cfg = dataclasses.replace(model_cfg, attention_backend=attention_backend)
    device = resolve_device(device_kind)
    compile = train_cfg.compile if compile is None else compile
    compile_backend = compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    fusion_cap = train_cfg.compile_max_fusion_io_buffers if max_fusion_io_buffers is None else max_fusion_io_buffers
    if fusion_cap == 1 or fusion_cap < 0:
        raise ValueError(f"bench train: --max-fusion-io-buffers expects 0 (no cap) or >= 2, got {fusion_cap}")
    mix_order = train_cfg.compile_mix_order_reduction if mix_order_reduction is None else mix_order_reduction
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
    attn_kernels.use_in_model(model, train_cfg.fused_qk_norm_rope if qk_kernel is None else qk_kernel,
                              train_cfg.fused_xsa_gate if xsa_kernel is None else xsa_kernel,
                              train_cfg.fused_qkv_matmul if qkv_matmul is None else qkv_matmul,
                              train_cfg.repeat_kv_heads if repeat_kv is None else repeat_kv,
                              train_cfg.fused_gate_linear)
    model.fold_output_scales = train_cfg.fold_output_scales if fold_scales is None else fold_scales
    attention = model.set_attention_backend(device)  # before compiling: probes FlashAttention
    groups = param_groups(model)
    # as the training stage stores them: under `record` a bf16 embedding, hence a bf16 residual stream
    apply_param_storage(model, train_cfg.param_storage, [name for name, _ in groups.get("embedding", ())])
    optimizers = build_optimizers(groups, run_cfg.optim, muon_average_grads=False)  # one process: nothing to average
    # a step's micro-batches differ, as in training: from shards one distinct row per micro-batch
    num_rows = accum if data_dir is not None else DISTINCT_ROWS
    stream = None if data_dir is None else shard_stream(data_dir, num_rows * micro + 1, model_cfg.vocab_size)
    rows = packed_rows(micro, model_cfg.vocab_size, train_cfg.train_seq_len, seed, rows=num_rows,
                       pad=train_cfg.cu_seqlens_pad, stream=stream)
    if device.type == "cuda":  # the training stage's micro-batches come pinned from its prefetch thread
        rows = dataclasses.replace(rows, **{field: [t.pin_memory() for t in getattr(rows, field)]
                                            for field in ("inputs", "targets", "cu_seqlens")})
    extend_rope_cache(model, rows.tokens)  # as the training stage does
    fused_accumulation = train_cfg.fused_grad_accumulation if fused_grad_accumulation is None else fused_grad_accumulation
    step_model = build_step_model(model, fused_accumulation, lambda module: compile_model(
        module, compile, compile_backend, fusion_cap, mix_order, train_cfg.compile_add_into_matmul))
    graphs_cfg = dataclasses.replace(train_cfg, compile=bool(compile),
                                     cuda_graphs=train_cfg.cuda_graphs if cuda_graphs is None else cuda_graphs)
    bench = TrainBench(
        model=model,
        step_model=step_model,
        optimizers=optimizers,
        params=list(model.parameters()),
        device=device,
        grad_accum_steps=accum,
        grad_clip_norm=train_cfg.grad_clip_norm,
        rows=rows,
        compiled=bool(compile),
        graphs=micro_batch_graphs(graphs_cfg, step_model, model, device, accum),
    )
    bench.micro_batches = (bench.graphs if bench.graphs is not None
                           else EagerMicroBatches(step_model, device, accum, bool(compile)))
    tokens_per_step = accum * rows.tokens
    peak = peak_tflops if peak_tflops is not None else peak_tflops_for(device_name(device))
    can_loop = model_cfg.loop_count > 1
    states = {"off": [False], "on": [True], "both": [False, True]}[looping]
    if not can_loop:
        states = [False]  # nothing to switch on: one phase

    phases = []
    for loop_on in states:
        model.looping = loop_on
        counter = CompileCounter()
        warm_s, warm_calls = time_steps(lambda i: train_step(bench, i), warmup, device)
        warm_counts = counter.delta()
        reset_memory(device)
        timed = CompileCounter()
        losses = []
        total_s, _ = time_steps(lambda i: losses.append(train_step(bench, warmup + i)), steps, device)
        timed_counts = timed.delta()
        alloc, reserved = memory_gib(device)
        applications = len(model.virtual_layers())
        fwd = forward_flops_per_token(model_cfg, applications, rows.mean_context)
        tokens_per_s = steps * tokens_per_step / total_s
        loss = float(losses[-1].item())
        profiled = (
            profile_breakdown(lambda i: train_step(bench, warmup + steps + i), profile_steps, device,
                              trace_path=trace_file(trace_dir, loop_on))
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
                "graph_pool_gib": None if bench.graphs is None else bench.graphs.pool_bytes() / 2**30,
                "profile": profiled,
            }
        )
    return {
        "bench": "train",
        "run": run_cfg.run,
        "device": device_name(device),
        "device_type": device.type,
        **versions(),
        "fused_kernels": bool(model.use_fused_kernels),
        "fused_kernels_active": bool(model.use_fused_kernels and device.type == "cuda" and kernels.TRITON_AVAILABLE),
        "attention_kernels": attn_kernels.used_in_model(model),  # attached; they run on CUDA only
        "attention_kernels_active": device.type == "cuda" and attn_kernels.TRITON_AVAILABLE,
        "fold_output_scales": model.fold_output_scales,
        "attention_backend": attention,
        "param_storage": train_cfg.param_storage,
        "compile": bool(compile),
        "compile_backend": compile_backend if compile else None,
        "cuda_graphs": None if bench.graphs is None else bench.graphs.summary(),
        "fused_grad_accumulation": fused_accumulation,
        # the inductor options the step was compiled with (None: none; only inductor takes them)
        "compile_options": (recorded_options(inductor_options(compile_backend, fusion_cap, mix_order,
                                                              train_cfg.compile_add_into_matmul)) if compile else None),
        "params": sum(p.numel() for p in model.parameters()),
        "micro_batch_tokens": rows.tokens,
        "grad_accum_steps": accum,
        "tokens_per_step": tokens_per_step,
        "train_seq_len": train_cfg.train_seq_len,
        "cu_seqlens_shapes": rows.cu_shapes,
        "data_dir": None if data_dir is None else str(data_dir),  # None: the synthetic stream
        "distinct_rows": len(rows.inputs),
        "peak_tflops": peak,
        "seed": seed,
        "phases": phases,
    }


def _fmt(value: Optional[float], spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def _options_text(options: Optional[dict[str, Any]]) -> str:
    return "" if not options else " (" + ", ".join(f"{k}={v}" for k, v in sorted(options.items())) + ")"


def train_summary_line(result: dict[str, Any]) -> str:
    head = (
        f"bench train {result['run']} on {result['device']}: fused {'on' if result['fused_kernels_active'] else 'off'}, "
        f"attention {result['attention_backend']['resolved']}, "
        f"compile {result['compile_backend'] or 'off'}{_options_text(result.get('compile_options'))}, "
        f"{result['tokens_per_step']:,} tokens/step (accum {result['grad_accum_steps']})"
    )
    parts = []
    for p in result["phases"]:
        mfu_pct = None if p["mfu"] is None else 100 * p["mfu"]
        parts.append(
            f"loop {'on' if p['looping'] else 'off'}: {p['ms_per_step']:.1f} ms/step, {p['tokens_per_s'] / 1e3:,.0f}K tok/s, "
            f"MFU {_fmt(mfu_pct, '.1f')}%, peak {_fmt(p['peak_memory_allocated_gib'], '.1f')} GiB, "
            f"warm-up {p['warmup_seconds']:.1f}s, recompiles {p['recompiles_in_timed_steps']}"
            + ("" if p.get("graph_pool_gib") is None else f", graph pool {p['graph_pool_gib']:.1f} GiB")
        )
    return " | ".join([head, *parts])
