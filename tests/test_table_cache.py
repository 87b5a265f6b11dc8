"""pgolf.artifact.table_cache: the shipped bundle's module table, kept on disk between Snakemake plans.

A hit must equal what shrinking computes (modules, left-out reasons and message tags, in order); any change of
the recipe or of a pgolf source is another key; a damaged or foreign entry is computed again; a folder that
cannot be written, or the cache turned off, only costs the time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

import pgolf
from pgolf.artifact import bundle, table_cache
from pgolf.config import load_run_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def _smoke():
    return bundle.shipped_recipe(load_run_config(REPO / "recipes" / "smoke.yaml"))


def _no_shrinking(*args, **kwargs):
    raise AssertionError("the table was computed, not read from the cache")


def test_a_hit_is_the_computed_table_and_another_recipe_is_computed(tmp_path, monkeypatch):
    monkeypatch.setenv("PGOLF_CACHE_DIR", str(tmp_path))
    cfg = _smoke()
    computed = bundle.module_table(cfg, minify=True)
    assert len(list((tmp_path / "bundle_tables").glob("*.json"))) == 1

    monkeypatch.setattr(bundle, "_shrunk_table", _no_shrinking)
    cached = bundle.module_table(cfg, minify=True, read_cache=True)
    assert cached == computed
    assert list(cached.left_out.items()) == list(computed.left_out.items())
    assert list(cached.messages.items()) == list(computed.messages.items())
    assert bundle.code_identity(cfg) == bundle.bundle_code_hash(computed.modules)  # the plans' reader

    # what a bundle writes is always computed, never read
    with pytest.raises(AssertionError, match="computed, not read"):
        bundle.build_bundle(cfg, minify=True)
    changed = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, diagnostics=not cfg.evaluate.diagnostics))
    with pytest.raises(AssertionError, match="computed, not read"):
        bundle.module_table(changed, minify=True, read_cache=True)


def test_the_key_follows_the_recipe_and_every_source_byte(tmp_path):
    package = tmp_path / "pgolf"
    shutil.copytree(Path(pgolf.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    recipe = to_dict(_smoke())
    key = table_cache.table_key(recipe, package)
    assert table_cache.table_key(recipe, package) == key
    assert table_cache.table_key({**recipe, "run": "other"}, package) != key

    rope = package / "model" / "rope.py"
    rope.write_text(rope.read_text() + "# one comment more\n")
    assert table_cache.table_key(recipe, package) != key
    (package / "model" / "extra.py").write_text("")  # a new module, even an empty one
    edited = table_cache.table_key(recipe, package)
    (package / "model" / "extra.py").unlink()
    assert edited != table_cache.table_key(recipe, package)

    # an editor's lock link (a dangling symlink named .#x.py) is no source and breaks nothing
    key = table_cache.table_key(recipe, package)
    (package / "model" / ".#rope.py").symlink_to(tmp_path / "gone")
    assert table_cache.table_key(recipe, package) == key
    # an unreadable source: no key, so no cache (and no error)
    (package / "model" / "broken.py").symlink_to(tmp_path / "gone")
    assert table_cache.table_key(recipe, package) is None


def test_damaged_or_foreign_entries_are_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("PGOLF_CACHE_DIR", str(tmp_path))
    key, other = "a" * 64, "b" * 64
    assert table_cache.load(key) is None  # nothing stored yet
    table_cache.store(key, [("pgolf", True, "")], {"pgolf.report": "why"}, {"E1": "text"})
    assert table_cache.load(key)["modules"] == [["pgolf", True, ""]]

    path = tmp_path / "bundle_tables" / f"{key}.json"
    entry = json.loads(path.read_text())
    shutil.copy(path, path.with_name(f"{other}.json"))  # an entry under a name that is not its key
    assert table_cache.load(other) is None
    for damaged in ('{"format": "pgolf-bundle-table-0"}', entry | {"modules": [["pgolf", "yes", ""]]}, "{", ""):
        path.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
        assert table_cache.load(key) is None, damaged


def test_an_unwritable_or_disabled_cache_only_costs_time(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("PGOLF_CACHE_DIR", str(blocker))
    table_cache.store("c" * 64, [], {}, {})  # no error
    assert table_cache.load("c" * 64) is None

    monkeypatch.setenv("PGOLF_CACHE_DIR", "off")
    assert table_cache.cache_dir() is None
    assert table_cache.table_key({}, Path(pgolf.__file__).parent) is None
    table_cache.store("c" * 64, [], {}, {})
    assert table_cache.load("c" * 64) is None
    assert blocker.read_text() == "not a folder"

    monkeypatch.delenv("PGOLF_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert table_cache.cache_dir() == tmp_path / "xdg" / "pgolf" / "bundle_tables"


def test_a_table_shrunk_without_torch_is_not_stored(tmp_path, monkeypatch):
    """Where torch is installed but did not import, the shrink keeps every public method: a table the key (torch's
    version, read without importing it) cannot tell from the usual one, so it is not kept."""
    monkeypatch.setenv("PGOLF_CACHE_DIR", str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # restored after the test
    table_cache.store("d" * 64, [], {}, {})
    assert table_cache.load("d" * 64) is None


def test_only_the_newest_entries_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("PGOLF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(table_cache, "MAX_ENTRIES", 2)
    for i, key in enumerate(("1" * 64, "2" * 64, "3" * 64)):
        table_cache.store(key, [], {}, {})
        os.utime(tmp_path / "bundle_tables" / f"{key}.json", (1_700_000_000 + i, 1_700_000_000 + i))
    table_cache.store("4" * 64, [], {}, {})  # written now: the newest
    kept = sorted(p.stem[0] for p in (tmp_path / "bundle_tables").glob("*.json"))
    assert kept == ["3", "4"]
