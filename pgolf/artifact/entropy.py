"""Static-model rANS coding of the int8 code matrices, vectorized over interleaved lanes (numpy only).

Why: brotli codes the GPTQ codes of the record-size model ~0.8 % above their zero-order entropy, and cannot use
what the pack knows about them: a column holds the codes of one input feature, and the spread of the columns of
a matrix differs. Here every matrix's columns are put into ``groups`` classes by the spread of their codes, each
(matrix, class) gets its own frequency table, and the codes are coded with rANS against those tables (record-size
model: ~80 KB below column-major brotli, which counts against the 16,000,000-byte cap).

Coder: rANS with a 32-bit state in [2^16, 2^32), 16-bit renormalization words (at most one per symbol, since
the frequency precision is <= 16 bits) and ``lanes`` interleaved states: symbol i belongs to lane i % lanes and
round i // lanes, so numpy codes a whole round at once. The encoder runs the rounds backwards; the words are
stored in the order the decoder reads them (round by round, lanes ascending), so only the lanes' final states
are stored besides the words. The decoder ends with every lane back at the initial state, a built-in check.

Everything is deterministic integer arithmetic: equal inputs give equal bytes on every machine.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PRECISION_BITS = 15  # frequencies of a table sum to 2^15
STATE_LOW = 1 << 16  # lower bound of a lane's state; states live in [2^16, 2^32)
WORD_BITS = 16
ALPHABET = 256  # int8 codes, stored as code + 128
DEFAULT_LANES = 1024


class EntropyCodingError(ValueError):
    """The coded data is inconsistent with its tables (damaged or not produced by this coder)."""


@dataclasses.dataclass(frozen=True)
class CodedMatrices:
    """What the pack stores for a list of int8 matrices (each coded column by column).

    ``groups``: uint8 [sum of column counts], each column's class; ``freqs``: uint16 [matrices * num_groups,
    ALPHABET], one table per (matrix, class); ``states``: uint32 [lanes]; ``words``: uint16 [n].
    """

    num_groups: int
    groups: np.ndarray
    freqs: np.ndarray
    states: np.ndarray
    words: np.ndarray


def normalize_counts(counts: np.ndarray, precision_bits: int = PRECISION_BITS) -> np.ndarray:
    """Integer frequencies summing to 2^precision_bits, >= 1 for every symbol seen, 0 for the others.

    Proportional rounding, then the difference is taken from (or given to) the largest frequencies, never pushing
    a seen symbol below 1. All-zero counts give all-zero frequencies (a table no symbol uses).
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(counts.shape, dtype=np.int64)
    target = 1 << precision_bits
    if int((counts > 0).sum()) > target:
        raise EntropyCodingError(f"{int((counts > 0).sum())} distinct symbols do not fit a {precision_bits}-bit table")
    freqs = np.where(counts > 0, np.maximum(counts * target // total, 1), 0)
    excess = int(freqs.sum()) - target
    order = np.argsort(-freqs, kind="stable")
    while excess != 0:
        for i in order:
            if excess == 0:
                break
            if excess > 0 and freqs[i] > 1:
                take = min(excess, int(freqs[i]) - 1)
                freqs[i] -= take
                excess -= take
            elif excess < 0:
                freqs[i] -= excess  # give the whole shortfall to the most frequent symbol
                excess = 0
    return freqs


def column_groups(codes: np.ndarray, num_groups: int) -> np.ndarray:
    """uint8 [cols]: the class of each column, by the rank of its codes' standard deviation (equal-sized classes)."""
    cols = codes.shape[1]
    spread = codes.astype(np.float32).std(axis=0)  # [cols]
    rank = np.argsort(np.argsort(spread, kind="stable"), kind="stable")
    return (rank * num_groups // cols).astype(np.uint8)


def _symbols_and_tables(matrices: list[np.ndarray], groups: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """All symbols (column-major per matrix, matrices in order) and the table index (int32) of each."""
    symbols, tables, start = [], [], 0
    for m, codes in enumerate(matrices):
        rows, cols = codes.shape
        symbols.append((codes.T.astype(np.int16) + 128).astype(np.uint8).ravel())
        tables.append(np.repeat(m * num_groups + groups[start : start + cols].astype(np.int32), rows))
        start += cols
    if not matrices:
        return np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.int32)
    return np.concatenate(symbols), np.concatenate(tables)


def _cumulative(freqs: np.ndarray) -> np.ndarray:
    cum = np.zeros_like(freqs, dtype=np.int64)
    cum[:, 1:] = np.cumsum(freqs, axis=1)[:, :-1]
    return cum


def encode_matrices(matrices: list[np.ndarray], num_groups: int = 4, lanes: int = DEFAULT_LANES) -> CodedMatrices:
    """Code int8 matrices [rows, cols] (column by column, in list order) against per-(matrix, class) tables."""
    if not 1 <= num_groups <= 255:
        raise ValueError(f"num_groups: expected 1..255, got {num_groups}")
    if lanes < 1:
        raise ValueError(f"lanes: expected >= 1, got {lanes}")
    for i, codes in enumerate(matrices):
        if codes.ndim != 2 or codes.dtype != np.int8:
            raise ValueError(f"matrix {i}: expected a 2-D int8 array, got {codes.dtype} {list(codes.shape)}")
    groups = np.concatenate([column_groups(c, num_groups) for c in matrices]) if matrices else np.zeros(0, np.uint8)
    symbols, tables = _symbols_and_tables(matrices, groups, num_groups)
    num_tables = len(matrices) * num_groups
    counts = np.bincount(tables.astype(np.int64) * ALPHABET + symbols, minlength=num_tables * ALPHABET)
    counts = counts.reshape(num_tables, ALPHABET)
    freqs = np.stack([normalize_counts(row) for row in counts]) if len(counts) else counts
    cum = _cumulative(freqs)

    n = len(symbols)
    rounds = -(-n // lanes)
    state = np.full(lanes, STATE_LOW, dtype=np.uint64)
    emitted: list[np.ndarray] = [np.zeros(0, np.uint16)] * rounds
    renorm_scale = np.uint64((STATE_LOW >> PRECISION_BITS) << WORD_BITS)
    for r in range(rounds - 1, -1, -1):
        lo, hi = r * lanes, min(n, (r + 1) * lanes)
        x = state[: hi - lo]
        f = freqs[tables[lo:hi], symbols[lo:hi]].astype(np.uint64)
        c = cum[tables[lo:hi], symbols[lo:hi]].astype(np.uint64)
        emit = x >= renorm_scale * f  # [lanes in this round]: one 16-bit word out first
        emitted[r] = (x[emit] & np.uint64(0xFFFF)).astype(np.uint16)
        x = np.where(emit, x >> np.uint64(WORD_BITS), x)
        state[: hi - lo] = ((x // f) << np.uint64(PRECISION_BITS)) + (x % f) + c
    words = np.concatenate(emitted) if emitted else np.zeros(0, np.uint16)
    return CodedMatrices(num_groups, groups, freqs.astype(np.uint16), state.astype(np.uint32), words)


def decode_matrices(coded: CodedMatrices, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    """The int8 matrices back from :func:`encode_matrices`' output and their shapes; EntropyCodingError if damaged."""
    G = coded.num_groups
    total_cols = sum(cols for _, cols in shapes)
    if coded.groups.shape != (total_cols,) or (total_cols and int(coded.groups.max()) >= G):
        raise EntropyCodingError(f"column classes: expected {total_cols} values below {G}, got {list(coded.groups.shape)}")
    if coded.freqs.shape != (len(shapes) * G, ALPHABET):
        raise EntropyCodingError(f"frequency tables: expected [{len(shapes) * G}, {ALPHABET}], got {list(coded.freqs.shape)}")
    freqs = coded.freqs.astype(np.int64)
    sums = freqs.sum(axis=1)
    if np.any((sums != 0) & (sums != 1 << PRECISION_BITS)):
        raise EntropyCodingError(f"frequency tables: every used table must sum to 2^{PRECISION_BITS}")
    lanes = len(coded.states)
    if lanes < 1 or np.any(coded.states < STATE_LOW):
        raise EntropyCodingError("lane states: expected at least one, each >= 2^16")
    cum = _cumulative(freqs)
    # slot -> symbol per table: [tables, 2^precision]
    slot_symbol = np.zeros((len(freqs), 1 << PRECISION_BITS), dtype=np.uint8)
    for t in np.nonzero(sums)[0]:
        slot_symbol[t] = np.repeat(np.arange(ALPHABET, dtype=np.uint8), freqs[t])
    _, tables = _symbols_and_tables([np.zeros(s, np.int8) for s in shapes], coded.groups, G)
    n = len(tables)
    symbols = np.empty(n, dtype=np.uint8)
    state = coded.states.astype(np.uint64)
    words = coded.words.astype(np.uint64)
    mask = np.uint64((1 << PRECISION_BITS) - 1)
    position = 0
    for r in range(-(-n // lanes)):
        lo, hi = r * lanes, min(n, (r + 1) * lanes)
        x = state[: hi - lo]
        t = tables[lo:hi]
        slot = x & mask
        s = slot_symbol[t, slot]
        f = freqs[t, s].astype(np.uint64)
        if np.any(f == 0):
            raise EntropyCodingError(f"coded words: round {r} decodes a symbol its table does not have")
        x = f * (x >> np.uint64(PRECISION_BITS)) + slot - cum[t, s].astype(np.uint64)
        need = np.nonzero(x < STATE_LOW)[0]
        if position + len(need) > len(words):
            raise EntropyCodingError(f"coded words: the stream ends early (round {r} of {-(-n // lanes)})")
        x[need] = (x[need] << np.uint64(WORD_BITS)) | words[position : position + len(need)]
        position += len(need)
        state[: hi - lo] = x
        symbols[lo:hi] = s
    if position != len(words) or np.any(state != STATE_LOW):
        raise EntropyCodingError("coded words: the lanes do not end in their initial state (damaged stream)")
    out, start = [], 0
    for rows, cols in shapes:
        block = symbols[start : start + rows * cols].reshape(cols, rows).T  # stored column by column
        out.append((block.astype(np.int16) - 128).astype(np.int8))
        start += rows * cols
    return out
