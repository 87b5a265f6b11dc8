"""Documents (JSONL) -> BOS-correct train/val shards, the CaseOps byte sidecar and a manifest, in parallel.

Split rule (challenge rules): the first ``val_docs`` documents in file order are validation, every later one is
training. Every document becomes ``[BOS] + tokens(doc)``; the sidecar holds, per validation token, the number
of original UTF-8 bytes it stands for (0 for BOS and CaseOps operators).

Why it is built this way:

- Streaming and bounded memory: the JSONL file is read lazily in chunks (a few hundred documents or ~1 MB) and
  at most ``2 * workers + 2`` chunks are in flight (``Pool.imap`` would read the whole input ahead of the
  workers, so the window is kept explicitly). Shard buffers are fixed-size.
- Deterministic: chunk boundaries depend only on the input, and results are consumed in chunk order, so the
  output is byte-identical for any number of workers.
- All or nothing: everything is written into a temporary directory beside ``out_dir`` that replaces it only
  after the manifest is written. Bad input, a refused train/val overlap or an interruption leaves no
  ``out_dir`` (or the previous complete one untouched).
- Duplicates across the split: each document is identified by a 64-bit hash of its token ids (texts equal after
  the tokenizer's normalization have equal ids). A training document equal to a validation document is, by
  ``val_duplicates_policy``, not written (``drop_train_copies``, the default; counted in the manifest's
  ``val_duplicates``) or an error naming its file and line (``refuse``). Under either policy, more validation
  documents with a training copy than ``max_val_overlap_fraction`` of them is an error: the split is wrong.
  Validation documents come first in the file, so every validation hash is known before the first training
  chunk is written. That bookkeeping, and the manifest, are :mod:`pgolf.data.split`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Iterator, TextIO

import numpy as np

from pgolf.data.shards import BOS_ID, DEFAULT_SHARD_TOKENS, MANIFEST_NAME, ShardStreamWriter, doc_hash
from pgolf.config.training import DEFAULT_MAX_VAL_OVERLAP_FRACTION, VAL_DUPLICATES_POLICIES
from pgolf.data.split import PrepareError, SplitStats, shard_manifest
from pgolf.io import atomic_dir, atomic_write_json, progress

MAX_VOCAB_SIZE = 65536  # token ids are stored as uint16
CHUNK_DOCS = 256  # documents per work unit ...
CHUNK_BYTES = 1 << 20  # ... or about this many bytes of JSONL, whichever comes first
PROGRESS_INTERVAL_SECONDS = 2.0
PREPARE_REPORT_NAME = "prepare_report.json"  # how a preparation ran (path, workers, seconds): outside every hash


# --------------------------------------------------------------------------------------------------------------
# Reading documents in chunks (main process)
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Chunk:
    """A work unit: consecutive raw JSONL lines, all of one split."""

    index: int
    split: str  # "val" | "train"
    first_doc: int  # corpus-wide index of the first document
    first_line: int  # 1-based line number of the first document in the JSONL file
    lines: list[bytes]
    path: str  # the JSONL file, for error messages


def _is_blank(line: bytes) -> bool:
    return not line.strip()


class _DocsReader:
    """Reads the JSONL file once, front to back, hashing every byte on the way (the manifest's docs_sha256).

    A line is one document; a trailing newline at the end of the file does not make an extra document.
    """

    def __init__(self, path: Path):
        self.path = path
        self.size_bytes = path.stat().st_size
        self.bytes_read = 0
        self._digest = hashlib.sha256()
        self._handle = open(path, "rb")

    def lines(self) -> Iterator[bytes]:
        for line in self._handle:
            self._digest.update(line)
            self.bytes_read += len(line)
            yield line

    def chunks(self, val_docs: int, max_docs: int, chunk_docs: int, chunk_bytes: int) -> Iterator[_Chunk]:
        """Chunks of at most ``chunk_docs`` documents / ~``chunk_bytes`` bytes; none straddles the val/train split."""
        lines: list[bytes] = []
        size_bytes = 0
        doc = 0
        first_line = 1
        index = 0
        for line_no, line in enumerate(self.lines(), start=1):
            if max_docs and doc >= max_docs:
                break
            if not lines:
                first_line = line_no
            lines.append(line)
            size_bytes += len(line)
            doc += 1
            if len(lines) >= chunk_docs or size_bytes >= chunk_bytes or doc == val_docs:
                first_doc = doc - len(lines)
                yield _Chunk(
                    index, "val" if first_doc < val_docs else "train", first_doc, first_line, lines, str(self.path)
                )
                index += 1
                lines, size_bytes = [], 0
        if lines:
            first_doc = doc - len(lines)
            yield _Chunk(
                index, "val" if first_doc < val_docs else "train", first_doc, first_line, lines, str(self.path)
            )

    def finish_sha256(self) -> str:
        """Hash the rest of the file (when reading stopped early) and return the hex sha256 of the whole file."""
        while block := self._handle.read(1 << 22):
            self._digest.update(block)
        return self._digest.hexdigest()

    def close(self) -> None:
        self._handle.close()


def _count_documents(path: Path, limit: int) -> int:
    """Number of documents (lines) in ``path``, counting no further than ``limit``."""
    count = 0
    with open(path, "rb") as handle:
        for _ in handle:
            count += 1
            if count >= limit:
                break
    return count


# --------------------------------------------------------------------------------------------------------------
# Tokenizing chunks (worker processes)
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Encoded:
    """A tokenized chunk: documents as ``[BOS] + ids`` concatenated."""

    index: int
    split: str
    tokens: np.ndarray  # [n] uint16
    byte_counts: np.ndarray | None  # [n] uint16, original bytes per token (val chunks of CaseOps data only)
    doc_lengths: np.ndarray  # [docs] int64, BOS included
    doc_hashes: np.ndarray  # [docs] uint64, see shards.doc_hash
    text_bytes: int  # UTF-8 bytes of the documents' text (throughput)
    doc_text_bytes: np.ndarray  # [docs] int64, UTF-8 bytes of each document's text (the manifest counts the written)
    jsonl_bytes: int  # bytes of the JSONL lines
    first_line: int


_WORKER: dict = {}  # per-process state set by _init_worker: the tokenizer and whether to emit byte counts


def _init_worker(tokenizer_path: str, caseops: bool) -> None:
    """Load the tokenizer once per process (the executor's initializer; called in-process for workers=1)."""
    from pgolf.data.tokenizer import load_tokenizer

    _WORKER["tokenizer"] = load_tokenizer(Path(tokenizer_path), caseops=caseops)
    _WORKER["caseops"] = caseops


def _parse_text(line: bytes, path: str, line_no: int) -> str:
    """The ``text`` field of one JSONL line; errors name FILE:LINE."""
    if _is_blank(line):
        raise PrepareError(f'{path}:{line_no}: empty line, expected a JSON object with a "text" field')
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrepareError(f"{path}:{line_no}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or "text" not in obj:
        raise PrepareError(
            f'{path}:{line_no}: expected a JSON object with a "text" field, got {type(obj).__name__}'
            + (f" with keys {sorted(obj)[:5]}" if isinstance(obj, dict) else "")
        )
    text = obj["text"]
    if not isinstance(text, str):
        raise PrepareError(f'{path}:{line_no}: "text" must be a string, got {type(text).__name__}')
    return text


def _encode_ids(tokenizer, text: str) -> np.ndarray:
    """Token ids only, for documents that need no byte counts (all training documents).

    The same ids as ``encode_document`` (CaseOps transform, then SentencePiece) at about half the cost: the
    per-token byte counts take as long as the encoding itself, and training never reads them.
    """
    return np.asarray(tokenizer.processor.encode(tokenizer.transform(text)), dtype=np.uint16)


def _encode_chunk(chunk: _Chunk) -> _Encoded:
    tokenizer = _WORKER["tokenizer"]
    want_bytes = chunk.split == "val" and _WORKER["caseops"]
    n_docs = len(chunk.lines)
    pieces: list[np.ndarray] = []
    byte_pieces: list[np.ndarray] = []
    lengths = np.empty(n_docs, dtype=np.int64)
    hashes = np.empty(n_docs, dtype=np.uint64)
    doc_text_bytes = np.empty(n_docs, dtype=np.int64)
    bos = np.array([BOS_ID], dtype=np.uint16)
    zero = np.zeros(1, dtype=np.uint16)
    for k, line in enumerate(chunk.lines):
        text = _parse_text(line, chunk.path, chunk.first_line + k)
        try:  # what the text itself can break (a lone surrogate; a run too long for a sidecar entry), named by line
            doc_text_bytes[k] = len(text.encode("utf-8"))
            if want_bytes:
                ids, byte_counts = tokenizer.encode_document(text)
            else:
                ids = _encode_ids(tokenizer, text)
        except (UnicodeError, ValueError) as exc:
            raise PrepareError(f"{chunk.path}:{chunk.first_line + k}: {exc}") from None
        ids = np.asarray(ids, dtype=np.uint16)
        if (ids == BOS_ID).any():  # documents are counted by BOS: a BOS inside a document would split it
            raise PrepareError(
                f"{chunk.path}:{chunk.first_line + k}: the tokenizer emitted BOS ({BOS_ID}) inside the text"
            )
        pieces += [bos, ids]
        if want_bytes:
            byte_pieces += [zero, np.asarray(byte_counts, dtype=np.uint16)]
        lengths[k] = len(ids) + 1
        hashes[k] = doc_hash(ids)
    return _Encoded(
        index=chunk.index,
        split=chunk.split,
        tokens=np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16),
        byte_counts=np.concatenate(byte_pieces) if want_bytes and byte_pieces else None,
        doc_lengths=lengths,
        doc_hashes=hashes,
        text_bytes=int(doc_text_bytes.sum()),
        doc_text_bytes=doc_text_bytes,
        jsonl_bytes=sum(len(line) for line in chunk.lines),
        first_line=chunk.first_line,
    )


class _Runner:
    """Ordered map of ``_encode_chunk`` over chunks, with at most ``2 * workers + 2`` chunks in flight.

    workers == 1 runs in this process (no pickling). Otherwise a ProcessPoolExecutor with the ``spawn`` start
    method (no inherited state or threads, the same on every platform and Python version). Not
    ``multiprocessing.Pool``: when one of its workers dies (killed for memory, say) the pending result never
    arrives and the caller waits forever; the executor raises BrokenProcessPool instead.
    """

    def __init__(self, workers: int, tokenizer_path: Path, caseops: bool):
        self.workers = workers
        self.executor: ProcessPoolExecutor | None = None
        if workers == 1:
            _init_worker(str(tokenizer_path), caseops)
        else:
            self.executor = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(str(tokenizer_path), caseops),
            )

    def map(self, chunks: Iterator[_Chunk]) -> Iterator[_Encoded]:
        if self.executor is None:
            for chunk in chunks:
                yield _encode_chunk(chunk)
            return
        window: deque[Future] = deque()
        for chunk in chunks:
            window.append(self.executor.submit(_encode_chunk, chunk))
            if len(window) >= 2 * self.workers + 2:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)  # in-flight chunks are small: quick
            self.executor = None
        _WORKER.clear()

    def __enter__(self) -> "_Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------------------


