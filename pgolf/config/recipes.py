"""The recipes of public submissions next to the record: where they are, and how they differ from it.

A recipe is a whole configuration (recipes/<name>.yaml; ``config.yaml`` is the record, PR #1855). ``show`` prints
the recipe with every default filled in, then what it changes relative to the record, key by key (old -> new), so a
reader sees at a glance what a submission is made of and a reviewer sees what a recipe really sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pgolf.config.strict import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
RECORD_NAMES = ("record", "pr1855", "config")  # names of config.yaml


def recipe_path(name: str, root: Path = REPO_ROOT) -> Path:
    """``record``/``pr1855`` -> config.yaml; an existing file path -> itself; otherwise recipes/<name>.yaml."""
    if name in RECORD_NAMES:
        return root / "config.yaml"
    as_path = Path(name)
    if as_path.suffix in (".yaml", ".yml") and as_path.exists():
        return as_path
    path = root / "recipes" / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(recipe_names(root))
        raise ConfigError(f"recipe {name!r}: no {path}; known recipes: {known}")
    return path


def recipe_names(root: Path = REPO_ROOT) -> list[str]:
    return ["pr1855"] + sorted(p.stem for p in (root / "recipes").glob("*.yaml"))


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested mapping (lists are leaves): {"a": {"b": 1}} -> {"a.b": 1}."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_diff(base: dict, other: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, base value, other value) for every key whose values differ, in ``other``'s key order."""
    flat_base, flat_other = flatten(base), flatten(other)
    missing = object()
    keys = list(flat_other) + [k for k in flat_base if k not in flat_other]
    return [(k, flat_base.get(k), flat_other.get(k)) for k in keys
            if flat_base.get(k, missing) != flat_other.get(k, missing)]
