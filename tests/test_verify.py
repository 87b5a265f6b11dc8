"""The data gate: passes good directories, fails damaged ones with a check that names the file and the fact."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pgolf.data import shards as S
from pgolf.data.verify import RECORD_VAL_DOCS, print_report, verify_dir
from shard_fixtures import build_dir, corpus_texts, published_model, write_jsonl, write_stream

N_VAL = 16
N_DOCS = 40


def _failed(report) -> dict[str, str]:
    return {check.name: check.detail for check in report.checks if not check.ok}


def _rewrite(path, tokens) -> None:
    """Replace a shard's contents with a valid shard of ``tokens`` (header consistent, manifest hash not)."""
    S.write_shard(path, np.asarray(tokens, dtype=np.uint16))


def _stream(directory, kind) -> np.ndarray:
    return np.concatenate([S.read_shard(p) for p in S.list_shards(directory, kind)])


# --------------------------------------------------------------------------------------------------------------
# Manifest-less directories (the shape of a Hub export)
# --------------------------------------------------------------------------------------------------------------


def test_export_like_dir_passes_and_says_manifest_skipped(tmp_path):
    val, train = build_dir(tmp_path)
    report = verify_dir(tmp_path, expected_val_docs=len(val))
    assert report.ok, _failed(report)
    assert "no manifest.json" in report.check("manifest").detail
    assert report.summary["val_docs"] == len(val)
    assert report.summary["train_docs"] == len(train)
    assert report.summary["val_tokens"] == sum(map(len, val))
    assert report.summary["train_tokens"] == sum(map(len, train))
    assert report.summary["val_bytes"] == sum(int(np.where(d == 1, 0, 1 + d % 5).sum()) for d in val)
    assert report.summary["caseops"] is True  # inferred from the sidecar


def test_missing_directory_and_missing_splits(tmp_path):
    assert not verify_dir(tmp_path / "nope").ok
    build_dir(tmp_path)
    for path in S.list_shards(tmp_path, "train"):
        path.unlink()
    report = verify_dir(tmp_path)
    assert "no fineweb_train_*.bin files" in _failed(report)["shard files"]


def test_gap_in_shard_indices_fails(tmp_path):
    build_dir(tmp_path)
    S.list_shards(tmp_path, "train")[1].unlink()
    assert "missing [1]" in _failed(verify_dir(tmp_path))["shard files"]


def test_stream_without_leading_bos_fails(tmp_path):
    build_dir(tmp_path)
    first = S.list_shards(tmp_path, "train")[0]
    tokens = np.array(S.read_shard(first))
    tokens[0] = 9
    _rewrite(first, tokens)
    detail = _failed(verify_dir(tmp_path))["BOS per document"]
    assert "fineweb_train_000000.bin: stream starts with id 9" in detail


def test_val_doc_in_train_is_a_leak(tmp_path):
    val, train = build_dir(tmp_path)
    last = S.list_shards(tmp_path, "train")[-1]
    _rewrite(last, np.concatenate([S.read_shard(last), val[5], train[0]]))
    detail = _failed(verify_dir(tmp_path))["train/val disjoint"]
    assert (  # 1 of 40: above the default 1% even for an export, which may keep a few copies of its published split
        "leak: 1 validation documents also occur in the training split (1 train docs, 2.50% of the validation docs), "
        f"first at train doc {len(train)}" in detail
    )
    assert last.name in detail


def test_sidecar_length_and_count_mismatch(tmp_path):
    build_dir(tmp_path)
    side = S.list_shards(tmp_path, "val_bytes")[0]
    _rewrite(side, S.read_shard(side)[:-1])
    assert (
        "fineweb_val_bytes_000000.bin: 96 entries, fineweb_val_000000.bin has 97 tokens"
        in _failed(verify_dir(tmp_path))["byte sidecar"]
    )
    S.list_shards(tmp_path, "val_bytes")[-1].unlink()
    assert "val shards" in _failed(verify_dir(tmp_path))["byte sidecar"]


def test_operator_bytes_zero_unless_escaped(tmp_path):
    """A CaseOps operator token counts 0 bytes, except the operand of ESC (a literal operator char, 3 bytes)."""
    esc, title = 7, 4
    val = [
        np.array([1, 100, title, 200], dtype=np.uint16),
        np.array([1, esc, title, 300, esc, esc, 400], dtype=np.uint16),  # two escaped literals
    ]
    good = [np.array([0, 1, 0, 3]), np.array([0, 0, 3, 3, 0, 3, 3])]
    train = [np.array([1, 500], dtype=np.uint16)]
    # shard size 4 puts the second ESC pair across a shard boundary (tokens 7 and 8)
    S_TOK = 4
    write_stream(tmp_path, "val", val, S_TOK)
    write_stream(tmp_path, "train", train, S_TOK)
    write_stream(tmp_path, "val_bytes", [g.astype(np.uint16) for g in good], S_TOK)
    report = verify_dir(tmp_path)
    assert report.ok, _failed(report)
    assert report.summary["val_bytes"] == 16

    bad = [np.array([0, 1, 3, 3]), good[1]]  # the unescaped TITLE in doc 0 counts 3 bytes
    for path in S.list_shards(tmp_path, "val_bytes"):
        path.unlink()
    write_stream(tmp_path, "val_bytes", [b.astype(np.uint16) for b in bad], S_TOK)
    detail = _failed(verify_dir(tmp_path))["byte sidecar"]
    assert (
        "fineweb_val_bytes_000000.bin: 1 nonzero byte counts at unescaped operator tokens, first at token 2" in detail
    )


