"""The `.bin` shard format shared with the public parameter-golf exports, and streaming helpers around it.

A shard is a 1,024-byte header of 256 little-endian int32 (magic 20240520, version 1, token count, zeros)
followed by that many little-endian uint16 token ids. Three kinds live side by side in a data directory:
``fineweb_train_NNNNNN.bin``, ``fineweb_val_NNNNNN.bin`` and the CaseOps byte sidecar
``fineweb_val_bytes_NNNNNN.bin`` (same format, one original-byte count per token of the matching val shard).

Documents are ``[BOS] + tokens(doc)`` concatenated with no separator other than BOS, and shards are cut at
exactly ``shard_tokens``, so a document may continue into the next shard. Readers therefore split streams at
BOS, never at file boundaries (see :func:`iter_document_batches`).

Documents are identified by a 64-bit hash of their token ids (BOS excluded). Hashing tokens rather than text
makes the train/validation leak check work on exports downloaded without their source text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from pgolf.io import atomic_path

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")  # little-endian uint16 on every platform
MAX_TOKEN_ID = 65535
BOS_ID = 1
DEFAULT_SHARD_TOKENS = 100_000_000  # the canonical exporter's shard size
CASEOPS_OPERATOR_IDS = (4, 5, 6, 7)  # TITLE, ALLCAPS, CAPNEXT, ESC: reserved ids of CaseOps tokenizers

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "pgolf-shards"  # the `format` field of a manifest written by `pgolf data prepare`
MANIFEST_VERSION = 3  # 2: no timings (prepare_report.json) and the documents' file name, not path; 3: val_duplicates

# kind -> file name prefix; the index is appended as six digits
SHARD_PREFIXES = {
    "train": "fineweb_train_",
    "val": "fineweb_val_",
    "val_bytes": "fineweb_val_bytes_",
}
_NAME_PATTERNS = {kind: re.compile(re.escape(prefix) + r"(\d{6})\.bin") for kind, prefix in SHARD_PREFIXES.items()}


class ShardFormatError(ValueError):
    """A shard file does not follow the format (bad magic, version, count or size); the message names the file."""


@dataclasses.dataclass(frozen=True)
class ShardHeader:
    path: Path
    magic: int
    version: int
    num_tokens: int


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """What a manifest records about one written shard."""

    name: str
    kind: str
    tokens: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in SHARD_PREFIXES:
        raise ValueError(f"shard kind {kind!r}: expected one of {', '.join(SHARD_PREFIXES)}")


def shard_name(kind: str, index: int) -> str:
    """``shard_name("val", 3) == "fineweb_val_000003.bin"``."""
    _check_kind(kind)
    if not 0 <= index <= 999_999:
        raise ValueError(f"shard index {index}: expected 0..999999 (six digits)")
    return f"{SHARD_PREFIXES[kind]}{index:06d}.bin"


shard_names = shard_name  # the name used in the stage brief


def shard_index(kind: str, name: str) -> int | None:
    """The six-digit index of ``name`` if it is a shard file name of ``kind``, else None.

    Exact matching matters: ``fineweb_val_*.bin`` as a glob would also match the byte sidecar files.
    """
    _check_kind(kind)
    match = _NAME_PATTERNS[kind].fullmatch(name)
    return int(match.group(1)) if match else None


def list_shards(directory: str | Path, kind: str) -> list[Path]:
    """Shard files of ``kind`` in ``directory`` (not recursive), sorted by index."""
    directory = Path(directory)
    found = []
    for entry in os.scandir(directory):
        index = shard_index(kind, entry.name)
        if index is not None:
            found.append((index, directory / entry.name))
    return [path for _, path in sorted(found)]


# --------------------------------------------------------------------------------------------------------------
# Reading and writing single shards
# --------------------------------------------------------------------------------------------------------------


def encode_header(num_tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = num_tokens
    return header.tobytes()


def read_header(path: str | Path) -> ShardHeader:
    """Parse and validate the header of ``path`` against the file size; raise ShardFormatError naming the file."""
    path = Path(path)
    size_bytes = path.stat().st_size
    if size_bytes < HEADER_BYTES:
        raise ShardFormatError(f"{path}: size {size_bytes} bytes, smaller than the {HEADER_BYTES}-byte header")
    with open(path, "rb") as handle:
        header = np.frombuffer(handle.read(HEADER_BYTES), dtype="<i4")
    magic, version, num_tokens = (int(v) for v in header[:3])
    if magic != SHARD_MAGIC:
        raise ShardFormatError(f"{path}: magic {magic}, expected {SHARD_MAGIC} (not a shard file)")
    if version != SHARD_VERSION:
        raise ShardFormatError(f"{path}: version {version}, expected {SHARD_VERSION}")
    if num_tokens < 0:
        raise ShardFormatError(f"{path}: header says {num_tokens} tokens, expected >= 0")
    reserved = np.flatnonzero(header[3:])
    if reserved.size:  # data.md: "the rest zero" (a writer that puts something there is not this format)
        first = int(reserved[0]) + 3
        raise ShardFormatError(f"{path}: header int {first} is {int(header[first])}, expected 0 (ints 3..255 are "
                               f"reserved and zero; {reserved.size} are not)")
    expected_bytes = HEADER_BYTES + 2 * num_tokens
    if size_bytes != expected_bytes:
        raise ShardFormatError(
            f"{path}: size {size_bytes} bytes, header says {num_tokens} tokens -> expected {expected_bytes}"
        )
    return ShardHeader(path=path, magic=magic, version=version, num_tokens=num_tokens)


def read_shard(path: str | Path, mmap: bool = True) -> np.ndarray:
    """Token ids of a validated shard, shape [num_tokens], dtype little-endian uint16.

    With ``mmap`` (default) the array is a read-only memory map: pages are read on demand, so streaming over
    many 200 MB shards keeps memory flat.
    """
    header = read_header(path)
    if header.num_tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    if mmap:
        return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(header.num_tokens,))
    with open(path, "rb") as handle:
        handle.seek(HEADER_BYTES)
        return np.fromfile(handle, dtype=TOKEN_DTYPE, count=header.num_tokens)


def as_tokens(tokens: np.ndarray, what: str = "tokens") -> np.ndarray:
    """``tokens`` as a contiguous little-endian uint16 array; out-of-range or non-integer input is an error."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D array, got shape {tokens.shape}")
    if tokens.dtype == TOKEN_DTYPE:
        return np.ascontiguousarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{what}: expected integer token ids, got dtype {tokens.dtype}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > MAX_TOKEN_ID):
        raise ValueError(
            f"{what}: ids must lie in 0..{MAX_TOKEN_ID} for uint16 shards, got {int(tokens.min())}..{int(tokens.max())}"
        )
    return np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)


