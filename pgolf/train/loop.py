"""The training stage: ``python -m pgolf.train`` (run under torchrun for N processes).

One optimizer step consumes ``train_batch_tokens`` tokens on any number of processes (gradient accumulation makes
up the difference). The schedule is time-based when ``max_wallclock_seconds > 0`` (pgolf.train.schedule; rank 0's
clock decides for every rank) and step-based otherwise. Compile warm-up steps run first and their state is thrown
away (pgolf.train.warmup). The EMA of the weights is what gets saved (pgolf.train.storage).

Where PR #1855's loop differs, the recipe chooses (``train.*``, ``optim.muon_precision``/``adam_fused``); the
defaults keep pgolf's behaviour, ``config.yaml`` sets the record's:

=====================  ====================================  =============================================
key                    pgolf (default)                       record (config.yaml)
=====================  ====================================  =============================================
budget_reading         strict: loop + Hessians <= cap        record: the loop <= cap, Hessians after it
reserve_seconds        8.0 (the Hessians' allowance)         0.5 (the record run's GPTQ_RESERVE_SECONDS)
data_stream            contiguous, any GPU count alike       record: spans inside one shard, tails dropped
micro_batch_order      blocked                               interleaved
cu_seqlens_pad         pow2                                  multiple_of_64
clip_scope             global: average, then clip            per_rank: clip, then average
warmup_steps           10 (+ 10 looping)                     20 (+ 20 looping)
warmup_cu_passes       0                                     3
warmup_restore         full                                  record: Muon momentum survives
param_storage          fp32                                  record: bf16-rounded init, bf16 embedding
muon_precision         fp32_momentum                         record_bf16
adam_fused             cuda                                  always
=====================  ====================================  =============================================

Checked against the record script itself (tests/test_record_train_oracle.py).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from pgolf.compliance.provenance import code_hash, environment
from pgolf.config import ModelConfig, OptimConfig, TrainConfig, to_dict
from pgolf.data.loader import BatchPlan, PackedBatchLoader
from pgolf.data.record_stream import RecordStreamLoader
from pgolf.data.shards import list_shards, read_header, read_shard
from pgolf.io import (TRAIN_SUMMARY_MEASURED_FIELDS, MetricsLog, atomic_write_json, progress, rate_text,
                      read_json_object, sha256_file)
from pgolf.model.device import CompileCounter, compile_model
from pgolf.model.gpt import GPT, param_groups
from pgolf.model.rope import extend_rope_cache
from pgolf.train.checkpoint import load_initial_weights, save_checkpoint
from pgolf.train.distributed import DistInfo, broadcast_floats, init_distributed, shutdown
from pgolf.train.optim import build_optimizers, set_lr_multiplier, set_step_index
from pgolf.train.prefetch import MicroBatch, MicroBatchPrefetcher
from pgolf.train.prequant_ttt import prequant_ttt
from pgolf.train.schedule import lr_multiplier, training_budget_seconds, training_fraction
from pgolf.train.step import (
    EagerMicroBatches,
    autocast_for,
    cu_seqlens_bucket,
    forward_backward,
    micro_batch_segments,
    muon_averages_grads,
    optimizer_step,
)
from pgolf.train.storage import EMA, apply_param_storage
from pgolf.train.warmup import cu_warmup_seqlens, run_warmup

# re-exported: the loop's pieces have been importable from here since before the split into modules
__all__ = [
    "autocast_for", "check_data", "cu_seqlens_bucket", "forward_backward", "lr_multiplier", "make_loader",
    "optimizer_step", "train", "train_in_group", "train_model", "training_budget_seconds", "training_fraction",
]

NamedParams = Sequence[tuple[str, torch.nn.Parameter]]


# ------------------------------------------------------------------------------------------------------ checks


def check_data(data_dir: Path, vocab_size: int) -> dict[str, Any]:
    """Refuse before any step: missing shards, or token ids the model's vocabulary cannot embed.

    Reads the data manifest's vocab size when present; otherwise scans the validation shards and the first
    train shard (a full scan of 8e9 tokens would cost minutes).
    """
    train = list_shards(data_dir, "train")
    if not train:
        raise FileNotFoundError(f"{data_dir}: no fineweb_train_*.bin shards")
    if sum(read_header(p).num_tokens for p in train) == 0:  # headers only: a loader would divide by zero
        raise ValueError(f"{data_dir}: the {len(train)} fineweb_train_*.bin shard(s) hold no tokens")
    manifest_path = data_dir / "manifest.json"
    info: dict[str, Any] = {"train_shards": len(train), "data_manifest_sha256": None}
    if manifest_path.exists():
        info["data_manifest_sha256"] = sha256_file(manifest_path)
        manifest = read_json_object(manifest_path, "data manifest")
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


def make_loader(data_dir: Path, plan: BatchPlan, rank: int, cfg: TrainConfig):
    """This rank's micro-batches, ``micro_batch(step, accum_index) -> (inputs [n], targets [n])``, from the
    configured stream (``train.data_stream``, ``train.micro_batch_order``)."""
    if cfg.data_stream == "record":
        return RecordStreamLoader(data_dir, plan, rank)
    return PackedBatchLoader(data_dir, plan, rank, order=cfg.micro_batch_order)


def _memory_gib(device: torch.device, reserved: bool = False) -> float:
    """Peak GiB allocated (or reserved: the allocator's cache and the CUDA graphs' pool too) since the last reset."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_reserved if reserved else torch.cuda.max_memory_allocated)(device) / 2**30
    return 0.0


