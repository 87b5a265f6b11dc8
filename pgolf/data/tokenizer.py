"""SentencePiece tokenizers: loading with checks, fast encoding with per-token original byte counts, training.

Byte counts are what bpb divides by, so they must match the published format exactly: for each token, the
number of ORIGINAL (pre-CaseOps) UTF-8 bytes its piece surface covers (the surface is the substring of the
transformed input that the piece came from). SentencePiece exposes surfaces only through per-piece Python
objects, which caps a tokenizer at ~1.5 MB/s. The fast path here gets the same numbers from two C++ calls:

1. ``encode`` -> token ids;
2. ``normalize(with_offsets=True)`` -> for every byte of the normalized text, the input byte it came from.

The pieces tile the normalized text, so a cumulative sum of each piece's normalized length gives piece
boundaries in normalized bytes; the offsets map them to input bytes, which is exactly how SentencePiece
computes surfaces (including the empty surfaces of all but the last byte-fallback piece of a character).
A cumulative sum of CaseOps byte weights then turns input byte spans into original byte counts.
:meth:`Tokenizer.encode_document_reference` computes the same from SentencePiece's own offsets; tests hold
the two equal, and the fast path falls back to it if a document ever breaks the tiling assumption.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from pgolf.data.caseops import OPERATORS as CASEOPS_OPERATORS
from pgolf.data.caseops import encode as caseops_encode
from pgolf.data.caseops import original_bytes_of_spans
from pgolf.data.caseops import utf8_byte_weights as caseops_byte_weights
from pgolf.io import atomic_write_bytes, sha256_bytes

# SentencePiece piece types (sentencepiece_model.proto, ModelProto.SentencePiece.Type).
PIECE_NORMAL = 1
PIECE_UNKNOWN = 2
PIECE_CONTROL = 3
PIECE_USER_DEFINED = 4
PIECE_UNUSED = 5
PIECE_BYTE = 6

BOS_ID = 1
CASEOPS_FIRST_ID = 4  # ids 4..7 = TITLE, ALLCAPS, CAPNEXT, ESC
MAX_UINT16 = np.iinfo(np.uint16).max
_SPACE_MARK = "\u2581"  # "▁": SentencePiece's visible space

# Canonical trainer settings (data spec): the published CaseOps tokenizer was trained with these.
CANONICAL_TRAINER_SETTINGS = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
}


class TokenizerError(ValueError):
    """A tokenizer model file is unusable for the pipeline (wrong special ids, missing reserved pieces...)."""


class ByteCountOverflowError(ValueError):
    """A token stands for more original bytes than a uint16 sidecar entry can hold."""


# --------------------------------------------------------------------------------------------------------------
# Minimal protobuf wire-format reading of the .model file (no `protobuf` dependency)
# --------------------------------------------------------------------------------------------------------------


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _iter_fields(data: bytes) -> Iterator[tuple[int, int, int | bytes, int, int]]:
    """Top-level fields of a serialized protobuf message: (number, wire type, value, start, end)."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:  # varint
            value, pos = _read_varint(data, pos)
        elif wire_type == 1:  # 64-bit
            value, pos = data[pos : pos + 8], pos + 8
        elif wire_type == 2:  # length-delimited
            length, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire_type == 5:  # 32-bit
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if pos > len(data):
            raise ValueError("truncated field")
        yield number, wire_type, value, start, pos


def read_model_pieces(model: bytes) -> list[tuple[str, int]]:
    """(piece, type) for every id of a serialized SentencePiece ModelProto (field 1: pieces; 1: piece, 3: type)."""
    pieces = []
    for number, wire_type, value, _, _ in _iter_fields(model):
        if number == 1 and wire_type == 2:
            piece, piece_type = "", PIECE_NORMAL
            for sub_number, sub_wire, sub_value, _, _ in _iter_fields(value):
                if sub_number == 1 and sub_wire == 2:
                    piece = sub_value.decode("utf-8")
                elif sub_number == 3 and sub_wire == 0:
                    piece_type = sub_value
            pieces.append((piece, piece_type))
    return pieces


