"""The training stage: ``python -m pgolf.train`` (run under torchrun for N processes).

One optimizer step consumes ``train_batch_tokens`` tokens on any number of processes (gradient accumulation
makes up the difference), so 1 GPU with accumulation 8 and 8 GPUs without accumulation see the same batches.
The schedule is time-based when ``max_wallclock_seconds > 0`` (the fraction of the budget used, minus the
Hessian reserve, drives the LR warmdown and loop activation; rank 0's clock decides for every rank) and
step-based otherwise. Compile warm-up steps run first and their state is thrown away. The EMA of the weights
is what gets saved.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pgolf.model.attention import build_cu_seqlens, pad_cu_seqlens
from pgolf.train.checkpoint import save_checkpoint
from pgolf.config import ModelConfig, OptimConfig, TrainConfig, to_dict
from pgolf.data.loader import BatchPlan, PackedBatchLoader
from pgolf.data.shards import list_shards, read_shard
from pgolf.train.distributed import DistInfo, broadcast_float, init_distributed, shutdown
from pgolf.io import MetricsLog, atomic_write_json, sha256_file
from pgolf.model.gpt import GPT, param_groups
from pgolf.train.optim import build_optimizers, set_lr_multiplier
from pgolf.train.prequant_ttt import prequant_ttt
from pgolf.compliance.provenance import code_hash, environment

BOS_ID = 1


# ----------------------------------------------------------------------------------------------------- schedule


def lr_multiplier(frac: float, warmdown_fraction: float, min_lr_fraction: float) -> float:
    """1 until ``1 - warmdown_fraction`` of training, then linear to 0, floored at ``min_lr_fraction``.

    Record: warmdown 0.85, floor 0.10 -> ``max((1 - frac) / 0.85, 0.10)`` after frac = 0.15.
    """
    if warmdown_fraction <= 0 or frac < 1.0 - warmdown_fraction:
        return 1.0
    return max((1.0 - frac) / warmdown_fraction, min_lr_fraction)


def training_budget_seconds(cfg: TrainConfig) -> float:
    """The loop's share of the wallclock cap: the Hessian reserve is set aside for the calibration pass."""
    return max(cfg.max_wallclock_seconds - cfg.hessian_reserve_seconds, 0.0)


def training_fraction(step: int, elapsed_s: float, cfg: TrainConfig) -> float:
    if cfg.max_wallclock_seconds > 0:
        return min(elapsed_s / max(training_budget_seconds(cfg), 1e-9), 1.0)
    return min(step / cfg.iterations, 1.0)


# ------------------------------------------------------------------------------------------------------ checks


def check_data(data_dir: Path, vocab_size: int) -> dict[str, Any]:
    """Refuse before any step: missing shards, or token ids the model's vocabulary cannot embed.

    Reads the data manifest's vocab size when present; otherwise scans the validation shards and the first
    train shard (a full scan of 8e9 tokens would cost minutes).
    """
    train = list_shards(data_dir, "train")
    if not train:
        raise FileNotFoundError(f"{data_dir}: no fineweb_train_*.bin shards")
    manifest_path = data_dir / "manifest.json"
    info: dict[str, Any] = {"train_shards": len(train), "data_manifest_sha256": None}
    if manifest_path.exists():
        info["data_manifest_sha256"] = sha256_file(manifest_path)
        manifest = json.loads(manifest_path.read_text())
        tok_vocab = (manifest.get("tokenizer") or {}).get("vocab_size")
        if isinstance(tok_vocab, int) and tok_vocab > vocab_size:
            raise ValueError(f"{manifest_path}: tokenizer vocab {tok_vocab} > model.vocab_size {vocab_size}")
    for path in [*list_shards(data_dir, "val"), train[0]]:
        tokens = read_shard(path)
        top = int(tokens.max()) if len(tokens) else 0
        if top >= vocab_size:
            raise ValueError(f"{path}: token id {top} >= model.vocab_size {vocab_size}")
    return info


# ------------------------------------------------------------------------------------------------------ helpers


