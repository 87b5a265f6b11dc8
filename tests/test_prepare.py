"""`pgolf data prepare`: token-for-token agreement with a plain reference loop, determinism, all-or-nothing output."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from pgolf.data import caseops
from pgolf.data import shards as S
from pgolf.data.prepare import PrepareError, prepare_shards
from pgolf.data.verify import verify_dir
from pgolf.io import sha256_file
from shard_fixtures import GOLDEN_VECTORS, SAMPLE_DOCS, corpus_texts, published_model, write_jsonl

N_DOCS = 40
N_VAL = 12


def _prepare(docs, out, **kwargs) -> dict:
    kwargs.setdefault("tokenizer_path", published_model())
    kwargs.setdefault("val_docs", N_VAL)
    kwargs.setdefault("shard_tokens", 101)
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("progress", io.StringIO())
    return prepare_shards(docs_path=docs, out_dir=out, **kwargs)


def _stream(directory, kind) -> np.ndarray:
    return np.concatenate([S.read_shard(p) for p in S.list_shards(directory, kind)])


def _reference_stream(model, texts, use_caseops=True) -> np.ndarray:
    """The expected stream by a plain loop: [BOS] + sp.encode(caseops.encode(text)) per document."""
    sp = spm.SentencePieceProcessor(model_file=str(model))
    out = []
    for text in texts:
        out += [S.BOS_ID] + sp.encode(caseops.encode(text) if use_caseops else text)
    return np.array(out, dtype=np.uint16)


def _assert_nothing_left(parent, out_name="shards"):
    assert not (parent / out_name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{out_name}")]  # no temp dirs left


@pytest.fixture
def texts():
    return corpus_texts(N_DOCS, seed=11)


@pytest.fixture
def docs(tmp_path, texts):
    return write_jsonl(tmp_path / "docs.jsonl", texts)


def test_streams_equal_reference_loop(tmp_path, docs, texts):
    model = published_model()
    out = tmp_path / "shards"
    manifest = _prepare(docs, out, chunk_docs=5)

    assert _stream(out, "val").tolist() == _reference_stream(model, texts[:N_VAL]).tolist()
    assert _stream(out, "train").tolist() == _reference_stream(model, texts[N_VAL:]).tolist()
    for kind in ("val", "val_bytes", "train"):  # cut at exactly shard_tokens
        sizes = [len(S.read_shard(p)) for p in S.list_shards(out, kind)]
        assert len(sizes) > 1 and set(sizes[:-1]) == {101} and 0 < sizes[-1] <= 101

    # sidecar: one count per val token, 0 at BOS, and each document's counts sum to its UTF-8 length
    val, sidecar = _stream(out, "val"), _stream(out, "val_bytes")
    assert len(sidecar) == len(val) and not sidecar[val == S.BOS_ID].any()
    starts = np.flatnonzero(val == S.BOS_ID)
    per_doc = np.add.reduceat(sidecar.astype(np.int64), starts)
    assert per_doc.tolist() == [len(t.encode("utf-8")) for t in texts[:N_VAL]]

    assert manifest["docs"] == {"val": N_VAL, "train": N_DOCS - N_VAL}
    assert manifest["tokens"] == {"val": len(val), "train": len(_stream(out, "train"))}
    assert manifest["val_bytes"] == sum(len(t.encode("utf-8")) for t in texts[:N_VAL])
    assert manifest["source"]["docs_sha256"] == sha256_file(docs)
    assert manifest["tokenizer"]["sha256"] == sha256_file(model)
    assert manifest["tokenizer"]["vocab_size"] == 8192 and manifest["caseops"] is True
    for entry in manifest["files"]:
        assert sha256_file(out / entry["name"]) == entry["sha256"]
        assert S.read_header(out / entry["name"]).num_tokens == entry["tokens"]
    fingerprints = manifest["fingerprints"]
    assert fingerprints["train_val_overlap_docs"] == 0 and fingerprints["val_duplicate_docs"] == 0
    val_docs = list(S.iter_documents(val))
    assert fingerprints["val_doc_hashes_sha256"] == S.hashes_fingerprint(
        np.array([S.doc_hash(d[1:]) for d in val_docs], dtype=np.uint64)
    )
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert verify_dir(out, expected_val_docs=N_VAL).ok


def test_golden_vectors_tokens_and_bytes(tmp_path):
    """The published conformance vectors (ids and original bytes per token) come out of prepare unchanged."""
    model = published_model()
    vectors = [json.loads(line) for line in GOLDEN_VECTORS.read_text(encoding="utf-8").splitlines()]
    train_texts = corpus_texts(5, seed=2)
    docs = write_jsonl(tmp_path / "docs.jsonl", [v["text"] for v in vectors] + train_texts)
    out = tmp_path / "shards"
    _prepare(docs, out, tokenizer_path=model, val_docs=len(vectors), shard_tokens=64, chunk_docs=7)
    expected_ids = np.concatenate([[S.BOS_ID] + v["token_ids"] for v in vectors])
    expected_bytes = np.concatenate([[0] + v["original_bytes"] for v in vectors])
    assert _stream(out, "val").tolist() == expected_ids.tolist()
    assert _stream(out, "val_bytes").tolist() == expected_bytes.tolist()
    report = verify_dir(out)  # includes escaped literal operators that count 3 bytes
    assert report.ok, [c for c in report.checks if not c.ok]


def test_output_identical_for_any_worker_count(tmp_path, docs):
    manifests = {}
    for workers in (1, 2):
        manifests[workers] = _prepare(docs, tmp_path / f"w{workers}", workers=workers, chunk_docs=3, shard_tokens=57)
    one, two = tmp_path / "w1", tmp_path / "w2"
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) and len(names) > 5
    for name in names:  # the manifest included: no timing in it (they are in prepare_report.json)
        if name != "prepare_report.json":
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert manifests[1] == manifests[2] and "run" not in manifests[1]
    reports = [json.loads((d / "prepare_report.json").read_text()) for d in (one, two)]
    assert [r["workers"] for r in reports] == [1, 2] and all(r["seconds"] >= 0 for r in reports)


def test_caps_on_documents_and_train_shards(tmp_path, docs, texts):
    model = published_model()
    manifest = _prepare(docs, tmp_path / "few", max_docs=N_VAL + 5)
    assert manifest["docs"] == {"val": N_VAL, "train": 5}
    assert _stream(tmp_path / "few", "train").tolist() == _reference_stream(model, texts[N_VAL : N_VAL + 5]).tolist()

    manifest = _prepare(docs, tmp_path / "capped", max_train_shards=2, shard_tokens=50)
    train = S.list_shards(tmp_path / "capped", "train")
    assert [S.read_header(p).num_tokens for p in train] == [50, 50]
    assert manifest["train_complete"] is False
    full = _reference_stream(model, texts[N_VAL:])
    assert _stream(tmp_path / "capped", "train").tolist() == full[:100].tolist()
    assert manifest["docs"]["train"] == int(np.count_nonzero(full[:100] == S.BOS_ID))
    assert verify_dir(tmp_path / "capped").ok
    # the text bytes are those of the documents written, whatever the chunk size (which never changes the output)
    n = manifest["docs"]["train"]
    assert manifest["text_bytes"]["train"] == sum(len(t.encode("utf-8")) for t in texts[N_VAL : N_VAL + n])
    assert _prepare(docs, tmp_path / "capped_1", max_train_shards=2, shard_tokens=50, chunk_docs=1) == manifest


def test_progress_and_summary_line(tmp_path, docs):
    stream = io.StringIO()
    _prepare(docs, tmp_path / "shards", progress=stream)
    lines = stream.getvalue().strip().splitlines()
    assert lines[-2].startswith(f"prepare: {N_VAL:,} val + {N_DOCS - N_VAL:,} train docs")
    summary = json.loads(lines[-1])
    assert summary["event"] == "prepare_done" and summary["train_docs"] == N_DOCS - N_VAL


# --------------------------------------------------------------------------------------------------------------
# Refusals: clear message, nothing written
# --------------------------------------------------------------------------------------------------------------


def _lines(texts) -> list[str]:
    return [json.dumps({"text": t}) for t in texts]


@pytest.mark.parametrize(
    ("line_no", "line", "message", "workers"),
    [
        (7, '{"text": "unterminated', "docs.jsonl:7: not valid JSON", 1),
        (30, '{"body": "no text here"}', 'docs.jsonl:30: expected a JSON object with a "text" field, got dict', 1),
        (25, '["a list"]', 'docs.jsonl:25: expected a JSON object with a "text" field, got list', 1),
        (20, '{"text": 42}', 'docs.jsonl:20: "text" must be a string, got int', 1),
        (33, "", 'docs.jsonl:33: empty line, expected a JSON object with a "text" field', 1),
        (31, '{"text": "unterminated', "docs.jsonl:31: not valid JSON", 2),  # raised in a worker process
        # valid JSON, but text no UTF-8 consumer takes (a validation and a training document)
        (9, '{"text": "bad \\ud800 surrogate"}', "docs.jsonl:9: 'utf-8' codec can't encode", 1),
        (20, '{"text": "bad \\ud800 surrogate"}', "docs.jsonl:20: 'utf-8' codec can't encode", 2),
        # a validation token standing for more original bytes than a uint16 sidecar entry holds
        (3, json.dumps({"text": "x" + " " * 70_000 + "y"}), "docs.jsonl:3: token 1 of a document stands for", 1),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, texts, line_no, line, message, workers):
    lines = _lines(texts)
    lines[line_no - 1] = line
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        _prepare(docs, tmp_path / "shards", workers=workers, chunk_docs=4)
    _assert_nothing_left(tmp_path)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    """A small SentencePiece model without CaseOps reserved ids, trained on the bundled sample corpus."""
    from pgolf.data.tokenizer import iter_jsonl_texts, train_tokenizer

    if not SAMPLE_DOCS.exists():
        pytest.skip(f"{SAMPLE_DOCS} not found")
    path = tmp_path_factory.mktemp("tok") / "plain.model"
    return train_tokenizer(list(iter_jsonl_texts(SAMPLE_DOCS, limit=400)), path, vocab_size=400, caseops=False)


def test_plain_tokenizer_without_caseops(tmp_path, docs, texts, plain_model):
    out = tmp_path / "shards"
    manifest = _prepare(docs, out, tokenizer_path=plain_model, caseops=False, chunk_docs=6)
    assert _stream(out, "val").tolist() == _reference_stream(plain_model, texts[:N_VAL], use_caseops=False).tolist()
    assert _stream(out, "train").tolist() == _reference_stream(plain_model, texts[N_VAL:], use_caseops=False).tolist()
    assert S.list_shards(out, "val_bytes") == []  # like the published non-CaseOps exports: no sidecar
    assert manifest["caseops"] is False and "val_bytes" not in manifest
    assert manifest["tokenizer"]["vocab_size"] == 400
    report = verify_dir(out)
    assert report.ok and report.check("byte sidecar").detail.startswith("none")


def test_caseops_needs_reserved_ids(tmp_path, docs, plain_model):
    with pytest.raises(ValueError, match=r"plain\.model: a CaseOps tokenizer must reserve ids 4-7"):
        _prepare(docs, tmp_path / "shards", tokenizer_path=plain_model, caseops=True)
    _assert_nothing_left(tmp_path)


def test_too_few_documents(tmp_path, docs):
    with pytest.raises(PrepareError, match=rf"--val-docs 60 but .*docs\.jsonl has {N_DOCS} documents"):
        _prepare(docs, tmp_path / "shards", val_docs=60)
    with pytest.raises(PrepareError, match=f"--val-docs {N_DOCS} leaves no training documents"):
        _prepare(docs, tmp_path / "shards", val_docs=N_DOCS)
    with pytest.raises(PrepareError, match="--max-docs 12 leaves no training documents"):
        _prepare(docs, tmp_path / "shards", max_docs=N_VAL)
    _assert_nothing_left(tmp_path)


def test_leak_is_refused(tmp_path, texts):
    """Under val_duplicates_policy=refuse (the default drops the copies: tests/test_val_duplicates.py)."""
    leaked = texts[: N_VAL + 5] + [texts[3]] + texts[N_VAL + 5 :]  # val doc 3 again as train doc 5 (line 18)
    leaked += [texts[7]]
    docs = write_jsonl(tmp_path / "docs.jsonl", leaked)
    with pytest.raises(PrepareError) as err:
        _prepare(docs, tmp_path / "shards", chunk_docs=4, val_duplicates_policy="refuse", max_val_overlap_fraction=0.5)
    assert str(err.value) == (
        "leak: 2 validation documents also occur in the training split, " f"first at train doc 5 ({docs}:{N_VAL + 6})"
    )
    _assert_nothing_left(tmp_path)


def test_failure_keeps_previous_output(tmp_path, docs):
    out = tmp_path / "shards"
    first = _prepare(docs, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(PrepareError):
        _prepare(docs, out, val_docs=500)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(docs.read_text() + "not json\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:{N_DOCS + 1}: not valid JSON"):
        _prepare(bad, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert first["docs"]["val"] == N_VAL


def test_cli_prepare(tmp_path, docs):
    base = [
        sys.executable,
        "-m",
        "pgolf",
        "data",
        "prepare",
        "--docs",
        str(docs),
        "--tokenizer",
        str(published_model()),
    ]
    ok = subprocess.run(
        base + ["--out", str(tmp_path / "shards"), "--val-docs", str(N_VAL), "--shard-tokens", "200", "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert '"event": "prepare_done"' in ok.stderr
    assert verify_dir(tmp_path / "shards", expected_val_docs=N_VAL).ok
    bad = subprocess.run(
        base + ["--out", str(tmp_path / "other"), "--val-docs", "99"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2
    assert f"pgolf: error: --val-docs 99 but {docs} has {N_DOCS} documents" in bad.stderr
    assert not (tmp_path / "other").exists()


def test_a_copy_right_at_the_train_cap_is_counted_alike_however_the_input_is_chunked(tmp_path):
    """A training document that fills the last allowed shard exactly, then a copy of a validation document: the copy
    lies past the cut, so no chunking counts it as read (and dropped), and the manifests are equal bytes."""
    from pgolf.data.tokenizer import load_tokenizer

    val = [f"validation document number {i} about cats" for i in range(4)]
    filler = "a training document that fills one shard exactly"
    shard_tokens = len(load_tokenizer(published_model(), True).encode_document(filler)[0]) + 1  # + its BOS
    docs = write_jsonl(tmp_path / "docs.jsonl", [*val, filler, val[2], "another training doc"])
    manifests = {}
    for chunk_docs in (1, 2, 256):
        out = tmp_path / f"chunks{chunk_docs}"
        manifest = _prepare(docs, out, val_docs=4, shard_tokens=shard_tokens, max_train_shards=1, chunk_docs=chunk_docs)
        assert manifest["val_duplicates"] == {"val_docs_with_train_copies": 0, "train_docs_dropped": 0}, chunk_docs
        manifests[chunk_docs] = (out / "manifest.json").read_bytes()
    assert manifests[1] == manifests[2] == manifests[256]
