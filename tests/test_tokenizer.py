"""Tokenizer: published vectors, fast path == SentencePiece's own offsets, load checks, training, LUT bytes."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from datafiles import CASEOPS_VECTORS, PUBLISHED_TOKENIZER, SAMPLE_DOCS

from pgolf.data import caseops
from pgolf.data import tokenizer as tok
from pgolf.io import sha256_file
from pgolf.data.tokenizer import (
    PIECE_BYTE,
    PIECE_USER_DEFINED,
    ByteCountOverflowError,
    TokenizerError,
    build_byte_lut,
    iter_jsonl_texts,
    load_tokenizer,
    lut_byte_counts,
    train_tokenizer,
    train_tokenizer_from_jsonl,
)

VECTORS_PATH = CASEOPS_VECTORS
TRAIN_DOCS = 400  # of the bundled corpus: enough for the vocabulary below, quick to train
VOCAB_SIZE = 400  # the plain (cased) corpus needs 80 characters + 260 special/byte pieces

# Characters that exercise normalization and byte fallback: NFKC ligatures and compatibility forms,
# combining marks, NBSP, CRLF, tabs, runs of spaces, emoji, private use, CaseOps operators.
TRICKY_ALPHABET = (
    list("aAbBxXyY  .,'")
    + ["\n", "\r\n", "\t", "\xa0", "  ", "\u3000"]
    + ["é", "É", "ß", "ﬁ", "①", "Ａ", "e\u0301", "😀", "中", "\ue000"]
    + list(caseops.OPERATORS)
)


def sample_texts(count: int) -> list[str]:
    return list(iter_jsonl_texts(SAMPLE_DOCS, limit=count))


def random_texts(seed: int, count: int, max_parts: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(TRICKY_ALPHABET) for _ in range(rng.randint(0, max_parts))) for _ in range(count)]


@pytest.fixture(scope="module")
def published():
    return load_tokenizer(PUBLISHED_TOKENIZER, caseops=True)


@pytest.fixture(scope="module")
def trained_caseops(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "caseops.model"
    train_tokenizer(sample_texts(TRAIN_DOCS), path, vocab_size=VOCAB_SIZE, caseops=True, num_threads=1)
    return path


@pytest.fixture(scope="module")
def trained_plain(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "plain.model"
    train_tokenizer(sample_texts(TRAIN_DOCS), path, vocab_size=VOCAB_SIZE, caseops=False, num_threads=1)
    return path


# ---------------------------------------------------------------------------------------- published format


def test_published_tokenizer_properties(published):
    assert published.vocab_size == 8192
    assert published.bos_id == 1
    assert published.caseops is True
    assert published.sha256 == sha256_file(published.path)
    assert [published.pieces[i] for i in range(4, 8)] == [(op, PIECE_USER_DEFINED) for op in caseops.OPERATORS]


def test_conformance_vectors(published):
    vectors = [json.loads(line) for line in VECTORS_PATH.read_text(encoding="utf-8").splitlines()]
    assert len(vectors) >= 40
    for vector in vectors:
        text = vector["text"]
        assert published.transform(text) == vector["encoded"]
        ids, counts = published.encode_document(text)
        assert ids.dtype == np.uint16 and counts.dtype == np.uint16
        assert ids.tolist() == vector["token_ids"], text
        assert counts.tolist() == vector["original_bytes"], text
        ref_ids, ref_counts, surfaces = published.encode_document_reference(text)
        assert ref_ids.tolist() == vector["token_ids"], text
        assert ref_counts.tolist() == vector["original_bytes"], text
        assert surfaces == vector["piece_surfaces"], text


def test_fast_path_equals_sentencepiece_offsets_on_corpus_and_tricky_text(published):
    texts = sample_texts(300) + random_texts(seed=7, count=1500, max_parts=20)
    for text in texts:
        ids, counts = published.encode_document(text)
        ref_ids, ref_counts, _ = published.encode_document_reference(text)
        assert ids.tolist() == ref_ids.tolist(), repr(text)
        assert counts.tolist() == ref_counts.tolist(), repr(text)


def test_byte_counts_cover_the_stripped_text_and_bos_is_never_emitted(published):
    checked = 0
    for text in sample_texts(500):
        ids, counts = published.encode_document(text)
        assert published.bos_id not in ids.tolist()
        # Only whitespace at the two ends belongs to no piece.
        assert int(counts.sum()) == len(text.strip().encode("utf-8")), repr(text[:60])
        checked += 1
    assert checked == 500


def test_encode_documents_equals_encode_document(published):
    texts = sample_texts(50) + ["", "  ", "Hello"]
    for num_threads in (1, 2):
        batch = published.encode_documents(texts, num_threads=num_threads)
        for text, (ids, counts) in zip(texts, batch):
            one_ids, one_counts = published.encode_document(text)
            assert ids.tolist() == one_ids.tolist() and counts.tolist() == one_counts.tolist()


def test_empty_and_whitespace_only_documents(published):
    for text in ("", "   ", "\n\t\n"):
        ids, counts = published.encode_document(text)
        assert ids.dtype == np.uint16 and counts.dtype == np.uint16
        assert len(ids) == len(counts) == 0


def test_byte_count_overflow_is_an_error(published):
    # The normalizer folds a whitespace run into the next piece, whose surface then covers all of it.
    with pytest.raises(ByteCountOverflowError, match="uint16"):
        published.encode_document("x" + " " * 70_000 + "y")


# ------------------------------------------------------------------------------------------------- loading


def test_load_refuses_caseops_without_reserved_ids(trained_plain):
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(trained_plain, caseops=True)
    assert str(trained_plain) in str(info.value) and "ids 4-7" in str(info.value)
    assert load_tokenizer(trained_plain, caseops=False).caseops is False


def test_load_refuses_non_models_and_missing_files(tmp_path):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(TokenizerError, match="junk.model"):
        load_tokenizer(junk, caseops=False)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        load_tokenizer(tmp_path / "missing.model", caseops=False)


def train_raw(path: Path, **overrides) -> Path:
    """A model trained with SentencePiece directly: canonical settings except ``overrides``."""
    settings = {**tok.CANONICAL_TRAINER_SETTINGS, "vocab_size": VOCAB_SIZE, "num_threads": 1, **overrides}
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sample_texts(TRAIN_DOCS)), model_writer=buffer, **settings)
    path.write_bytes(buffer.getvalue())
    return path


def test_load_refuses_wrong_bos(tmp_path):
    path = train_raw(tmp_path / "bos0.model", bos_id=0, pad_id=1)
    with pytest.raises(TokenizerError, match="bos id is 0, expected 1"):
        load_tokenizer(path, caseops=False)


def test_unknown_pieces_fall_back_to_sentencepiece_offsets(tmp_path):
    """Without byte fallback a rare character is <unk>, whose length the fast path cannot know."""
    plain = load_tokenizer(train_raw(tmp_path / "unk.model", byte_fallback=False, vocab_size=200), caseops=False)
    text = "the 中文 word Ω and more"
    ids, counts = plain.encode_document(text)
    assert plain.processor.unk_id() in ids.tolist()
    ref_ids, ref_counts, surfaces = plain.encode_document_reference(text)
    assert ids.tolist() == ref_ids.tolist() and counts.tolist() == ref_counts.tolist()
    assert int(counts.sum()) == len(text.encode("utf-8"))
    assert "中文" in surfaces or "中" in surfaces


# ------------------------------------------------------------------------------------------------ training


def test_trained_caseops_tokenizer_layout(trained_caseops):
    loaded = load_tokenizer(trained_caseops, caseops=True)
    assert loaded.vocab_size == VOCAB_SIZE and loaded.bos_id == 1
    sp = loaded.processor
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [loaded.pieces[i] for i in range(4, 8)] == [(op, PIECE_USER_DEFINED) for op in caseops.OPERATORS]
    assert all(loaded.piece_type(i) == PIECE_BYTE for i in range(8, 264))
    # Operators are single tokens and the text round-trips through CaseOps.
    ids, counts = loaded.encode_document("The USA and iPhone")
    assert {4, 5, 6} <= set(ids.tolist())
    assert int(counts.sum()) == len("The USA and iPhone")
    assert caseops.decode(loaded.decode(ids.tolist())) == "The USA and iPhone"
    assert not list(trained_caseops.parent.glob(".*.tmp")), "temporary file left behind"


def test_training_is_deterministic_across_thread_counts(tmp_path, trained_caseops):
    again = tmp_path / "again.model"
    train_tokenizer(sample_texts(TRAIN_DOCS), again, vocab_size=VOCAB_SIZE, caseops=True, num_threads=2)
    assert again.read_bytes() == trained_caseops.read_bytes()


def test_training_from_jsonl_never_sees_skipped_validation_docs(tmp_path):
    """A word that occurs only in the skipped docs must not become a piece; the same word trained on does."""
    secret = "zqvjxkw"
    docs = tmp_path / "docs.jsonl"
    val = [{"text": " ".join([secret] * 200)} for _ in range(5)]
    train = [{"text": text} for text in sample_texts(150)]
    docs.write_text("".join(json.dumps(record) + "\n" for record in val + train), encoding="utf-8")

    def has_secret_piece(path: Path) -> bool:
        return any(secret in piece for piece, _ in load_tokenizer(path, caseops=True).pieces)

    skipped = train_tokenizer_from_jsonl(docs, tmp_path / "skip.model", VOCAB_SIZE, caseops=True, skip_docs=5)
    seen = train_tokenizer_from_jsonl(docs, tmp_path / "seen.model", VOCAB_SIZE, caseops=True, skip_docs=0)
    assert not has_secret_piece(skipped)
    assert has_secret_piece(seen)
    # training copies of a validation document are left out too (the data stage drops them from the shards)
    copies = tmp_path / "copies.jsonl"
    copies.write_text("".join(json.dumps(record) + "\n" for record in val + train + val * 3), encoding="utf-8")
    assert not has_secret_piece(train_tokenizer_from_jsonl(copies, tmp_path / "c.model", VOCAB_SIZE, caseops=True,
                                                           skip_docs=5))


def test_training_copies_that_differ_only_where_the_normalizer_erases_are_left_out(tmp_path, monkeypatch):
    """Copies of a validation document with other whitespace or another Unicode form give the published tokenizer's
    same ids (the data stage's test for a copy), so they stay out of the tokenizer's training text too."""
    val_text = "Secret validation text"
    variants = [val_text + " ", "  Secret   validation text", "Secret validation text\n", "Secret validation text",
                # characters the normalizer removes: zero-width space, byte-order mark, DEL
                val_text + "\u200b", "\ufeff" + val_text, "Secret validation\x7f text"]
    published = load_tokenizer(PUBLISHED_TOKENIZER, caseops=True)
    assert len({tuple(published.encode_document(t)[0]) for t in [val_text, *variants]}) == 1  # one id sequence
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in [val_text, *variants, "other text"]),
                    encoding="utf-8")
    seen: list[str] = []

    def recording_trainer(texts, out_path, **kwargs):
        seen.extend(texts)
        return Path(out_path)

    monkeypatch.setattr(tok, "train_tokenizer", recording_trainer)
    train_tokenizer_from_jsonl(docs, tmp_path / "t.model", VOCAB_SIZE, caseops=True, skip_docs=1)
    assert seen == ["other text"]


def test_training_refuses_empty_input_and_tiny_vocab(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must exceed the 264 reserved pieces"):
        train_tokenizer(["abc"], tmp_path / "x.model", vocab_size=264, caseops=True)
    with pytest.raises(ValueError, match="no training text"):
        train_tokenizer([], tmp_path / "empty.model", vocab_size=300, caseops=True)
    assert not (tmp_path / "empty.model").exists()


def test_training_sentences_are_cut_not_dropped():
    text = ("word " * 100).strip()
    cut = list(tok._training_sentences([text], caseops_transform=False, max_sentence_chars=64))
    assert all(len(piece) <= 64 for piece in cut)
    assert "".join(cut) == text


# ------------------------------------------------------------------------------------------------- reading


def test_iter_jsonl_texts_skip_limit_and_errors(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)), encoding="utf-8")
    assert list(iter_jsonl_texts(path)) == [f"doc {i}" for i in range(5)]
    assert list(iter_jsonl_texts(path, skip=2, limit=2)) == ["doc 2", "doc 3"]
    assert list(iter_jsonl_texts(path, skip=9)) == []

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "unterminated\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        list(iter_jsonl_texts(bad))
    for line in ('{"body": "x"}', '{"text": 5}', '["text"]', ""):
        wrong = tmp_path / "wrong.jsonl"
        wrong.write_text('{"text": "ok"}\n' + line + "\n", encoding="utf-8")
        expected = "not valid JSON" if not line else "expected a string field 'text'"
        with pytest.raises(ValueError, match=rf"wrong\.jsonl:2: {expected}"):
            list(iter_jsonl_texts(wrong))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(iter_jsonl_texts(tmp_path / "nope.jsonl"))
    surrogate = tmp_path / "surrogate.jsonl"  # valid JSON, not valid Unicode: named here, not deep in SentencePiece
    surrogate.write_text('{"text": "ok"}\n{"text": "bad \\ud800"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"surrogate\.jsonl:2: 'text' is not valid Unicode"):
        list(iter_jsonl_texts(surrogate))
    with pytest.raises(Exception, match=r"surrogate\.jsonl:2: 'text' is not valid Unicode"):
        train_tokenizer_from_jsonl(surrogate, tmp_path / "t.model", VOCAB_SIZE, caseops=True)


# --------------------------------------------------------------------------------------- lookup-table bytes


def test_lut_bytes_equal_normalized_length_without_double_counting_spaces(trained_plain):
    plain = load_tokenizer(trained_plain, caseops=False)
    lut = build_byte_lut(plain)
    base_bytes, has_leading_space, is_boundary = lut
    assert base_bytes.dtype == np.int16 and has_leading_space.dtype == bool and is_boundary.dtype == bool
    assert is_boundary[[0, 1, 2, 3]].all() and not is_boundary[4:].any()
    assert (base_bytes[plain.processor.bos_id()] == 0) and (base_bytes[[i for i in range(4, 260)]] == 1).all()
    space_ids = np.flatnonzero(has_leading_space)
    assert len(space_ids) > 0
    # A "▁x" piece is 1 + len(x) bytes in total, not 2 + len(x): the space is in has_leading_space only.
    for token_id in space_ids[:20]:
        piece = plain.pieces[token_id][0]
        assert base_bytes[token_id] == len(piece[1:].encode("utf-8"))

    docs = ["hello world", "The quick brown fox jumps over the lazy dog.", "a b c d e", "x"]
    # Printable ASCII with single spaces: the normalizer neither folds whitespace nor drops control characters
    # (the surfaces, and so the sidecar, would cover those bytes; the table cannot know them).
    docs += [" ".join(text.split()) for text in sample_texts(100) if text.isascii()]
    docs = [text for text in docs if text.isprintable()]
    assert len(docs) > 50
    for text in docs:
        ids, sidecar = plain.encode_document(text)
        ids = ids.astype(np.int64)
        prev = np.concatenate([[plain.bos_id], ids[:-1]])
        lut_bytes = lut_byte_counts(ids, prev, lut)
        assert int(lut_bytes.sum()) == len(text.encode("utf-8")), text
        assert lut_bytes.tolist() == sidecar.tolist(), text  # single spaces: both accountings agree per token


def test_lut_leading_space_after_boundary_is_not_counted(trained_plain):
    plain = load_tokenizer(trained_plain, caseops=False)
    lut = build_byte_lut(plain)
    space_id = int(np.flatnonzero(lut[1])[0])
    after_bos = lut_byte_counts(np.array([space_id]), np.array([plain.bos_id]), lut)
    after_text = lut_byte_counts(np.array([space_id]), np.array([100]), lut)
    assert after_text[0] == after_bos[0] + 1 == lut[0][space_id] + 1
    with pytest.raises(ValueError, match="shape"):
        lut_byte_counts(np.array([1, 2]), np.array([1]), lut)


def test_lut_refused_for_caseops(trained_caseops):
    with pytest.raises(TokenizerError, match="sidecar"):
        build_byte_lut(load_tokenizer(trained_caseops, caseops=True))