class _Progress:
    """Progress lines on stderr, at most one every PROGRESS_INTERVAL_SECONDS."""

    def __init__(self, total_bytes: int | None, stream: TextIO):
        self.total_bytes = total_bytes
        self.stream = stream
        self.start = time.monotonic()
        self.last = self.start
        self.docs = {"val": 0, "train": 0}
        self.text_bytes = 0
        self.jsonl_bytes = 0

    def update(self, result: _Encoded, docs: int) -> None:
        self.docs[result.split] += docs
        self.text_bytes += result.text_bytes
        self.jsonl_bytes += result.jsonl_bytes
        now = time.monotonic()
        if now - self.last >= PROGRESS_INTERVAL_SECONDS:
            self.last = now
            self.print(now)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start

    def mb_per_second(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)

    def print(self, now: float) -> None:
        elapsed = now - self.start
        line = (
            f"prepare: {self.docs['val']:,} val + {self.docs['train']:,} train docs, "
            f"{self.text_bytes / 1e6:,.1f} MB text, {self.mb_per_second():.1f} MB/s"
        )
        if self.total_bytes and self.jsonl_bytes:
            remaining = elapsed * (self.total_bytes - self.jsonl_bytes) / self.jsonl_bytes
            line += f", ETA {int(remaining) // 60}m{int(remaining) % 60:02d}s"
        if self.stream is sys.stderr:
            progress(line.removeprefix("prepare: "))  # the rule's log, and the console (pgolf.io.run_logged)
        else:
            print(line, file=self.stream, flush=True)


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def _resolve_workers(workers: int) -> int:
    if workers < 0:
        raise PrepareError(f"--workers: expected >= 0 (0 = all cores), got {workers}")
    if workers:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _check_policy(policy: str, max_fraction: float) -> None:
    if policy not in VAL_DUPLICATES_POLICIES:
        raise PrepareError(f"--val-duplicates-policy: expected one of {VAL_DUPLICATES_POLICIES}, got {policy!r}")
    if not 0.0 <= max_fraction <= 1.0:
        raise PrepareError(f"--max-val-overlap-fraction: expected a fraction in [0, 1], got {max_fraction}")


