"""The split's bookkeeping for pgolf.data.prepare: each tokenized chunk written to the validation or training
shards under the duplicates policy (a training copy of a validation document dropped or refused), the running
totals, and the manifest they end in. The main process alone runs this, in chunk order."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pgolf.config.training import val_overlap_limit
from pgolf.data.shards import (
    BOS_ID,
    CASEOPS_OPERATOR_IDS,
    HEADER_INTS,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    SHARD_MAGIC,
    SHARD_VERSION,
    ShardStreamWriter,
    hashes_fingerprint,
)


class PrepareError(ValueError):
    """The inputs cannot produce a valid shard directory (bad documents, bad arguments, a train/val leak)."""


def keep_documents(tokens: np.ndarray, lengths: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The tokens [n] of a chunk without its documents [docs] whose ``keep`` is False."""
    owner = np.repeat(np.arange(len(lengths)), lengths)  # [n] the document each token belongs to
    return tokens[keep[owner]]


@dataclasses.dataclass
class SplitStats:
    """Running totals of the main process, and the validation hashes for the duplicate check."""

    drop_train_copies: bool = True  # val_duplicates_policy == "drop_train_copies"
    val_docs: int = 0
    train_docs: int = 0  # written to the training shards
    source_train_docs: int = 0  # read from the training part of the documents (written or dropped)
    train_docs_dropped: int = 0  # training documents equal to a validation document, not written
    val_hash_parts: list = dataclasses.field(default_factory=list)
    val_hash_set: np.ndarray | None = None  # sorted unique, built when the first train chunk arrives
    overlap_hashes: set = dataclasses.field(default_factory=set)  # validation docs with a copy in training
    first_leak: str = ""  # a format string with {path}
    train_complete: bool = True
    val_bytes: int = 0
    text_bytes: dict = dataclasses.field(default_factory=lambda: {"val": 0, "train": 0})

    def add(self, result, writers: dict[str, ShardStreamWriter]) -> int:
        """Write one tokenized chunk (``pgolf.data.prepare._Encoded``); return the number of its documents that
        made it into the shards."""
        if result.split == "val":
            self.text_bytes["val"] += result.text_bytes
            writers["val"].append(result.tokens)
            if "val_bytes" in writers:
                writers["val_bytes"].append(result.byte_counts)
                self.val_bytes += int(result.byte_counts.sum(dtype=np.int64))
            self.val_hash_parts.append(result.doc_hashes)
            self.val_docs += len(result.doc_lengths)
            return len(result.doc_lengths)
        if self.val_hash_set is None:
            self.val_hash_set = np.unique(np.concatenate(self.val_hash_parts))
        copies = np.isin(result.doc_hashes, self.val_hash_set)  # [docs] equal to some validation document
        keep = ~copies if self.drop_train_copies else np.ones_like(copies)
        tokens = keep_documents(result.tokens, result.doc_lengths, keep) if not keep.all() else result.tokens
        writer = writers["train"]
        before = writer.tokens_accepted
        writer.append(tokens)
        accepted = writer.tokens_accepted - before
        # where each document starts in the written stream (a dropped one: where it would have been); the shard
        # cap may cut the chunk, and documents past the cut were never read as far as the output is concerned
        kept_lengths = np.where(keep, result.doc_lengths, 0)
        starts = np.cumsum(kept_lengths) - kept_lengths
        # a full writer read up to `accepted`, however the input was cut into chunks: a dropped copy right at the
        # cut is past it (it would be were it the next chunk's first document)
        reached = starts < accepted if writer.full else np.ones_like(keep)
        hits = np.flatnonzero(reached & copies)
        if len(hits):
            if not self.first_leak:
                line = result.first_line + int(hits[0])
                self.first_leak = f"first at train doc {self.source_train_docs + int(hits[0])} ({{path}}:{line})"
            self.overlap_hashes.update(result.doc_hashes[hits].tolist())
            if self.drop_train_copies:
                self.train_docs_dropped += len(hits)
        docs = int(np.count_nonzero(reached & keep))
        self.text_bytes["train"] += int(result.doc_text_bytes[reached & keep].sum())  # what was written, as docs
        self.train_docs += docs
        self.source_train_docs += int(np.count_nonzero(reached))
        return docs

    @property
    def val_hashes(self) -> np.ndarray:
        return np.concatenate(self.val_hash_parts) if self.val_hash_parts else np.zeros(0, dtype=np.uint64)

    @property
    def written_overlap_docs(self) -> int:
        """Validation documents with a copy in the written training shards."""
        return 0 if self.drop_train_copies else len(self.overlap_hashes)

    def finish(self, docs_path: Path, policy: str, max_fraction: float) -> None:
        overlap = len(self.overlap_hashes)
        limit = val_overlap_limit(self.val_docs, max_fraction)
        where = self.first_leak.format(path=docs_path)
        if overlap > limit:
            raise PrepareError(
                f"leak: {overlap} of {self.val_docs} validation documents ({overlap / max(self.val_docs, 1):.1%}) "
                f"also occur in the training split, more than max_val_overlap_fraction {max_fraction} allows "
                f"({limit}) under any val_duplicates_policy: the split itself is wrong (validation documents taken "
                f"from the training pool, or a validation cut smaller than the published one?); {where}"
            )
        if overlap and policy == "refuse":
            raise PrepareError(f"leak: {overlap} validation documents also occur in the training split, {where}")
        if self.train_docs == 0:
            raise PrepareError(f"{docs_path}: no training documents were written")


