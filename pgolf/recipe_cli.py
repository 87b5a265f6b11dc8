"""``pgolf recipe list`` and ``pgolf recipe show NAME``: the recipes of public submissions next to the record.

A recipe is a whole configuration (recipes/<name>.yaml; ``config.yaml`` is the record, PR #1855). ``show`` prints
the recipe with every default filled in, then what it changes relative to the record, key by key (old -> new), so a
reader sees at a glance what a submission is made of and a reviewer sees what a recipe really sets.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from pgolf.config import ConfigError, load_run_config, to_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
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


def _fmt(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _show(args: argparse.Namespace) -> int:
    path = recipe_path(args.name)
    base_path = recipe_path(args.against)
    resolved = to_dict(load_run_config(path))
    base = to_dict(load_run_config(base_path))
    if not args.diff_only:
        sys.stdout.write(f"# {path}, every default filled in\n")
        sys.stdout.write(yaml.safe_dump(resolved, sort_keys=False, width=120))
    diff = config_diff(base, resolved)
    sys.stdout.write(f"# differences from {base_path} ({len(diff)} keys): old -> new\n")
    width = max((len(k) for k, _, _ in diff), default=0)
    for key, old, new in diff:
        sys.stdout.write(f"{key:<{width}}  {_fmt(old)} -> {_fmt(new)}\n")
    return 0


def _list(args: argparse.Namespace) -> int:
    for name in recipe_names():
        cfg = load_run_config(recipe_path(name))
        sys.stdout.write(f"{name:<10} run={cfg.run:<10} mode={cfg.mode:<7} seeds={list(cfg.seeds)}\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipe", help="the recipes of public submissions (recipes/*.yaml) against the record")
    s = p.add_subparsers(dest="recipe_command", required=True)
    s.add_parser("list", help="every recipe with its run name, mode and seeds").set_defaults(func=_list)
    show = s.add_parser("show", help="a recipe with every default filled in, and its differences from the record")
    show.add_argument("name", help="recipe name (pr1530, ...; pr1855/record = config.yaml) or a YAML path")
    show.add_argument("--against", default="pr1855", help="recipe to diff against (default: pr1855 = config.yaml)")
    show.add_argument("--diff-only", action="store_true", help="print only the differences")
    show.set_defaults(func=_show)
