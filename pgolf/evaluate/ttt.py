"""Legal test-time training: every token is SCORED before it may feed a gradient (rules C1-C4).

Three pieces (the ledger in :mod:`pgolf.evaluate.ledger`, the adapters in :mod:`pgolf.evaluate.lora`, the
chunked loop in :mod:`pgolf.evaluate.chunked_ttt`; this module holds the LoRA loop, its phases and the dispatch):

* :class:`Ledger` - which stream positions were scored and which fed an update. It raises
  :class:`LegalityError` the moment an update would use an unscored position (C3), a position is scored after it
  fed an update (C3) or is scored twice, and checks at the end that every target was scored exactly once. The TTT
  loops call it at the exact place where they score or step, so a reordering bug cannot slip past it.

* Document-batched LoRA TTT (``mode: lora``, PR #1530 / the record). Documents are sorted longest first and taken
  ``docs_per_batch`` at a time. Each document of a batch owns a slot of L tokens in one packed row and its own
  rank-r adapters on q, k, v, o, mlp.up, mlp.down and the LM head (``A [slots, in, r]``, ``B [slots, r, out]``,
  output ``x A B * alpha / r``). Every document is cut into chunks of ``chunk_tokens`` targets; for chunk c of
  all documents at once: forward over each document's window (up to ``context_tokens`` of its tokens ending at
  the chunk), SCORE the chunk's targets, then one optimizer step on the chunk's loss (none after a document's
  last chunk). The loss is the sum over documents of each one's mean chunk NLL and each slot's attention, smear
  and adapters see only that slot, so documents of a batch do not influence each other.
  Phased TTT: once ``phase_boundaries_docs[i]`` documents (in queue order) are scored, one global SGD pass
  (momentum, cosine LR over the pass) trains the BASE weights on already-scored documents, then scoring goes on.

* Chunked score-first TTT (``mode: chunked``, PR #549 / #1572 / #1523): the stream in chunks of
  ``stream_chunk_tokens`` targets; each chunk is scored under no_grad with the usual within-document windows,
  then ``chunk_epochs`` SGD steps on the whole model over it (cosine LR over chunks); the last chunk gets none.

Both run on N processes: LoRA batches go round-robin to ranks (phases synchronize); a stream chunk is split in
N contiguous parts whose gradients are summed. Everything random is drawn from generators seeded by ``seed``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from pgolf.io import Progress
from pgolf.config import EvaluateConfig, TTTConfig
from pgolf.evaluate.scoring import (
    IGNORE,
    PAD_ID,
    NllRunner,
    PackedRow,
    ScoreAccumulator,
    cu_seqlens_bucket,
    pack_documents,
)
from pgolf.evaluate.valdata import ValidationSet


from pgolf.evaluate.ledger import Ledger


# --------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TTTOutcome:
    accumulator: ScoreAccumulator  # or a DeviceScores (record variant): .result(dist_info), .token_nll
    ledger: Ledger  # or a DeviceLedger (record variant): .check_complete, .scored_counts, .summary
    summary: dict
    warmup_s: float
    score_s: float
    expected_targets: Optional[np.ndarray] = None  # bool [N] the run must score once each; None = val.target_mask()


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """``base_lr * (1 + cos(pi * step / total_steps)) / 2``: base_lr at step 0, decaying towards 0."""
    if total_steps <= 1:
        return base_lr
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def all_reduce_sum_grads(params: Sequence[nn.Parameter], dist_info) -> None:
    """Sum gradients over processes in one flat all-reduce (missing grads count as zeros)."""
    if dist_info is None or not dist_info.enabled:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def scored_nll(nll: Tensor, row: PackedRow) -> tuple[np.ndarray, np.ndarray]:
    """(positions, nll in float64) of the scored entries of a row."""
    mask = row.scored
    values = nll.detach().float().cpu().numpy()[mask].astype(np.float64)
    return row.target_positions[mask], values


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lora_doc_order(val: ValidationSet) -> np.ndarray:
    """Document indices longest first (ties: stream order) - the queue of document-batched TTT."""
    return longest_first(val.doc_lengths())


def longest_first(doc_lengths: np.ndarray) -> np.ndarray:
    """Indices of ``doc_lengths`` (int [D]) longest first, ties in stream order (a stable sort)."""
    return np.argsort(-np.asarray(doc_lengths), kind="stable")


# --------------------------------------------------------------------------------------------------------------
# LoRA TTT
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _SlotChunk:
    """What one document contributes to one step: its window and its chunk's targets (stream positions)."""

    slot: int
    window_start: int  # first input position
    input_end: int  # one past the last input position (= last target position)
    target_start: int  # first target position of the chunk
    doc_start: int
    last_chunk: bool


