"""A disk cache of the shipped bundle's module table (:func:`pgolf.artifact.bundle.module_table`, minified form).

Why: shrinking every embedded module is seconds of AST work, and Snakemake did it in every plan that holds a
bundle or gate job (the bundle rule's ``code_id`` param, the gate's code identity): ``snakemake -n`` paid ~5 s of
a 6.5 s plan for it. Only that code identity reads the cache; the bundle job always computes the file it writes
(and stores its table), so an entry that were wrong would show as the plan's code identity differing from the
written file's CODE_HASH, which the gate records and the submission checks. The table is a pure function of

- the shipped recipe (its switches are folded, its values become the generated ``pgolf.config``),
- every source file of the pgolf package it is built from (the embedded modules and the transforms themselves),
- the interpreter (``ast.unparse``'s spelling varies between Python versions) and torch's version (the method
  names torch's classes call are kept: :func:`pgolf.artifact.reach.protocol_names`),

so an entry is keyed by a sha256 over all of them and a hit returns exactly what computing would. A missing,
unreadable or malformed entry is computed again; a cache folder that cannot be written is not an error.

Where: ``$PGOLF_CACHE_DIR/bundle_tables`` (``PGOLF_CACHE_DIR=off`` turns the cache off), else
``$XDG_CACHE_HOME/pgolf/bundle_tables``, else ``~/.cache/pgolf/bundle_tables``. At most
:data:`MAX_ENTRIES` entries (~0.3 MB each) are kept, the most recently written.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from pgolf.io import atomic_write_text, canonical_json

CACHE_FORMAT = "pgolf-bundle-table-1"
MAX_ENTRIES = 32


def cache_dir() -> Optional[Path]:
    """The folder of the entries, or None when ``PGOLF_CACHE_DIR`` is ``off`` (or no home folder is known)."""
    chosen = os.environ.get("PGOLF_CACHE_DIR")
    if chosen == "off":
        return None
    if chosen:
        return Path(chosen) / "bundle_tables"
    try:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    except RuntimeError:  # no HOME and a user id without a passwd entry
        return None
    return Path(base) / "pgolf" / "bundle_tables"


def _torch_version() -> str:
    """The installed torch's version and location, read without importing it (importing torch is ~2 s, the
    most of a plan that finds its table here)."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None:
        return "none"
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"{version} at {spec.origin}"


def table_key(recipe: dict, package_dir: Path) -> Optional[str]:
    """sha256 over the cache format, the interpreter, torch's version, the recipe (canonical JSON) and every
    ``.py`` file under ``package_dir`` (relative path and bytes, in path order; hidden files such as an editor's
    lock links are not sources). None when the cache is off or a source cannot be read: no cache then."""
    if cache_dir() is None:
        return None
    digest = hashlib.sha256()
    for part in (CACHE_FORMAT, sys.version, _torch_version(), canonical_json(recipe)):
        digest.update(part.encode("utf-8") + b"\0")
    try:
        for path in sorted(package_dir.rglob("*.py")):
            if any(part.startswith(".") for part in path.relative_to(package_dir).parts):
                continue
            digest.update(path.relative_to(package_dir).as_posix().encode("utf-8") + b"\0")
            digest.update(path.read_bytes() + b"\0")
    except OSError:
        return None
    return digest.hexdigest()


def load(key: Optional[str]) -> Optional[dict[str, Any]]:
    """The entry stored under ``key`` (``{"modules": [[name, is_package, source], ...], "left_out": {...},
    "messages": {...}}``), or None when there is none or it is not a well-formed entry for this key."""
    folder = cache_dir()
    if folder is None or key is None:
        return None
    try:
        entry = json.loads((folder / f"{key}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not _well_formed(entry, key):
        return None
    return entry


def _well_formed(entry: Any, key: str) -> bool:
    if not isinstance(entry, dict) or entry.get("format") != CACHE_FORMAT or entry.get("key") != key:
        return False
    modules, left_out, messages = entry.get("modules"), entry.get("left_out"), entry.get("messages")
    if not isinstance(modules, list) or not isinstance(left_out, dict) or not isinstance(messages, dict):
        return False
    return all(isinstance(m, list) and len(m) == 3 and isinstance(m[0], str) and isinstance(m[1], bool)
               and isinstance(m[2], str) for m in modules)


def store(key: Optional[str], modules: list[tuple[str, bool, str]], left_out: dict[str, str],
          messages: dict[str, str]) -> None:
    """Write the entry for ``key`` (temp file, then rename: a reader never sees half an entry) and keep the newest
    :data:`MAX_ENTRIES`. Does nothing without a key, when the folder cannot be written, or when torch did not
    import (the shrink then keeps every public method, a table the key could not tell from the usual one)."""
    folder = cache_dir()
    if folder is None or key is None or (_torch_version() != "none" and "torch" not in sys.modules):
        return
    entry = {"format": CACHE_FORMAT, "key": key, "modules": [list(m) for m in modules], "left_out": left_out,
             "messages": messages}
    try:
        atomic_write_text(folder / f"{key}.json", json.dumps(entry) + "\n")  # insertion order kept: the table's own
        _prune(folder)
    except OSError:
        return


def _prune(folder: Path) -> None:
    entries = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[MAX_ENTRIES:]:
        try:
            old.unlink()
        except FileNotFoundError:  # a concurrent plan pruned it first
            pass
