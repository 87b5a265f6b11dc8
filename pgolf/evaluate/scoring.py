"""The numeric core of evaluation: bits per byte, score sums, packed scoring rows and per-token NLL.

Everything that decides a reported number lives here as small functions, so the stage code (``pgolf.evaluate.stage``)
and test-time training (``pgolf.evaluate.ttt``) share one definition of "a target", "a window" and "a score".

Rows. The model consumes packed 1-D rows. A scoring row holds INPUT tokens; the target of the input at stream
position i is the token at i + 1. A document [BOS, t1, ..., tn] contributes the targets ``ValidationSet`` gives it
(positions start + 1 .. score_end - 1): [t1, ..., tn] from inputs [BOS, ..., t(n-1)], or, with ``score_next_bos``,
[t1, ..., tn, BOS'] from inputs [BOS, ..., tn] (the record's target set). Inside a document attention windows are
cut every ``seq_len`` tokens from its BOS (the segments of ``cu_seqlens``); a document never shares a window with
another, a document longer than a row continues at the start of the next row (split at a window boundary, behind
its predecessor token so SmearGate sees what it would see in one long row), and every target is scored exactly
once. Rows are padded to a fixed length (padding is its own segment, never a target) so a compiled
model sees few shapes.

Flat rows (:func:`record_flat_rows`): PR #1855's ``eval_val``, the record recipe's no-TTT diagnostic. Contiguous
stream spans, each scoring every target in it, documents cut at the span's edges.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pgolf.data.shards import BOS_ID
from pgolf.evaluate.valdata import ValidationSet
from pgolf.model.rope import extend_rope_cache

PAD_ID = 0  # SentencePiece pad id: only ever an input of padding segments
IGNORE = -100  # target id that is not scored (F.cross_entropy's ignore_index)


# --------------------------------------------------------------------------------------------------------------
# Bits per byte and score sums
# --------------------------------------------------------------------------------------------------------------


def bits_per_byte(loss_sum_nats: float, byte_sum: int) -> float:
    """``loss_sum / (ln 2 * byte_sum)``: summed NLL in nats over scored targets per original UTF-8 byte, in bits."""
    if byte_sum <= 0:
        raise ValueError(f"bits_per_byte: byte_sum must be > 0, got {byte_sum}")
    return float(loss_sum_nats) / (math.log(2.0) * float(byte_sum))


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    """Sums from which anyone can recompute the reported figures."""

    loss_sum: float  # nats, summed over scored targets (float64 accumulation)
    token_count: int
    byte_sum: int
    doc_count: int

    @property
    def val_loss(self) -> float:
        """Mean NLL in nats per target token."""
        return self.loss_sum / self.token_count if self.token_count else float("nan")

    @property
    def val_bpb(self) -> float:
        return bits_per_byte(self.loss_sum, self.byte_sum) if self.byte_sum else float("nan")

    def to_dict(self) -> dict:
        return {
            "val_loss": self.val_loss,
            "val_bpb": self.val_bpb,
            "loss_sum": self.loss_sum,
            "token_count": self.token_count,
            "byte_sum": self.byte_sum,
            "doc_count": self.doc_count,
        }


class ScoreAccumulator:
    """Adds up the NLL and bytes of scored targets (one process); optionally keeps every target's NLL.

    ``token_nll`` (float64 [N], NaN where unscored) and ``score_order`` (int64 [N], the index of the ``add`` call
    that scored a position, -1 where unscored) exist for tests and diagnostics: ``keep_tokens=True``.
    """

    def __init__(self, val: ValidationSet, keep_tokens: bool = False):
        self.val = val
        self.loss_sum = 0.0
        self.token_count = 0
        self.byte_sum = 0
        self.calls = 0
        self.token_nll = np.full(val.num_positions, np.nan) if keep_tokens else None
        self.score_order = np.full(val.num_positions, -1, dtype=np.int64) if keep_tokens else None

    def add(self, positions: np.ndarray, nll: np.ndarray) -> None:
        """Scores of targets at stream ``positions`` [n] (int64) with NLL ``nll`` [n] in nats."""
        nll = np.asarray(nll, dtype=np.float64)
        self.loss_sum += float(nll.sum())
        self.token_count += int(len(positions))
        self.byte_sum += int(self.val.target_bytes[positions].sum(dtype=np.int64))
        if self.token_nll is not None:
            self.token_nll[positions] = nll
            self.score_order[positions] = self.calls
        self.calls += 1

    def local_result(self) -> ScoreResult:
        return ScoreResult(self.loss_sum, self.token_count, self.byte_sum, self.val.num_docs)

    def result(self, dist_info=None) -> ScoreResult:
        """The sums over every process (an all-reduce in float64 when distributed)."""
        if dist_info is None or not dist_info.enabled:
            return self.local_result()
        import torch.distributed as dist

        sums = torch.tensor([self.loss_sum, float(self.token_count), float(self.byte_sum)], dtype=torch.float64,
                            device=dist_info.device)
        dist.all_reduce(sums)
        return ScoreResult(float(sums[0]), int(round(float(sums[1]))), int(round(float(sums[2]))), self.val.num_docs)


class DeviceScores:
    """:class:`ScoreAccumulator` kept on the device: float64 sums (loss, bytes, targets) updated without a host sync;
    with ``keep_tokens`` also each position's NLL and the index of the call that scored it (read by
    :meth:`finish`)."""

    def __init__(self, val: ValidationSet, device, keep_tokens: bool = False):
        self.val = val
        self.device = torch.device(device)
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, bytes, targets
        self.calls = 0
        n = val.num_positions + 1  # + a dummy slot for masked entries
        self._nll = torch.full((n,), float("nan"), dtype=torch.float64, device=self.device) if keep_tokens else None
        self._order = torch.full((n,), -1, dtype=torch.int64, device=self.device) if keep_tokens else None
        self.token_nll: Optional[np.ndarray] = None
        self.score_order: Optional[np.ndarray] = None

    def add(self, nll: Tensor, mask: Tensor, nbytes: Tensor, positions: Tensor) -> None:
        """nll, mask, nbytes, positions: equal shapes; only entries where ``mask`` count."""
        m = mask.to(torch.float64)
        self.sums += torch.stack([(nll.to(torch.float64) * m).sum(), (nbytes.to(torch.float64) * m).sum(), m.sum()])
        if self._nll is not None:
            slots = torch.where(mask, positions, torch.full_like(positions, self.val.num_positions)).reshape(-1)
            self._nll.scatter_(0, slots, nll.detach().to(torch.float64).reshape(-1))
            self._order.scatter_(0, slots, torch.full_like(slots, self.calls))
        self.calls += 1

    def finish(self) -> None:
        """Copy the kept per-position values to the host (``token_nll``, ``score_order``)."""
        if self._nll is not None:
            N = self.val.num_positions
            self.token_nll = self._nll[:N].cpu().numpy()
            self.score_order = self._order[:N].cpu().numpy()
            self.token_nll[self.score_order < 0] = np.nan

    def result(self, dist_info=None) -> ScoreResult:
        sums = self.sums.clone()
        if dist_info is not None and dist_info.enabled:
            import torch.distributed as dist

            dist.all_reduce(sums)
        loss, nbytes, count = sums.tolist()
        return ScoreResult(loss, int(round(count)), int(round(nbytes)), self.val.num_docs)


# --------------------------------------------------------------------------------------------------------------
# Packed rows
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PackedRow:
    """One model call. All arrays are numpy; ``as_tensors`` moves them to a device."""

    input_ids: np.ndarray  # [T] int64 (padded with PAD_ID)
    target_ids: np.ndarray  # [T] int64, IGNORE where nothing is scored
    target_positions: np.ndarray  # [T] int64 stream position of each scored target, -1 elsewhere
    cu_seqlens: np.ndarray  # [S + 1] int32 segment starts (last entry T; zero-length segments allowed)
    max_seqlen: int
    used_positions: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # ^ stream positions of every non-BOS input or target token in the row (what a gradient step on it uses)

    @property
    def scored(self) -> np.ndarray:
        """bool [T]: which row entries are scored targets."""
        return self.target_positions >= 0


def cu_seqlens_bucket(num_entries: int, minimum: int = 16) -> int:
    """Next power of two: a compiled model then sees a handful of cu_seqlens shapes, not one per row."""
    return max(minimum, 1 << (max(num_entries, 1) - 1).bit_length())


def pad_cu(cu: Sequence[int], num_entries: int) -> np.ndarray:
    """Repeat the last boundary until ``num_entries`` entries (zero-length segments are ignored by attention)."""
    cu = np.asarray(cu, dtype=np.int32)
    if len(cu) > num_entries:
        raise ValueError(f"pad_cu: {len(cu)} entries exceed the requested {num_entries}")
    return np.concatenate([cu, np.full(num_entries - len(cu), cu[-1], dtype=np.int32)])


def _window_cuts(offset_in_doc: int, length: int, seq_len: int) -> list[int]:
    """Relative starts of the windows of a piece that begins ``offset_in_doc`` tokens into its document.

    Windows are aligned to the document's BOS: boundaries at multiples of ``seq_len`` from it.
    """
    first = (-offset_in_doc) % seq_len  # distance to the next aligned boundary
    cuts = [0] + list(range(first if first else seq_len, length, seq_len))
    return sorted(set(cuts))


def _needs_predecessor(doc_start: int, a: int) -> int:
    """1 when a piece starting mid-document carries its predecessor token (see :func:`_finish_row`), else 0."""
    return int(a > doc_start)


def _finish_row(pieces: list[tuple[int, int, int]], val: ValidationSet, row_tokens: int, seq_len: int,
                pad: bool) -> PackedRow:
    """pieces: (doc start, input start, input end) stream positions; inputs [a, b) predict targets [a+1, b+1).

    A piece that starts mid-document is preceded by the token before it, alone in a one-token segment and never
    scored: SmearGate then mixes in the true previous token, exactly as when the whole document sits in one row,
    so a score does not depend on where rows (or stream chunks, or processes) cut.
    """
    total = sum(b - a + _needs_predecessor(d, a) for d, a, b in pieces)
    length = row_tokens if pad else total
    input_ids = np.full(length, PAD_ID, dtype=np.int64)
    target_ids = np.full(length, IGNORE, dtype=np.int64)
    target_positions = np.full(length, -1, dtype=np.int64)
    cu: list[int] = []
    used: list[np.ndarray] = []
    cursor = 0
    for doc_start, a, b in pieces:
        if _needs_predecessor(doc_start, a):
            input_ids[cursor] = val.tokens[a - 1]
            cu.append(cursor)
            cursor += 1
            a_used = a - 1 if a - 1 > doc_start else a  # it feeds the gradient through the gate; a BOS never counts
        else:
            a_used = max(a, doc_start + 1)
        n = b - a
        input_ids[cursor : cursor + n] = val.tokens[a:b]
        target_ids[cursor : cursor + n] = val.tokens[a + 1 : b + 1]
        target_positions[cursor : cursor + n] = np.arange(a + 1, b + 1)
        cu.extend(cursor + c for c in _window_cuts(a - doc_start, n, seq_len))
        used.append(np.arange(a_used, b + 1))
        cursor += n
    cu.extend(range(cursor, length, seq_len))  # padding: segments of its own, none longer than a window
    cu.append(length)
    cu_arr = np.unique(np.asarray(cu, dtype=np.int32))  # sorted; drops the duplicate when there is no padding
    used_arr = np.concatenate(used) if used else np.zeros(0, dtype=np.int64)
    return PackedRow(input_ids, target_ids, target_positions, cu_arr, seq_len, used_arr)


def pack_documents(
    val: ValidationSet,
    doc_indices: Sequence[int] | np.ndarray,
    row_tokens: int,
    seq_len: int,
    pad: bool = True,
) -> Iterator[PackedRow]:
    """Pack the given documents, in order, into rows of at most ``row_tokens`` inputs (see the module docstring).

    A document that does not fit the space left in a row starts the next row. Only a document longer than a whole
    row is split, at a window boundary: it fills the rest of the current row with whole windows and continues at
    the start of the next one, behind its predecessor token (see :func:`_finish_row`), so every score is the same
    as if the document were alone in one long row. ``pad`` pads every row to ``row_tokens`` (static shapes for
    torch.compile).
    """
    if row_tokens <= seq_len:  # a continued document needs its predecessor token beside a whole window
        raise ValueError(f"pack_documents: row_tokens ({row_tokens}) must be > seq_len ({seq_len})")
    pieces: list[tuple[int, int, int]] = []
    used = 0
    for d in np.asarray(doc_indices, dtype=np.int64).tolist():
        doc_start, score_end = int(val.doc_starts[d]), int(val.score_ends[d])
        a, b = doc_start, score_end - 1  # inputs [a, b) predict the document's targets [a + 1, score_end)
        while a < b:
            extra = _needs_predecessor(doc_start, a)
            space = row_tokens - used - extra
            n = b - a
            if n > space:
                # a document that fits a row starts a new one; a longer one is split at a window boundary
                n = 0 if n + extra <= row_tokens else (max(space, 0) // seq_len) * seq_len
            if n == 0:
                yield _finish_row(pieces, val, row_tokens, seq_len, pad)
                pieces, used = [], 0
                continue
            pieces.append((doc_start, a, a + n))
            used += n + extra
            a += n
            if used == row_tokens:
                yield _finish_row(pieces, val, row_tokens, seq_len, pad)
                pieces, used = [], 0
    if pieces:
        yield _finish_row(pieces, val, row_tokens, seq_len, pad)


def stream_window_row(val: ValidationSet, lo: int, hi: int, seq_len: int, row_tokens: Optional[int] = None) -> PackedRow:
    """A row scoring the targets at stream positions [lo, hi) with their within-document window context.

    The row starts at the window boundary that holds target ``lo``'s input (behind its predecessor token when that
    is mid-document), so windows and scores are the same as in :func:`pack_documents`; targets before ``lo`` are
    context only (not scored). Needs at most ``hi - lo + seq_len`` tokens; ``row_tokens`` pads to a fixed length.
    """
    if not 1 <= lo < hi <= val.num_positions:
        raise ValueError(f"stream_window_row: need 1 <= lo < hi <= {val.num_positions}, got [{lo}, {hi})")
    # the document whose targets hold position p: score_ends[d - 1] <= p < score_ends[d] (a next-document BOS
    # belongs to the document before it; a BOS that is no target, to the document it starts)
    d0 = int(np.searchsorted(val.score_ends, lo, side="right"))
    d1 = int(np.searchsorted(val.score_ends, hi - 1, side="right"))
    pieces = []
    for d in range(d0, d1 + 1):
        doc_start, score_end = int(val.doc_starts[d]), int(val.score_ends[d])
        a = doc_start
        if d == d0:
            a = doc_start + (max(lo - 1 - doc_start, 0) // seq_len) * seq_len
        b = min(score_end - 1, hi - 1)
        if a < b:
            pieces.append((doc_start, a, b))
    total = sum(b - a + _needs_predecessor(d, a) for d, a, b in pieces)
    if row_tokens is not None and total > row_tokens:
        raise ValueError(f"stream_window_row: {total} inputs do not fit row_tokens={row_tokens}")
    row = _finish_row(pieces, val, row_tokens if row_tokens is not None else total, seq_len, row_tokens is not None)
    outside = (row.target_positions < lo) | (row.target_positions >= hi)
    row.target_ids[outside] = IGNORE
    row.target_positions[outside] = -1
    row.used_positions = row.used_positions[row.used_positions < hi]
    return row


def record_flat_spans(num_positions: int, seq_len: int, batch_seqs: int, world_size: int) -> list[tuple[int, int]]:
    """The record's ``eval_val`` partition of a stream of ``num_positions`` tokens: spans ``(lo, hi)``, inputs
    ``[lo, hi - 1)``, targets ``[lo + 1, hi)``, in the record's rank order.

    ``total = (num_positions - 1) // seq_len`` rows of seq_len targets; rank r of ``world_size`` takes rows
    ``[total * r // W, total * (r + 1) // W)``, cut to a whole number of ``batch_seqs``-row batches from its start
    (the rest is never scored); each batch is one span of ``batch_seqs * seq_len`` targets.
    """
    total = (num_positions - 1) // seq_len
    spans = []
    for rank in range(world_size):
        first, last = total * rank // world_size, total * (rank + 1) // world_size
        last = first + (last - first) // batch_seqs * batch_seqs
        spans.extend((s * seq_len, (s + batch_seqs) * seq_len + 1) for s in range(first, last, batch_seqs))
    return spans


def record_flat_rows(val: ValidationSet, seq_len: int, batch_seqs: int, world_size: int) -> Iterator[PackedRow]:
    """One row per :func:`record_flat_spans` span: every target scored; attention segments start at the span's
    start, at each BOS and every ``seq_len`` tokens after each of those (the record's ``_build_cu_seqlens``); no
    predecessor token (a document cut by the span's start loses its context there, as in the record)."""
    for lo, hi in record_flat_spans(val.num_positions, seq_len, batch_seqs, world_size):
        inputs = val.tokens[lo : hi - 1].astype(np.int64)
        starts = np.union1d([0], np.flatnonzero(inputs == BOS_ID))
        cuts = [np.arange(a, b, seq_len) for a, b in zip(starts, np.append(starts[1:], len(inputs)))]
        cu = np.append(np.concatenate(cuts), len(inputs)).astype(np.int32)
        positions = np.arange(lo + 1, hi, dtype=np.int64)
        yield PackedRow(inputs, val.tokens[lo + 1 : hi].astype(np.int64), positions, cu, seq_len, positions)


def record_flat_mask(val: ValidationSet, seq_len: int, batch_seqs: int, world_size: int) -> np.ndarray:
    """bool [N]: the targets :func:`record_flat_rows` scores (what its ledger must find scored once)."""
    mask = np.zeros(val.num_positions, dtype=bool)
    for lo, hi in record_flat_spans(val.num_positions, seq_len, batch_seqs, world_size):
        mask[lo + 1 : hi] = True
    return mask


# --------------------------------------------------------------------------------------------------------------
# Per-token NLL
# --------------------------------------------------------------------------------------------------------------


def token_nll(model, input_ids: Tensor, target_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int,
              softcap_dtype: str = "float32") -> Tensor:
    """NLL in nats of every target (0 where ``target_ids == IGNORE``): float32 [T].

    Uses the model's own pieces (hidden states, ``lm_head`` module - possibly LoRA-wrapped - and softcap), so a
    score is exactly what the model defines: a full softmax over the vocabulary (rule C2). ``softcap_dtype``
    (``evaluate.softcap_dtype``): ``float32`` softcaps float32 logits; ``model`` softcaps the head's output in its
    own dtype (bf16 under autocast, as the record) and casts to float32 for the cross-entropy.
    """
    from pgolf.model.gpt import softcap

    h = model.forward_hidden(input_ids, cu_seqlens, max_seqlen)  # [T, d]
    z = model.lm_head(h)  # [T, V]
    if softcap_dtype == "model":
        logits = softcap(z, model.cfg.logit_softcap).float()
    elif softcap_dtype == "float32":
        logits = softcap(z.float(), model.cfg.logit_softcap)
    else:
        raise ValueError(f"token_nll: softcap_dtype expected 'float32' or 'model', got {softcap_dtype!r}")
    return F.cross_entropy(logits, target_ids, ignore_index=IGNORE, reduction="none")  # [T]


def _compiler_errors() -> tuple[type, ...]:
    """The exception types torch.compile raises when a backend fails on a graph (not errors of the model)."""
    errors: list[type] = []
    try:
        from torch._dynamo.exc import BackendCompilerFailed

        errors.append(BackendCompilerFailed)
    except ImportError:
        pass
    try:
        from torch._inductor.exc import InductorError

        errors.append(InductorError)
    except ImportError:
        pass
    return tuple(errors)


COMPILER_ERRORS = _compiler_errors()


def disable_mix_order_reduction() -> None:
    """Switch off inductor's mix-order reduction fusion where the installed torch has it.

    Why: with torch 2.11 on an H100, compiling the backward of the phased-TTT rows (32,768-token rows through the
    whole model) fails inside that fusion pass (``AssertionError`` in ``FusedMixOrderReductions``); the LoRA
    and scoring graphs compile either way. Off, the graph compiles like any other reduction.
    """
    try:
        import torch._inductor.config as inductor_config
    except ImportError:
        return
    if hasattr(inductor_config, "triton") and hasattr(inductor_config.triton, "mix_order_reduction"):
        inductor_config.triton.mix_order_reduction = False


class NllRunner:
    """Calls :func:`token_nll` (with ``softcap_dtype``) on a device under bf16 autocast (CUDA), optionally through
    ``torch.compile``.

    ``warmup`` compiles on RANDOM tokens only (never validation tokens: compile warm-up that touches validation
    data was flagged on PR #1530) and leaves no trace: gradients are cleared, nothing is stepped. A shape whose
    graph the compiler fails on during warm-up runs eagerly from then on (``eager_shapes``, with the error in
    ``compile_failures``): a slower evaluation beats none, and the summary says which shapes fell back.
    """

    def __init__(self, model, device: torch.device, compile: bool = False, dynamic: bool = False,
                 softcap_dtype: str = "float32"):
        self.model = model
        self.device = torch.device(device)
        self.compiled = compile
        self.dynamic = dynamic
        self._eager_fn: Callable = lambda i, t, c, m: token_nll(self.model, i, t, c, m, softcap_dtype)  # noqa: E731
        fn = self._eager_fn
        if compile:
            import torch._dynamo as dynamo

            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
            disable_mix_order_reduction()
            fn = torch.compile(fn, dynamic=dynamic)
        self._fn = fn
        self.shapes: set[tuple] = set()
        self.eager_shapes: set[tuple] = set()  # (tokens, cu entries as called, max_seqlen) that run uncompiled
        self.compile_failures: list[str] = []

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def tensors(self, row: PackedRow) -> tuple[Tensor, Tensor, Tensor, int]:
        cu = row.cu_seqlens
        if self.compiled:
            cu = pad_cu(cu, cu_seqlens_bucket(len(cu)))
        to = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dt, non_blocking=True)  # noqa: E731
        return to(row.input_ids, torch.long), to(row.target_ids, torch.long), to(cu, torch.int32), int(row.max_seqlen)

    def __call__(self, row: PackedRow) -> Tensor:
        """float32 [T] NLL on the device (differentiable when grad mode is on)."""
        ids, targets, cu, max_seqlen = self.tensors(row)
        extend_rope_cache(self.model, len(ids))  # row RoPE positions: sliced tables (a no-op once long enough)
        shape = (len(ids), len(cu), max_seqlen)
        self.shapes.add(shape)
        fn = self._eager_fn if shape in self.eager_shapes else self._fn
        with self.autocast():
            return fn(ids, targets, cu, max_seqlen)

    def shape_of(self, row: PackedRow) -> tuple[int, int, int]:
        """(tokens, cu_seqlens entries as called, max_seqlen): what a compiled graph is specialized on."""
        entries = len(row.cu_seqlens)
        return len(row.input_ids), cu_seqlens_bucket(entries) if self.compiled else entries, int(row.max_seqlen)

    def warmup(self, shapes: Sequence[tuple[int, int, int]], steps: int, backward: bool, seed: int) -> float:
        """``steps`` calls per :meth:`shape_of` shape on RANDOM tokens (forward, and backward when ``backward``).

        Nothing is stepped and gradients are cleared afterwards, so the model leaves exactly as it came in.
        Returns the seconds spent.
        """
        import time

        start = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        vocab = self.model.cfg.vocab_size
        is_main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if shapes:  # the longest row first, so no graph compiled here is invalidated by a later growth
            extend_rope_cache(self.model, max(tokens for tokens, _, _ in shapes))
        for tokens, entries, max_seqlen in sorted(set(shapes)):
            shape_start = time.perf_counter()
            cu = list(range(0, tokens, max_seqlen)) + [tokens]
            if len(cu) > entries:
                continue  # cannot build a random row of this shape; the real call compiles it
            cu = pad_cu(cu, entries)
            for _ in range(steps):
                ids = torch.randint(2, vocab, (tokens,), generator=gen).numpy()
                targets = torch.randint(2, vocab, (tokens,), generator=gen).numpy()
                row = PackedRow(ids, targets, np.full(tokens, -1, dtype=np.int64), cu, max_seqlen)
                try:
                    with torch.set_grad_enabled(backward):
                        nll = self(row)
                        if backward:
                            nll.mean().backward()
                except COMPILER_ERRORS as exc:
                    if not self.compiled:
                        raise
                    shape = (tokens, entries, max_seqlen)
                    self.eager_shapes.add(shape)
                    message = f"shape {shape}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
                    self.compile_failures.append(message)
                    print(f"warning: the compiler failed on {message}; this shape runs eagerly", file=sys.stderr)
                    break
            if is_main:  # a compile can take minutes: say which shape took how long
                print(f"[warm-up] shape {(tokens, entries, max_seqlen)} {'fwd+bwd' if backward else 'fwd'}: "
                      f"{time.perf_counter() - shape_start:.1f} s", file=sys.stderr, flush=True)
        for p in self.model.parameters():
            p.grad = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start