# ----------------------------------------------------------------------------------------------------- attempts

RESUME_DIR = "resume"  # <train dir>/resume/: a sweep's saved state (pgolf.train.resume) and the attempt record
ATTEMPT_NAME = "attempt.json"
TRAIN_LOCK_NAME = ".train.lock"  # held by the training process of a seed folder (pgolf.io.exclusive_lock)
PREFETCH_MICRO_BATCHES = 2  # micro-batches prepared ahead on a worker thread (the record's loader queues two)


def begin_attempt(resume_dir: Path, resumed_step: Optional[int], resume_every_steps: int) -> int:
    """Record this attempt in ``attempt.json``; returns the number of earlier, unfinished attempts. When one did
    not finish and nothing is resumed, say that this attempt starts over from step 0, and why."""
    import datetime

    path = resume_dir / ATTEMPT_NAME
    earlier, started = 0, None
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
            earlier, started = int(previous.get("attempts", 1)), previous.get("started_utc")
        except (ValueError, TypeError, AttributeError):  # not JSON, not an object, not a count: one attempt at least
            earlier = 1
    if earlier and resumed_step is None:
        why = ("train.resume_every_steps is 0: a record run is one uninterrupted timed run, so an interrupted one "
               "restarts from scratch" if resume_every_steps == 0 else "no usable saved state")
        progress(f"an earlier attempt (started {started or 'unknown'}) did not finish; this one starts over from "
                 f"step 0 ({why})", final=True)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    atomic_write_json(path, {"attempts": earlier + 1, "started_utc": now})
    return earlier


def finish_attempts(resume_dir: Path) -> None:
    """A successful finish: the saved state and the attempt record go (a forced rerun trains afresh)."""
    import shutil

    if resume_dir.exists():
        shutil.rmtree(resume_dir, ignore_errors=True)


# -------------------------------------------------------------------------------------------------------- train