def cu_seqlens_bucket(num_entries: int, minimum: int = 16) -> int:
    """Pad cu_seqlens to the next power of two: a compiled step then sees a handful of shapes, not one per batch."""
    return max(minimum, 1 << (num_entries - 1).bit_length())


def _all_reduce_grads(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Average gradients over ranks in one flattened all-reduce (few large messages beat many small ones)."""
    if not info.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(info.world_size)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; plain float32 on CPU (tests compare processes and need no bf16 rounding)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def forward_backward(
    step_model: torch.nn.Module,
    inputs: torch.Tensor,  # [n] token ids
    targets: torch.Tensor,  # [n] next tokens
    cu_seqlens: torch.Tensor,  # [segments + 1], bucketed
    max_seqlen: int,
    grad_accum_steps: int,
    device: torch.device,
    compiled: bool,
) -> torch.Tensor:
    """One micro-batch of a step: move it to the device, forward under autocast, backward of loss / accumulation.

    Returns the detached loss. Under compile the cu_seqlens length is marked dynamic: one graph serves every
    segment count (bucketing alone still recompiled ~50 s per new bucket on an H100).
    """
    if device.type == "cuda" and not inputs.is_cuda:  # pinned: the copies below really are asynchronous
        inputs, targets, cu_seqlens = (t if t.is_pinned() else t.pin_memory() for t in (inputs, targets, cu_seqlens))
    inputs = inputs.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    cu_seqlens = cu_seqlens.to(device, non_blocking=True)
    if compiled:
        torch._dynamo.mark_dynamic(cu_seqlens, 0)
    with autocast_for(device):
        loss = step_model(inputs, targets, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    (loss / grad_accum_steps).backward()
    return loss.detach()


def optimizer_step(
    params: list[torch.nn.Parameter], optimizers: list, grad_clip_norm: float, info: DistInfo | None
) -> None:
    """After a step's micro-batches: average gradients over ranks, clip by the global norm, step, zero."""
    if info is not None:
        _all_reduce_grads(params, info)
    if grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
    for opt in optimizers:
        opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)


class EMA:
    """Exponential moving average of every parameter in float32; ``decay`` 0 keeps the live weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """``shadow = lerp(shadow, p, 1 - decay)`` for every parameter, as ONE foreach call (a handful of CUDA
        launches instead of one per parameter; the same lerp per element)."""
        names = [name for name, _ in model.named_parameters()]
        live = [p.detach().float() for _, p in model.named_parameters()]
        torch._foreach_lerp_([self.shadow[name] for name in names], live, 1.0 - self.decay)

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        if self.decay == 0:
            return {n: p.detach().float().clone() for n, p in model.named_parameters()}
        return {n: t.clone() for n, t in self.shadow.items()}


def _compiled_graph_count() -> int:
    """Distinct graphs torch.compile produced in this process (recompiles show up here)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return 0.0


# -------------------------------------------------------------------------------------------------------- train


def train(
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    seed: int,
    data_dir: str | Path,
    out_dir: str | Path,
    device_kind: str = "auto",
) -> dict[str, Any]:
    """Train one seed in its own process group: join it, train, leave it (the ``python -m pgolf.train`` stage)."""
    info = init_distributed(device_kind)
    summary = train_in_group(model_cfg, optim_cfg, train_cfg, seed, data_dir, out_dir, info)
    shutdown(info)
    return summary