def test_val_count_expectations(tmp_path):
    val, _ = build_dir(tmp_path)
    assert verify_dir(tmp_path, expected_val_docs=len(val)).ok
    detail = _failed(verify_dir(tmp_path, expected_val_docs=len(val) + 1))["val doc count"]
    assert f"{len(val)} validation docs, expected {len(val) + 1} (--val-docs)" in detail
    detail = _failed(verify_dir(tmp_path, record=True))["val doc count"]
    assert f"expected {RECORD_VAL_DOCS:,} (the record rule)" in detail
    detail = _failed(verify_dir(tmp_path, expected_val_docs=len(val), record=True))["val doc count"]
    assert "--record needs 50,000 validation docs; --val-docs says 40" in detail


# --------------------------------------------------------------------------------------------------------------
# Directories written by `pgolf data prepare` (manifest cross-checks), through the CLI
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from pgolf.data.prepare import prepare_shards

    root = tmp_path_factory.mktemp("prepared")
    docs = write_jsonl(root / "docs.jsonl", corpus_texts(N_DOCS, seed=3))
    out = root / "shards"
    prepare_shards(docs, published_model(), out, val_docs=N_VAL, shard_tokens=128, workers=1, progress=io.StringIO())
    return out


@pytest.fixture
def copy(prepared, tmp_path):
    target = tmp_path / "shards"
    shutil.copytree(prepared, target)
    return target


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pgolf", "data", "verify", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_prepared_dir_passes_every_check(prepared, tmp_path, capsys):
    report = verify_dir(prepared)
    assert report.ok, _failed(report)
    names = [check.name for check in report.checks]
    for name in ("manifest files", "manifest totals", "byte sidecar", "train/val disjoint", "val doc count"):
        assert name in names
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert report.summary["val_docs"] == N_VAL == manifest["docs"]["val"]
    assert report.summary["val_bytes"] == manifest["val_bytes"]
    print_report(report)
    out = capsys.readouterr().out
    assert out.count("PASS") == len(report.checks) and "FAIL" not in out

    result = _cli(prepared, "--val-docs", N_VAL, "--json-out", tmp_path / "report.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "report.json").read_text())["ok"] is True


def _truncate(d):
    path = S.list_shards(d, "train")[0]
    path.write_bytes(path.read_bytes()[:-2])
    return "shard headers", "fineweb_train_000000.bin: size"


def _flip_magic(d):
    path = S.list_shards(d, "val")[0]
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0xFF
    path.write_bytes(bytes(raw))
    return "shard headers", "fineweb_val_000000.bin: magic"


def _sidecar_at_bos(d):
    path = S.list_shards(d, "val_bytes")[0]
    counts = np.array(S.read_shard(path))
    counts[0] = 4  # the val stream starts with BOS
    _rewrite(path, counts)
    return "byte sidecar", "nonzero byte counts at BOS tokens, first at token 0 (count 4)"


def _val_doc_into_train(d):
    val_doc = next(iter(S.iter_documents(_stream(d, "val"))))
    path = S.list_shards(d, "train")[-1]
    _rewrite(path, np.concatenate([S.read_shard(path), val_doc]))
    return "train/val disjoint", "leak: 1 validation documents also occur in the training split"


def _edit_train_token(d):
    path = S.list_shards(d, "train")[0]
    tokens = np.array(S.read_shard(path))
    tokens[5] = 4321 if tokens[5] != 4321 else 4322
    _rewrite(path, tokens)
    return "manifest files", "fineweb_train_000000.bin: sha256"


def _no_training_document(d):
    first, *rest = S.list_shards(d, "train")
    for path in rest:
        path.unlink()
    _rewrite(first, [])  # a valid header of 0 tokens: training would have nothing to read
    return "documents", "the train shards hold no document"


def _reserved_header_int(d):
    path = S.list_shards(d, "val")[0]
    raw = bytearray(path.read_bytes())
    raw[12:16] = np.array([12345], dtype="<i4").tobytes()  # data.md: header ints 3..255 are zero
    path.write_bytes(bytes(raw))
    return "shard headers", "fineweb_val_000000.bin: header int 3 is 12345, expected 0"


def _manifest_entry_not_an_object(d):
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"][0] = manifest["files"][0]["name"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    return "manifest files", "a 'files' entry is 'fineweb_"


@pytest.mark.parametrize("tamper", [_truncate, _flip_magic, _sidecar_at_bos, _val_doc_into_train, _edit_train_token,
                                    _no_training_document, _reserved_header_int, _manifest_entry_not_an_object])
def test_tampered_dir_fails(copy, tamper):
    check, fact = tamper(copy)
    detail = _failed(verify_dir(copy)).get(check, "")
    assert fact in detail, verify_dir(copy).to_dict()
    result = _cli(copy)
    assert result.returncode == 1
    assert f"FAIL  {check}:" in result.stdout


def test_cli_wrong_val_count_and_record(prepared):
    result = _cli(prepared, "--val-docs", N_VAL + 2)
    assert result.returncode == 1 and f"{N_VAL} validation docs, expected {N_VAL + 2} (--val-docs)" in result.stdout
    result = _cli(prepared, "--record")
    assert result.returncode == 1 and f"expected {RECORD_VAL_DOCS:,} (the record rule)" in result.stdout


def test_manifest_claims_are_checked(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["settings"]["val_docs"] = N_VAL + 1
    manifest["docs"]["train"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    failed = _failed(verify_dir(copy))
    assert f"expected {N_VAL + 1} (manifest.json settings.val_docs)" in failed["val doc count"]
    assert "docs.train: manifest.json says" in failed["manifest totals"]
    (copy / "manifest.json").write_text("{not json")
    assert "not valid JSON" in _failed(verify_dir(copy))["manifest"]