def train(
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    seed: int,
    data_dir: str | Path,
    out_dir: str | Path,
    device_kind: str = "auto",
    init_checkpoint: str | Path | None = None,
    keep_resume: bool = False,
) -> dict[str, Any]:
    """Train one seed in its own process group: join it, train, leave it (the ``python -m pgolf.train`` stage).

    ``init_checkpoint``: a pgolf checkpoint directory whose weights replace the seeded initialization.
    ``keep_resume``: see :func:`train_in_group`.
    """
    info = init_distributed(device_kind)
    summary = train_in_group(model_cfg, optim_cfg, train_cfg, seed, data_dir, out_dir, info, init_checkpoint,
                             keep_resume)
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
    init_checkpoint: str | Path | None = None,
    keep_resume: bool = False,
) -> dict[str, Any]:
    """Train one seed inside an existing process group and leave it open, so that later stages can reuse it (the
    in-process record run, pgolf.artifact.record_run). Rank 0 writes ``out_dir/checkpoint/`` and
    ``out_dir/train_summary.json``, holding ``out_dir/.train.lock`` all along: a second training of the same folder
    is refused at once.

    ``keep_resume``: leave ``out_dir/resume/`` for the caller to remove once it has accepted the outputs (the
    Snakemake rule does, after the job succeeded), with a sweep's state of the LAST step in it. A job killed between
    these writes and that acceptance (Snakemake then deletes the outputs as incomplete) resumes from the end
    instead of starting over. Without it the folder goes as soon as the outputs are written.
    """
    from pgolf.io import exclusive_lock, set_cpu_threads

    set_cpu_threads(train_cfg.cpu_threads)  # CPU training: the same sums from the pipeline and train_gpt.py
    lock = exclusive_lock(Path(out_dir) / TRAIN_LOCK_NAME, "a training of this seed") if info.is_main else nullcontext()
    with lock:
        return _train_in_group(model_cfg, optim_cfg, train_cfg, seed, data_dir, out_dir, info, init_checkpoint,
                               keep_resume)


def _train_in_group(model_cfg: ModelConfig, optim_cfg: OptimConfig, train_cfg: TrainConfig, seed, data_dir, out_dir,
                    info, init_checkpoint, keep_resume):
    """:func:`train_in_group`'s work, under its lock."""
    data_info = check_data(Path(data_dir), model_cfg.vocab_size)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    build_start = time.perf_counter()  # start-up: model construction to the first training step (as the record's)
    model = GPT(model_cfg, train_seq_len=train_cfg.train_seq_len)  # (the length of its RoPE tables)
    extra: dict[str, Any] = {}
    if init_checkpoint is not None:
        init_meta = load_initial_weights(model, model_cfg, init_checkpoint)
        extra = {"init_checkpoint": str(init_checkpoint), "init_weights_sha256": init_meta.get("weights_sha256")}
    model = model.to(info.device)
    model.use_fused_kernels = train_cfg.fused_kernels and info.device.type == "cuda"
    model.fold_output_scales = train_cfg.fold_output_scales  # pure PyTorch: every device
    if (train_cfg.fused_qk_norm_rope or train_cfg.fused_xsa_gate) and info.device.type == "cuda":
        from pgolf.model import attn_kernels  # (a bundle of a recipe with both off folds this away: none shipped)

        attn_kernels.use_in_model(model, train_cfg.fused_qk_norm_rope, train_cfg.fused_xsa_gate,
                                  train_cfg.fused_qkv_matmul, train_cfg.repeat_kv_heads, train_cfg.fused_gate_linear)
    model.set_attention_backend(info.device)  # before compiling: probes FlashAttention; recorded in the summary
    return train_model(
        model, param_groups(model), model_cfg, optim_cfg, train_cfg, seed, data_dir, out_dir, info,
        data_info={**data_info, **extra}, build_start=build_start, keep_resume=keep_resume,
    )


def build_step_model(model: torch.nn.Module, fused_grad_accumulation: bool, compile_fn: Callable) -> Callable:
    """What each micro-batch calls: ``compile_fn(model)``, or under ``train.fused_grad_accumulation`` the model
    reparametrized so that the compiled backward adds the gradients into ``.grad`` (pgolf.train.grad_fusion).
    Build it after the parameters' storage is final. The training loop's and the bench's."""
    if not fused_grad_accumulation:
        return compile_fn(model)
    from pgolf.train.grad_fusion import FusedGradAccumulation

    return FusedGradAccumulation(model, compile_fn)


