"""The shard format: round trips, refusal of damaged files, exact cuts, BOS document splitting, doc hashes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pgolf.data import shards as S


def _random_docs(rng: np.random.Generator, n_docs: int, max_len: int = 40) -> list[np.ndarray]:
    """Documents as ``[BOS] + ids`` with ids drawn from 2..65535 (never BOS)."""
    return [
        np.concatenate([[S.BOS_ID], rng.integers(2, 65536, size=int(rng.integers(0, max_len)))]).astype(np.uint16)
        for _ in range(n_docs)
    ]


def test_round_trip_header_and_body(tmp_path):
    tokens = np.array([1, 0, 65535, 42, 1, 7], dtype=np.uint16)
    path = tmp_path / S.shard_name("train", 0)
    info = S.write_shard(path, tokens, kind="train")

    raw = path.read_bytes()
    assert len(raw) == S.HEADER_BYTES + 2 * len(tokens)
    header = np.frombuffer(raw[: S.HEADER_BYTES], dtype="<i4")
    assert header[:3].tolist() == [S.SHARD_MAGIC, S.SHARD_VERSION, len(tokens)]
    assert not header[3:].any()
    assert np.frombuffer(raw[S.HEADER_BYTES :], dtype="<u2").tolist() == tokens.tolist()
    assert info.sha256 == hashlib.sha256(raw).hexdigest()
    assert (info.name, info.tokens, info.bytes) == (path.name, len(tokens), len(raw))

    for mmap in (True, False):
        back = S.read_shard(path, mmap=mmap)
        assert back.dtype == np.dtype("<u2")
        assert back.tolist() == tokens.tolist()
    assert S.read_header(path).num_tokens == len(tokens)


def test_empty_shard_round_trip(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    S.write_shard(path, np.zeros(0, dtype=np.uint16))
    assert S.read_shard(path).shape == (0,)


def test_write_refuses_out_of_range_ids(tmp_path):
    with pytest.raises(ValueError, match=r"0\.\.65535"):
        S.write_shard(tmp_path / "x.bin", np.array([1, 65536]))
    with pytest.raises(ValueError, match="integer"):
        S.write_shard(tmp_path / "x.bin", np.array([1.0, 2.0]))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_truncated_shard_names_file_and_sizes(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    S.write_shard(path, np.ones(512, dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(S.ShardFormatError) as err:
        S.read_shard(path)
    message = str(err.value)
    assert "fineweb_val_000000.bin" in message
    assert "size 2047 bytes, header says 512 tokens -> expected 2048" in message


def test_shorter_than_header_refused(tmp_path):
    path = tmp_path / "fineweb_train_000003.bin"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(S.ShardFormatError, match=r"fineweb_train_000003\.bin: size 100 bytes, smaller than"):
        S.read_header(path)


@pytest.mark.parametrize(("field", "value", "expected"), [
    (0, 20240521, "magic 20240521"), (1, 2, "version 2"),
    # data.md: "the rest zero"
    (3, 12345, "header int 3 is 12345, expected 0"), (255, -1, "header int 255 is -1, expected 0"),
])
def test_wrong_magic_or_version_refused(tmp_path, field, value, expected):
    path = tmp_path / "fineweb_train_000000.bin"
    S.write_shard(path, np.array([1, 2, 3], dtype=np.uint16))
    raw = bytearray(path.read_bytes())
    raw[4 * field : 4 * field + 4] = np.array([value], dtype="<i4").tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(S.ShardFormatError, match=rf"fineweb_train_000000\.bin: {expected}"):
        S.read_shard(path)


def test_names_and_listing_keep_kinds_apart(tmp_path):
    assert S.shard_name("train", 12) == "fineweb_train_000012.bin"
    assert S.shard_name("val", 0) == "fineweb_val_000000.bin"
    assert S.shard_name("val_bytes", 1) == "fineweb_val_bytes_000001.bin"
    with pytest.raises(ValueError, match="kind"):
        S.shard_name("test", 0)
    for kind, index in [("val", 1), ("val", 0), ("val_bytes", 0), ("train", 0)]:
        S.write_shard(tmp_path / S.shard_name(kind, index), np.array([1], dtype=np.uint16))
    (tmp_path / "fineweb_val_1.bin").write_bytes(b"")  # not six digits: not a shard
    assert [p.name for p in S.list_shards(tmp_path, "val")] == ["fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    assert [p.name for p in S.list_shards(tmp_path, "val_bytes")] == ["fineweb_val_bytes_000000.bin"]


@pytest.mark.parametrize("shard_tokens", [1, 7, 64, 10_000])
def test_stream_writer_cuts_at_exactly_shard_tokens(tmp_path, shard_tokens):
    rng = np.random.default_rng(shard_tokens)
    docs = _random_docs(rng, 30)
    stream = np.concatenate(docs)
    with S.ShardStreamWriter(tmp_path, "train", shard_tokens) as writer:
        for doc in docs:
            writer.append(doc)
    paths = S.list_shards(tmp_path, "train")
    assert paths == writer.paths
    sizes = [len(S.read_shard(p)) for p in paths]
    full, rest = divmod(len(stream), shard_tokens)
    assert sizes == [shard_tokens] * full + ([rest] if rest else [])
    assert np.concatenate([S.read_shard(p) for p in paths]).tolist() == stream.tolist()
    assert [info.tokens for info in writer.shards] == sizes


def test_stream_writer_returns_completed_paths_and_respects_cap(tmp_path):
    writer = S.ShardStreamWriter(tmp_path, "train", shard_tokens=4, max_shards=2)
    assert writer.append(np.array([1, 2, 3], dtype=np.uint16)) == []
    assert writer.append(np.array([1, 5], dtype=np.uint16)) == [tmp_path / "fineweb_train_000000.bin"]
    assert not writer.full
    assert writer.append(np.arange(1, 10, dtype=np.uint16)) == [tmp_path / "fineweb_train_000001.bin"]
    assert writer.full and writer.tokens_accepted == 8
    writer.append(np.array([1, 2], dtype=np.uint16))  # dropped: the cap is reached
    assert writer.close() == [tmp_path / "fineweb_train_000000.bin", tmp_path / "fineweb_train_000001.bin"]
    assert S.read_shard(tmp_path / "fineweb_train_000000.bin").tolist() == [1, 2, 3, 1]
    assert S.read_shard(tmp_path / "fineweb_train_000001.bin").tolist() == [5, 1, 2, 3]


def test_iter_documents_splits_at_bos():
    stream = np.array([1, 5, 6, 1, 1, 7], dtype=np.uint16)
    assert [d.tolist() for d in S.iter_documents(stream)] == [[1, 5, 6], [1], [1, 7]]
    with pytest.raises(ValueError, match="expected BOS"):
        list(S.iter_documents(np.array([5, 1, 6], dtype=np.uint16)))


@pytest.mark.parametrize("shard_tokens", [1, 3, 17, 1000])
def test_document_batches_reassemble_documents_across_shards(tmp_path, shard_tokens):
    rng = np.random.default_rng(7)
    docs = _random_docs(rng, 25, max_len=12)
    with S.ShardStreamWriter(tmp_path, "val", shard_tokens) as writer:
        writer.append(np.concatenate(docs))
    seen, indices = [], []
    for batch in S.iter_document_batches(S.list_shards(tmp_path, "val")):
        for i in range(len(batch)):
            seen.append(batch.document(i).tolist())
            indices.append(batch.first_doc + i)
            # the recorded offset points at this document's BOS inside the named file
            assert S.read_shard(batch.path)[batch.offsets[i]] == S.BOS_ID
    assert seen == [d.tolist() for d in docs]
    assert indices == list(range(len(docs)))


def test_document_batches_refuse_stream_without_leading_bos(tmp_path):
    S.write_shard(tmp_path / "fineweb_train_000000.bin", np.array([9, 1, 2], dtype=np.uint16))
    with pytest.raises(ValueError, match=r"fineweb_train_000000\.bin: stream starts with id 9"):
        list(S.iter_document_batches(S.list_shards(tmp_path, "train")))


def test_doc_hash_matches_blake2b_of_ids_and_fingerprint_ignores_order():
    ids = np.array([300, 2, 65535], dtype=np.uint16)
    digest = hashlib.blake2b(ids.astype("<u2").tobytes(), digest_size=8).digest()
    assert S.doc_hash(ids) == int.from_bytes(digest, "little")
    assert S.doc_hash(ids.astype(np.int64)) == S.doc_hash(ids)
    stream = np.concatenate([[1], ids, [1], ids[:2]]).astype(np.uint16)
    hashes = S.doc_hashes(stream, np.array([0, 4]), np.array([4, 7]))
    assert hashes.tolist() == [S.doc_hash(ids), S.doc_hash(ids[:2])]
    assert S.hashes_fingerprint(hashes) == S.hashes_fingerprint(hashes[::-1])
    assert S.hashes_fingerprint(hashes) != S.hashes_fingerprint(hashes[:1])
