"""Download raw documents, tokenized exports and tokenizers from the Hugging Face Hub: pinned and verified.

A record has to be reproducible byte for byte, so every download here

1. resolves the requested revision (branch, tag or sha) to ONE commit sha first and fetches every file at that
   commit: a branch that moves during a long download cannot mix two versions of the data;
2. checks every file against what the Hub's API says about it at that commit: the size always, LFS files by their
   sha256, plain git files by their git blob sha1; the raw documents also by the ``docs_sha256`` of their source
   manifest;
3. fetches and verifies EVERYTHING before it places anything in the output folder, then writes the record
   (``download.json``: repo, requested revision, commit, per-file size / sha256 / how it was verified) last and
   atomically. A folder with a ``download.json`` is complete; one without it is not.

Transfers go through huggingface_hub's own cache (``cache_dir``; ``None`` = the library's default, which honours
``HF_HOME`` / ``HF_HUB_CACHE``), so a second call at the same commit transfers no file body. Files are hard-linked
from the cache into the output folder (copied when the two are on different file systems): treat them as read-only,
writing into one in place would also change the cached copy.

Resuming: huggingface_hub (1.x and 2.x alike) resumes a file with an HTTP ``Range`` request when the connection
drops in the middle of a body, within one call. Its partial file is private to the process and is deleted when the
call fails, so after a killed process the interrupted file starts again from byte 0; files already completed stay in
the cache and are not fetched again.

The endpoint is the library's business: ``endpoint=None`` lets huggingface_hub use its default (it reads
``HF_ENDPOINT`` itself); pgolf never reads that variable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import huggingface_hub
from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import RemoteEntryNotFoundError
from huggingface_hub.hf_api import RepoFile

import pgolf
from pgolf.config import DataConfig, TokenizerConfig
from pgolf.io import atomic_path, atomic_write_json

REPO_TYPE = "dataset"  # every source of this project is a dataset repo
RECORD_NAME = "download.json"
EXPORT_TOKENIZER_NAME = "tokenizer.model"
EXPORT_MANIFEST_NAME = "source_manifest.json"
# Where an export's manifest may sit, in order of preference (the official repo keeps it beside `datasets/datasets`).
EXPORT_MANIFEST_CANDIDATES = ("datasets/manifest.json", "manifest.json")
EXPORTS_FOLDER = "datasets/datasets"
TOKENIZERS_FOLDER = "datasets/tokenizers"

_SHA1_HEX = re.compile(r"[0-9a-f]{40}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_VAL_SHARD = re.compile(r"fineweb_val_(\d{6})\.bin")
_VAL_BYTES = re.compile(r"fineweb_val_bytes_(\d{6})\.bin")
_TRAIN_SHARD = re.compile(r"fineweb_train_(\d{6})\.bin")
_SHARD_FILE = re.compile(r"fineweb_(?:train|val|val_bytes)_\d{6}\.bin")
_HASH_CHUNK_BYTES = 1 << 22


class HubDownloadError(ValueError):
    """A download from the Hub failed, or the repo does not hold what the config asks for."""


class ChecksumMismatchError(HubDownloadError):
    """A file's bytes differ from the size / checksum the Hub (or a source manifest) gives for it."""


# --------------------------------------------------------------------------------------------------------------
# What the Hub says about a file, and where a file comes from
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One file of the repo at the pinned commit, as the Hub's API lists it."""

    repo_path: str
    size_bytes: int
    lfs_sha256: Optional[str]  # LFS files: sha256 of the content
    git_oid: Optional[str]  # git blob sha1: of the content for plain files, of the LFS pointer for LFS files

    @property
    def name(self) -> str:
        return posixpath.basename(self.repo_path)

    @classmethod
    def from_api(cls, entry: RepoFile) -> "RemoteFile":
        lfs_sha256 = getattr(entry.lfs, "sha256", None) if entry.lfs is not None else None
        return cls(
            repo_path=entry.path,
            size_bytes=int(entry.size),
            lfs_sha256=lfs_sha256.lower() if lfs_sha256 else None,
            git_oid=entry.blob_id.lower() if entry.blob_id else None,
        )


