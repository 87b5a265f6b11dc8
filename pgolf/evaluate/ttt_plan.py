"""The record's phased LoRA-TTT schedule (PR #1855 ``eval_val_ttt_phased``) as pure functions of document lengths.

numpy only, no torch: the runner (:mod:`pgolf.evaluate.ttt_record`) executes exactly what :func:`schedule_of`
returns, and ``pgolf eval-plan`` prices the same object, so "the plan is the run" holds by construction.

Documents (record convention). Document d starts at its BOS ``start[d]`` and its ``doc_len[d]`` counts its own tokens
PLUS the next document's BOS (the stream's last document: up to the end), so its targets are the stream positions
``start + 1 .. start + doc_len - 1``: ``pred_len = doc_len - 1`` predictions, the last one the next BOS. Over all
documents these are every position 1..N-1, each once.

Queue. Documents sorted by ``doc_len`` ascending (stable: ties keep stream order) are cut into batches of
``per_batch`` from the SHORT end (batch j = sorted positions [j P, j P + P); the last batch holds the remainder,
i.e. the longest documents); the queue runs the batches longest first (a stable sort on minus the batch's longest
document, so batches with equal maxima keep ascending order).

Steps of a batch. Chunk c (c = 0 .. max chunks - 1) of every document that still has one: its window is
``[max(0, e - ctx), e)`` of prediction indices with ``e = min(C (c + 1), pred_len)``; the row width of the step is
``w = min(C (c + 1), ctx)`` for every document, and the chunk's C targets are the row's last C positions (the last
chunk of a document may be shorter and its row shorter than w; trailing padding is never scored). A document with a
later chunk trains on the chunk just scored.

Phases. With ``inflight`` batches still running elsewhere when the document counter reaches a boundary (the
record's 8 ranks: 7), phase k fires once the queue PREFIX of ``P_k = min(Q, c_k + inflight)`` entries is scored,
where ``c_k`` is the first prefix (after ``P_{k-1}``) whose documents reach ``bounds[k]``. Phase k trains on the first
``bounds[k]`` documents of that prefix in ascending (batch, position) order: the SHORTEST scored documents.

Lanes. ``lanes`` stand for the record's ranks: a lane carries each slot's adapter A from batch to batch within a
segment (between two phases). Which lane runs which entry is the record's dynamic claiming, SIMULATED with a fixed
cost proxy (:data:`CLAIM_STEP_SECONDS`, :data:`CLAIM_TOKEN_SECONDS`), so the result is a pure function of the
lengths: lane 0 of a 1-lane schedule is the record's one-process run, in its order.

Side batches (``side_batches``): first-segment entries none of whose documents is in any phase set never feed a
phase; they are scored with the pre-phase weights on fresh adapters (chain-isolated: what the record's first batch
on a rank gets), so WHEN they run cannot change a score; the runner runs them beside the phased work, in the last
segment. Off: the record's order.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Optional, Sequence

import numpy as np

# the record's step price fitted to its own logs (benchmarks/record_pr1855_costs.json): the proxy of the simulated
# claiming. Fixed numbers, so the lanes are a pure function of the document lengths, whatever GPU runs them.
CLAIM_STEP_SECONDS = 0.03
CLAIM_TOKEN_SECONDS = 1.26e-6


class PlanError(ValueError):
    """A schedule that breaks the score-before-update rule (C3) or is inconsistent; the message says which."""


# --------------------------------------------------------------------------------------------------------------
# documents, queue, windows
# --------------------------------------------------------------------------------------------------------------


def record_doc_lengths(doc_starts: np.ndarray, score_ends: np.ndarray) -> np.ndarray:
    """``doc_len`` int64 [D] in the record convention (own tokens + the next BOS) from the documents' BOS positions
    and their score ends (one past the last scored target: the next document's start + 1, the stream end last)."""
    lengths = np.asarray(score_ends, dtype=np.int64) - np.asarray(doc_starts, dtype=np.int64)
    if len(lengths) and int(lengths.min()) < 1:
        raise PlanError(f"document {int(np.argmin(lengths))} has no tokens")
    return lengths


@dataclasses.dataclass(frozen=True)
class QueueEntry:
    index: int  # position in the queue
    orig: int  # batch index in the ascending cut (the record's orig_batch_idx; logged as b{orig+1})
    docs: np.ndarray  # int64 document indices, ascending doc_len (ties: stream order)


def record_queue(doc_len: np.ndarray, per_batch: int) -> list[QueueEntry]:
    """Batches cut from the short end of the ascending (stable) sort, queued longest batch first (stable)."""
    doc_len = np.asarray(doc_len, dtype=np.int64)
    if per_batch < 1:
        raise PlanError(f"per_batch: expected >= 1, got {per_batch}")
    order = np.argsort(doc_len, kind="stable")
    batches = [order[i : i + per_batch] for i in range(0, len(order), per_batch)]
    maxima = [int(doc_len[b].max()) for b in batches]
    queued = sorted(range(len(batches)), key=lambda j: -maxima[j])  # Python's sort is stable
    return [QueueEntry(q, j, batches[j]) for q, j in enumerate(queued)]


def chunk_counts(pred_len: np.ndarray, chunk: int) -> np.ndarray:
    """Chunks per document: ceil(pred_len / chunk) (int64)."""
    return -(-np.asarray(pred_len, dtype=np.int64) // chunk)


def step_width(c: int, chunk: int, ctx: int) -> int:
    """Row width of step c: min(chunk (c + 1), ctx). The chunk's targets are the row's last ``chunk`` positions."""
    return min(chunk * (c + 1), ctx)


def chunk_windows(c: int, pred_len: np.ndarray, chunk: int, ctx: int) -> tuple[np.ndarray, ...]:
    """Per document (all assumed to have chunk c): (win_start, win_len, chunk_offset, chunk_len) in prediction
    indices of the document: the window [win_start, win_start + win_len), its chunk at [chunk_offset, win_len)."""
    pred_len = np.asarray(pred_len, dtype=np.int64)
    last = chunk_counts(pred_len, chunk) - 1 == c
    end = np.where(last, pred_len, chunk * (c + 1))
    win_start = np.maximum(0, end - ctx)
    win_len = end - win_start
    return win_start, win_len, chunk * c - win_start, end - chunk * c


def batch_steps(pred_len_sorted: np.ndarray, chunk: int, ctx: int) -> list[tuple[int, int, int, bool]]:
    """Per step of a batch (documents ascending): (first active document, active documents, width, trains).

    The active documents are a suffix (chunk counts grow with the length); a step trains when some document has a
    later chunk, i.e. every step but the batch's last.
    """
    nch = chunk_counts(pred_len_sorted, chunk)
    max_nc = int(nch.max(initial=0))
    n = len(nch)
    first = np.searchsorted(nch, np.arange(max_nc), side="right")  # first document with nch > c
    return [(int(first[c]), n - int(first[c]), step_width(c, chunk, ctx), c < max_nc - 1) for c in range(max_nc)]


# --------------------------------------------------------------------------------------------------------------
# phases
# --------------------------------------------------------------------------------------------------------------


def phase_prefixes(entry_sizes: Sequence[int], bounds: Sequence[int], inflight: int) -> list[int]:
    """Queue prefix length ``P_k`` scored when each phase fires; phases that never fire are left out.

    After each finished entry the document counter is compared with the NEXT boundary only (a batch that passes two
    boundaries fires the second phase after the next batch, as the record's pause flag does). ``inflight`` entries
    that were already running elsewhere finish before the phase (the record's 8 ranks: 7).
    """
    sizes = np.asarray(entry_sizes, dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(sizes)])  # cum[c] = documents of the first c entries
    Q = len(sizes)
    prefixes: list[int] = []
    prev = 0
    for bound in bounds:
        c = max(prev + 1, int(np.searchsorted(cum, bound, side="left")))
        if c > Q:
            break  # the queue ends before this boundary's check
        p = min(Q, c + max(0, inflight))
        prefixes.append(p)
        prev = p
    return prefixes


def phase_doc_sets(queue: Sequence[QueueEntry], prefixes: Sequence[int], bounds: Sequence[int]) -> list[np.ndarray]:
    """Documents of each phase: the first ``bounds[k]`` of the scored prefix in ascending (batch, position) order."""
    out = []
    for k, p in enumerate(prefixes):
        entries = sorted(queue[:p], key=lambda e: e.orig)
        docs = np.concatenate([e.docs for e in entries]) if entries else np.zeros(0, dtype=np.int64)
        out.append(docs[: bounds[k]].astype(np.int64))
    return out


def phase_stream_tokens(doc_len: np.ndarray, docs: np.ndarray) -> int:
    """Tokens of a phase's concatenated stream (each document with its trailing next BOS)."""
    return int(np.asarray(doc_len, dtype=np.int64)[docs].sum())


def phase_chunks(stream_tokens: int, chunk_tokens: int) -> int:
    """Chunks of the phase SGD (its last one is never trained): ceil((tokens - 1) / chunk_tokens)."""
    return max(0, -(-(stream_tokens - 1) // chunk_tokens))


# --------------------------------------------------------------------------------------------------------------
# lanes: the record's dynamic claiming, simulated
# --------------------------------------------------------------------------------------------------------------


def batch_cost(pred_len_sorted: np.ndarray, chunk: int, ctx: int, step_s: float = CLAIM_STEP_SECONDS,
               token_s: float = CLAIM_TOKEN_SECONDS, exact_rows: bool = False) -> float:
    """Seconds of one batch under ``step_s + token_s * rows * width`` per step (rows: the whole batch, as the record
    computes finished documents' rows too, or only the active ones with ``exact_rows``)."""
    n = len(pred_len_sorted)
    return float(sum(step_s + token_s * (active if exact_rows else n) * w
                     for _, active, w, _ in batch_steps(pred_len_sorted, chunk, ctx)))


def simulate_claims(costs: Sequence[float], lanes: int) -> list[int]:
    """Lane of each job when every free lane claims the next job in order (ties: the lowest lane)."""
    heap = [(0.0, lane) for lane in range(lanes)]
    out = []
    for cost in costs:
        t, lane = heapq.heappop(heap)
        out.append(lane)
        heapq.heappush(heap, (t + float(cost), lane))
    return out


# --------------------------------------------------------------------------------------------------------------
# the schedule
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
    queue_index: int
    orig: int
    docs: np.ndarray  # document indices, ascending doc_len
    segment: int  # 0 .. number of phases: the weights it is scored with (after that many phases)
    lane: int  # the adapter chain it belongs to (side batches: where it runs)
    side: bool  # chain-isolated, scored with the pre-phase weights, run in the last segment
    fresh: bool  # its own adapters (size != per_batch): a draw of its own, not the lane's reusable set


@dataclasses.dataclass(frozen=True)
class TTTSchedule:
    per_batch: int
    chunk: int
    ctx: int
    lanes: int
    inflight: int
    bounds: tuple[int, ...]
    batches: tuple[PlannedBatch, ...]  # queue order
    prefixes: tuple[int, ...]  # P_k of every phase that fires
    phase_docs: tuple[np.ndarray, ...]

    @property
    def num_segments(self) -> int:
        return len(self.prefixes) + 1

    def runnable_phases(self) -> int:
        """Phases that can change a score: those that fire before the queue ends (a phase after the last batch
        trains weights nothing is scored with; the record runs it, pgolf skips it)."""
        return sum(1 for p in self.prefixes if p < len(self.batches))

    def lane_batches(self, lane: int, segment: int, side: Optional[bool] = None) -> list[PlannedBatch]:
        """The batches of ``lane`` run in ``segment`` (side batches run in the last segment), in claim order."""
        last = self.num_segments - 1
        out = []
        for b in self.batches:
            runs_in = last if b.side else b.segment
            if b.lane == lane and runs_in == segment and (side is None or b.side == side):
                out.append(b)
        return out


def _assign_lanes(queue, doc_len, seg_of, side, cfg_lanes, chunk, ctx, num_segments) -> list[int]:
    lane = [0] * len(queue)
    for seg in range(num_segments):
        jobs = [e.index for e in queue if seg_of[e.index] == seg and not side[e.index]]
        if seg == num_segments - 1:
            jobs = [e.index for e in queue if side[e.index]] + jobs  # the longest entries claim first
        costs = [batch_cost(doc_len[queue[q].docs] - 1, chunk, ctx) for q in jobs]
        for q, lane_q in zip(jobs, simulate_claims(costs, cfg_lanes)):
            lane[q] = lane_q
    return lane


def schedule_of(doc_len: np.ndarray, *, per_batch: int, chunk: int, ctx: int, bounds: Sequence[int], lanes: int = 1,
                inflight: int = 0, side_batches: bool = False) -> TTTSchedule:
    """The whole schedule of the record-variant LoRA TTT (see the module docstring) for documents of ``doc_len``.

    A document of one token (a lone BOS: the stream cut right after it, or an empty document when the next BOS is
    not a target) has nothing to score: it is in no batch and no phase, and the others are scheduled as if it
    were not there. (The record script asserts that no such document exists.)"""
    doc_len = np.asarray(doc_len, dtype=np.int64)
    scorable = np.flatnonzero(doc_len >= 2)
    if len(scorable) == 0:
        raise PlanError("doc_len: expected at least one document with >= 2 tokens (a target)")
    if len(scorable) < len(doc_len):
        inner = schedule_of(doc_len[scorable], per_batch=per_batch, chunk=chunk, ctx=ctx, bounds=bounds, lanes=lanes,
                            inflight=inflight, side_batches=side_batches)
        return dataclasses.replace(
            inner, batches=tuple(dataclasses.replace(b, docs=scorable[b.docs]) for b in inner.batches),
            phase_docs=tuple(scorable[docs] for docs in inner.phase_docs))
    if lanes < 1:
        raise PlanError(f"lanes: expected >= 1, got {lanes}")
    if chunk < 1 or ctx < chunk:
        raise PlanError(f"chunk {chunk} / context {ctx}: expected 1 <= chunk <= context")
    queue = record_queue(doc_len, per_batch)
    bounds = tuple(int(b) for b in bounds)
    prefixes = phase_prefixes([len(e.docs) for e in queue], bounds, inflight)
    phase_docs = phase_doc_sets(queue, prefixes, bounds)
    seg_of = [sum(1 for p in prefixes if e.index >= p) for e in queue]
    in_phase = np.zeros(len(doc_len), dtype=bool)
    for docs in phase_docs:
        in_phase[docs] = True
    side = [bool(side_batches and prefixes and seg_of[e.index] == 0 and not in_phase[e.docs].any()) for e in queue]
    lane = _assign_lanes(queue, doc_len, seg_of, side, lanes, chunk, ctx, len(prefixes) + 1)
    batches = tuple(PlannedBatch(e.index, e.orig, e.docs, seg_of[e.index], lane[e.index], side[e.index],
                                 len(e.docs) != per_batch) for e in queue)
    schedule = TTTSchedule(per_batch, chunk, ctx, lanes, inflight, bounds, batches, tuple(prefixes), tuple(phase_docs))
    check_schedule(schedule)
    return schedule


def check_schedule(schedule: TTTSchedule) -> None:
    """C3 at plan time: every document a phase trains on is scored in a segment BEFORE that phase (not a side
    batch, not later; else :class:`pgolf.evaluate.ledger.LegalityError` naming C3), and every document is in
    exactly one batch (else :class:`PlanError`)."""
    owner: dict[int, PlannedBatch] = {}
    for b in schedule.batches:
        for d in b.docs.tolist():
            if d in owner:
                raise PlanError(f"document {d} is in queue entries {owner[d].queue_index} and {b.queue_index}")
            owner[d] = b
    for k, docs in enumerate(schedule.phase_docs):
        for d in docs.tolist():
            b = owner.get(d)
            if b is None or b.side or b.segment > k:
                from pgolf.evaluate.ledger import LegalityError  # (torch) only when there is something to refuse

                where = "no batch" if b is None else f"queue entry {b.queue_index} (segment {b.segment}, side {b.side})"
                raise LegalityError(f"C3 (score before update) violated at plan time: phase {k + 1} trains on "
                                    f"document {d}, scored in {where}, i.e. not before that phase")