def write_shard(path: str | Path, tokens: np.ndarray, kind: str = "") -> ShardInfo:
    """Write ``tokens`` [n] as one shard, atomically (temp file + rename); return its manifest entry."""
    path = Path(path)
    body = as_tokens(tokens, what=str(path)).tobytes()
    header = encode_header(len(body) // 2)
    digest = hashlib.sha256(header)
    digest.update(body)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(header)
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
    return ShardInfo(
        name=path.name, kind=kind, tokens=len(body) // 2, bytes=len(header) + len(body), sha256=digest.hexdigest()
    )


class ShardStreamWriter:
    """Append token arrays of any length; every ``shard_tokens`` tokens become one shard file.

    Cuts fall at exactly ``shard_tokens`` regardless of document boundaries, as in the canonical exporter, so
    two writers fed the same lengths (val tokens and their byte sidecar) cut at the same places. With
    ``max_shards`` > 0 the writer stops after that many full shards and drops further input (check ``full``).
    The buffer is allocated once (``np.empty`` of ``shard_tokens``; the OS commits pages only when touched).
    """

    def __init__(self, out_dir: str | Path, kind: str, shard_tokens: int = DEFAULT_SHARD_TOKENS, max_shards: int = 0):
        _check_kind(kind)
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens: expected > 0, got {shard_tokens}")
        if max_shards < 0:
            raise ValueError(f"max_shards: expected >= 0 (0 = no cap), got {max_shards}")
        self.out_dir = Path(out_dir)
        self.kind = kind
        self.shard_tokens = shard_tokens
        self.max_shards = max_shards
        self.shards: list[ShardInfo] = []
        self.tokens_accepted = 0  # tokens taken so far (written or buffered); input past a cap is not counted
        self._buffer = np.empty(shard_tokens, dtype=TOKEN_DTYPE)
        self._filled = 0
        self._closed = False

    @property
    def full(self) -> bool:
        return self.max_shards > 0 and len(self.shards) >= self.max_shards

    @property
    def paths(self) -> list[Path]:
        return [self.out_dir / info.name for info in self.shards]

    def append(self, tokens: np.ndarray) -> list[Path]:
        """Buffer ``tokens`` [n]; return the paths of shards completed by this call (usually none)."""
        if self._closed:
            raise ValueError(f"{self.kind} shard writer: append after close")
        tokens = as_tokens(tokens, what=f"{self.kind} tokens")
        written: list[Path] = []
        offset = 0
        while offset < len(tokens) and not self.full:
            take = min(len(tokens) - offset, self.shard_tokens - self._filled)
            self._buffer[self._filled : self._filled + take] = tokens[offset : offset + take]
            self._filled += take
            offset += take
            self.tokens_accepted += take
            if self._filled == self.shard_tokens:
                written.append(self._flush())
        return written

    def _flush(self) -> Path:
        path = self.out_dir / shard_name(self.kind, len(self.shards))
        self.shards.append(write_shard(path, self._buffer[: self._filled], kind=self.kind))
        self._filled = 0
        return path

    def close(self) -> list[Path]:
        """Write the partial last shard (if any tokens are buffered) and return every written path."""
        if not self._closed:
            if self._filled and not self.full:
                self._flush()
            self._closed = True
            self._buffer = np.empty(0, dtype=TOKEN_DTYPE)
        return self.paths

    def __enter__(self) -> "ShardStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


# --------------------------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------------------------


def document_starts(tokens: np.ndarray, bos_id: int = BOS_ID) -> np.ndarray:
    """Indices of BOS in ``tokens`` [n] -> int64 [docs]."""
    return np.flatnonzero(np.asarray(tokens) == bos_id)


def iter_documents(tokens: np.ndarray, bos_id: int = BOS_ID) -> Iterator[np.ndarray]:
    """Split one in-memory stream [n] at BOS; each yielded view starts with BOS. A stream must start with BOS."""
    tokens = np.asarray(tokens)
    if len(tokens) == 0:
        return
    if tokens[0] != bos_id:
        raise ValueError(f"token stream starts with id {int(tokens[0])}, expected BOS ({bos_id})")
    starts = document_starts(tokens, bos_id)
    ends = np.append(starts[1:], len(tokens))
    for start, end in zip(starts.tolist(), ends.tolist()):
        yield tokens[start:end]


@dataclasses.dataclass
class DocumentBatch:
    """Complete documents ``tokens[starts[i]:ends[i]]`` (each starting with BOS) from a multi-shard stream.

    ``first_doc`` is the stream-wide index of the first document; ``path`` and ``offsets`` say where each
    document begins (file and token offset inside it), for error messages.
    """

    tokens: np.ndarray  # [n] uint16: a shard (memory map) or one document that spanned shards
    starts: np.ndarray  # [docs] int64
    ends: np.ndarray  # [docs] int64
    first_doc: int
    path: Path
    offsets: np.ndarray  # [docs] int64: token offset of each document's BOS inside ``path``

    def __len__(self) -> int:
        return len(self.starts)

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.starts[i] : self.ends[i]]