def train_in_group(
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    seed: int,
    data_dir: str | Path,
    out_dir: str | Path,
    info: DistInfo,
) -> dict[str, Any]:
    """Train one seed inside an existing process group and leave it open, so that later stages can reuse it (the
    in-process record run, pgolf.artifact.record_run). Rank 0 writes ``out_dir/checkpoint/`` and ``out_dir/train_summary.json``.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    device = info.device
    plan = BatchPlan(train_cfg.train_batch_tokens, train_cfg.micro_batch_tokens, info.world_size)
    data_info = check_data(data_dir, model_cfg.vocab_size)
    loader = PackedBatchLoader(data_dir, plan, info.rank)

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    build_start = time.perf_counter()  # "start-up" = model construction to the first training step (as the record's)
    model = GPT(model_cfg, train_seq_len=train_cfg.train_seq_len).to(device)  # (its RoPE tables' length)
    model.use_fused_kernels = train_cfg.fused_kernels and device.type == "cuda"
    attention = model.set_attention_backend(device)  # before compiling: probes FlashAttention
    groups = param_groups(model)
    optimizers = build_optimizers(groups, optim_cfg, muon_average_grads=False)  # grads averaged below, before clipping
    params = [p for p in model.parameters()]
    step_model = torch.compile(model, fullgraph=True, dynamic=False) if train_cfg.compile else model
    can_loop = model_cfg.loop_count > 1

    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.jsonl").write_text("")  # a rerun starts a fresh log
    metrics = MetricsLog(out_dir / "metrics.jsonl" if info.is_main else None)

    seen_cu_shapes: set[int] = set()

    def run_step(step: int) -> torch.Tensor:
        loss_sum = torch.zeros((), device=device)
        for accum_index in range(plan.grad_accum_steps):
            inputs, targets = loader.micro_batch(step, accum_index)  # [n] each, on CPU
            cu_seqlens, max_seqlen = build_cu_seqlens(inputs, bos_id=BOS_ID, max_seqlen=train_cfg.train_seq_len)
            cu_seqlens = pad_cu_seqlens(cu_seqlens, cu_seqlens_bucket(cu_seqlens.numel()))
            seen_cu_shapes.add(cu_seqlens.numel())
            loss_sum += forward_backward(
                step_model, inputs, targets, cu_seqlens, max_seqlen, plan.grad_accum_steps, device, train_cfg.compile
            )
        optimizer_step(params, optimizers, train_cfg.grad_clip_norm, info)
        return loss_sum / plan.grad_accum_steps

    # Compile warm-up: run real steps (both loop states when looping is configured), then restore everything.
    warmup_start = time.perf_counter()
    warmup_by_loop_state: dict[str, dict[str, Any]] = {}  # measurement only: steps, seconds, graphs per state
    if train_cfg.compile_warmup_steps > 0:
        saved_model = copy.deepcopy(model.state_dict())
        saved_opts = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
        for i in range(train_cfg.compile_warmup_steps):
            model.looping = can_loop and i >= train_cfg.compile_warmup_steps // 2
            t_step, graphs_before = time.perf_counter(), _compiled_graph_count()
            run_step(i)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            entry = warmup_by_loop_state.setdefault("on" if model.looping else "off",
                                                    {"steps": 0, "seconds": 0.0, "graphs_compiled": 0})
            entry["steps"] += 1
            entry["seconds"] += time.perf_counter() - t_step
            entry["graphs_compiled"] += _compiled_graph_count() - graphs_before
        model.load_state_dict(saved_model)
        for opt, state in zip(optimizers, saved_opts):
            opt.load_state_dict(state)
        model.looping = False
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    warmup_seconds = time.perf_counter() - warmup_start
    startup_seconds = time.perf_counter() - build_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    ema = EMA(model, train_cfg.ema_decay)
    model.looping = can_loop and train_cfg.loop_enable_fraction == 0.0
    loop_enabled_step = 0 if model.looping else None
    budget_s = training_budget_seconds(train_cfg)
    elapsed_s = 0.0
    step = 0
    step_times_ms = {"before_loop": [], "after_loop": []}
    train_start = time.perf_counter()
    last_log_time, last_log_step = train_start, 0
    while True:
        frac = training_fraction(step, elapsed_s, train_cfg)
        if step >= train_cfg.iterations or (train_cfg.max_wallclock_seconds > 0 and elapsed_s >= budget_s):
            break
        if can_loop and not model.looping and frac >= train_cfg.loop_enable_fraction:
            model.looping = True
            loop_enabled_step = step
        mult = lr_multiplier(frac, train_cfg.warmdown_fraction, train_cfg.min_lr_fraction)
        set_lr_multiplier(optimizers, mult)
        t0 = time.perf_counter()
        loss = run_step(step)
        ema.update(model)
        step += 1
        if device.type == "cuda" and (step % train_cfg.log_every_steps == 0):
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        step_times_ms["after_loop" if model.looping else "before_loop"].append((now - t0) * 1000.0)
        elapsed_s = broadcast_float(now - train_start, info)
        if step % train_cfg.log_every_steps == 0 or step == 1:
            loss_value = float(loss.item())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training loss is {loss_value} at step {step}")
            window_s = max(now - last_log_time, 1e-9)
            tokens_per_s = (step - last_log_step) * plan.train_batch_tokens / window_s
            last_log_time, last_log_step = now, step
            if train_cfg.max_wallclock_seconds > 0:
                eta_s = max(budget_s - elapsed_s, 0.0)
            else:
                eta_s = (train_cfg.iterations - step) * elapsed_s / step
            record = {
                "event": "train_step",
                "step": step,
                "loss": loss_value,
                "lr_multiplier": mult,
                "train_fraction": frac,
                "looping": bool(model.looping),
                "step_ms": step_times_ms["after_loop" if model.looping else "before_loop"][-1],
                "tokens_per_s": tokens_per_s,
                "elapsed_s": elapsed_s,
                "peak_memory_gib": _memory_gib(device),
            }
            metrics.write(record)
            if info.is_main:
                print(
                    f"step {step:>6} loss {loss_value:.4f} lr x{mult:.3f} {tokens_per_s / 1e3:,.0f}K tok/s "
                    f"{record['step_ms']:.0f} ms/step loop={'on' if model.looping else 'off'} "
                    f"elapsed {elapsed_s:.0f}s eta {eta_s:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - train_start

    weights = ema.state_dict(model)
    prequant: dict[str, Any] = {}
    if train_cfg.prequant_ttt_epochs > 0:  # ILLEGAL (C3/C4), sweeps only: recorded so `pgolf comply` rejects it
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights[name])
        prequant = prequant_ttt(model, data_dir, train_cfg.prequant_ttt_epochs, train_cfg.train_seq_len,
                                train_cfg.prequant_ttt_lr, device)
        weights = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    def _mean(xs: list[float]) -> float | None:
        # skip each phase's first step (it includes a recompile when the loop state changes)
        xs = xs[1:] if len(xs) > 1 else xs
        return float(sum(xs) / len(xs)) if xs else None

    summary = {
        "seed": seed,
        "world_size": info.world_size,
        "grad_accum_steps": plan.grad_accum_steps,
        "steps": step,
        "tokens_seen": step * plan.train_batch_tokens,
        "train_seconds": train_seconds,
        "compile_warmup_seconds": warmup_seconds,
        "compile_warmup_by_loop_state": warmup_by_loop_state,
        "startup_seconds": startup_seconds,
        "attention_backend": attention,
        "loop_enabled_step": loop_enabled_step,
        "ms_per_step": train_seconds * 1000.0 / max(step, 1),
        "ms_per_step_before_loop": _mean(step_times_ms["before_loop"]),
        "ms_per_step_after_loop": _mean(step_times_ms["after_loop"]),
        "tokens_per_s": step * plan.train_batch_tokens / max(train_seconds, 1e-9),
        "peak_memory_gib": _memory_gib(device),
        "cu_seqlens_shapes": sorted(seen_cu_shapes),
        "compiled_graphs": _compiled_graph_count(),
        **data_info,
        **prequant,
    }
    if info.is_main:
        meta = {
            "model_config": to_dict(model_cfg),
            "optim_config": to_dict(optim_cfg),
            "train_config": to_dict(train_cfg),
            "weights": "ema" if train_cfg.ema_decay > 0 else "final",
            "code_hash": code_hash(),
            "environment": environment(),
            **summary,
        }
        save_checkpoint(out_dir / "checkpoint", weights, meta)
        metrics.write({"event": "train_done", **summary})
        atomic_write_json(out_dir / "train_summary.json", summary)
    metrics.close()
    return summary
