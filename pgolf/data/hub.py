"""Download raw documents, tokenized exports and tokenizers from the Hugging Face Hub: pinned and verified.

How (one commit sha for every file, every file verified before anything is placed, ``download.json`` written last)
is described in :mod:`pgolf.data.hub_client`, which does the transfers.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from huggingface_hub.hf_api import RepoFile

from pgolf.config import DataConfig, TokenizerConfig
from pgolf.data.hub_client import (
    ChecksumMismatchError,
    EXPORTS_FOLDER,
    EXPORT_MANIFEST_CANDIDATES,
    EXPORT_MANIFEST_NAME,
    EXPORT_TOKENIZER_NAME,
    Fetched,
    HubDownloadError,
    RECORD_NAME,
    REPO_TYPE,
    RemoteFile,
    SHARD_FILE,
    Source,
    TOKENIZERS_FOLDER,
    TRAIN_SHARD,
    VAL_BYTES,
    VAL_SHARD,
    api,
    docs_sha256_from,
    fetch,
    file_record,
    list_folder,
    paths_info,
    pin,
    place,
    read_json_blob,
    record_header,
    remove,
    require_files,
    summary,
)
from pgolf.io import atomic_write_json


def download_docs(
    cfg: DataConfig, out_dir: Path, endpoint: Optional[str] = None, *, cache_dir: Optional[Path] = None
) -> dict:
    """Fetch ``cfg.docs_file`` and its source manifest at the pinned commit into ``out_dir`` (same file names).

    The documents must match both the Hub's LFS sha256 and the manifest's ``docs_sha256``; the manifest is fetched
    first, so a manifest without ``docs_sha256`` fails before the large file is transferred.
    """
    out_dir = Path(out_dir)
    src = pin(cfg.hub_repo, cfg.revision, endpoint, cache_dir)
    remotes = require_files(src, [cfg.docs_manifest_file, cfg.docs_file])
    remove(out_dir / RECORD_NAME)  # from here on the folder is incomplete until the new record is written

    manifest = fetch(src, remotes[cfg.docs_manifest_file])
    manifest_where = src.where(cfg.docs_manifest_file)
    docs_sha256 = docs_sha256_from(read_json_blob(manifest.blob, manifest_where), manifest_where)
    docs = fetch(src, remotes[cfg.docs_file])
    if docs.sha256 != docs_sha256:
        raise ChecksumMismatchError(
            f"{src.where(cfg.docs_file)}: sha256 {docs.sha256} differs from docs_sha256 {docs_sha256} "
            f"in {cfg.docs_manifest_file!r} (the repo's documents and their source manifest disagree)"
        )
    docs = dataclasses.replace(docs, verified=docs.verified + ("docs_sha256",))

    files = []
    for fetched, role in ((docs, "docs"), (manifest, "source_manifest")):
        place(fetched, out_dir / fetched.remote.name)
        files.append(file_record(fetched, fetched.remote.name, role))
    record = {**record_header(src, "docs"), "docs_sha256": docs_sha256, "files": files}
    atomic_write_json(out_dir / RECORD_NAME, record)
    summary("docs", src, files, out_dir)
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
        val=_by_index(listing, VAL_SHARD),
        val_bytes=_by_index(listing, VAL_BYTES),
        train=_by_index(listing, TRAIN_SHARD),
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


def _list_subfolder_names(src: Source, folder: str) -> list[str]:
    """Names of the sub-folders of ``folder`` (for error messages only; empty when they cannot be listed)."""
    try:
        entries = api(src.endpoint).list_repo_tree(
            src.repo_id, path_in_repo=folder, revision=src.commit, repo_type=REPO_TYPE
        )
        return sorted(posixpath.basename(e.path) for e in entries if not isinstance(e, RepoFile))
    except Exception:
        return []


def _export_listing(src: Source, folder: str, variant: str) -> list[RemoteFile]:
    listing = list_folder(src, folder, missing_ok=True)
    if listing is None:
        known = ", ".join(n.removeprefix("fineweb10B_") for n in _list_subfolder_names(src, EXPORTS_FOLDER)) or "none"
        raise HubDownloadError(f"{src.where(folder + '/')}: no export variant {variant!r}; variants here: {known}")
    return listing


def _fetch_export_manifest(src: Source, dataset_name: str, val_shards: int) -> tuple[Optional[Fetched], list[str]]:
    """Fetch the export's manifest if the repo has one; check its val shard count; return its tokenizer hints."""
    found = paths_info(src, EXPORT_MANIFEST_CANDIDATES)
    remote = next((found[path] for path in EXPORT_MANIFEST_CANDIDATES if path in found), None)
    if remote is None:
        return None, []
    fetched = fetch(src, remote)
    manifest = read_json_blob(fetched.blob, src.where(remote.repo_path))
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
        ours = SHARD_FILE.fullmatch(path.name) or path.name in (EXPORT_TOKENIZER_NAME, EXPORT_MANIFEST_NAME)
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
    src = pin(cfg.hub_repo, cfg.revision, endpoint, cache_dir)
    shards = select_export_shards(_export_listing(src, folder, cfg.export_variant), cfg.train_shards,
                                  src.where(folder + "/"))
    manifest, tokenizer_hints = _fetch_export_manifest(src, dataset_name, len(shards.val))
    tokenizer = pick_export_tokenizer(
        cfg.export_variant, list_folder(src, TOKENIZERS_FOLDER, missing_ok=True) or [], tokenizer_hints
    )
    if tokenizer is None:
        print(f"hub: note: no tokenizer model for {cfg.export_variant!r} under {TOKENIZERS_FOLDER}/", flush=True)

    plan: list[tuple[str, str, RemoteFile]] = []  # (role, name in out_dir, remote file)
    if tokenizer is not None:
        plan.append(("tokenizer", EXPORT_TOKENIZER_NAME, tokenizer))
    plan += [("val", r.name, r) for r in shards.val.values()]
    plan += [("val_bytes", r.name, r) for r in shards.val_bytes.values()]
    # data.train_shards 0 = every train shard (as prepare's 0 = no cap), never none
    plan += [("train", r.name, r) for r in list(shards.train.values())[: cfg.train_shards or None]]

    remove(out_dir / RECORD_NAME)  # from here on the folder is incomplete until the new record is written
    fetched = [(role, name, fetch(src, remote)) for role, name, remote in plan]
    if manifest is not None:
        fetched.insert(0, ("source_manifest", EXPORT_MANIFEST_NAME, manifest))
    _prune_stale(out_dir, {name for _, name, _ in fetched})
    files = []
    for role, name, item in fetched:
        place(item, out_dir / name)
        files.append(file_record(item, name, role))
    record = {
        **record_header(src, "export"),
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
    summary("export", src, files, out_dir)
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
    src = pin(cfg.hub_repo, cfg.revision, endpoint, cache_dir)
    remote = require_files(src, [cfg.filename])[cfg.filename]
    record_path = tokenizer_record_path(out_path)
    remove(record_path)
    fetched = fetch(src, remote)
    place(fetched, out_path)
    files = [file_record(fetched, out_path.name, "tokenizer")]
    record = {**record_header(src, "tokenizer"), "files": files}
    atomic_write_json(record_path, record)
    summary("tokenizer", src, files, out_path)
    return record