def _without_trainer_num_threads(model: bytes) -> bytes:
    """The model with TrainerSpec.num_threads (field 2 -> field 16) removed.

    The thread count changes no piece, but SentencePiece records it in the model, so the same data and settings
    would give files with different sha256 on machines with different core counts. Dropping it makes the
    model bytes a function of data and settings only.
    """
    out = bytearray()
    for number, wire_type, value, start, end in _iter_fields(model):
        if number == 2 and wire_type == 2:
            spec = b"".join(
                value[s:e] for n, w, _, s, e in _iter_fields(value) if not (n == 16 and w == 0)
            )
            out += model[start : start + 1] + _encode_varint(len(spec)) + spec  # key 0x12 is one byte
        else:
            out += model[start:end]
    return bytes(out)


# --------------------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------------------


class Tokenizer:
    """A loaded SentencePiece model plus what the data stage needs: CaseOps flag, hash and per-id tables.

    ``pieces[i]`` is ``(piece, type)`` of id ``i`` (types: the ``PIECE_*`` constants). Ids fit uint16 (checked).
    """

    def __init__(self, model: bytes, path: Path, caseops: bool):
        self.path = Path(path)
        self.caseops = caseops
        self._sha256 = sha256_bytes(model)
        self._processor = spm.SentencePieceProcessor()
        try:
            self._processor.LoadFromSerializedProto(model)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError subclasses depending on version
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({exc})") from None
        _check_sentencepiece_api(self._processor)
        self.pieces = read_model_pieces(model)
        if len(self.pieces) != self._processor.get_piece_size():
            raise TokenizerError(f"{self.path}: could not read the piece table of the model")
        self._check()
        types = np.array([piece_type for _, piece_type in self.pieces], dtype=np.int8)  # [vocab]
        # Length of each piece in the normalized text: byte pieces 1 byte, others their UTF-8 length
        # ("▁" included, it is how the normalized text spells a space). Unknown/control: not tileable (-1).
        normalized_bytes = np.array([len(piece.encode("utf-8")) for piece, _ in self.pieces], dtype=np.int64)
        normalized_bytes[types == PIECE_BYTE] = 1
        normalized_bytes[(types == PIECE_UNKNOWN) | (types == PIECE_CONTROL) | (types == PIECE_UNUSED)] = -1
        self._normalized_bytes = normalized_bytes  # [vocab]
        self._piece_types = types

    def _check(self) -> None:
        vocab_size = self._processor.get_piece_size()
        if vocab_size > MAX_UINT16 + 1:
            raise TokenizerError(f"{self.path}: vocab size {vocab_size} does not fit uint16 shards (max 65536)")
        if self._processor.bos_id() != BOS_ID:
            raise TokenizerError(f"{self.path}: bos id is {self._processor.bos_id()}, expected {BOS_ID}")
        if self.caseops:
            expected = [(op, PIECE_USER_DEFINED) for op in CASEOPS_OPERATORS]
            found = self.pieces[CASEOPS_FIRST_ID : CASEOPS_FIRST_ID + len(expected)]
            if found != expected:
                raise TokenizerError(
                    f"{self.path}: a CaseOps tokenizer must reserve ids 4-7 as the user-defined pieces "
                    f"U+E001..U+E004 (TITLE, ALLCAPS, CAPNEXT, ESC); found {found!r}. "
                    "Train one with `pgolf tokenizer train` or load it with caseops=False."
                )

    # ------------------------------------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._processor.bos_id()

    @property
    def sha256(self) -> str:
        """sha256 of the model file's bytes."""
        return self._sha256

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        return self._processor

    def piece_type(self, token_id: int) -> int:
        return int(self._piece_types[token_id])

    # --------------------------------------------------------------------------------------------- encoding

    def transform(self, text: str) -> str:
        """The text SentencePiece sees: CaseOps-encoded when this is a CaseOps tokenizer."""
        return caseops_encode(text) if self.caseops else text

    def _span_bytes(self, transformed: str, data: bytes, byte_boundaries: np.ndarray) -> np.ndarray:
        """Original bytes of consecutive input byte spans: int64 [n] for boundaries [n + 1]."""
        if self.caseops:
            return original_bytes_of_spans(transformed, byte_boundaries, data)
        return byte_boundaries[1:] - byte_boundaries[:-1]

    def encode_document(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (uint16 [n], no BOS) and the original UTF-8 bytes of each token (uint16 [n])."""
        transformed = self.transform(text)
        data = transformed.encode("utf-8")
        ids = np.asarray(self._processor.encode(data, out_type="numpy"), dtype=np.int64)  # [n_tokens]
        return self._finish(transformed, data, ids)

    def encode_documents(self, texts: list[str], num_threads: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`encode_document` for many texts; the BPE step runs in SentencePiece's C++ threads."""
        transformed = [self.transform(text) for text in texts]
        data = [t.encode("utf-8") for t in transformed]
        all_ids = self._processor.encode(data, out_type="numpy", num_threads=num_threads)
        return [
            self._finish(t, d, np.asarray(ids, dtype=np.int64)) for t, d, ids in zip(transformed, data, all_ids)
        ]

    def _finish(self, transformed: str, data: bytes, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(ids) == 0:
            return np.zeros(0, dtype=np.uint16), np.zeros(0, dtype=np.uint16)
        normalized, offsets = self._processor.normalize(data, with_offsets=True)
        piece_bytes = self._normalized_bytes[ids]  # [n_tokens]
        boundaries = np.zeros(len(ids) + 1, dtype=np.int64)  # [n_tokens + 1], in normalized bytes
        np.cumsum(piece_bytes, out=boundaries[1:])
        if piece_bytes.min() < 0 or boundaries[-1] != len(normalized):
            # An unknown piece (no byte fallback) has no fixed length: take SentencePiece's own offsets.
            ids, counts, _ = self.encode_document_reference(transformed, already_transformed=True)
            return ids, counts
        input_offsets = np.fromiter(offsets, dtype=np.int64, count=len(offsets))[boundaries]  # [n_tokens + 1]
        counts = self._span_bytes(transformed, data, input_offsets)  # [n_tokens]
        return ids.astype(np.uint16), _as_uint16_counts(counts, transformed)

    def encode_document_reference(
        self, text: str, already_transformed: bool = False
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Slow, obviously-correct path: ids, byte counts and piece surfaces from SentencePiece's own offsets."""
        transformed = text if already_transformed else self.transform(text)
        data = transformed.encode("utf-8")
        result = self._processor.encode(data, out_type="offset_mapping", return_bytes=True)
        ids = np.asarray(result["ids"], dtype=np.int64)
        spans = np.asarray(result["offsets"], dtype=np.int64).reshape(-1, 2)  # [n_tokens, 2] input bytes
        # Independent of the fast path on purpose: a cumulative sum of per-byte weights, read at each span.
        cumulative = np.zeros(len(data) + 1, dtype=np.int64)  # [n_bytes + 1]
        weights = caseops_byte_weights(transformed, data) if self.caseops else np.ones(len(data), dtype=np.int64)
        np.cumsum(weights, out=cumulative[1:])
        counts = cumulative[spans[:, 1]] - cumulative[spans[:, 0]]
        surfaces = [data[begin:end].decode("utf-8") for begin, end in spans.tolist()]
        return ids.astype(np.uint16), _as_uint16_counts(counts, transformed), surfaces

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text (normalized: not the original text; CaseOps operators are left in)."""
        return self._processor.decode([int(i) for i in ids])


def _check_sentencepiece_api(processor: spm.SentencePieceProcessor) -> None:
    """The fast path needs numpy ids, byte-offset normalization and offset mappings (sentencepiece >= 0.2.2)."""
    try:
        processor.encode(b"a", out_type="numpy")
        processor.normalize(b"a", with_offsets=True)
        processor.encode(b"a", out_type="offset_mapping", return_bytes=True)
    except (TypeError, ValueError, AttributeError) as exc:
        raise TokenizerError(
            f"sentencepiece {getattr(spm, '__version__', '?')} lacks an API this pipeline needs ({exc}); "
            "install sentencepiece >= 0.2.2"
        ) from None


def _as_uint16_counts(counts: np.ndarray, text: str) -> np.ndarray:
    if len(counts) and counts.max() > MAX_UINT16:
        index = int(counts.argmax())
        raise ByteCountOverflowError(
            f"token {index} of a document stands for {int(counts[index])} original bytes, more than a uint16 "
            f"sidecar entry holds ({MAX_UINT16}); document starts {text[:80]!r}"
        )
    return counts.astype(np.uint16)


def load_tokenizer(path: str | Path, caseops: bool) -> Tokenizer:
    """Load a SentencePiece ``.model`` file; ``caseops=True`` requires the reserved operator ids 4-7."""
    path = Path(path)
    try:
        model = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: tokenizer model not found") from None
    return Tokenizer(model, path, caseops)


# --------------------------------------------------------------------------------------------------------------
# Lookup-table byte accounting (non-CaseOps tokenizers)
# --------------------------------------------------------------------------------------------------------------


def build_byte_lut(tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-id tables for the records' lookup-table byte accounting of non-CaseOps tokenizers.

    Returns ``base_bytes`` (int16 [vocab]: UTF-8 length of the piece without its leading "▁"; byte-fallback
    pieces 1; control, unknown and unused pieces 0), ``has_leading_space`` (bool [vocab]) and ``is_boundary``
    (bool [vocab]: control/unknown/unused ids, after which a leading "▁" is not a byte of the text). The leading
    space is counted once, in :func:`lut_byte_counts` - the variant that added it to ``base_bytes`` too
    inflated bytes by ~17 %.
    """
    if tokenizer.caseops:
        raise TokenizerError(
            f"{tokenizer.path}: CaseOps tokens take their byte counts from the sidecar, not from a lookup table"
        )
    vocab_size = tokenizer.vocab_size
    base_bytes = np.zeros(vocab_size, dtype=np.int16)
    has_leading_space = np.zeros(vocab_size, dtype=bool)
    is_boundary = np.zeros(vocab_size, dtype=bool)
    for token_id, (piece, piece_type) in enumerate(tokenizer.pieces):
        if piece_type in (PIECE_CONTROL, PIECE_UNKNOWN, PIECE_UNUSED):
            is_boundary[token_id] = True
        elif piece_type == PIECE_BYTE:
            base_bytes[token_id] = 1
        else:
            if piece.startswith(_SPACE_MARK):
                has_leading_space[token_id] = True
                piece = piece[1:]
            # Inside a piece "▁" stands for one space byte.
            base_bytes[token_id] = len(piece.replace(_SPACE_MARK, " ").encode("utf-8"))
    return base_bytes, has_leading_space, is_boundary


def lut_byte_counts(
    ids: np.ndarray, prev_ids: np.ndarray, lut: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> np.ndarray:
    """Bytes of each target token (int32, same shape as ``ids``) given the token before it (``prev_ids``)."""
    base_bytes, has_leading_space, is_boundary = lut
    ids = np.asarray(ids, dtype=np.int64)
    prev_ids = np.asarray(prev_ids, dtype=np.int64)
    if ids.shape != prev_ids.shape:
        raise ValueError(f"ids shape {ids.shape} != prev_ids shape {prev_ids.shape}")
    space = has_leading_space[ids] & ~is_boundary[prev_ids]
    return base_bytes[ids].astype(np.int32) + space.astype(np.int32)


# --------------------------------------------------------------------------------------------------------------
# Documents and training
# --------------------------------------------------------------------------------------------------------------


def iter_jsonl_texts(path: str | Path, skip: int = 0, limit: int = 0) -> Iterator[str]:
    """The ``"text"`` of each line of a JSONL file, after skipping ``skip`` lines, at most ``limit`` (0 = all).

    Every line is one document (a blank line is an error, not a skipped line: document indices define the
    validation split). Skipped lines are not parsed.
    """
    if skip < 0 or limit < 0:
        raise ValueError(f"skip and limit must be >= 0, got skip={skip}, limit={limit}")
    path = Path(path)
    yielded = 0
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: documents file not found") from None
    with handle:
        for line_number, line in enumerate(handle, start=1):
            if line_number <= skip:
                continue
            if limit and yielded >= limit:
                return
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({exc})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{line_number}: expected a string field 'text'")
            try:  # valid JSON may still hold a lone surrogate ("\ud800"), which no UTF-8 consumer takes
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"{path}:{line_number}: 'text' is not valid Unicode ({exc})") from None
            yielded += 1
            yield text


def _training_sentences(texts: Iterable[str], caseops_transform: bool, max_sentence_chars: int) -> Iterator[str]:
    """Texts as the trainer sees them: CaseOps-encoded, cut into pieces of at most ``max_sentence_chars``.

    SentencePiece silently drops sentences longer than its limit; cutting (at the last whitespace of the
    window when there is one) keeps all of a long document's text in the training sample.
    """
    for text in texts:
        if caseops_transform:
            text = caseops_encode(text)
        while len(text) > max_sentence_chars:
            window = text[:max_sentence_chars]
            cut = max(window.rfind(" "), window.rfind("\n"))
            cut = cut if cut > max_sentence_chars // 2 else max_sentence_chars
            yield text[:cut]
            text = text[cut:]
        if text:
            yield text


def train_tokenizer(
    texts: Iterable[str],
    out_path: str | Path,
    vocab_size: int,
    caseops: bool = True,
    max_sentence_chars: int = 16384,
    num_threads: int | None = None,
) -> Path:
    """Train a SentencePiece BPE model with the canonical settings and write it atomically to ``out_path``.

    With ``caseops`` the texts are CaseOps-encoded first and the four operators are reserved as user-defined
    pieces, which puts them at ids 4-7 (after pad/bos/eos/unk). The output is deterministic: same texts and
    settings give the same bytes whatever ``num_threads`` is (the thread count is not written to the model).
    """
    out_path = Path(out_path)
    reserved = 4 + (len(CASEOPS_OPERATORS) if caseops else 0) + 256  # special, operator and byte pieces
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size must exceed the {reserved} reserved pieces, got {vocab_size}")
    if max_sentence_chars < 1:
        raise ValueError(f"max_sentence_chars must be >= 1, got {max_sentence_chars}")
    settings = dict(CANONICAL_TRAINER_SETTINGS)
    settings.update(
        vocab_size=vocab_size,
        # bytes: a character is at most 4 UTF-8 bytes, so no cut sentence is dropped
        max_sentence_length=4 * max_sentence_chars,
        num_threads=num_threads or os.cpu_count() or 1,
    )
    if caseops:
        settings["user_defined_symbols"] = list(CASEOPS_OPERATORS)
    sentences = _training_sentences(texts, caseops, max_sentence_chars)
    counted = _CountingIterator(sentences)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=counted, model_writer=buffer, **settings)
    except RuntimeError as exc:
        if counted.count == 0:
            raise ValueError(f"{out_path}: no training text (the documents iterator was empty)") from None
        raise TokenizerError(f"{out_path}: SentencePiece training failed: {exc}") from None
    if counted.count == 0:
        raise ValueError(f"{out_path}: no training text (the documents iterator was empty)")
    model = _without_trainer_num_threads(buffer.getvalue())
    tokenizer = Tokenizer(model, out_path, caseops)  # the same checks as loading it later
    if tokenizer.vocab_size != vocab_size:
        raise TokenizerError(f"{out_path}: trained {tokenizer.vocab_size} pieces, asked for {vocab_size}")
    atomic_write_bytes(out_path, model)
    return out_path


class _CountingIterator:
    def __init__(self, iterable: Iterable[str]):
        self._iterator = iter(iterable)
        self.count = 0

    def __iter__(self) -> "_CountingIterator":
        return self

    def __next__(self) -> str:
        item = next(self._iterator)
        self.count += 1
        return item


def train_tokenizer_from_jsonl(
    docs_path: str | Path,
    out_path: str | Path,
    vocab_size: int,
    caseops: bool,
    skip_docs: int = 0,
    max_docs: int = 0,
    max_sentence_chars: int = 16384,
) -> Path:
    """Train on the ``"text"`` of a JSONL file, skipping the first ``skip_docs`` (the validation split, so the
    tokenizer never sees validation text) and reading at most ``max_docs`` (0 = all); texts are cut into pieces of
    at most ``max_sentence_chars`` (tokenizer.train_max_sentence_chars).

    A training document whose text equals a validation document's is left out too, as the data stage leaves its
    copy out of the training shards. That stage compares token ids, which need this very tokenizer, so texts are
    compared here after SentencePiece's own normalizer (the trainer's rule: NFKC, control and zero-width characters
    removed, runs of whitespace as one space): texts that differ only there give the same ids, and neither may
    train the tokenizer."""
    normalizer = spm.SentencePieceNormalizer(rule_name=CANONICAL_TRAINER_SETTINGS["normalization_rule_name"])

    def digest(text: str) -> bytes:
        return hashlib.blake2b(normalizer.Normalize(text).encode("utf-8"), digest_size=16).digest()

    validation = {digest(text) for text in iter_jsonl_texts(docs_path, limit=skip_docs)} if skip_docs else set()
    copies = 0

    def training_texts() -> Iterator[str]:
        nonlocal copies
        for text in iter_jsonl_texts(docs_path, skip=skip_docs, limit=max_docs):
            if validation and digest(text) in validation:
                copies += 1
                continue
            yield text

    model = train_tokenizer(training_texts(), out_path, vocab_size=vocab_size, caseops=caseops,
                            max_sentence_chars=max_sentence_chars)
    if copies:
        print(f"tokenizer: left out {copies} training document(s) equal to a validation document", flush=True)
    return model