def shard_manifest(
    *,
    docs_path,
    docs_sha256,
    docs_bytes,
    tokenizer,
    caseops,
    settings,
    split: SplitStats,
    writers: dict[str, ShardStreamWriter],
) -> dict:
    files = [
        info.to_dict() for kind in ("val", "val_bytes", "train") if kind in writers for info in writers[kind].shards
    ]
    val_hashes = split.val_hashes
    tokens = {kind: sum(info.tokens for info in writers[kind].shards) for kind in ("val", "train")}
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "shard_format": {
            "magic": SHARD_MAGIC,
            "version": SHARD_VERSION,
            "header_ints": HEADER_INTS,
            "dtype": "uint16 little-endian",
            "bos_id": BOS_ID,
        },
        # the file's name, not its path: the same documents read from another folder give the same manifest
        "source": {"docs_name": Path(docs_path).name, "docs_sha256": docs_sha256, "docs_bytes": docs_bytes},
        "tokenizer": {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id},
        "caseops": caseops,
        "caseops_operator_ids": list(CASEOPS_OPERATOR_IDS) if caseops else [],
        "settings": settings,
        "docs": {"val": split.val_docs, "train": split.train_docs},
        "tokens": tokens,
        "bos": {"val": split.val_docs, "train": split.train_docs},  # one BOS per document, by construction
        "text_bytes": dict(split.text_bytes),
        # False when the max_train_shards cap stopped reading (documents may have been left unread)
        "train_complete": split.train_complete,
        "files": files,
        "fingerprints": {
            "doc_hash": "blake2b, 8-byte digest, over the document's uint16 little-endian token ids (BOS excluded)",
            "val_doc_hash_count": int(len(val_hashes)),
            "val_doc_hashes_sha256": hashes_fingerprint(val_hashes),
            "val_duplicate_docs": int(len(val_hashes) - len(np.unique(val_hashes))),
            "train_val_overlap_docs": split.written_overlap_docs,  # in the written shards: 0
        },
        # exact duplicates across the split in the documents (settings.val_duplicates_policy says what was done)
        "val_duplicates": {
            "val_docs_with_train_copies": len(split.overlap_hashes),  # distinct validation documents
            "train_docs_dropped": split.train_docs_dropped,  # training documents not written
        },
    }
    if "val_bytes" in writers:
        manifest["val_bytes"] = split.val_bytes  # original UTF-8 bytes of the validation set (bpb denominator)
    return manifest
