"""Chunked score-first TTT (``mode: chunked``, PR #549 / #1572 / #1523): the stream in chunks of
``stream_chunk_tokens`` targets; each chunk is scored under no_grad with the usual within-document windows, then
``chunk_epochs`` SGD steps on the whole model over it (cosine LR over chunks); the last chunk gets none. On N
processes a chunk is split in N contiguous parts whose gradients are summed."""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from pgolf.io import Progress
from pgolf.config import EvaluateConfig
from pgolf.evaluate.scoring import (
    NllRunner,
    PackedRow,
    ScoreAccumulator,
    stream_window_row,
)
from pgolf.evaluate.valdata import ValidationSet


from pgolf.evaluate.ledger import Ledger
from pgolf.evaluate.ttt import TTTOutcome, all_reduce_sum_grads, scored_nll, sync_device, cosine_lr


# --------------------------------------------------------------------------------------------------------------
# Chunked score-first TTT
# --------------------------------------------------------------------------------------------------------------


def stream_chunks(num_positions: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of stream positions 1..N-1 (position 0 is the first BOS, never a target)."""
    return [(lo, min(lo + chunk_tokens, num_positions)) for lo in range(1, num_positions, chunk_tokens)]


def _split(lo: int, hi: int, parts: int, index: int) -> tuple[int, int]:
    """The index-th of ``parts`` contiguous near-equal pieces of [lo, hi)."""
    n = hi - lo
    return lo + n * index // parts, lo + n * (index + 1) // parts


def chunked_ttt(
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
    """Score a stream chunk under no_grad, then SGD on the whole model over it; the last chunk is never trained."""
    cfg = eval_cfg.ttt
    rank = dist_info.rank if dist_info is not None else 0
    world = dist_info.world_size if dist_info is not None else 1
    L = eval_cfg.eval_seq_len
    chunks = stream_chunks(val.num_positions, cfg.stream_chunk_tokens)
    row_tokens = -(-cfg.stream_chunk_tokens // world) + L + 1 if eval_cfg.compile else None  # + predecessor
    acc = ScoreAccumulator(val, keep_tokens)
    ledger = Ledger(val.num_positions)
    progress = Progress("ttt-chunked", val.target_count, val.num_docs, eval_cfg.progress_every_seconds, rank == 0, write, world)
    if cfg.bigram_hash_buckets:  # eval-time table, zero contribution now, trained below with the whole model
        from pgolf.evaluate.bigram_hash import BigramHash  # here: a bundle of a recipe without it leaves the module out

        model.bigram_hash = BigramHash(
            cfg.bigram_hash_buckets, cfg.bigram_hash_dim or model.cfg.model_dim, model.cfg.model_dim,
            model.cfg.vocab_size, model.bos_id, generator=torch.Generator().manual_seed(seed + 104_729),
        ).to(device)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    runner = NllRunner(model, device, compile=eval_cfg.compile, softcap_dtype=eval_cfg.softcap_dtype)
    opt = torch.optim.SGD(params, lr=cfg.chunk_lr, momentum=cfg.chunk_momentum)
    doc_starts = val.doc_starts
    targets_before = np.concatenate([[0], np.cumsum(val.target_mask(), dtype=np.int64)])  # [N + 1]

    def targets_in(lo: int, hi: int) -> int:
        """Scored positions in [lo, hi): a BOS is one only as the next document's target (score_next_bos)."""
        return int(targets_before[hi] - targets_before[lo])

    def own_part(lo: int, hi: int) -> tuple[int, int, bool]:
        """This process's ``[rlo, rhi)`` of a chunk, and whether it scores anything there (a part holding only a
        document's leading BOS, which nothing predicts here, makes no row: an empty row is no model input)."""
        rlo, rhi = _split(lo, hi, world, rank)
        return rlo, rhi, rlo < rhi and targets_in(rlo, rhi) > 0

    warmup_s = 0.0
    if eval_cfg.compile and eval_cfg.compile_warmup_steps > 0:  # one graph per row shape, always with grad
        parts = [own_part(lo, hi) for lo, hi in chunks]
        shapes = sorted({runner.shape_of(stream_window_row(val, rlo, rhi, L, row_tokens))
                         for rlo, rhi, scores in parts if scores})
        warmup_s += runner.warmup(shapes, eval_cfg.compile_warmup_steps, backward=True, seed=seed + 7_919)

    def step(row: Optional[PackedRow], nll: Optional[Tensor], chunk_targets: int) -> None:
        """One SGD step on the chunk: this process's part of the mean NLL, gradients summed over processes."""
        if row is not None:
            ledger.record_update(row.used_positions)  # C3: raises if any position is not yet scored
            (nll.sum() / max(chunk_targets, 1)).backward()
        all_reduce_sum_grads(params, dist_info)
        opt.step()
        opt.zero_grad(set_to_none=True)

    score_start = time.perf_counter()
    steps = 0
    for k, (lo, hi) in enumerate(chunks):
        rlo, rhi, scores = own_part(lo, hi)
        row = stream_window_row(val, rlo, rhi, L, row_tokens) if scores else None
        trains = k < len(chunks) - 1 and cfg.chunk_epochs > 0
        chunk_targets = targets_in(lo, hi)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg.chunk_lr, k, len(chunks) - 1)
        epochs_left = cfg.chunk_epochs if trains else 0
        if cfg.debug_update_before_score and trains:  # ILLEGAL ordering, for tests and compliance checks only
            step(row, runner(row) if row is not None else None, chunk_targets)
            epochs_left -= 1
            steps += 1
        # Score (with grad on, so the first epoch reuses this very forward: one compiled graph, one pass saved)
        nll = runner(row) if row is not None else None
        if row is not None:
            positions, values = scored_nll(nll, row)
            ledger.record_scored(positions)
            acc.add(positions, values)
            progress.update(len(positions), docs=int(np.searchsorted(doc_starts, rhi) - np.searchsorted(doc_starts, rlo)))
        if world > 1:  # every process has scored its part before any gradient is exchanged
            ledger.note_scored_elsewhere(np.concatenate([np.arange(lo, rlo), np.arange(rhi, hi)]))
        for epoch in range(epochs_left):
            step(row, nll if epoch == 0 else (runner(row) if row is not None else None), chunk_targets)
            steps += 1
        del nll
    sync_device(device)
    score_s = time.perf_counter() - score_start
    for p in params:
        p.requires_grad_(False)
    progress.update(0, force=True)
    summary = {"mode": "chunked", "chunks": len(chunks), "steps": steps, "chunk_epochs": cfg.chunk_epochs,
               "compiled_shapes": len(runner.shapes), "compile_failures": list(runner.compile_failures),
               "bigram_hash_buckets": cfg.bigram_hash_buckets}
    return TTTOutcome(acc, ledger, summary, warmup_s, score_s)
