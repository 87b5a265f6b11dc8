"""The Hugging Face Hub plumbing of the downloads (:mod:`pgolf.data.hub`): pin, list, fetch, verify, place.

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
from pgolf.io import atomic_path

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
VAL_SHARD = re.compile(r"fineweb_val_(\d{6})\.bin")
VAL_BYTES = re.compile(r"fineweb_val_bytes_(\d{6})\.bin")
TRAIN_SHARD = re.compile(r"fineweb_train_(\d{6})\.bin")
SHARD_FILE = re.compile(r"fineweb_(?:train|val|val_bytes)_\d{6}\.bin")
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
class Source:
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
class Fetched:
    """A file that is in the cache and has passed every check; not yet placed in the output folder."""

    remote: RemoteFile
    blob: Path
    sha256: str
    verified: tuple[str, ...]


def _endpoint_name(endpoint: Optional[str]) -> str:
    return endpoint or hf_constants.ENDPOINT


def api(endpoint: Optional[str]) -> HfApi:
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
        info = api(endpoint).repo_info(repo_id, repo_type=REPO_TYPE, revision=revision)
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


def pin(repo_id: str, revision: str, endpoint: Optional[str], cache_dir: Optional[Path]) -> Source:
    commit = resolve_revision(repo_id, revision, endpoint)
    return Source(repo_id, revision, commit, endpoint, None if cache_dir is None else str(cache_dir))


def list_folder(src: Source, folder: str, *, missing_ok: bool = False) -> Optional[list[RemoteFile]]:
    """Files directly inside ``folder`` at the pinned commit (the client follows the API's pagination).

    Returns None for a missing folder when ``missing_ok``.
    """
    try:
        entries = list(
            api(src.endpoint).list_repo_tree(
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


def paths_info(src: Source, paths: Sequence[str]) -> dict[str, RemoteFile]:
    """API metadata of the given files at the pinned commit; files that do not exist are absent from the result."""
    try:
        entries = api(src.endpoint).get_paths_info(
            src.repo_id, list(paths), revision=src.commit, repo_type=REPO_TYPE
        )
    except Exception as exc:
        raise HubDownloadError(f"{src.where()}: cannot get file metadata for {list(paths)} ({_describe(exc)})") from exc
    return {entry.path: RemoteFile.from_api(entry) for entry in entries if isinstance(entry, RepoFile)}


def require_files(src: Source, paths: Sequence[str]) -> dict[str, RemoteFile]:
    found = paths_info(src, paths)
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
        remove(path)


def _is_cached(src: Source, repo_path: str) -> bool:
    found = try_to_load_from_cache(
        src.repo_id, repo_path, cache_dir=src.cache_dir, revision=src.commit, repo_type=REPO_TYPE
    )
    return isinstance(found, str) and os.path.exists(found)


def _size_text(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:,.1f} MB" if size_bytes >= 100_000 else f"{size_bytes:,} bytes"


def fetch(src: Source, remote: RemoteFile) -> Fetched:
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
    return Fetched(remote=remote, blob=blob, sha256=sha256, verified=verified)


def place(fetched: Fetched, dest: Path) -> None:
    """Put a verified cache blob at ``dest`` atomically: hard link when possible, else copy."""
    with atomic_path(dest) as tmp:
        tmp.unlink()
        try:
            os.link(fetched.blob, tmp)
        except OSError:
            shutil.copyfile(fetched.blob, tmp)
            if tmp.stat().st_size != fetched.remote.size_bytes:
                raise HubDownloadError(f"{dest}: copy from {fetched.blob} is incomplete")


def remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def file_record(fetched: Fetched, name: str, role: str) -> dict[str, Any]:
    return {
        "name": name,
        "role": role,
        "repo_path": fetched.remote.repo_path,
        "size_bytes": fetched.remote.size_bytes,
        "sha256": fetched.sha256,
        "verified": list(fetched.verified),
    }


def record_header(src: Source, kind: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "repo_id": src.repo_id,
        "repo_type": REPO_TYPE,
        "revision": src.revision,
        "commit": src.commit,
        "endpoint": _endpoint_name(src.endpoint),
        "huggingface_hub_version": huggingface_hub.__version__,
    }


def read_json_blob(path: Path, where: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HubDownloadError(f"{where}: not valid JSON ({exc})") from None


def summary(kind: str, src: Source, files: list[dict[str, Any]], out: Path) -> None:
    total_gb = sum(f["size_bytes"] for f in files) / 1e9
    print(f"hub: {kind} {src.repo_id}@{src.commit[:12]}: {len(files)} files, {total_gb:.3f} GB -> {out}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Raw documents
# --------------------------------------------------------------------------------------------------------------


def docs_sha256_from(manifest: Any, where: str) -> str:
    value = manifest.get("docs_sha256") if isinstance(manifest, dict) else None
    if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value.lower()):
        raise HubDownloadError(f"{where}: expected a 'docs_sha256' field of 64 hex digits, got {value!r}")
    return value.lower()
