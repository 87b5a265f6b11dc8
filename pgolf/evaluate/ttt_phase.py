"""The global SGD pass of the record's phased TTT (PR #1855 ``train_val_ttt_global_sgd_distributed``).

Input: the phase's documents concatenated in their (batch, position) order, each with its trailing next BOS (so a
boundary reads ``... last token, BOS, BOS, first token ...``). With ``total = len(stream) - 1`` targets it runs
``ceil(total / chunk_tokens)`` chunks and trains on every chunk but the LAST (the tail of the set, its longest
documents, is never trained on). Chunk ci covers targets [ci T, min((ci + 1) T, total)); only its
``(end - start) // seq_len`` whole sequences are used, split into ``rows`` rows (row r: sequences
[s r // rows, s (r + 1) // rows)). A row is one packed sequence ``x = stream[a:b]``, ``y = stream[a+1:b+1]``
whose attention segments start at the row start, at every BOS and every ``seq_len`` tokens after a segment start;
its loss is the mean NLL over all its targets. The step's gradient is the sum over rows of each row's gradient
divided by ``rows`` (the record: per-rank means all-reduced and divided by the world size, one row per rank), then
clipped to ``clip`` (global norm), then SGD with momentum at ``lr * (1 + cos(pi ci / (chunks - 1))) / 2``; a new
optimizer (fresh momentum) every phase; every base parameter trains.

Rows go to processes round-robin (row r on process r % world); gradients are summed with one flat all-reduce.
With ``rows`` equal to the record's world size this is the record's split whatever the process count.
"""

from __future__ import annotations

import math
import time
import numpy as np
import torch

from pgolf.model.attention import build_cu_seqlens


def phase_stream(tokens: np.ndarray, doc_starts: np.ndarray, doc_len: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """The phase's token stream: each document's tokens [start, start + doc_len) in ``docs`` order."""
    if len(docs) == 0:
        return np.zeros(0, dtype=tokens.dtype)
    return np.concatenate([tokens[s : s + n] for s, n in zip(doc_starts[docs].tolist(), doc_len[docs].tolist())])


def phase_positions(doc_starts: np.ndarray, doc_len: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """Stream positions a phase learns from: each document's targets start+1 .. start+doc_len-1 (its BOS is a
    constant; its last target is the next BOS, scored as this document's)."""
    if len(docs) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(s + 1, s + n) for s, n in zip(doc_starts[docs].tolist(), doc_len[docs].tolist())])


def _all_reduce_flat(params, dist_info) -> None:
    """Sum the gradients over processes: one flat all-reduce per gradient dtype (a bf16 embedding's apart)."""
    import torch.distributed as dist

    groups: dict = {}
    for p in params:
        groups.setdefault(p.grad.dtype, []).append(p)
    for group in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        offset = 0
        for p in group:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def phase_sgd(model, stream: torch.Tensor, *, chunk_tokens: int, seq_len: int, lr: float, momentum: float,
              clip: float, rows: int, dist_info=None, autocast=None) -> dict:
    """One phase over ``stream`` (int64 device tensor); the model's weights change in place. Returns counts."""
    rank = dist_info.rank if dist_info is not None and dist_info.enabled else 0
    world = dist_info.world_size if dist_info is not None and dist_info.enabled else 1
    start = time.perf_counter()
    total = int(stream.numel()) - 1
    num_chunks = max(0, -(-total // chunk_tokens))
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    steps = tokens = 0
    for ci in range(num_chunks - 1):  # the last chunk is never trained on
        lo, hi = ci * chunk_tokens, min((ci + 1) * chunk_tokens, total)
        seqs = (hi - lo) // seq_len
        if seqs <= 0:
            continue
        for group in opt.param_groups:
            group["lr"] = phase_lr(lr, ci, num_chunks)
        for p in params:
            p.grad = torch.zeros_like(p)
        for r in range(rank, rows, world):
            s0, s1 = seqs * r // rows, seqs * (r + 1) // rows
            if s1 <= s0:
                continue
            row = stream[lo + s0 * seq_len : lo + s1 * seq_len + 1]
            x, y = row[:-1], row[1:]
            cu, max_seqlen = build_cu_seqlens(x, model.bos_id, seq_len)
            with (autocast() if autocast is not None else torch.autocast("cpu", enabled=False)):
                loss = model(x, y, cu, max_seqlen)
            (loss / rows).backward()
            tokens += int(x.numel())
        if world > 1:
            _all_reduce_flat(params, dist_info)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        steps += 1
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    if stream.is_cuda:
        torch.cuda.synchronize(stream.device)
    seconds = time.perf_counter() - start
    return {"chunks": num_chunks, "steps": steps, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / max(seconds, 1e-9)}



def phase_lr(lr: float, ci: int, num_chunks: int) -> float:
    """The phase's learning rate at chunk ``ci`` of ``num_chunks``: cosine from ``lr`` towards 0."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * ci / max(num_chunks - 1, 1)))