def slot_lengths(cfg: TTTConfig) -> tuple[int, ...]:
    """The slot lengths a LoRA step may use (each one a compiled graph): ``cfg.slot_lengths``, or by default the
    powers of two from 128 below ``context_tokens`` followed by ``context_tokens`` itself."""
    if cfg.slot_lengths:
        return tuple(cfg.slot_lengths)
    powers = [1 << k for k in range(7, 32) if (1 << k) < cfg.context_tokens]
    return (*powers, cfg.context_tokens)


def slot_length_for_window(max_window: int, cfg: TTTConfig) -> int:
    """Slot length L of a step: the smallest allowed length that holds the step's longest window."""
    for length in slot_lengths(cfg):
        if length >= max_window:
            return length
    raise ValueError(f"a LoRA window of {max_window} tokens exceeds every slot length {slot_lengths(cfg)}")


def compiled_slot_lengths(cfg: TTTConfig) -> tuple[int, ...]:
    """The slot lengths some step can use (a window of k chunks, k = 1 .. context): one compiled graph each."""
    windows = range(1, -(-cfg.context_tokens // cfg.chunk_tokens) + 1)
    return tuple(sorted({slot_length_for_window(min(cfg.context_tokens, k * cfg.chunk_tokens), cfg) for k in windows}))


def _lora_step_plan(val: ValidationSet, docs: np.ndarray, cfg: TTTConfig, chunk: int) -> list[_SlotChunk]:
    plan = []
    C = cfg.chunk_tokens
    for slot, d in enumerate(docs.tolist()):
        start, end = int(val.doc_starts[d]), int(val.doc_ends[d])
        n_targets = end - start - 1
        n_chunks = -(-n_targets // C)
        if chunk >= n_chunks:
            continue
        target_start = start + 1 + chunk * C
        target_end = start + 1 + min((chunk + 1) * C, n_targets)  # exclusive
        input_end = target_end - 1
        window_start = max(start, input_end - cfg.context_tokens)
        plan.append(_SlotChunk(slot, window_start, input_end, target_start, start, chunk == n_chunks - 1))
    return plan


def _lora_row(val: ValidationSet, plan: list[_SlotChunk], slots: int, L: int) -> PackedRow:
    """The packed row of one step: slot b holds its window left-aligned in [b*L, (b+1)*L), the rest is padding."""
    T = slots * L
    input_ids = np.full(T, PAD_ID, dtype=np.int64)
    target_ids = np.full(T, IGNORE, dtype=np.int64)
    target_positions = np.full(T, -1, dtype=np.int64)
    bounds = [0]
    lengths = {p.slot: p.input_end - p.window_start for p in plan}
    for b in range(slots):
        bounds.extend([b * L + lengths.get(b, 0), (b + 1) * L])
    for p in plan:
        n = p.input_end - p.window_start
        base = p.slot * L
        input_ids[base : base + n] = val.tokens[p.window_start : p.input_end]
        positions = np.arange(p.window_start + 1, p.input_end + 1)  # target of each input
        scored = positions >= p.target_start
        target_ids[base : base + n][scored] = val.tokens[positions[scored]]
        target_positions[base : base + n][scored] = positions[scored]
    return PackedRow(input_ids, target_ids, target_positions, np.asarray(bounds, dtype=np.int32), L)


def _lora_update_loss(nll: Tensor, row: PackedRow, plan: list[_SlotChunk], L: int) -> tuple[Optional[Tensor], np.ndarray]:
    """Sum over updating documents of their mean chunk NLL, and the positions that update uses."""
    weights = np.zeros(len(row.input_ids), dtype=np.float32)
    used = []
    for p in plan:
        if p.last_chunk:
            continue
        base = p.slot * L
        n = p.input_end - p.window_start
        scored = row.scored[base : base + n]
        weights[base : base + n][scored] = 1.0 / scored.sum()
        used.append(np.arange(max(p.window_start, p.doc_start + 1), p.input_end + 1))
    if not used:
        return None, np.zeros(0, dtype=np.int64)
    w = torch.from_numpy(weights).to(nll.device)
    return (nll * w).sum(), np.concatenate(used)


def phase_plan(cfg: TTTConfig, order: np.ndarray, num_batches: int, world_size: int) -> dict[int, tuple[int, int]]:
    """round index -> (first, last) queue indices of the documents its phase trains on, for rounds that end one.

    A phase runs at the end of the first round after which at least ``boundary`` documents are scored; boundaries
    crossed in the same round share one phase.
    """
    plan: dict[int, tuple[int, int]] = {}
    bounds = list(cfg.phase_boundaries_docs)
    per_round = world_size * cfg.docs_per_batch
    num_rounds = -(-num_batches // world_size)
    last_end = 0
    for r in range(num_rounds):
        scored = min((r + 1) * per_round, len(order))
        crossed = False
        while bounds and scored >= bounds[0]:
            bounds.pop(0)
            crossed = True
        if crossed and r < num_rounds - 1:  # nothing is left to score after the last round
            first = 0 if cfg.phase_scope == "scored_prefix" else last_end
            plan[r] = (first, scored)
            last_end = scored
    return plan


def lora_ttt(
    model: nn.Module,
    val: ValidationSet,
    eval_cfg: EvaluateConfig,
    seed: int,
    *,
    device: torch.device,
    dist_info=None,
    keep_tokens: bool = False,
    write: Optional[Callable[[dict], None]] = None,
) -> TTTOutcome:
    """Document-batched LoRA TTT (with phases when configured) over the whole validation set. See the module doc."""
    from pgolf.evaluate.lora import attach_lora  # imported here: the record variant's bundles leave it out

    cfg = eval_cfg.ttt
    rank = dist_info.rank if dist_info is not None else 0
    world = dist_info.world_size if dist_info is not None else 1
    is_main = rank == 0
    S = cfg.docs_per_batch
    order = lora_doc_order(val)
    batches = [order[i : i + S] for i in range(0, len(order), S)]
    num_rounds = -(-len(batches) // world)
    phases = phase_plan(cfg, order, len(batches), world)
    acc = ScoreAccumulator(val, keep_tokens)
    ledger = Ledger(val.num_positions)
    progress = Progress("ttt-lora", val.target_count, val.num_docs, eval_cfg.progress_every_seconds, is_main, write, world)
    summary: dict = {"mode": "lora", "batches": len(batches), "rounds": num_rounds, "docs_per_batch": S,
                     "steps": 0, "phases": []}

    base_params = list(model.parameters())  # before the adapters exist
    with attach_lora(model, cfg, S) as adapters:
        runner = NllRunner(model, device, compile=eval_cfg.compile, softcap_dtype=eval_cfg.softcap_dtype)
        # phase passes: eager unless asked (each phase row shape is a whole-model forward+backward graph costing
        # minutes of compile, for passes that train on a few million tokens in all)
        phase_runner = NllRunner(model, device, compile=eval_cfg.compile and cfg.phase_compile,
                                 softcap_dtype=eval_cfg.softcap_dtype)
        summary["adapter_parameters"] = adapters.num_parameters()
        summary["phase_compiled"] = phase_runner.compiled

        # ---- compile warm-up on random tokens: every slot length, with and without backward; phase rows
        warmup_s = 0.0
        if eval_cfg.compile and eval_cfg.compile_warmup_steps > 0:
            shapes = [(S * L, cu_seqlens_bucket(2 * S + 1), L) for L in compiled_slot_lengths(cfg)]
            gen_seed = seed + 7_919
            warmup_s += runner.warmup(shapes, eval_cfg.compile_warmup_steps, backward=True, seed=gen_seed)
            if phases and phase_runner.compiled:
                adapters.set_active(False)
                for p in base_params:
                    p.requires_grad_(True)
                rows = pack_documents(val, order[: max(b for _, b in phases.values())],
                                      phase_row_tokens(eval_cfg, world), eval_cfg.eval_seq_len)
                phase_shapes = sorted({phase_runner.shape_of(r) for r in rows})
                warmup_s += phase_runner.warmup(phase_shapes, eval_cfg.compile_warmup_steps, backward=True,
                                                seed=gen_seed)
                for p in base_params:
                    p.requires_grad_(False)
                adapters.set_active(True)
        score_start = time.perf_counter()
        for r in range(num_rounds):
            b = r * world + rank
            if b < len(batches):
                # warm start reuses the A this process trained on its previous batch (never the untrained zeros)
                keep_a = cfg.warm_start_a and r > 0
                _lora_batch(val, batches[b], b, keep_a, cfg, seed, runner, adapters, acc, ledger, progress, summary)
            if r in phases:
                first, last = phases[r]
                summary["phases"].append(
                    _phase_pass(model, val, order[first:last], eval_cfg, phase_runner, adapters, base_params, ledger,
                                dist_info, after_docs=last)
                )
        sync_device(device)
        score_s = time.perf_counter() - score_start
    progress.update(0, force=True)
    summary["compiled_shapes"] = len(runner.shapes)
    summary["compile_failures"] = runner.compile_failures + phase_runner.compile_failures  # shapes run eagerly
    return TTTOutcome(acc, ledger, summary, warmup_s, score_s)


def _lora_batch(val, docs, batch_index, keep_a, cfg: TTTConfig, seed, runner, adapters, acc, ledger, progress,
                summary) -> None:
    """Score and adapt one batch of documents, chunk by chunk, with fresh adapters (B = 0; A new or kept)."""
    S = cfg.docs_per_batch
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + batch_index)  # independent of the process count
    adapters.reset(gen, keep_a=keep_a)
    params = adapters.parameters()
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                                weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.beta1, weight_decay=cfg.weight_decay)
    n_targets = val.doc_lengths()[docs] - 1
    n_chunks = int((-(-n_targets // cfg.chunk_tokens)).max(initial=0))
    for c in range(n_chunks):
        plan = _lora_step_plan(val, docs, cfg, c)
        if not plan:
            continue
        L = slot_length_for_window(max(p.input_end - p.window_start for p in plan), cfg)
        row = _lora_row(val, plan, S, L)
        updates = any(not p.last_chunk for p in plan)
        step_start = time.perf_counter()

        def step(nll: Tensor) -> None:
            loss, used = _lora_update_loss(nll, row, plan, L)
            ledger.record_update(used)  # raises before stepping if any position is unscored (C3)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            summary["steps"] += 1

        if cfg.debug_update_before_score and updates:  # ILLEGAL ordering, for tests and compliance checks only
            step(runner(row))
            with torch.no_grad():
                nll = runner(row)
            positions, values = scored_nll(nll, row)
            ledger.record_scored(positions)
            acc.add(positions, values)
            continue
        nll = runner(row)  # with grad even when nothing updates: one compiled graph per slot length, not two
        positions, values = scored_nll(nll, row)
        ledger.record_scored(positions)
        acc.add(positions, values)
        if updates:
            step(nll)
        sync_device(runner.device)  # nll already came to the host; this only closes the step for its timing
        _add_slot_timing(summary, L, time.perf_counter() - step_start, len(positions))
        progress.update(len(positions), docs=sum(p.last_chunk for p in plan))
    progress.update(0, docs=int((n_targets == 0).sum()))


def _add_slot_timing(summary: dict, slot_length: int, seconds: float, scored_tokens: int) -> None:
    """Accumulate steps, seconds and scored tokens per slot length: the figures a time projection needs."""
    entry = summary.setdefault("slot_timing", {}).setdefault(str(slot_length), {"steps": 0, "seconds": 0.0,
                                                                                 "scored_tokens": 0})
    entry["steps"] += 1
    entry["seconds"] += seconds
    entry["scored_tokens"] += int(scored_tokens)


def phase_row_tokens(eval_cfg: EvaluateConfig, world_size: int) -> int:
    """Tokens per process per phase step: one SGD step covers ``phase_chunk_tokens`` over all processes."""
    return max(-(-eval_cfg.ttt.phase_chunk_tokens // world_size), eval_cfg.eval_seq_len + 1)


def _phase_pass(model, val, docs, eval_cfg: EvaluateConfig, runner, adapters, base_params, ledger, dist_info,
                after_docs: int) -> dict:
    """One global SGD pass (momentum, cosine LR) over already-scored documents, on the base weights.

    The documents are packed (queue order, within-document windows) into rows of :func:`phase_row_tokens`; a step
    takes one row per process and sums their gradients, so it sees about ``phase_chunk_tokens`` tokens whatever
    the process count. The loss of a step is the mean over its rows of each row's mean NLL.
    """
    cfg = eval_cfg.ttt
    start = time.perf_counter()
    rank = dist_info.rank if dist_info is not None else 0
    world = dist_info.world_size if dist_info is not None else 1
    ledger.sync(dist_info)  # documents scored on other processes are trained on here
    # padded to static shapes only for a compiled runner (phase passes run eagerly by default)
    rows = list(pack_documents(val, docs, phase_row_tokens(eval_cfg, world), eval_cfg.eval_seq_len, pad=runner.compiled))
    steps = -(-len(rows) // world)
    tokens = 0  # targets this process trained on
    adapters.set_active(False)
    for p in base_params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(base_params, lr=cfg.phase_lr, momentum=cfg.phase_momentum)
    for k in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg.phase_lr, k, steps)
        rows_in_step = min(world, len(rows) - k * world)
        i = k * world + rank
        if i < len(rows):
            row = rows[i]
            ledger.record_update(row.used_positions)
            nll = runner(row)
            tokens += int(row.scored.sum())
            (nll.sum() / max(int(row.scored.sum()), 1) / rows_in_step).backward()
        all_reduce_sum_grads(base_params, dist_info)
        if cfg.phase_grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in base_params if p.grad is not None], cfg.phase_grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for p in base_params:
        p.requires_grad_(False)
    adapters.set_active(True)
    sync_device(runner.device)
    seconds = time.perf_counter() - start
    return {"after_docs": after_docs, "docs": int(len(docs)), "rows": len(rows), "steps": steps,
            "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9)}


def run_ttt(model, val, eval_cfg: EvaluateConfig, seed: int, **kwargs) -> TTTOutcome:
    """Dispatch on ``eval_cfg.ttt.mode`` ("lora" or "chunked") and, for LoRA, ``variant`` ("legacy" here, "record" in
    :mod:`pgolf.evaluate.ttt_record`); the model's weights are changed in place."""
    from pgolf.evaluate.chunked_ttt import chunked_ttt

    torch.manual_seed(seed)
    mode = eval_cfg.ttt.mode
    if mode == "lora" and eval_cfg.ttt.variant == "record":
        from pgolf.evaluate.ttt_record import record_lora_ttt

        return record_lora_ttt(model, val, eval_cfg, seed, **kwargs)
    if mode == "lora":
        return lora_ttt(model, val, eval_cfg, seed, **kwargs)
    if mode == "chunked":
        return chunked_ttt(model, val, eval_cfg, seed, **kwargs)
    raise ValueError(f"run_ttt: mode {mode!r} has no TTT (use pgolf.evaluate.stage.score_model for mode 'none')")
