"""Helpers shared by the shard, prepare and verify tests: a small mixed-case corpus and hand-built shard dirs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from pgolf.data.shards import BOS_ID, ShardStreamWriter

from datafiles import CASEOPS_VECTORS as GOLDEN_VECTORS  # noqa: F401
from datafiles import CONFORMANCE_DIR, SAMPLE_DOCS  # noqa: F401
from datafiles import PUBLISHED_TOKENIZER as PUBLISHED_MODEL


def published_model() -> Path:
    """The published CaseOps tokenizer (shipped in tests/data/conformance/)."""
    return PUBLISHED_MODEL


_WORDS = (
    "the quick Brown fox JUMPS over a lazy dog while NASA and OpenAI watch the iPhone of McDonald's "
    "café naïve Zürich straße ÉCOLE I am A cat of 2024 numbers 123ABC and snake_case_Name in CamelCase"
).split()


def corpus_texts(n_docs: int, seed: int = 0) -> list[str]:
    """``n_docs`` distinct mixed-case documents (no leading/trailing whitespace, nothing the normalizer alters).

    Each starts with its index, so no two are equal (equal documents across the split would be a leak).
    """
    rng = random.Random(seed)
    texts = []
    for i in range(n_docs):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(1, 40))]
        texts.append(f"Document {i}: " + " ".join(words) + rng.choice([".", "!", " OK.", " end"]))
    return texts


def write_jsonl(path: Path, texts: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text, "id": len(text)}, ensure_ascii=False) + "\n")
    return path


def random_docs(n_docs: int, seed: int, max_len: int = 30) -> list[np.ndarray]:
    """Distinct documents ``[BOS] + ids`` with ids in 8..8191 (no BOS, no CaseOps operator ids)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        body = rng.integers(8, 8192, size=int(rng.integers(1, max_len)))
        body[0] = 8 + i  # distinct first token: distinct documents
        docs.append(np.concatenate([[BOS_ID], body]).astype(np.uint16))
    return docs


def write_stream(directory: Path, kind: str, arrays: list[np.ndarray], shard_tokens: int) -> list[Path]:
    """Concatenate ``arrays`` and cut them into shards of ``kind`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    with ShardStreamWriter(directory, kind, shard_tokens) as writer:
        for array in arrays:
            writer.append(array)
    return writer.paths


def build_dir(directory: Path, n_val: int = 40, n_train: int = 60, shard_tokens: int = 97, sidecar: bool = True):
    """A manifest-less shard directory (as a Hub export looks): val/train docs and a plausible byte sidecar.

    Returns (val_docs, train_docs) as lists of arrays.
    """
    val = random_docs(n_val, seed=1)
    train = random_docs(n_train, seed=2)
    for doc in train:
        doc[1] += 4000  # train docs differ from val docs
    write_stream(directory, "val", val, shard_tokens)
    write_stream(directory, "train", train, shard_tokens)
    if sidecar:
        counts = [np.where(doc == BOS_ID, 0, 1 + doc % 5).astype(np.uint16) for doc in val]
        write_stream(directory, "val_bytes", counts, shard_tokens)
    return val, train
