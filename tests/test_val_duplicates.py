"""Exact duplicates across the train/val split (issue 15 item 7): the data stage's stated policy.

Local preparation drops the training copies of validation documents by default (counted in the manifest) or
refuses them (``refuse``); a published export is accepted as published with its overlap counted in the
verification report; above ``max_val_overlap_fraction`` of the validation documents the split is wrong and both
preparation and verification fail under either policy.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from pgolf.config import ConfigError, DataConfig, parse_run_config
from pgolf.data import shards as S
from pgolf.data.prepare import PREPARE_REPORT_NAME, PrepareError, prepare_shards
from pgolf.data.verify import verify_dir
from shard_fixtures import build_dir, corpus_texts, published_model, random_docs, write_jsonl, write_stream

N_VAL = 12
N_DOCS = 40


def _prepare(docs, out, **kwargs) -> dict:
    kwargs.setdefault("val_docs", N_VAL)
    kwargs.setdefault("shard_tokens", 101)
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("progress", io.StringIO())
    return prepare_shards(docs_path=docs, tokenizer_path=published_model(), out_dir=out, **kwargs)


def _doc_hashes(directory, kind) -> list[int]:
    stream = np.concatenate([S.read_shard(p) for p in S.list_shards(directory, kind)])
    return [S.doc_hash(doc[1:]) for doc in S.iter_documents(stream)]


def _failed(report) -> dict[str, str]:
    return {check.name: check.detail for check in report.checks if not check.ok}


@pytest.fixture
def texts():
    return corpus_texts(N_DOCS, seed=11)


def _with_copies(texts):
    """Val doc 3 again as train docs 5 and 20 (file lines 18 and 33), val doc 7 again as the last train doc."""
    return texts[: N_VAL + 5] + [texts[3]] + texts[N_VAL + 5 : N_VAL + 19] + [texts[3]] + texts[N_VAL + 19 :] + [
        texts[7]
    ]


# --------------------------------------------------------------------------------------------------------------
# Local preparation
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers, chunk_docs", [(1, 4), (2, 256)])
def test_default_drops_training_copies(tmp_path, texts, workers, chunk_docs):
    dup = _with_copies(texts)
    assert dup[N_VAL + 20] == texts[3]
    dup[N_VAL + 20] = "  " + texts[3] + "\n"  # other raw text, equal to val doc 3 after SentencePiece normalization
    docs = write_jsonl(tmp_path / "dup.jsonl", dup)
    out = tmp_path / "shards"
    manifest = _prepare(docs, out, max_val_overlap_fraction=0.25, workers=workers, chunk_docs=chunk_docs)

    assert manifest["val_duplicates"] == {"val_docs_with_train_copies": 2, "train_docs_dropped": 3}
    assert manifest["settings"]["val_duplicates_policy"] == "drop_train_copies"
    assert manifest["fingerprints"]["train_val_overlap_docs"] == 0
    assert manifest["docs"] == {"val": N_VAL, "train": N_DOCS - N_VAL}
    assert json.loads((out / PREPARE_REPORT_NAME).read_text())["train_docs_dropped"] == 3
    assert not set(_doc_hashes(out, "val")) & set(_doc_hashes(out, "train"))
    # the training shards are exactly those of the corpus without the copies
    clean = _prepare(write_jsonl(tmp_path / "clean.jsonl", texts), tmp_path / "clean", max_val_overlap_fraction=0.25)
    for kind in ("train", "val", "val_bytes"):
        assert [p.read_bytes() for p in S.list_shards(out, kind)] == [
            p.read_bytes() for p in S.list_shards(tmp_path / "clean", kind)
        ], kind
    assert clean["val_duplicates"] == {"val_docs_with_train_copies": 0, "train_docs_dropped": 0}

    report = verify_dir(out, expected_val_docs=N_VAL)
    assert report.ok, _failed(report)
    assert report.summary["train_docs_dropped"] == 3 and report.summary["train_val_overlap_docs"] == 0


def test_dropping_is_deterministic(tmp_path, texts):
    docs = write_jsonl(tmp_path / "dup.jsonl", _with_copies(texts))
    runs = []
    for name in ("a", "b"):
        _prepare(docs, tmp_path / name, max_val_overlap_fraction=0.25)
        runs.append({p.name: p.read_bytes() for p in (tmp_path / name).iterdir() if p.name != PREPARE_REPORT_NAME})
    assert runs[0] == runs[1]


def test_default_threshold_is_one_percent_of_validation(tmp_path):
    """100 validation docs: 1 with a training copy is accepted by the defaults, 2 are refused."""
    texts = corpus_texts(130, seed=5)
    one = write_jsonl(tmp_path / "one.jsonl", texts + [texts[10]])
    assert _prepare(one, tmp_path / "a", val_docs=100, shard_tokens=4000)["val_duplicates"]["train_docs_dropped"] == 1
    two = write_jsonl(tmp_path / "two.jsonl", texts + [texts[10], texts[20]])
    with pytest.raises(PrepareError, match=r"leak: 2 of 100 validation documents \(2\.0%\).*allows \(1\)"):
        _prepare(two, tmp_path / "b", val_docs=100, shard_tokens=4000)
    assert not (tmp_path / "b").exists()


def test_refuse_names_file_and_line(tmp_path, texts):
    docs = write_jsonl(tmp_path / "docs.jsonl", _with_copies(texts))
    with pytest.raises(PrepareError) as err:
        _prepare(docs, tmp_path / "shards", val_duplicates_policy="refuse", max_val_overlap_fraction=0.25, chunk_docs=4)
    assert str(err.value) == (
        f"leak: 2 validation documents also occur in the training split, first at train doc 5 ({docs}:{N_VAL + 6})"
    )
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize("policy", ["drop_train_copies", "refuse"])
def test_large_overlap_fails_under_either_policy(tmp_path, texts, policy):
    """Every validation document again in the training part: the validation docs came from the training pool."""
    docs = write_jsonl(tmp_path / "docs.jsonl", texts + texts[:N_VAL])
    with pytest.raises(PrepareError, match=rf"leak: {N_VAL} of {N_VAL} validation documents \(100\.0%\).*"
                                           r"the split itself is wrong.*first at train doc 28"):
        _prepare(docs, tmp_path / "shards", val_duplicates_policy=policy, max_val_overlap_fraction=0.25)
    assert not (tmp_path / "shards").exists()


def test_cli_prepare_policy(tmp_path, texts):
    docs = write_jsonl(tmp_path / "docs.jsonl", _with_copies(texts))
    base = [sys.executable, "-m", "pgolf", "data", "prepare", "--docs", str(docs), "--tokenizer",
            str(published_model()), "--val-docs", str(N_VAL), "--shard-tokens", "200", "--workers", "1",
            "--max-val-overlap-fraction", "0.25"]
    ok = subprocess.run(base + ["--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert '"train_docs_dropped": 3' in ok.stderr
    bad = subprocess.run(base + ["--out", str(tmp_path / "b"), "--val-duplicates-policy", "refuse"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "leak: 2 validation documents also occur" in bad.stderr
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------------------------------------------------------
# Verification of a published export (no pgolf manifest): accepted as published, counted, bounded
# --------------------------------------------------------------------------------------------------------------

EXPORT_VAL = 400  # 1% of them: 4 validation documents may have a training copy


def _export(tmp_path, n_copies: int, extra_copy: bool = False):
    """An export-like directory whose training stream also holds validation docs 0..n_copies-1 (doc 0 twice)."""
    d = tmp_path / "export"
    val, train = build_dir(d, n_val=EXPORT_VAL, n_train=100)
    last = S.list_shards(d, "train")[-1]
    extra = [val[i] for i in range(n_copies)] + ([val[0]] if extra_copy else [])
    S.write_shard(last, np.concatenate([S.read_shard(last), *extra]).astype(np.uint16))
    return d


def test_export_small_overlap_accepted_and_counted(tmp_path):
    d = _export(tmp_path, 3, extra_copy=True)
    report = verify_dir(d, expected_val_docs=EXPORT_VAL)
    assert report.ok, _failed(report)
    detail = report.check("train/val disjoint").detail
    assert detail.startswith("accepted as published (no pgolf manifest; <= 4): 3 validation documents also occur")
    assert "(4 train docs, 0.75% of the validation docs)" in detail
    assert report.summary["train_val_overlap_docs"] == 3 and report.summary["train_docs_matching_val"] == 4
    assert report.summary["val_overlap_limit_docs"] == 4

    out = tmp_path / "verified.json"
    result = subprocess.run([sys.executable, "-m", "pgolf", "data", "verify", str(d), "--json-out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    verified = json.loads(out.read_text())
    assert verified["ok"] is True and verified["summary"]["train_val_overlap_docs"] == 3


def test_export_overlap_refused_under_refuse(tmp_path):
    d = _export(tmp_path, 1)
    detail = _failed(verify_dir(d, val_duplicates_policy="refuse"))["train/val disjoint"]
    assert detail.startswith("leak: 1 validation documents also occur") and "policy is 'refuse'" in detail
    result = subprocess.run([sys.executable, "-m", "pgolf", "data", "verify", str(d), "--val-duplicates-policy",
                             "refuse"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "FAIL  train/val disjoint: leak: 1 validation" in result.stdout


@pytest.mark.parametrize("policy", ["drop_train_copies", "refuse"])
def test_export_over_threshold_refused(tmp_path, policy):
    d = _export(tmp_path, 5)
    detail = _failed(verify_dir(d, val_duplicates_policy=policy))["train/val disjoint"]
    assert "5 validation documents also occur in the training split (5 train docs, 1.25% of" in detail
    assert "more than max_val_overlap_fraction 0.01 allows (4): the split itself is wrong" in detail
    # the threshold is a knob: 5% of 400 allows these 5 (unless the policy refuses every copy)
    assert verify_dir(d, val_duplicates_policy=policy, max_val_overlap_fraction=0.05).ok is (policy != "refuse")


def test_export_with_the_2127_mistake_refused(tmp_path):
    """Training shards cut with 10,000 validation docs next to the official 50,000: 80% of them in training."""
    d = tmp_path / "export"
    val = random_docs(50, seed=1)
    train = val[10:] + random_docs(30, seed=2)
    write_stream(d, "val", val, 97)
    write_stream(d, "train", train, 97)
    detail = _failed(verify_dir(d, max_val_overlap_fraction=0.5))["train/val disjoint"]
    assert "40 validation documents also occur in the training split (40 train docs, 80.00% of" in detail


def test_prepared_dir_holds_no_copy_whatever_the_threshold(tmp_path, texts):
    """Prepared data never keeps a copy: one added afterwards fails even where an export would pass."""
    out = tmp_path / "shards"
    _prepare(write_jsonl(tmp_path / "docs.jsonl", texts), out)
    val_doc = next(iter(S.iter_documents(np.concatenate([S.read_shard(p) for p in S.list_shards(out, "val")]))))
    last = S.list_shards(out, "train")[-1]
    S.write_shard(last, np.concatenate([S.read_shard(last), val_doc]))
    detail = _failed(verify_dir(out, max_val_overlap_fraction=1.0))["train/val disjoint"]
    assert "a prepared directory holds none" in detail


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


def test_config_knobs_are_checked():
    assert DataConfig().val_duplicates_policy == "drop_train_copies"
    assert DataConfig().max_val_overlap_fraction == 0.01
    with pytest.raises(ConfigError, match="data.val_duplicates_policy: expected one of"):
        parse_run_config({"run": "t", "data": {"val_duplicates_policy": "keep"}})
    with pytest.raises(ConfigError, match=r"max_val_overlap_fraction: expected a fraction in \[0, 1\], got 2"):
        parse_run_config({"run": "t", "data": {"max_val_overlap_fraction": 2}})
    with pytest.raises(ConfigError, match="data.val_duplicate_policy: unknown key"):
        parse_run_config({"run": "t", "data": {"val_duplicate_policy": "refuse"}})
