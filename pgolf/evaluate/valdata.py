"""The validation stream as the evaluator sees it: tokens, documents and the original bytes of every target.

The stream is the concatenation of ``fineweb_val_*.bin`` in index order. Documents are the BOS-delimited spans
(every document starts with BOS, id 1); shard files are not document boundaries. Which positions are TARGETS
(each scored exactly once, predicted from its own document's earlier tokens) is the set's ``score_next_bos``:

  - ``True`` (PR #1855, ``evaluate.score_next_bos: true``): every position but the first. Document d's targets are
    its tokens after its BOS AND the next document's BOS, predicted from d's last token (0 bytes): the record's
    ``_find_docs`` gives each document ``len = next start + 1 - start`` (its ``end += 1``), so
    ``score_ends[d] = doc_starts[d + 1] + 1`` and, for the last document, ``N``. ``token_count = N - 1``.
  - ``False`` (pgolf's own definition): every token after a document's BOS; a BOS is never predicted.
    ``score_ends = doc_ends`` and ``token_count = N - num_docs``.

Document d's targets are the positions ``doc_starts[d] + 1 .. score_ends[d] - 1``, whatever the definition.

Bytes (the bpb denominator) are attached to target positions:
  - ``sidecar``: ``fineweb_val_bytes_*.bin`` gives, per token, the ORIGINAL (pre-CaseOps) UTF-8 bytes it stands
    for. CaseOps data must use it: the transformed text is not the text being compressed.
  - ``lut``: the records' lookup table over the tokenizer's pieces (``pgolf.data.tokenizer.build_byte_lut``);
    the leading-space byte of a piece depends on the previous token, so it is computed over the stream.
The two agree on the full validation set to about 0.002 % (data spec), but a run reports which one it used.

Truncation (``evaluate.stream_truncation``): ``record`` keeps the first ``(N - 1) // L * L + 1`` tokens (and byte
counts), L = ``eval_seq_len``, as the record's ``load_validation_tokens`` does (the real stream: 47,851,521 of
47,853,343 tokens; the last document is cut); ``none`` keeps the whole stream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from pgolf.data.shards import BOS_ID, CASEOPS_OPERATOR_IDS, list_shards, read_header, read_shard, shard_index, shard_name
from pgolf.io import sha256_file

ByteAccounting = Literal["auto", "sidecar", "lut"]


class ValidationDataError(ValueError):
    """The validation shards, their byte sidecar or the tokenizer cannot give exact bpb; the message says why."""


@dataclasses.dataclass(frozen=True)
class ValidationSet:
    """The whole validation stream in memory (the record's is 48 M tokens: ~96 MB ids + ~190 MB byte counts)."""

    tokens: np.ndarray  # [N] uint16 token ids
    target_bytes: np.ndarray  # [N] int32: original bytes of the token at p when it is a target; 0 at every BOS
    doc_starts: np.ndarray  # [D] int64: position of each document's BOS
    doc_ends: np.ndarray  # [D] int64: one past each document's last token
    byte_accounting: str  # "sidecar" or "lut"
    source: dict  # where it came from: directory, files, token/byte fingerprints
    # whether the next document's BOS is a target of the document before it (module docstring)
    score_next_bos: bool = False
    # [D] int64: one past each document's last TARGET (derived from the above; see the module docstring)
    score_ends: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        ends = self.doc_ends
        if self.score_next_bos:
            ends = np.append(self.doc_starts[1:] + 1, self.num_positions).astype(np.int64)
        object.__setattr__(self, "score_ends", ends)

    @property
    def num_positions(self) -> int:
        return int(len(self.tokens))

    @property
    def num_docs(self) -> int:
        return int(len(self.doc_starts))

    @property
    def target_count(self) -> int:
        return self.num_positions - (1 if self.score_next_bos else self.num_docs)

    @property
    def byte_sum(self) -> int:
        return int(self.target_bytes.sum(dtype=np.int64))

    def target_mask(self) -> np.ndarray:
        """bool [N]: True at every position that is scored exactly once: all but the documents' BOS, or, with
        ``score_next_bos``, all but the first position."""
        mask = np.ones(self.num_positions, dtype=bool)
        mask[self.doc_starts[:1] if self.score_next_bos else self.doc_starts] = False
        return mask

    def doc_lengths(self) -> np.ndarray:
        """Tokens per document, BOS included: int64 [D]."""
        return self.doc_ends - self.doc_starts

    def doc_target_counts(self) -> np.ndarray:
        """Targets per document (its tokens after the BOS, plus the next BOS with ``score_next_bos``): int64 [D]."""
        return self.score_ends - self.doc_starts - 1


def from_tokens(
    tokens: np.ndarray,
    target_bytes: np.ndarray,
    byte_accounting: str = "sidecar",
    source: Optional[dict] = None,
    score_next_bos: bool = False,
) -> ValidationSet:
    """Build a :class:`ValidationSet` from in-memory arrays (tests, and the loader below).

    ``target_bytes`` [N] gives each token's byte count; entries at BOS positions must be 0 (a BOS stands for no
    text, whether or not it is a target: see ``score_next_bos`` in the module docstring).
    """
    tokens = np.ascontiguousarray(np.asarray(tokens), dtype=np.uint16)
    target_bytes = np.ascontiguousarray(np.asarray(target_bytes), dtype=np.int32)
    if tokens.ndim != 1 or target_bytes.shape != tokens.shape:
        raise ValidationDataError(f"tokens {tokens.shape} and target_bytes {target_bytes.shape} must be equal 1-D shapes")
    if len(tokens) == 0:
        raise ValidationDataError("the validation stream is empty")
    if tokens[0] != BOS_ID:
        raise ValidationDataError(f"the validation stream starts with id {int(tokens[0])}, expected BOS ({BOS_ID})")
    doc_starts = np.flatnonzero(tokens == BOS_ID).astype(np.int64)
    if int(target_bytes[doc_starts].max(initial=0)) != 0:
        bad = int(doc_starts[np.flatnonzero(target_bytes[doc_starts])[0]])
        raise ValidationDataError(
            f"byte counts are misaligned with the tokens: the BOS at position {bad} counts "
            f"{int(target_bytes[bad])} bytes (a BOS must count 0)"
        )
    if int(target_bytes.min(initial=0)) < 0:
        raise ValidationDataError("byte counts must be >= 0")
    doc_ends = np.append(doc_starts[1:], len(tokens)).astype(np.int64)
    return ValidationSet(tokens, target_bytes, doc_starts, doc_ends, byte_accounting, dict(source or {}), score_next_bos)


# --------------------------------------------------------------------------------------------------------------
# Byte accounting
# --------------------------------------------------------------------------------------------------------------


def lut_target_bytes(tokens: np.ndarray, tokenizer_path: str | Path) -> np.ndarray:
    """Bytes of every token as a target under the lookup-table accounting: int32 [N], 0 at BOS positions.

    Refuses a CaseOps tokenizer (ids 4-7 are the operators): its pieces spell the TRANSFORMED text, so only the
    sidecar gives original bytes.
    """
    from pgolf.data.caseops import OPERATORS
    from pgolf.data.tokenizer import PIECE_USER_DEFINED, build_byte_lut, load_tokenizer, lut_byte_counts

    tokenizer = load_tokenizer(tokenizer_path, caseops=False)
    operators = [(op, PIECE_USER_DEFINED) for op in OPERATORS]
    first = CASEOPS_OPERATOR_IDS[0]
    if tokenizer.pieces[first : first + len(operators)] == operators:
        raise ValidationDataError(
            f"{tokenizer_path}: this is a CaseOps tokenizer (ids 4-7 are the operators); its bytes must come from "
            "the fineweb_val_bytes_*.bin sidecar, not from a lookup table"
        )
    tokens = np.asarray(tokens)
    if len(tokens) and int(tokens.max()) >= tokenizer.vocab_size:
        raise ValidationDataError(
            f"{tokenizer_path}: the validation stream holds id {int(tokens.max())}, outside the tokenizer's "
            f"{tokenizer.vocab_size} pieces (wrong tokenizer for this data?)"
        )
    lut = build_byte_lut(tokenizer)
    out = np.zeros(len(tokens), dtype=np.int32)
    if len(tokens) > 1:
        out[1:] = lut_byte_counts(tokens[1:], tokens[:-1], lut)
    out[tokens == BOS_ID] = 0
    return out


def _concat(paths: list[Path]) -> np.ndarray:
    return np.concatenate([np.asarray(read_shard(p)) for p in paths]) if paths else np.zeros(0, dtype=np.uint16)


def _manifest(data_dir: Path) -> dict:
    """The data stage's manifest.json of ``data_dir`` ({} without one: an export)."""
    path = data_dir / "manifest.json"
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValidationDataError(f"{path}: not valid JSON ({exc})") from None
    return manifest if isinstance(manifest, dict) else {}


def _manifest_caseops(manifest: dict) -> Optional[bool]:
    value = manifest.get("caseops")
    return value if isinstance(value, bool) else None


def _check_shard_set(data_dir: Path, val_paths: list[Path], byte_paths: list[Path]) -> None:
    """The stream is the val shards in index order: refuse a gap (documents either side would be spliced) and a
    sidecar set that does not pair up with the val shards index for index, naming what is missing."""
    indices = [shard_index("val", p.name) for p in val_paths]
    missing = sorted(set(range(max(indices) + 1)) - set(indices))
    if missing:
        raise ValidationDataError(f"{data_dir}: {shard_name('val', missing[0])} is missing (the val shards must be "
                                  f"numbered 0..{len(indices) - 1 + len(missing)} without a gap; {len(missing)} missing)")
    if byte_paths:
        sidecars = {shard_index("val_bytes", p.name) for p in byte_paths}
        lacking = [i for i in indices if i not in sidecars]
        extra = sorted(sidecars - set(indices))
        if lacking or extra:
            what = (f"{shard_name('val', lacking[0])} has no {shard_name('val_bytes', lacking[0])}" if lacking
                    else f"{shard_name('val_bytes', extra[0])} has no {shard_name('val', extra[0])}")
            raise ValidationDataError(f"{data_dir}: {what} (expected one byte sidecar per val shard)")


def _check_manifest_totals(data_dir: Path, manifest: dict, tokens: np.ndarray) -> None:
    """The documents and tokens the data stage's manifest says the validation split holds."""
    found = {"tokens": len(tokens), "docs": int(np.count_nonzero(tokens == BOS_ID))}
    for key in ("tokens", "docs"):
        stated = manifest[key].get("val") if isinstance(manifest.get(key), dict) else None
        if isinstance(stated, int) and stated != found[key]:
            raise ValidationDataError(f"{data_dir}: the val shards hold {found[key]:,} {key}, manifest.json says "
                                      f"{key}.val = {stated:,}")


def resolve_accounting(requested: str, has_sidecar: bool, caseops: Optional[bool], tokenizer_path) -> str:
    """Which byte accounting a run uses; refuses the combinations that cannot give exact bpb."""
    if requested not in ("auto", "sidecar", "lut"):
        raise ValidationDataError(f"byte_accounting: expected auto, sidecar or lut, got {requested!r}")
    if caseops and not has_sidecar:
        raise ValidationDataError(
            "the data manifest says CaseOps but there is no fineweb_val_bytes_*.bin sidecar: CaseOps bytes can only "
            "come from the sidecar (re-run the data stage or download the export's byte files)"
        )
    if requested == "sidecar" and not has_sidecar:
        raise ValidationDataError("byte_accounting 'sidecar' requested but there are no fineweb_val_bytes_*.bin files")
    if requested == "lut" and caseops:
        raise ValidationDataError("byte_accounting 'lut' requested for CaseOps data: its bytes must come from the sidecar")
    chosen = requested if requested != "auto" else ("sidecar" if has_sidecar else "lut")
    if chosen == "lut" and tokenizer_path is None:
        raise ValidationDataError("lookup-table byte accounting (no byte sidecar) needs the tokenizer: pass --tokenizer")
    return chosen


def planned_accounting(data_dir: str | Path, requested: str, tokenizer_path, caseops: Optional[bool]) -> str:
    """:func:`resolve_accounting` for ``data_dir`` before any work: the accounting its evaluation will use, or the
    refusal it will make. ``caseops`` (the recipe's tokenizer.caseops) stands in for the manifest's when the shards
    come without one."""
    return _planned_accounting(Path(data_dir), requested, tokenizer_path, caseops, _manifest(Path(data_dir)))


def _planned_accounting(data_dir: Path, requested: str, tokenizer_path, caseops: Optional[bool], manifest: dict) -> str:
    if not list_shards(data_dir, "val"):
        raise FileNotFoundError(f"{data_dir}: no fineweb_val_*.bin shards")
    stated = _manifest_caseops(manifest)
    has_sidecar = bool(list_shards(data_dir, "val_bytes"))
    return resolve_accounting(requested, has_sidecar, caseops if stated is None else stated, tokenizer_path)


def load_validation(
    data_dir: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    byte_accounting: ByteAccounting = "auto",
    max_docs: int = 0,
    vocab_size: Optional[int] = None,
    score_next_bos: bool = False,
    truncate_multiple: int = 0,
) -> ValidationSet:
    """Read the validation shards (and byte sidecar) of ``data_dir``; ``max_docs`` > 0 keeps the first documents.

    ``score_next_bos``: the target definition; ``truncate_multiple`` > 0: keep ``(N - 1) // m * m + 1`` tokens
    (the record's truncation with m = eval_seq_len; applied before ``max_docs``). See the module docstring."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: data directory not found")
    manifest = _manifest(data_dir)
    accounting = _planned_accounting(data_dir, byte_accounting, tokenizer_path, None, manifest)  # the manifest says
    val_paths, byte_paths = list_shards(data_dir, "val"), list_shards(data_dir, "val_bytes")
    _check_shard_set(data_dir, val_paths, byte_paths)

    tokens = _concat(val_paths)
    _check_manifest_totals(data_dir, manifest, tokens)
    if len(tokens) == 0 or tokens[0] != BOS_ID:
        first = int(tokens[0]) if len(tokens) else None
        raise ValidationDataError(f"{val_paths[0]}: the validation stream starts with id {first}, expected BOS ({BOS_ID})")
    if vocab_size is not None and int(tokens.max()) >= vocab_size:
        raise ValidationDataError(f"{data_dir}: validation token id {int(tokens.max())} >= the model's vocab_size {vocab_size}")

    if accounting == "sidecar":
        if len(byte_paths) != len(val_paths):
            raise ValidationDataError(
                f"{data_dir}: {len(val_paths)} val shards but {len(byte_paths)} byte sidecar shards (expected one per shard)"
            )
        for vp, bp in zip(val_paths, byte_paths):
            if read_header(vp).num_tokens != read_header(bp).num_tokens:
                raise ValidationDataError(
                    f"{bp}: {read_header(bp).num_tokens} byte counts for {read_header(vp).num_tokens} tokens in {vp.name}"
                )
        target_bytes = _concat(byte_paths).astype(np.int32)
    else:
        stated = manifest["tokenizer"].get("sha256") if isinstance(manifest.get("tokenizer"), dict) else None
        actual = sha256_file(tokenizer_path) if isinstance(stated, str) else None
        if actual != stated:  # another tokenizer than the shards were made with: other bytes
            raise ValidationDataError(f"{tokenizer_path}: sha256 {actual[:16]}..., but "
                                      f"{data_dir / 'manifest.json'} says the shards were made with tokenizer "
                                      f"{stated[:16]}...: its pieces give the lookup table's bytes, so pass that one")
        target_bytes = lut_target_bytes(tokens, tokenizer_path)

    full_length = len(tokens)
    if truncate_multiple > 0:
        usable = (full_length - 1) // truncate_multiple * truncate_multiple
        if usable <= 0:
            raise ValidationDataError(f"{data_dir}: {full_length} validation tokens hold no whole window of "
                                      f"{truncate_multiple} (evaluate.stream_truncation: record needs more than that)")
        tokens, target_bytes = tokens[: usable + 1], target_bytes[: usable + 1]
    starts = np.flatnonzero(tokens == BOS_ID)
    total_docs = int(len(starts))  # the validation documents there are (max_docs may score fewer)
    if 0 < max_docs < total_docs:
        cut = int(starts[max_docs])
        tokens, target_bytes = tokens[:cut], target_bytes[:cut]
    source = {
        "data_dir": str(data_dir),
        "val_shards": [p.name for p in val_paths],
        "byte_shards": [p.name for p in byte_paths] if accounting == "sidecar" else [],
        "tokenizer": str(tokenizer_path) if accounting == "lut" else None,
        "max_docs": max_docs,
        "total_docs": total_docs,
        "score_next_bos": score_next_bos,
        "stream_tokens": full_length,  # before any truncation or max_docs cut
        "truncate_multiple": truncate_multiple,
        "tokens_sha256": hashlib.sha256(np.ascontiguousarray(tokens, dtype="<u2").tobytes()).hexdigest(),
        "bytes_sha256": hashlib.sha256(np.ascontiguousarray(target_bytes, dtype="<i4").tobytes()).hexdigest(),
    }
    try:
        return from_tokens(tokens, target_bytes, accounting, source, score_next_bos)
    except ValidationDataError as exc:
        raise ValidationDataError(f"{data_dir}: {exc}") from None