def micro_batch_graphs(train_cfg: TrainConfig, step_model, model, device: torch.device, accum: int):
    """train.cuda_graphs: the runner that replays micro-batches from CUDA graphs (pgolf.train.graphs), or None
    (the option off, or no CUDA: micro-batches then run eagerly). ``train_cfg.compile``: whether ``step_model`` is
    compiled. The training loop's and the bench's."""
    if not (train_cfg.cuda_graphs and device.type == "cuda"):
        return None
    from pgolf.train.graphs import MicroBatchGraphs  # a bundle leaves the module out when the recipe never uses it

    return MicroBatchGraphs(step_model, model, device, accum, train_cfg.compile)


def train_model(
    model: torch.nn.Module,
    groups: Mapping[str, NamedParams],
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    seed: int,
    data_dir: str | Path,
    out_dir: str | Path,
    info: DistInfo,
    *,
    data_info: Optional[dict[str, Any]] = None,
    clock: Callable[[], float] = time.perf_counter,
    build_start: Optional[float] = None,
    keep_resume: bool = False,
) -> dict[str, Any]:
    """Train a built model (its initial weights in place, on ``info.device``): warm-up, the timed loop, the EMA,
    the checkpoint. The model needs a ``looping`` attribute and ``forward(inputs [n], targets [n], cu_seqlens=,
    max_seqlen=) -> mean loss``; ``groups`` are its optimizer groups (pgolf.model.gpt.param_groups).

    ``clock``: the time source of the schedule and the stop (seconds; read once at the start, then at the top and
    at the end of every step, like the record's); a test can pass a fake one. ``build_start``: the
    ``time.perf_counter()`` of the model's construction, for the summary's ``startup_seconds``. ``keep_resume``:
    see :func:`train_in_group`.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    device = info.device
    run_graphs = CompileCounter()  # graphs an earlier run of this process compiled are not this run's
    plan = BatchPlan(train_cfg.train_batch_tokens, train_cfg.micro_batch_tokens, info.world_size)
    accum = plan.grad_accum_steps
    if data_info is None:
        data_info = check_data(data_dir, model_cfg.vocab_size)
    loader = make_loader(data_dir, plan, info.rank, train_cfg)
    # the stream starts over (a second epoch) at this step (1-based): said once, when a run gets there. The
    # contiguous stream wraps after the shards' tokens; the record's stream after its last whole span of calls
    # (each shard's head before its first BOS and its tail are never read)
    train_tokens = sum(read_header(p).num_tokens for p in list_shards(data_dir, "train"))
    if isinstance(loader, RecordStreamLoader):
        repeat_step = loader.calls_per_epoch // accum + 1
    else:
        repeat_step = train_tokens // plan.train_batch_tokens + 1

    apply_param_storage(model, train_cfg.param_storage, [name for name, _ in groups.get("embedding", ())])
    optimizers = build_optimizers(groups, optim_cfg, muon_average_grads=muon_averages_grads(train_cfg.clip_scope))
    params = [p for p in model.parameters()]  # the model's order: the clip norm sums in it
    extend_rope_cache(model, plan.micro_batch_tokens)  # rows of one micro-batch: sliced, not computed, RoPE tables
    step_model = build_step_model(model, train_cfg.fused_grad_accumulation, lambda module: compile_model(
        module, train_cfg.compile, "inductor", train_cfg.compile_max_fusion_io_buffers,
        train_cfg.compile_mix_order_reduction, train_cfg.compile_add_into_matmul))
    can_loop = model_cfg.loop_count > 1
    graphs = micro_batch_graphs(train_cfg, step_model, model, device, accum)
    run_micro_batch = graphs if graphs is not None else EagerMicroBatches(step_model, device, accum, train_cfg.compile)

    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    # a hidden partial file until the checkpoint and the summary are written (pgolf.io.MetricsLog)
    metrics = MetricsLog(out_dir / "metrics.jsonl" if info.is_main else None)

    seen_cu_shapes: set[int] = set()

    def prepare(call: int) -> MicroBatch:
        inputs, targets = loader.micro_batch(*divmod(call, accum))  # [n] each, on CPU
        # check_data read one training shard; every later one is checked as it is used (on the worker thread)
        top = int(torch.maximum(inputs.max(), targets.max())) if len(inputs) else 0
        if top >= model_cfg.vocab_size:
            raise ValueError(f"{data_dir}: training micro-batch {call} (step {call // accum}) holds token id {top} >= "
                             f"model.vocab_size {model_cfg.vocab_size}: a shard of another tokenizer")
        cu_seqlens, max_seqlen = micro_batch_segments(inputs, train_cfg.train_seq_len, train_cfg.cu_seqlens_pad)
        return MicroBatch(inputs, targets, cu_seqlens, max_seqlen)

    # the next micro-batches are read, cut and pinned on a worker thread while the GPU works (pgolf.train.prefetch)
    prefetcher = MicroBatchPrefetcher(prepare, depth=PREFETCH_MICRO_BATCHES, pin=device.type == "cuda")

    def run_step(step_index: int, first_call: int) -> torch.Tensor:
        """One optimizer step on stream calls first_call .. first_call + accum - 1; returns the mean loss."""
        set_step_index(optimizers, step_index)  # Muon's momentum warm-up follows the loop's step index
        loss_sum = torch.zeros((), device=device)
        for call in range(first_call, first_call + accum):
            batch = prefetcher.get(call)
            seen_cu_shapes.add(batch.cu_seqlens.numel())
            loss_sum += run_micro_batch(batch.inputs, batch.targets, batch.cu_seqlens, batch.max_seqlen)
        optimizer_step(params, optimizers, train_cfg.grad_clip_norm, info, train_cfg.clip_scope)
        return loss_sum / accum

    def compile_pass(cu_seqlens: torch.Tensor) -> None:
        inputs, targets = loader.micro_batch(0, 0)  # stream call 0
        # under graphs the runner learns the key here: the warm-up steps capture it without an eager run
        run_micro_batch.eager(inputs, targets, cu_seqlens, train_cfg.train_seq_len)

    # measurement only (the procedure is pgolf.train.warmup's): seconds, steps, compile passes and graphs compiled
    # per loop state, from wrappers around the warm-up's two callbacks
    warmup_by_loop_state: dict[str, dict[str, Any]] = {}

    def measured(fn: Callable, kind: str) -> Callable:
        def call(*args):
            t, graphs = time.perf_counter(), CompileCounter()
            out = fn(*args)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            entry = warmup_by_loop_state.setdefault("on" if model.looping else "off", {
                "steps": 0, "compile_passes": 0, "seconds": 0.0, "graphs_compiled": 0})
            entry[kind] += 1
            entry["seconds"] += time.perf_counter() - t
            entry["graphs_compiled"] += graphs.delta()["graphs_compiled"]
            return out

        return call

    try:  # the prefetch thread is joined however the warm-up or the loop ends
        warmup_start = time.perf_counter()
        set_lr_multiplier(optimizers, 1.0)
        run_warmup(
            model, optimizers,
            loop_states=(False, True) if can_loop else (False,),
            warmup_steps=train_cfg.warmup_steps,
            calls_per_step=accum,
            # the record's loader spends call 0 on the compile passes; the contiguous stream is indexed, not consumed,
            # so its warm-up starts at call 0 (a one-call shift would move each rank's slots by a world-size-dependent
            # amount, and with warmup_restore: record the warm-up's momentum would differ between GPU counts)
            first_step_call=1 if train_cfg.data_stream == "record" else 0,
            run_step=measured(run_step, "steps"),
            cu_passes=train_cfg.warmup_cu_passes,
            cu_seqlens_list=cu_warmup_seqlens(plan.micro_batch_tokens, train_cfg.train_seq_len,
                                              train_cfg.cu_seqlens_pad),
            compile_pass=measured(compile_pass, "compile_passes"),
            restore_kind=train_cfg.warmup_restore,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        warmup_seconds = time.perf_counter() - warmup_start
        startup_seconds = time.perf_counter() - (warmup_start if build_start is None else build_start)
        warmup_reserved_gib = _memory_gib(device, reserved=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        ema = EMA(model, train_cfg.ema_decay)
        model.looping = False
        loop_enabled_step = None
        budget_s = training_budget_seconds(train_cfg)
        timed = train_cfg.max_wallclock_seconds > 0
        step = 0
        end_s = 0.0  # rank 0's clock at the end of the previous step
        step_times_ms: dict[str, list[float]] = {"before_loop": [], "after_loop": []}

        # resume a sweep from its last saved state (pgolf.train.resume); a record run always starts at step 0
        resume_dir = out_dir / RESUME_DIR
        every = train_cfg.resume_every_steps
        resumed_from: Optional[int] = None
        if every > 0:
            from pgolf.train import resume  # sweeps only: a bundle of a recipe that never saves can leave it out

            state_id = resume.fingerprint(model_cfg, optim_cfg, train_cfg, seed, info.world_size, data_info,
                                          code_hash())
            state, state_meta, why = resume.load(resume_dir, state_id)
            if info.is_main:
                progress(f"resume: {why}", final=True)
            if state is not None:
                resume.restore(model, optimizers, ema.shadow, state)
                step, end_s = int(state["step"]), float(state["elapsed_s"])
                model.looping = bool(state["looping"])
                loop_enabled_step = None if int(state["loop_enabled_step"]) < 0 else int(state["loop_enabled_step"])
                step_times_ms = {k: [float(x) for x in v.tolist()] for k, v in state["step_times_ms"].items()}
                # as if never stopped
                seen_cu_shapes.update(int(n) for n in state.get("cu_shapes", torch.zeros(0)).tolist())
                resumed_from = step
                metrics.restart(state_meta["metrics"])
                metrics.write({"event": "resumed", "from_step": step, "elapsed_s": end_s})
        (resumed_on_rank0,) = broadcast_floats([-1.0 if resumed_from is None else float(resumed_from)], info)
        if int(resumed_on_rank0) != (-1 if resumed_from is None else resumed_from):
            raise RuntimeError(f"rank {info.rank}: resumed from {resumed_from}, rank 0 from {int(resumed_on_rank0)}")
        earlier_attempts = begin_attempt(resume_dir, resumed_from, every) if info.is_main else 0

        saved_step = resumed_from  # the step whose state resume/ holds

        def save_state() -> int:
            """Rank 0: the state of this step into resume/; returns the step resume/ now holds. A failure is
            reported, not raised."""
            state = resume.capture(
                model, optimizers, ema.shadow, step=step, elapsed_s=end_s, looping=bool(model.looping),
                loop_enabled_step=-1 if loop_enabled_step is None else loop_enabled_step,
                step_times_ms={k: torch.tensor(v, dtype=torch.float64) for k, v in step_times_ms.items()},
                cu_shapes=torch.tensor(sorted(seen_cu_shapes), dtype=torch.int64),
            )
            try:
                resume.save(resume_dir, state, state_id, step, metrics.lines)
            except OSError as exc:  # a full disk, say: the saved state is a convenience, the training is not
                progress(f"resume: could not save the state of step {step} in {resume_dir} ({exc}); training goes "
                         "on (an interruption would resume from an earlier saved state)", final=True)
                return saved_step
            return step

        last_loss: Optional[float] = None
        # every step's loss is finite so far: kept on the device (no synchronization), read on logged steps and at
        # the end, so that a divergence between two logged steps is not saved as a checkpoint
        all_finite = torch.ones((), dtype=torch.bool, device=device)
        train_start = clock() - end_s  # a resumed time-based schedule continues from the saved loop seconds
        last_log_time, last_log_step = time.perf_counter(), step
        while step < train_cfg.iterations:
            # rank 0's clock decides for every rank: the top of this step (schedule) and the end of the last (stop)
            top_s, end_s = broadcast_floats([clock() - train_start, end_s], info)
            if timed and step > 0 and end_s >= budget_s:
                break  # the record's rule: stop after the first step that ends at or past the budget
            frac = training_fraction(step, top_s, train_cfg)
            if can_loop and not model.looping and frac >= train_cfg.loop_enable_fraction:
                model.looping = True
                loop_enabled_step = step
            mult = lr_multiplier(frac, train_cfg.warmdown_fraction, train_cfg.min_lr_fraction)
            set_lr_multiplier(optimizers, mult)
            t0 = time.perf_counter()
            loss = run_step(step, step * accum)
            all_finite &= torch.isfinite(loss)
            ema.update()
            step += 1
            if step == repeat_step:
                metrics.write({"event": "data_repeated", "step": step, "train_tokens": train_tokens})
                if info.is_main:
                    progress(f"step {step} reads the training stream of {data_dir} ({train_tokens:,} tokens) a second "
                             "time: the stream starts over (a second epoch)", final=True)
            # replayed graphs leave the host steps ahead of the GPU: the stop rule's clock must see this step done
            if device.type == "cuda" and (graphs is not None or step % train_cfg.log_every_steps == 0):
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            end_s = clock() - train_start
            step_times_ms["after_loop" if model.looping else "before_loop"].append((now - t0) * 1000.0)
            if step % train_cfg.log_every_steps == 0 or step == 1:
                loss_value = last_loss = float(loss.item())
                if not math.isfinite(loss_value) or not bool(all_finite):
                    raise FloatingPointError(f"training loss is not finite at step {step} or before it (logged "
                                             f"{loss_value}; last finite log at step {last_log_step})")
                window_s = max(now - last_log_time, 1e-9)
                tokens_per_s = (step - last_log_step) * plan.train_batch_tokens / window_s
                last_log_time, last_log_step = now, step
                eta_s = max(budget_s - end_s, 0.0) if timed else (train_cfg.iterations - step) * end_s / step
                record = {
                    "event": "train_step",
                    "step": step,
                    "loss": loss_value,
                    "lr_multiplier": mult,
                    "train_fraction": frac,
                    "looping": bool(model.looping),
                    "step_ms": step_times_ms["after_loop" if model.looping else "before_loop"][-1],
                    "tokens_per_s": tokens_per_s,
                    "elapsed_s": end_s,
                    "peak_memory_gib": _memory_gib(device),
                }
                metrics.write(record)
                if info.is_main:
                    progress(
                        f"step {step}/{train_cfg.iterations} loss {loss_value:.4f} lr x{mult:.3f} "
                        f"{rate_text(tokens_per_s, 'tok')} {record['step_ms']:.0f} ms/step "
                        f"loop={'on' if model.looping else 'off'} elapsed {end_s:.0f}s eta {eta_s:.0f}s"
                    )
            if every > 0 and step % every == 0 and step < train_cfg.iterations:
                save_start = clock()
                if info.is_main:
                    saved_step = save_state()
                train_start += clock() - save_start  # saving is not training time: the schedule's clock skips it
    finally:
        prefetcher.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = clock() - train_start

    if not bool(all_finite):
        raise FloatingPointError(f"training loss was not finite at a step after the last logged one (step "
                                 f"{last_log_step}): no checkpoint is written")
    if keep_resume and every > 0 and info.is_main and saved_step != step:
        saved_step = save_state()  # the last step's: a job killed before its outputs are accepted resumes at the end
    weights = ema.final_weights()
    diverged = [name for name, t in weights.items() if not bool(torch.isfinite(t).all())]
    if diverged:
        raise FloatingPointError(f"the final weights are not finite ({len(diverged)} tensors, first {diverged[0]}): "
                                 "no checkpoint is written")
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

    stream_info: dict[str, Any] = {}
    if isinstance(loader, RecordStreamLoader):
        stream_info["data_stream_dropped_tail_tokens"] = int(sum(loader.dropped_tail_tokens()))
    summary = {
        "seed": seed,
        "world_size": info.world_size,
        "grad_accum_steps": accum,
        "steps": step,
        "tokens_seen": step * plan.train_batch_tokens,
        "train_seconds": train_seconds,
        "compile_warmup_seconds": warmup_seconds,
        "compile_warmup_by_loop_state": warmup_by_loop_state,
        "startup_seconds": startup_seconds,
        "attention_backend": getattr(model, "attention_choice", None),
        "loop_enabled_step": loop_enabled_step,
        "ms_per_step": train_seconds * 1000.0 / max(step, 1),
        "ms_per_step_before_loop": _mean(step_times_ms["before_loop"]),
        "ms_per_step_after_loop": _mean(step_times_ms["after_loop"]),
        "tokens_per_s": step * plan.train_batch_tokens / max(train_seconds, 1e-9),
        "peak_memory_gib": _memory_gib(device),
        # under train.cuda_graphs a replayed step allocates nothing: its activations live in the graphs' pool, which
        # the reserved peaks hold (the warm-up's from the process start: compile passes, captures, eager micro-batches)
        "peak_memory_reserved_gib": _memory_gib(device, reserved=True),
        "warmup_peak_memory_reserved_gib": warmup_reserved_gib,
        "cuda_graphs": None if graphs is None else graphs.summary(),
        "cu_seqlens_shapes": sorted(seen_cu_shapes),
        "resumed_from_step": resumed_from,  # None: this attempt trained from step 0
        "earlier_attempts": earlier_attempts,  # interrupted attempts before this one (0: one uninterrupted run)
        "compiled_graphs": run_graphs.delta()["graphs_compiled"],
        # how this run read the budget and which of the record's loop choices it made (`pgolf comply` reads these)
        "budget_reading": train_cfg.budget_reading,
        "reserve_seconds": train_cfg.reserve_seconds,
        "loop_budget_seconds": budget_s if timed else None,
        "data_stream": train_cfg.data_stream,
        "micro_batch_order": train_cfg.micro_batch_order,
        "clip_scope": train_cfg.clip_scope,
        "warmup_restore": train_cfg.warmup_restore,
        "param_storage": train_cfg.param_storage,
        "muon_precision": optim_cfg.muon_precision,
        **stream_info,
        **data_info,
        **prequant,
    }
    summary["environment"] = environment()
    if info.is_main:
        # the checkpoint describes the weights only: its bytes are a function of the inputs; the measurements
        # (times, rates, memory, the machine, the attempts) live in train_summary.json
        measured = set(TRAIN_SUMMARY_MEASURED_FIELDS)
        meta = {
            "model_config": to_dict(model_cfg),
            "optim_config": to_dict(optim_cfg),
            "train_config": to_dict(train_cfg),
            "weights": "ema" if train_cfg.ema_decay > 0 else "final",
            "code_hash": code_hash(),
            **{key: value for key, value in summary.items() if key not in measured},
        }
        save_checkpoint(out_dir / "checkpoint", weights, meta)
        metrics.write({"event": "train_done", **summary})
        atomic_write_json(out_dir / "train_summary.json", summary)
        metrics.commit()
        if not keep_resume:
            finish_attempts(resume_dir)
        progress(f"{step} steps" + (f", loss {last_loss:.4f}" if last_loss is not None else "")
                 + f", {train_seconds:.0f} s of training ({rate_text(summary['tokens_per_s'], 'tok')})", final=True)
    return summary