@dataclasses.dataclass(frozen=True)
class _Source:
    """A repo pinned to one commit, plus where to reach it and where to cache it."""

    repo_id: str
    revision: str  # what the config asked for
    commit: str  # what it resolved to
    endpoint: Optional[str]
    cache_dir: Optional[str]

    def where(self, repo_path: Optional[str] = None) -> str:
        """Error-message prefix naming the repo, the revision and (optionally) the file."""
        text = f"dataset {self.repo_id!r} revision {self.revision!r} (commit {self.commit})"
        return f"{text}, path {repo_path!r}" if repo_path else text


@dataclasses.dataclass(frozen=True)
class _Fetched:
    """A file that is in the cache and has passed every check; not yet placed in the output folder."""

    remote: RemoteFile
    blob: Path
    sha256: str
    verified: tuple[str, ...]


def _endpoint_name(endpoint: Optional[str]) -> str:
    return endpoint or hf_constants.ENDPOINT


def _api(endpoint: Optional[str]) -> HfApi:
    return HfApi(endpoint=endpoint, library_name="pgolf", library_version=pgolf.__version__)


def _describe(exc: BaseException, max_chars: int = 400) -> str:
    """The library's error on one line (its messages span several), for wrapping into ours."""
    text = " ".join(str(exc).split())
    if len(text) > max_chars:
        text = text[: max_chars - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------------------
# Hub API calls (every error names the repo, the revision and the file)
# --------------------------------------------------------------------------------------------------------------


def resolve_revision(repo_id: str, revision: str, endpoint: Optional[str] = None) -> str:
    """The commit sha that ``revision`` (branch, tag or sha) of dataset ``repo_id`` points at right now."""
    try:
        info = _api(endpoint).repo_info(repo_id, repo_type=REPO_TYPE, revision=revision)
    except Exception as exc:
        raise HubDownloadError(
            f"dataset {repo_id!r} revision {revision!r}: cannot resolve the revision on {_endpoint_name(endpoint)} "
            f"({_describe(exc)})"
        ) from exc
    sha = getattr(info, "sha", None)
    if not isinstance(sha, str) or not _SHA1_HEX.fullmatch(sha.lower()):
        raise HubDownloadError(
            f"dataset {repo_id!r} revision {revision!r}: the Hub gave no commit sha for it (got {sha!r})"
        )
    sha = sha.lower()
    if _SHA1_HEX.fullmatch(revision.lower()) and revision.lower() != sha:
        raise HubDownloadError(f"dataset {repo_id!r}: asked for commit {revision}, the Hub answered commit {sha}")
    return sha


def _pin(repo_id: str, revision: str, endpoint: Optional[str], cache_dir: Optional[Path]) -> _Source:
    commit = resolve_revision(repo_id, revision, endpoint)
    return _Source(repo_id, revision, commit, endpoint, None if cache_dir is None else str(cache_dir))


def _list_folder(src: _Source, folder: str, *, missing_ok: bool = False) -> Optional[list[RemoteFile]]:
    """Files directly inside ``folder`` at the pinned commit (the client follows the API's pagination).

    Returns None for a missing folder when ``missing_ok``.
    """
    try:
        entries = list(
            _api(src.endpoint).list_repo_tree(
                src.repo_id, path_in_repo=folder, recursive=False, revision=src.commit, repo_type=REPO_TYPE
            )
        )
    except RemoteEntryNotFoundError as exc:
        if missing_ok:
            return None
        raise HubDownloadError(f"{src.where(folder + '/')}: no such folder") from exc
    except Exception as exc:
        raise HubDownloadError(f"{src.where(folder + '/')}: cannot list the folder ({_describe(exc)})") from exc
    return [RemoteFile.from_api(entry) for entry in entries if isinstance(entry, RepoFile)]


def _paths_info(src: _Source, paths: Sequence[str]) -> dict[str, RemoteFile]:
    """API metadata of the given files at the pinned commit; files that do not exist are absent from the result."""
    try:
        entries = _api(src.endpoint).get_paths_info(
            src.repo_id, list(paths), revision=src.commit, repo_type=REPO_TYPE
        )
    except Exception as exc:
        raise HubDownloadError(f"{src.where()}: cannot get file metadata for {list(paths)} ({_describe(exc)})") from exc
    return {entry.path: RemoteFile.from_api(entry) for entry in entries if isinstance(entry, RepoFile)}


def _require_files(src: _Source, paths: Sequence[str]) -> dict[str, RemoteFile]:
    found = _paths_info(src, paths)
    for path in paths:
        if path not in found:
            raise HubDownloadError(f"{src.where(path)}: no such file at this commit")
    return found


# --------------------------------------------------------------------------------------------------------------
# Fetch into the cache, verify, place
# --------------------------------------------------------------------------------------------------------------


def _hash_file(path: Path, git_blob: bool) -> tuple[str, Optional[str]]:
    """(sha256, git blob sha1 or None) of a file in one pass; memory bounded."""
    sha256 = hashlib.sha256()
    sha1 = None
    if git_blob:
        sha1 = hashlib.sha1()
        sha1.update(b"blob %d\0" % path.stat().st_size)  # git hashes "blob <size>\0" + content
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            sha256.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
    return sha256.hexdigest(), None if sha1 is None else sha1.hexdigest()


def _verify(path: Path, remote: RemoteFile, where: str) -> tuple[str, tuple[str, ...]]:
    """Check a local copy against the API's metadata; returns (sha256, the checks that passed)."""
    size_bytes = path.stat().st_size
    if size_bytes != remote.size_bytes:
        raise ChecksumMismatchError(f"{where}: got {size_bytes} bytes, the Hub lists {remote.size_bytes} bytes")
    use_git_oid = remote.lfs_sha256 is None and remote.git_oid is not None
    sha256, git_sha1 = _hash_file(path, git_blob=use_git_oid)
    if remote.lfs_sha256 is not None:
        if sha256 != remote.lfs_sha256:
            raise ChecksumMismatchError(
                f"{where}: sha256 {sha256} differs from the Hub's LFS sha256 {remote.lfs_sha256}"
            )
        return sha256, ("size", "lfs-sha256")
    if use_git_oid:
        if git_sha1 != remote.git_oid:
            raise ChecksumMismatchError(
                f"{where}: git blob sha1 {git_sha1} differs from the Hub's oid {remote.git_oid}"
            )
        return sha256, ("size", "git-blob-sha1")
    return sha256, ("size",)


def _evict(pointer: Path) -> None:
    """Drop a bad cache entry so that the next call fetches the file again instead of trusting it.

    Removes the snapshot pointer and every link it goes through down to the bytes (the cache's ``blobs/`` entry,
    and huggingface_hub 2.x's shared blob store when the blob is a link into it).
    """
    chain = [pointer]
    while chain[-1].is_symlink() and len(chain) < 8:
        chain.append(chain[-1].parent / os.readlink(chain[-1]))
    for path in chain:
        _remove(path)


def _is_cached(src: _Source, repo_path: str) -> bool:
    found = try_to_load_from_cache(
        src.repo_id, repo_path, cache_dir=src.cache_dir, revision=src.commit, repo_type=REPO_TYPE
    )
    return isinstance(found, str) and os.path.exists(found)


def _size_text(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:,.1f} MB" if size_bytes >= 100_000 else f"{size_bytes:,} bytes"


def _fetch(src: _Source, remote: RemoteFile) -> _Fetched:
    """Make sure ``remote`` is in the cache at the pinned commit and matches the API's metadata.

    A cached copy that fails the checks is evicted, so a rerun downloads it again rather than failing forever.
    """
    where = src.where(remote.repo_path)
    was_cached = _is_cached(src, remote.repo_path)
    start = time.monotonic()
    try:
        local = hf_hub_download(
            src.repo_id,
            remote.repo_path,
            repo_type=REPO_TYPE,
            revision=src.commit,
            cache_dir=src.cache_dir,
            endpoint=src.endpoint,
            library_name="pgolf",
            library_version=pgolf.__version__,
        )
    except Exception as exc:
        raise HubDownloadError(f"{where}: download failed ({_describe(exc)})") from exc
    seconds = time.monotonic() - start
    pointer = Path(local)
    blob = pointer.resolve()
    try:
        sha256, verified = _verify(blob, remote, where)
    except ChecksumMismatchError as exc:
        _evict(pointer)
        raise ChecksumMismatchError(f"{exc}; the bad copy was removed from the cache") from None
    speed = "from cache" if was_cached else f"{seconds:.1f} s, {remote.size_bytes / 1e6 / max(seconds, 1e-6):.1f} MB/s"
    print(f"hub: {remote.name}  {_size_text(remote.size_bytes)}  {speed}  [{', '.join(verified)} ok]", flush=True)
    return _Fetched(remote=remote, blob=blob, sha256=sha256, verified=verified)


def _place(fetched: _Fetched, dest: Path) -> None:
    """Put a verified cache blob at ``dest`` atomically: hard link when possible, else copy."""
    with atomic_path(dest) as tmp:
        tmp.unlink()
        try:
            os.link(fetched.blob, tmp)
        except OSError:
            shutil.copyfile(fetched.blob, tmp)
            if tmp.stat().st_size != fetched.remote.size_bytes:
                raise HubDownloadError(f"{dest}: copy from {fetched.blob} is incomplete")


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _file_record(fetched: _Fetched, name: str, role: str) -> dict[str, Any]:
    return {
        "name": name,
        "role": role,
        "repo_path": fetched.remote.repo_path,
        "size_bytes": fetched.remote.size_bytes,
        "sha256": fetched.sha256,
        "verified": list(fetched.verified),
    }


def _record_header(src: _Source, kind: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "repo_id": src.repo_id,
        "repo_type": REPO_TYPE,
        "revision": src.revision,
        "commit": src.commit,
        "endpoint": _endpoint_name(src.endpoint),
        "huggingface_hub_version": huggingface_hub.__version__,
    }


def _read_json_blob(path: Path, where: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HubDownloadError(f"{where}: not valid JSON ({exc})") from None


def _summary(kind: str, src: _Source, files: list[dict[str, Any]], out: Path) -> None:
    total_gb = sum(f["size_bytes"] for f in files) / 1e9
    print(f"hub: {kind} {src.repo_id}@{src.commit[:12]}: {len(files)} files, {total_gb:.3f} GB -> {out}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Raw documents
# --------------------------------------------------------------------------------------------------------------


def _docs_sha256_from(manifest: Any, where: str) -> str:
    value = manifest.get("docs_sha256") if isinstance(manifest, dict) else None
    if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value.lower()):
        raise HubDownloadError(f"{where}: expected a 'docs_sha256' field of 64 hex digits, got {value!r}")
    return value.lower()


def download_docs(
    cfg: DataConfig, out_dir: Path, endpoint: Optional[str] = None, *, cache_dir: Optional[Path] = None
) -> dict:
    """Fetch ``cfg.docs_file`` and its source manifest at the pinned commit into ``out_dir`` (same file names).

    The documents must match both the Hub's LFS sha256 and the manifest's ``docs_sha256``; the manifest is fetched
    first, so a manifest without ``docs_sha256`` fails before the large file is transferred.
    """
    out_dir = Path(out_dir)
    src = _pin(cfg.hub_repo, cfg.revision, endpoint, cache_dir)
    remotes = _require_files(src, [cfg.docs_manifest_file, cfg.docs_file])
    _remove(out_dir / RECORD_NAME)  # from here on the folder is incomplete until the new record is written

    manifest = _fetch(src, remotes[cfg.docs_manifest_file])
    manifest_where = src.where(cfg.docs_manifest_file)
    docs_sha256 = _docs_sha256_from(_read_json_blob(manifest.blob, manifest_where), manifest_where)
    docs = _fetch(src, remotes[cfg.docs_file])
    if docs.sha256 != docs_sha256:
        raise ChecksumMismatchError(
            f"{src.where(cfg.docs_file)}: sha256 {docs.sha256} differs from docs_sha256 {docs_sha256} "
            f"in {cfg.docs_manifest_file!r} (the repo's documents and their source manifest disagree)"
        )
    docs = dataclasses.replace(docs, verified=docs.verified + ("docs_sha256",))

    files = []
    for fetched, role in ((docs, "docs"), (manifest, "source_manifest")):
        _place(fetched, out_dir / fetched.remote.name)
        files.append(_file_record(fetched, fetched.remote.name, role))
    record = {**_record_header(src, "docs"), "docs_sha256": docs_sha256, "files": files}
    atomic_write_json(out_dir / RECORD_NAME, record)
    _summary("docs", src, files, out_dir)
    return record


# --------------------------------------------------------------------------------------------------------------
# Tokenized exports
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExportShards:
    """The shard files of one export folder, by index."""

    val: dict[int, RemoteFile]
    val_bytes: dict[int, RemoteFile]
    train: dict[int, RemoteFile]


def _by_index(files: Sequence[RemoteFile], pattern: re.Pattern) -> dict[int, RemoteFile]:
    found = {}
    for remote in files:
        match = pattern.fullmatch(remote.name)
        if match:
            found[int(match.group(1))] = remote
    return dict(sorted(found.items()))


def select_export_shards(listing: Sequence[RemoteFile], train_shards: int, where: str) -> ExportShards:
    """Sort an export folder's files into shards and check they can serve the request (no I/O).

    Refuses a folder without val shards, with fewer train shards than ``train_shards``, or with val byte sidecars
    that do not pair up one to one with the val shards.
    """
    shards = ExportShards(
        val=_by_index(listing, _VAL_SHARD),
        val_bytes=_by_index(listing, _VAL_BYTES),
        train=_by_index(listing, _TRAIN_SHARD),
    )
    if not shards.val:
        raise HubDownloadError(f"{where}: no validation shard (fineweb_val_NNNNNN.bin) in this export")
    if len(shards.train) < train_shards:
        raise HubDownloadError(
            f"{where}: {train_shards} train shards requested (data.train_shards), only {len(shards.train)} exist"
        )
    if shards.val_bytes and list(shards.val_bytes) != list(shards.val):
        raise HubDownloadError(
            f"{where}: val byte sidecars {list(shards.val_bytes)} do not pair up with val shards {list(shards.val)}"
        )
    return shards


def _manifest_dataset_entry(manifest: Any, dataset_name: str) -> Optional[dict]:
    datasets = manifest.get("datasets") if isinstance(manifest, dict) else None
    if not isinstance(datasets, list):
        return None
    return next((d for d in datasets if isinstance(d, dict) and d.get("name") == dataset_name), None)


def _manifest_val_shards(dataset_entry: Optional[dict]) -> Optional[int]:
    stats = dataset_entry.get("stats") if dataset_entry is not None else None
    stated = stats.get("files_val") if isinstance(stats, dict) else None
    return stated if isinstance(stated, int) else None


def _manifest_tokenizer_paths(manifest: Any, dataset_entry: Optional[dict], manifest_dir: str) -> list[str]:
    """Repo paths the manifest names for the export's tokenizer model (most specific first).

    The official manifest lists ``tokenizers: [{name, model_path}]`` with paths relative to the manifest's folder and
    ties each dataset to one through ``tokenizer_name``.
    """
    if dataset_entry is None or not isinstance(manifest.get("tokenizers"), list):
        return []
    name = dataset_entry.get("tokenizer_name")
    entry = next((t for t in manifest["tokenizers"] if isinstance(t, dict) and t.get("name") == name), None)
    model_path = entry.get("model_path") if entry else None
    if not isinstance(model_path, str) or not model_path.endswith(".model"):
        return []
    candidates = [f"{TOKENIZERS_FOLDER}/{posixpath.basename(model_path)}"]
    if not posixpath.isabs(model_path):
        candidates.insert(0, posixpath.normpath(posixpath.join(manifest_dir, model_path)))
    return candidates


def pick_export_tokenizer(
    variant: str, tokenizers: Sequence[RemoteFile], manifest_paths: Sequence[str] = ()
) -> Optional[RemoteFile]:
    """The tokenizer model of export ``variant`` among the files of ``datasets/tokenizers/``, or None (no I/O).

    The export's manifest names it when it can (``manifest_paths``); otherwise the official naming applies:
    variant ``sp<V><suffix>`` uses ``fineweb_<V>_bpe<suffix>.model`` (``sp8192_lossless_caps_caseops_v1_reserved`` ->
    ``fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model``). Byte-level variants have no ``.model``.
    """
    by_path = {remote.repo_path: remote for remote in tokenizers}
    for path in manifest_paths:
        if path in by_path:
            return by_path[path]
    match = re.fullmatch(r"sp(\d+)(.*)", variant)
    if match:
        return by_path.get(f"{TOKENIZERS_FOLDER}/fineweb_{match.group(1)}_bpe{match.group(2)}.model")
    return None


def _list_subfolder_names(src: _Source, folder: str) -> list[str]:
    """Names of the sub-folders of ``folder`` (for error messages only; empty when they cannot be listed)."""
    try:
        entries = _api(src.endpoint).list_repo_tree(
            src.repo_id, path_in_repo=folder, revision=src.commit, repo_type=REPO_TYPE
        )
        return sorted(posixpath.basename(e.path) for e in entries if not isinstance(e, RepoFile))
    except Exception:
        return []


def _export_listing(src: _Source, folder: str, variant: str) -> list[RemoteFile]:
    listing = _list_folder(src, folder, missing_ok=True)
    if listing is None:
        known = ", ".join(n.removeprefix("fineweb10B_") for n in _list_subfolder_names(src, EXPORTS_FOLDER)) or "none"
        raise HubDownloadError(f"{src.where(folder + '/')}: no export variant {variant!r}; variants here: {known}")
    return listing


def _fetch_export_manifest(src: _Source, dataset_name: str, val_shards: int) -> tuple[Optional[_Fetched], list[str]]:
    """Fetch the export's manifest if the repo has one; check its val shard count; return its tokenizer hints."""
    found = _paths_info(src, EXPORT_MANIFEST_CANDIDATES)
    remote = next((found[path] for path in EXPORT_MANIFEST_CANDIDATES if path in found), None)
    if remote is None:
        return None, []
    fetched = _fetch(src, remote)
    manifest = _read_json_blob(fetched.blob, src.where(remote.repo_path))
    entry = _manifest_dataset_entry(manifest, dataset_name)
    stated = _manifest_val_shards(entry)
    if stated is not None and stated != val_shards:
        raise HubDownloadError(
            f"{src.where(remote.repo_path)}: states files_val={stated} for {dataset_name}, "
            f"but the export folder holds {val_shards} val shards"
        )
    return fetched, _manifest_tokenizer_paths(manifest, entry, posixpath.dirname(remote.repo_path))


def _prune_stale(out_dir: Path, keep: set[str]) -> None:
    """Remove shard / tokenizer / manifest files an earlier call left that are not part of this download."""
    if not out_dir.is_dir():
        return
    for path in sorted(out_dir.iterdir()):
        ours = _SHARD_FILE.fullmatch(path.name) or path.name in (EXPORT_TOKENIZER_NAME, EXPORT_MANIFEST_NAME)
        if ours and path.name not in keep:
            print(f"hub: removing {path} (not part of this download)", flush=True)
            path.unlink()


def download_export(
    cfg: DataConfig, out_dir: Path, endpoint: Optional[str] = None, *, cache_dir: Optional[Path] = None
) -> dict:
    """Fetch a tokenized export (``datasets/datasets/fineweb10B_<export_variant>/``) into ``out_dir``, flat.

    Takes every val shard and val byte sidecar, the first ``cfg.train_shards`` train shards by name, the variant's
    tokenizer (as ``tokenizer.model``) and the export manifest (as ``source_manifest.json``) when the repo has them.
    The request is checked before any shard moves: enough train shards, at least one val shard, one sidecar per val
    shard, and as many val shards as the manifest states. Shard files in ``out_dir`` that are not part of this
    download (from an earlier call with more shards) are removed, so a glob over ``out_dir`` sees exactly this set.
    """
    out_dir = Path(out_dir)
    dataset_name = f"fineweb10B_{cfg.export_variant}"
    folder = f"{EXPORTS_FOLDER}/{dataset_name}"
    src = _pin(cfg.hub_repo, cfg.revision, endpoint, cache_dir)
    shards = select_export_shards(_export_listing(src, folder, cfg.export_variant), cfg.train_shards,
                                  src.where(folder + "/"))
    manifest, tokenizer_hints = _fetch_export_manifest(src, dataset_name, len(shards.val))
    tokenizer = pick_export_tokenizer(
        cfg.export_variant, _list_folder(src, TOKENIZERS_FOLDER, missing_ok=True) or [], tokenizer_hints
    )
    if tokenizer is None:
        print(f"hub: note: no tokenizer model for {cfg.export_variant!r} under {TOKENIZERS_FOLDER}/", flush=True)

    plan: list[tuple[str, str, RemoteFile]] = []  # (role, name in out_dir, remote file)
    if tokenizer is not None:
        plan.append(("tokenizer", EXPORT_TOKENIZER_NAME, tokenizer))
    plan += [("val", r.name, r) for r in shards.val.values()]
    plan += [("val_bytes", r.name, r) for r in shards.val_bytes.values()]
    plan += [("train", r.name, r) for r in list(shards.train.values())[: cfg.train_shards]]

    _remove(out_dir / RECORD_NAME)  # from here on the folder is incomplete until the new record is written
    fetched = [(role, name, _fetch(src, remote)) for role, name, remote in plan]
    if manifest is not None:
        fetched.insert(0, ("source_manifest", EXPORT_MANIFEST_NAME, manifest))
    _prune_stale(out_dir, {name for _, name, _ in fetched})
    files = []
    for role, name, item in fetched:
        _place(item, out_dir / name)
        files.append(_file_record(item, name, role))
    record = {
        **_record_header(src, "export"),
        "export_variant": cfg.export_variant,
        "folder": folder,
        "train_shards_requested": cfg.train_shards,
        "train_shards_available": len(shards.train),
        "val_shards": len(shards.val),
        "val_byte_sidecars": len(shards.val_bytes),
        "tokenizer": None if tokenizer is None else tokenizer.repo_path,
        "source_manifest": None if manifest is None else manifest.remote.repo_path,
        "files": files,
    }
    atomic_write_json(out_dir / RECORD_NAME, record)
    _summary("export", src, files, out_dir)
    return record


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


def tokenizer_record_path(out_path: Path) -> Path:
    """Where ``download_tokenizer`` writes its record: ``<out_path>.download.json``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".download.json")


def download_tokenizer(
    cfg: TokenizerConfig, out_path: Path, endpoint: Optional[str] = None, *, cache_dir: Optional[Path] = None
) -> dict:
    """Fetch the single file ``cfg.filename`` of dataset ``cfg.hub_repo`` at the pinned commit to ``out_path``."""
    out_path = Path(out_path)
    src = _pin(cfg.hub_repo, cfg.revision, endpoint, cache_dir)
    remote = _require_files(src, [cfg.filename])[cfg.filename]
    record_path = tokenizer_record_path(out_path)
    _remove(record_path)
    fetched = _fetch(src, remote)
    _place(fetched, out_path)
    files = [_file_record(fetched, out_path.name, "tokenizer")]
    record = {**_record_header(src, "tokenizer"), "files": files}
    atomic_write_json(record_path, record)
    _summary("tokenizer", src, files, out_path)
    return record
