"""pgolf.data.hub against a local stand-in for the Hub (tests/hubserver.py), through the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest

from hubserver import FakeFile, FakeRepo, HubServer
from pgolf.config import DataConfig, TokenizerConfig
from pgolf.data import hub, hub_client

REPO = "pgolf-test/parameter-golf"
VARIANT = "sp64_test"
EXPORT = f"datasets/datasets/fineweb10B_{VARIANT}"
DOCS = "datasets/docs_selected.jsonl"
DOCS_MANIFEST = "datasets/docs_selected.source_manifest.json"
TOKENIZER = "datasets/tokenizers/fineweb_64_bpe_test.model"  # what the naming rule picks for VARIANT
MANIFEST_TOKENIZER = "datasets/tokenizers/custom_for_test.model"  # what the export manifest names


# ---------------------------------------------------------------------------------------------- fake repo content


def shard_bytes(tokens: np.ndarray) -> bytes:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    return header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes()


DOC_TEXTS = ("First validation document.", "Second one, with UTF-8: é ß Ω.", "A training doc.", "Another.")


def docs_files(docs_sha256: str | None = None, texts: tuple[str, ...] = DOC_TEXTS) -> dict[str, FakeFile]:
    docs = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()
    manifest = {
        "num_docs": len(texts),
        "docs_val": 2,
        "shuffle_seed": 1337,
        "docs_sha256": docs_sha256 or hashlib.sha256(docs).hexdigest(),
    }
    return {DOCS: FakeFile(docs, lfs=True), DOCS_MANIFEST: FakeFile(json.dumps(manifest).encode())}


def export_files(
    variant: str = VARIANT, n_val: int = 2, n_train: int = 3, manifest: bool = True, seed: int = 0
) -> dict[str, FakeFile]:
    rng = np.random.default_rng(seed)
    folder = f"datasets/datasets/fineweb10B_{variant}"
    files = {}
    for i in range(n_val):
        tokens = rng.integers(2, 64, size=300 + i)
        tokens[0] = 1  # BOS
        files[f"{folder}/fineweb_val_{i:06d}.bin"] = FakeFile(shard_bytes(tokens), lfs=True)
        sidecar = rng.integers(0, 5, size=300 + i)
        files[f"{folder}/fineweb_val_bytes_{i:06d}.bin"] = FakeFile(shard_bytes(sidecar), lfs=True)
    for i in range(n_train):
        tokens = rng.integers(2, 64, size=500 + i)
        tokens[0] = 1
        files[f"{folder}/fineweb_train_{i:06d}.bin"] = FakeFile(shard_bytes(tokens), lfs=True)
    files[TOKENIZER] = FakeFile(b"sentencepiece model picked by name " + variant.encode(), lfs=True)
    files[MANIFEST_TOKENIZER] = FakeFile(b"sentencepiece model named by the manifest", lfs=True)
    files["datasets/tokenizers/fineweb_1024_bpe.model"] = FakeFile(b"a tokenizer of another variant", lfs=True)
    if manifest:
        files["datasets/manifest.json"] = FakeFile(json.dumps({
            "datasets": [{"name": f"fineweb10B_{variant}", "tokenizer_name": "tok_test",
                          "stats": {"files_val": n_val, "files_train": n_train}}],
            "tokenizers": [{"name": "tok_test", "model_path": "tokenizers/custom_for_test.model"}],
        }).encode())
    return files


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def hf_env(monkeypatch, tmp_path):
    """A private HF_HOME, telemetry off, offline mode and tokens unset (here and in the library's copies)."""
    home = tmp_path / "hf_home"
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # huggingface_hub read the environment when it was imported: align this process's copies with it
    constants = huggingface_hub.constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"), raising=False)
    return home


@pytest.fixture
def serve(hf_env):
    """Start a HubServer over the given repos; every server started is stopped when the test ends."""
    servers = []

    def start(*repos: FakeRepo, page_size: int = 1000) -> HubServer:
        server = HubServer(list(repos), page_size=page_size).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def docs_cfg(**kw) -> DataConfig:
    return DataConfig(source="docs", hub_repo=REPO, revision="main", **kw)


def export_cfg(train_shards: int, variant: str = VARIANT) -> DataConfig:
    return DataConfig(
        source="export", hub_repo=REPO, revision="main", export_variant=variant, train_shards=train_shards
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------------- revisions


def test_resolve_revision_pins_to_the_commit_sha(serve):
    repo = FakeRepo(REPO, docs_files(), branches=("main", "v1"))
    server = serve(repo)
    assert hub_client.resolve_revision(REPO, "main", endpoint=server.endpoint) == repo.commit
    assert hub_client.resolve_revision(REPO, "v1", endpoint=server.endpoint) == repo.commit
    assert hub_client.resolve_revision(REPO, repo.commit, endpoint=server.endpoint) == repo.commit
    with pytest.raises(hub.HubDownloadError, match=rf"{REPO}.*'no-such-branch'"):
        hub_client.resolve_revision(REPO, "no-such-branch", endpoint=server.endpoint)
    with pytest.raises(hub.HubDownloadError, match=r"pgolf-test/missing.*cannot resolve"):
        hub_client.resolve_revision("pgolf-test/missing", "main", endpoint=server.endpoint)


# ---------------------------------------------------------------------------------------------------------- docs


def test_download_docs_is_verified_and_recorded(serve, tmp_path, cache_dir):
    repo = FakeRepo(REPO, docs_files())
    server = serve(repo)
    out = tmp_path / "docs"
    record = hub.download_docs(docs_cfg(), out, endpoint=server.endpoint, cache_dir=cache_dir)

    assert (out / "docs_selected.jsonl").read_bytes() == repo.files[DOCS].data
    assert (out / "docs_selected.source_manifest.json").read_bytes() == repo.files[DOCS_MANIFEST].data
    assert json.loads((out / "download.json").read_text()) == record
    assert record["revision"] == "main"
    assert record["commit"] == repo.commit and re.fullmatch(r"[0-9a-f]{40}", record["commit"])
    assert record["docs_sha256"] == sha256(repo.files[DOCS].data)
    by_name = {f["name"]: f for f in record["files"]}
    docs_entry = by_name["docs_selected.jsonl"]
    assert docs_entry["sha256"] == sha256(repo.files[DOCS].data)
    assert docs_entry["size_bytes"] == len(repo.files[DOCS].data)
    assert docs_entry["verified"] == ["size", "lfs-sha256", "docs_sha256"]
    assert by_name["docs_selected.source_manifest.json"]["verified"] == ["size", "git-blob-sha1"]
    assert len(server.body_gets("docs_selected.jsonl")) == 1  # fetched through the CDN redirect
    assert len(server.body_gets("docs_selected.source_manifest.json")) == 1


def test_second_call_at_the_same_commit_transfers_no_file_body(serve, tmp_path, cache_dir):
    server = serve(FakeRepo(REPO, docs_files()))
    first = hub.download_docs(docs_cfg(), tmp_path / "a", endpoint=server.endpoint, cache_dir=cache_dir)
    assert len(server.body_gets()) == 2
    seen = len(server.requests)
    second = hub.download_docs(docs_cfg(), tmp_path / "b", endpoint=server.endpoint, cache_dir=cache_dir)
    # at a pinned commit the client finds cached files without even asking for their metadata: API calls only
    assert {r.kind for r in server.requests[seen:]} == {"api"}
    assert second == first
    docs_a, docs_b = (tmp_path / d / "docs_selected.jsonl" for d in ("a", "b"))
    assert docs_b.read_bytes() == docs_a.read_bytes()


@pytest.mark.parametrize("bad_path, check", [(DOCS, "LFS sha256"), (DOCS_MANIFEST, "git blob sha1")])
def test_corrupted_body_is_rejected_and_evicted_from_the_cache(serve, tmp_path, cache_dir, bad_path, check):
    repo = FakeRepo(REPO, docs_files())
    server = serve(repo)
    server.corrupt.add(bad_path)
    out = tmp_path / "docs"
    with pytest.raises(hub.ChecksumMismatchError) as err:
        hub.download_docs(docs_cfg(), out, endpoint=server.endpoint, cache_dir=cache_dir)
    message = str(err.value)
    for needle in (REPO, "'main'", repo.commit, bad_path, check):
        assert needle in message
    assert not out.exists() or list(out.iterdir()) == []  # nothing placed, no record, no temporary left behind

    server.corrupt.clear()  # the bad copy must not have stayed in the cache: a rerun fetches it again and succeeds
    record = hub.download_docs(docs_cfg(), out, endpoint=server.endpoint, cache_dir=cache_dir)
    assert len(server.body_gets(bad_path.rsplit("/", 1)[1])) == 2
    assert (out / "docs_selected.jsonl").read_bytes() == repo.files[DOCS].data
    assert record["commit"] == repo.commit


def test_docs_that_disagree_with_their_source_manifest_are_rejected(serve, tmp_path, cache_dir):
    server = serve(FakeRepo(REPO, docs_files(docs_sha256="ab" * 32)))
    out = tmp_path / "docs"
    with pytest.raises(hub.ChecksumMismatchError, match=r"docs_sha256 abab"):
        hub.download_docs(docs_cfg(), out, endpoint=server.endpoint, cache_dir=cache_dir)
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


def test_a_branch_that_moves_during_the_download_does_not_mix_commits(serve, tmp_path, cache_dir):
    old = FakeRepo(REPO, docs_files())
    new = FakeRepo(REPO, docs_files(texts=("Rewritten history.",)), branches=())
    server = serve(old, new)
    server.after_revision_lookup = lambda: server.move_branch(REPO, "main", new.commit)
    out = tmp_path / "docs"
    record = hub.download_docs(docs_cfg(), out, endpoint=server.endpoint, cache_dir=cache_dir)
    assert hub_client.resolve_revision(REPO, "main", endpoint=server.endpoint) == new.commit  # the branch did move
    assert record["commit"] == old.commit
    assert (out / "docs_selected.jsonl").read_bytes() == old.files[DOCS].data


def test_missing_docs_file_names_repo_revision_and_file(serve, tmp_path, cache_dir):
    files = docs_files()
    del files[DOCS]
    server = serve(FakeRepo(REPO, files))
    with pytest.raises(hub.HubDownloadError, match=rf"{REPO}.*'main'.*{DOCS}.*no such file"):
        hub.download_docs(docs_cfg(), tmp_path / "docs", endpoint=server.endpoint, cache_dir=cache_dir)


# -------------------------------------------------------------------------------------------------------- export


def test_download_export_takes_val_sidecars_first_train_shards_tokenizer_and_manifest(serve, tmp_path, cache_dir):
    repo = FakeRepo(REPO, export_files())
    server = serve(repo, page_size=3)  # the folder listing spans several pages
    out = tmp_path / "export"
    record = hub.download_export(export_cfg(train_shards=2), out, endpoint=server.endpoint, cache_dir=cache_dir)

    expected = {
        "fineweb_val_000000.bin": f"{EXPORT}/fineweb_val_000000.bin",
        "fineweb_val_000001.bin": f"{EXPORT}/fineweb_val_000001.bin",
        "fineweb_val_bytes_000000.bin": f"{EXPORT}/fineweb_val_bytes_000000.bin",
        "fineweb_val_bytes_000001.bin": f"{EXPORT}/fineweb_val_bytes_000001.bin",
        "fineweb_train_000000.bin": f"{EXPORT}/fineweb_train_000000.bin",
        "fineweb_train_000001.bin": f"{EXPORT}/fineweb_train_000001.bin",
        "tokenizer.model": MANIFEST_TOKENIZER,
        "source_manifest.json": "datasets/manifest.json",
    }
    assert sorted(p.name for p in out.iterdir()) == sorted([*expected, "download.json"])
    for name, repo_path in expected.items():
        assert (out / name).read_bytes() == repo.files[repo_path].data, name
    header = np.frombuffer((out / "fineweb_train_000001.bin").read_bytes()[:1024], dtype="<i4")
    assert tuple(header[:3]) == (20240520, 1, 501)

    assert json.loads((out / "download.json").read_text()) == record
    assert record["commit"] == repo.commit and record["revision"] == "main"
    assert (record["val_shards"], record["val_byte_sidecars"]) == (2, 2)
    assert (record["train_shards_requested"], record["train_shards_available"]) == (2, 3)
    assert record["tokenizer"] == MANIFEST_TOKENIZER
    roles = {f["name"]: f["role"] for f in record["files"]}
    assert roles["fineweb_val_bytes_000000.bin"] == "val_bytes" and roles["tokenizer.model"] == "tokenizer"
    for entry in record["files"]:
        assert entry["sha256"] == sha256(repo.files[entry["repo_path"]].data)
        assert entry["repo_path"] == expected[entry["name"]]
    assert not server.body_gets("fineweb_train_000002.bin")


def test_export_second_call_uses_the_cache_and_prunes_stale_shards(serve, tmp_path, cache_dir):
    server = serve(FakeRepo(REPO, export_files()))
    out = tmp_path / "export"
    hub.download_export(export_cfg(train_shards=3), out, endpoint=server.endpoint, cache_dir=cache_dir)
    bodies = len(server.body_gets())
    record = hub.download_export(export_cfg(train_shards=1), out, endpoint=server.endpoint, cache_dir=cache_dir)
    assert len(server.body_gets()) == bodies
    assert sorted(p.name for p in out.glob("fineweb_train_*.bin")) == ["fineweb_train_000000.bin"]
    assert [f["name"] for f in record["files"] if f["role"] == "train"] == ["fineweb_train_000000.bin"]


def test_export_with_train_shards_0_takes_every_train_shard(serve, tmp_path, cache_dir):
    """0 means no cap, as for prepared data: never a download of the validation shards alone."""
    server = serve(FakeRepo(REPO, export_files()))
    out = tmp_path / "export"
    hub.download_export(export_cfg(train_shards=0), out, endpoint=server.endpoint, cache_dir=cache_dir)
    assert len(list(out.glob("fineweb_train_*.bin"))) == 3


def test_export_refuses_more_train_shards_than_exist_before_any_transfer(serve, tmp_path, cache_dir):
    server = serve(FakeRepo(REPO, export_files(n_train=3)))
    out = tmp_path / "export"
    with pytest.raises(hub.HubDownloadError, match=rf"{EXPORT}/.*5 train shards requested.*only 3 exist"):
        hub.download_export(export_cfg(train_shards=5), out, endpoint=server.endpoint, cache_dir=cache_dir)
    assert server.body_gets() == []
    assert not (out / "download.json").exists()


def test_export_without_val_shard_is_refused(serve, tmp_path, cache_dir):
    server = serve(FakeRepo(REPO, export_files(n_val=0, manifest=False)))
    with pytest.raises(hub.HubDownloadError, match=r"no validation shard"):
        hub.download_export(export_cfg(train_shards=1), tmp_path / "x", endpoint=server.endpoint, cache_dir=cache_dir)


def test_unknown_export_variant_lists_the_ones_that_exist(serve, tmp_path, cache_dir):
    server = serve(FakeRepo(REPO, export_files()))
    with pytest.raises(hub.HubDownloadError, match=rf"no export variant 'sp999'; variants here: {VARIANT}"):
        hub.download_export(export_cfg(1, variant="sp999"), tmp_path / "x", endpoint=server.endpoint,
                            cache_dir=cache_dir)


def test_export_without_manifest_picks_the_tokenizer_by_name(serve, tmp_path, cache_dir):
    repo = FakeRepo(REPO, export_files(manifest=False))
    server = serve(repo)
    out = tmp_path / "export"
    record = hub.download_export(export_cfg(train_shards=1), out, endpoint=server.endpoint, cache_dir=cache_dir)
    assert (out / "tokenizer.model").read_bytes() == repo.files[TOKENIZER].data
    assert record["tokenizer"] == TOKENIZER and record["source_manifest"] is None
    assert not (out / "source_manifest.json").exists()


def test_export_whose_manifest_states_another_val_count_is_refused(serve, tmp_path, cache_dir):
    files = export_files(n_val=2)
    manifest = json.loads(files["datasets/manifest.json"].data)
    manifest["datasets"][0]["stats"]["files_val"] = 3
    files["datasets/manifest.json"] = FakeFile(json.dumps(manifest).encode())
    server = serve(FakeRepo(REPO, files))
    with pytest.raises(hub.HubDownloadError, match=r"datasets/manifest.json.*files_val=3.*holds 2 val shards"):
        hub.download_export(export_cfg(train_shards=1), tmp_path / "x", endpoint=server.endpoint, cache_dir=cache_dir)
    assert server.body_gets("fineweb_val_000000.bin") == []


def remote(path: str) -> hub.RemoteFile:
    return hub.RemoteFile(repo_path=path, size_bytes=1, lfs_sha256=None, git_oid=None)


def test_select_export_shards_sorts_by_index_and_checks_sidecars():
    names = ["fineweb_train_000002.bin", "fineweb_val_000001.bin", "fineweb_train_000000.bin",
             "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin", "fineweb_val_bytes_000001.bin",
             "fineweb_train_000001.bin", "README.md"]
    shards = hub.select_export_shards([remote(f"{EXPORT}/{n}") for n in names], 2, "here")
    assert list(shards.val) == [0, 1] and list(shards.val_bytes) == [0, 1] and list(shards.train) == [0, 1, 2]
    assert shards.val[1].name == "fineweb_val_000001.bin"  # a sidecar is never taken for a val shard
    unpaired = [n for n in names if n != "fineweb_val_bytes_000001.bin"]
    with pytest.raises(hub.HubDownloadError, match=r"here: val byte sidecars \[0\] do not pair up"):
        hub.select_export_shards([remote(n) for n in unpaired], 2, "here")


def test_pick_export_tokenizer_follows_the_manifest_then_the_official_naming():
    caseops = "sp8192_lossless_caps_caseops_v1_reserved"
    files = [remote(f"datasets/tokenizers/{n}") for n in (
        "fineweb_8192_bpe.model", f"fineweb_8192_bpe{caseops[6:]}.model", "fineweb_1024_bpe.model",
        "fineweb_1024_bpe.vocab", "fineweb_pure_byte_260.json")]
    assert hub.pick_export_tokenizer(caseops, files).name == "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
    assert hub.pick_export_tokenizer("sp8192", files).name == "fineweb_8192_bpe.model"
    assert hub.pick_export_tokenizer("sp1024", files, ["datasets/tokenizers/fineweb_8192_bpe.model"]).name == (
        "fineweb_8192_bpe.model")
    assert hub.pick_export_tokenizer("byte260", files) is None
    assert hub.pick_export_tokenizer("sp4096", files) is None


def test_interrupted_transfer_resumes_with_a_range_request(serve, tmp_path, cache_dir):
    # the client keeps what it received in chunks of DOWNLOAD_CHUNK_SIZE: cut the body after more than one chunk
    chunk_bytes = huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE
    files = export_files(n_train=0, manifest=False)
    big = f"{EXPORT}/fineweb_train_000000.bin"
    tokens = np.arange(chunk_bytes // 2 + 8192, dtype=np.int64) % 60000  # 2 bytes per token: just over one chunk
    files[big] = FakeFile(shard_bytes(tokens), lfs=True)
    repo = FakeRepo(REPO, files)
    server = serve(repo)
    server.drop_after[big] = chunk_bytes + 4096
    out = tmp_path / "export"
    hub.download_export(export_cfg(train_shards=1), out, endpoint=server.endpoint, cache_dir=cache_dir)

    gets = server.body_gets("fineweb_train_000000.bin")
    assert len(gets) == 2
    assert gets[0].range is None and gets[0].body_bytes == chunk_bytes + 4096
    resumed_from = int(re.fullmatch(r"bytes=(\d+)-", gets[1].range).group(1))
    assert 0 < resumed_from <= chunk_bytes + 4096 and gets[1].status == 206
    assert gets[1].body_bytes == len(repo.files[big].data) - resumed_from
    assert (out / "fineweb_train_000000.bin").read_bytes() == repo.files[big].data


# ----------------------------------------------------------------------------------------------------- tokenizer


def test_download_tokenizer_writes_file_and_record(serve, tmp_path, cache_dir):
    repo = FakeRepo(REPO, export_files())
    server = serve(repo)
    cfg = TokenizerConfig(source="hub", hub_repo=REPO, revision="main", filename=TOKENIZER)
    out = tmp_path / "tok" / "tokenizer.model"
    record = hub.download_tokenizer(cfg, out, endpoint=server.endpoint, cache_dir=cache_dir)
    assert out.read_bytes() == repo.files[TOKENIZER].data
    assert json.loads((tmp_path / "tok" / "tokenizer.model.download.json").read_text()) == record
    assert record["commit"] == repo.commit
    assert record["files"] == [{
        "name": "tokenizer.model", "role": "tokenizer", "repo_path": TOKENIZER,
        "size_bytes": len(repo.files[TOKENIZER].data), "sha256": sha256(repo.files[TOKENIZER].data),
        "verified": ["size", "lfs-sha256"],
    }]


# ----------------------------------------------------------------------------------------------------------- CLI


def test_cli_reaches_the_hub_named_by_hf_endpoint(serve, tmp_path, hf_env):
    repo = FakeRepo(REPO, docs_files())
    server = serve(repo)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE")}
    env.update(HF_ENDPOINT=server.endpoint, HF_HOME=str(hf_env), HF_HUB_DISABLE_TELEMETRY="1")
    out = tmp_path / "docs"

    def run(repo_id: str) -> subprocess.CompletedProcess:
        data_json = json.dumps({"source": "docs", "hub_repo": repo_id, "revision": "main"})
        return subprocess.run(
            [sys.executable, "-m", "pgolf", "data", "download", "docs", "--out", str(out), "--data-json", data_json],
            env=env, capture_output=True, text=True, timeout=120,
        )

    done = run(REPO)
    assert done.returncode == 0, done.stderr
    assert "hub: docs_selected.jsonl" in done.stdout
    record = json.loads((out / "download.json").read_text())
    assert record["commit"] == repo.commit and record["endpoint"] == server.endpoint
    assert list((hf_env / "hub").glob("datasets--pgolf-test--parameter-golf/blobs/*"))  # the library's default cache

    failed = run("pgolf-test/nope")
    assert failed.returncode == 2
    assert "pgolf-test/nope" in failed.stderr and "'main'" in failed.stderr