def _check_arguments(
    docs_path: Path, tokenizer_path: Path, val_docs: int, shard_tokens: int, max_docs: int, max_train_shards: int
) -> None:
    if val_docs <= 0:
        raise PrepareError(f"--val-docs: expected > 0, got {val_docs}")
    if shard_tokens <= 0:
        raise PrepareError(f"--shard-tokens: expected > 0, got {shard_tokens}")
    if max_docs < 0 or max_train_shards < 0:
        raise PrepareError(
            f"--max-docs/--max-train-shards: expected >= 0 (0 = no cap), got {max_docs}/{max_train_shards}"
        )
    if max_docs and max_docs <= val_docs:
        raise PrepareError(f"--max-docs {max_docs} leaves no training documents after --val-docs {val_docs}")
    for path, what in ((docs_path, "documents file"), (tokenizer_path, "tokenizer model")):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {what} not found")


def prepare_shards(
    docs_path: Path,
    tokenizer_path: Path,
    out_dir: Path,
    val_docs: int,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int = 0,
    caseops: bool = True,
    max_docs: int = 0,
    max_train_shards: int = 0,
    progress: TextIO | None = None,
    *,
    val_duplicates_policy: str = "drop_train_copies",
    max_val_overlap_fraction: float = DEFAULT_MAX_VAL_OVERLAP_FRACTION,
    chunk_docs: int = CHUNK_DOCS,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict:
    """Tokenize ``docs_path`` into ``out_dir`` (replaced whole on success); return the manifest.

    ``max_docs`` > 0 reads at most that many documents (validation included); ``max_train_shards`` > 0 stops
    after that many full train shards. ``progress`` defaults to stderr. ``val_duplicates_policy`` and
    ``max_val_overlap_fraction``: training copies of validation documents (module docstring; DataConfig).
    ``chunk_docs``/``chunk_bytes`` size the work units (they change speed and memory, never the output).
    """
    docs_path, tokenizer_path, out_dir = Path(docs_path), Path(tokenizer_path), Path(out_dir)
    progress_stream = progress if progress is not None else sys.stderr
    _check_arguments(docs_path, tokenizer_path, val_docs, shard_tokens, max_docs, max_train_shards)
    _check_policy(val_duplicates_policy, max_val_overlap_fraction)
    if chunk_docs < 1 or chunk_bytes < 1:
        raise PrepareError(f"chunk_docs and chunk_bytes: expected >= 1, got {chunk_docs} and {chunk_bytes}")
    workers = _resolve_workers(workers)

    # Refuse before writing anything: tokenizer problems, too few documents.
    from pgolf.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path, caseops=caseops)  # raises when CaseOps ids are not reserved
    if tokenizer.vocab_size > MAX_VOCAB_SIZE:
        raise PrepareError(
            f"{tokenizer_path}: vocab size {tokenizer.vocab_size} exceeds {MAX_VOCAB_SIZE} (uint16 shards)"
        )
    if tokenizer.bos_id != BOS_ID:
        raise PrepareError(f"{tokenizer_path}: bos id {tokenizer.bos_id}, shards require {BOS_ID}")
    available = _count_documents(docs_path, val_docs + 1)
    if available < val_docs:
        raise PrepareError(f"--val-docs {val_docs} but {docs_path} has {available} documents")
    if available == val_docs:
        raise PrepareError(f"--val-docs {val_docs} leaves no training documents: {docs_path} has {available}")

    reader = _DocsReader(docs_path)
    ticker = _Progress(None if max_docs or max_train_shards else reader.size_bytes, progress_stream)
    try:
        with atomic_dir(out_dir, MANIFEST_NAME) as tmp, _Runner(workers, tokenizer_path, caseops) as runner:
            writers = {
                "val": ShardStreamWriter(tmp, "val", shard_tokens),
                "train": ShardStreamWriter(tmp, "train", shard_tokens, max_shards=max_train_shards),
            }
            if caseops:
                writers["val_bytes"] = ShardStreamWriter(tmp, "val_bytes", shard_tokens)
            split = SplitStats(drop_train_copies=val_duplicates_policy == "drop_train_copies")
            for result in runner.map(reader.chunks(val_docs, max_docs, chunk_docs, chunk_bytes)):
                docs = split.add(result, writers)
                ticker.update(result, docs)
                if writers["train"].full:
                    split.train_complete = False
                    break
            for writer in writers.values():
                writer.close()
            split.finish(docs_path, val_duplicates_policy, max_val_overlap_fraction)
            manifest = shard_manifest(
                docs_path=docs_path,
                docs_sha256=reader.finish_sha256(),
                docs_bytes=reader.size_bytes,
                tokenizer=tokenizer,
                caseops=caseops,
                settings={
                    "val_docs": val_docs,
                    "shard_tokens": shard_tokens,
                    "max_docs": max_docs,
                    "max_train_shards": max_train_shards,
                    "val_duplicates_policy": val_duplicates_policy,
                    "max_val_overlap_fraction": max_val_overlap_fraction,
                },
                split=split,
                writers=writers,
            )
            atomic_write_json(tmp / MANIFEST_NAME, manifest)
            # how this preparation ran: a report beside the manifest that no hash covers (pgolf.io.TIMING_FIELDS),
            # so the manifest is identical for identical documents and tokenizer
            run = {
                "docs_path": str(docs_path),
                "workers": workers,
                "seconds": round(ticker.seconds, 3),
                "text_mb_per_second": round(ticker.mb_per_second(), 3),
                "train_docs_dropped": split.train_docs_dropped,  # also in the manifest (val_duplicates)
            }
            atomic_write_json(tmp / PREPARE_REPORT_NAME, {"format": "pgolf-prepare-report", "version": 1, **run})
    finally:
        reader.close()
    ticker.print(time.monotonic())
    summary = {
        "event": "prepare_done",
        "out_dir": str(out_dir),
        "val_docs": manifest["docs"]["val"],
        "train_docs": manifest["docs"]["train"],
        "val_tokens": manifest["tokens"]["val"],
        "train_tokens": manifest["tokens"]["train"],
        **run,
    }
    print(json.dumps(summary), file=progress_stream, flush=True)
    return manifest