def iter_document_batches(paths: list[Path], bos_id: int = BOS_ID) -> Iterator[DocumentBatch]:
    """Stream the documents of consecutive shards in order, without loading more than one shard at a time.

    Each shard yields one batch of its documents except the last; that one may continue into the next shard,
    so it is carried over and yielded alone (a batch of one) once its end is known, before the next shard's
    batch. Memory: one memory-mapped shard plus the carried document. The stream must start with BOS;
    otherwise ValueError names the first file.
    """
    carry: list[np.ndarray] = []  # pieces of a document that crosses shard boundaries
    carry_path: Path | None = None
    carry_offset = 0
    doc_index = 0
    first = True
    for path in paths:
        tokens = read_shard(path)
        if len(tokens) == 0:
            continue
        starts = document_starts(tokens, bos_id)
        if first:
            if tokens[0] != bos_id:
                raise ValueError(f"{path}: stream starts with id {int(tokens[0])}, expected BOS ({bos_id})")
            first = False
        head_end = int(starts[0]) if len(starts) else len(tokens)
        if head_end:  # the carried document continues here
            carry.append(np.array(tokens[:head_end]))
        if carry and len(starts):
            doc = np.concatenate(carry)
            yield DocumentBatch(
                tokens=doc,
                starts=np.zeros(1, dtype=np.int64),
                ends=np.array([len(doc)], dtype=np.int64),
                first_doc=doc_index,
                path=carry_path,
                offsets=np.array([carry_offset], dtype=np.int64),
            )
            doc_index += 1
            carry = []
        if not len(starts):
            continue
        ends = np.append(starts[1:], len(tokens)).astype(np.int64)
        complete = len(starts) - 1  # the last document may continue into the next shard
        if complete:
            yield DocumentBatch(
                tokens=tokens,
                starts=starts[:complete],
                ends=ends[:complete],
                first_doc=doc_index,
                path=path,
                offsets=starts[:complete],
            )
        doc_index += complete
        carry = [np.array(tokens[starts[-1] :])]
        carry_path, carry_offset = path, int(starts[-1])
    if carry:
        doc = np.concatenate(carry)
        yield DocumentBatch(
            tokens=doc,
            starts=np.zeros(1, dtype=np.int64),
            ends=np.array([len(doc)], dtype=np.int64),
            first_doc=doc_index,
            path=carry_path,
            offsets=np.array([carry_offset], dtype=np.int64),
        )


def doc_hash(doc_ids: np.ndarray) -> int:
    """64-bit identity of a document: blake2b (8-byte digest) over its uint16 little-endian ids, BOS excluded.

    Read as a little-endian unsigned integer so hashes fit a numpy uint64 array (vectorized set membership).
    """
    data = memoryview(as_tokens(doc_ids)).cast("B")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def doc_hashes(tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Hashes of documents ``tokens[starts[i]:ends[i]]`` (each beginning with BOS, which is skipped) -> uint64."""
    out = np.empty(len(starts), dtype=np.uint64)
    for i, (start, end) in enumerate(zip(starts.tolist(), ends.tolist())):
        out[i] = doc_hash(tokens[start + 1 : end])
    return out


def hashes_fingerprint(hashes: np.ndarray) -> str:
    """sha256 over the sorted uint64 document hashes (little-endian bytes): a set identity independent of order."""
    return hashlib.sha256(np.sort(np.asarray(hashes, dtype=np.uint64)).astype("<u8").tobytes()).hexdigest()
