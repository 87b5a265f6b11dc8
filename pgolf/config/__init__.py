"""Typed, strict configuration: one frozen dataclass per pipeline stage.

A run is described by one YAML file (``config.yaml`` for the record, ``recipes/*.yaml`` for others). Every
section maps onto a frozen dataclass below; an unknown key, a wrong type or an out-of-range value is an error
that names the offending key (``config.yaml: data.val_docs: expected int, got str``). Nothing else in pgolf
reads YAML: stages receive their section as JSON on the command line (Snakemake passes it through
``params:``, so a changed knob reruns exactly the stages that own it).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pgolf.config.strict import ConfigError, check, from_mapping, schema_for, to_dict
from pgolf.config.training import DataConfig, ModelConfig, OptimConfig, TokenizerConfig, TrainConfig
from pgolf.config.post_training import (
    LORA_TARGETS,
    AggregateConfig,
    EvaluateConfig,
    HessianConfig,
    PackConfig,
    QuantizeConfig,
    TTTConfig,
)

__all__ = [
    "ConfigError",
    "from_mapping",
    "to_dict",
    "DataConfig",
    "TokenizerConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "HessianConfig",
    "QuantizeConfig",
    "PackConfig",
    "LORA_TARGETS",
    "TTTConfig",
    "EvaluateConfig",
    "AggregateConfig",
    "RunConfig",
    "parse_run_config",
    "load_run_config",
    "load_recipe",
    "recipe_from_snakemake",
    "section_from_json",
    "json_schema",
]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole recipe: the run name, its seeds and one section per stage."""

    run: str
    mode: Literal["record", "sweep"] = "record"
    seeds: tuple[int, ...] = (42,)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    hessians: HessianConfig = dataclasses.field(default_factory=HessianConfig)
    quantize: QuantizeConfig = dataclasses.field(default_factory=QuantizeConfig)
    pack: PackConfig = dataclasses.field(default_factory=PackConfig)
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
    aggregate: AggregateConfig = dataclasses.field(default_factory=AggregateConfig)

    def __post_init__(self) -> None:
        # FOLDER_NAME spelled with builtins: this validator is also the shipped train_gpt.py's (no re, no helpers)
        check(self.run[:1].isascii() and self.run[:1].isalnum()
              and all(c.isascii() and (c.isalnum() or c in "_.-") for c in self.run),
              f"run: expected letters, digits, '_', '.', '-' (it names a folder), got {self.run!r}")
        check(len(self.seeds) >= 1, "seeds: expected at least one seed")
        check(min(self.seeds) >= 0, f"seeds: expected seeds >= 0, got {list(self.seeds)}")
        check(len(set(self.seeds)) == len(self.seeds), f"seeds: duplicates in {list(self.seeds)}")
        if self.mode == "record":
            check(
                self.data.val_docs == 50_000,
                f"data.val_docs: a record run must score the official 50,000 validation documents, got {self.data.val_docs}",
            )
            check(
                self.train.resume_every_steps == 0,
                "train.resume_every_steps: a record run is one uninterrupted timed run and restarts from scratch "
                "when interrupted, never from a saved state; set 0 (or run it as mode: sweep), got "
                f"{self.train.resume_every_steps}",
            )
            # the rules' limits (rules.md): a record run may set tighter ones, never looser or none
            check(
                0 < self.train.max_wallclock_seconds <= 600,
                "train.max_wallclock_seconds: a record run trains under the rules' 600 s (0 < value <= 600), got "
                f"{self.train.max_wallclock_seconds}",
            )
            check(
                self.evaluate.max_eval_seconds <= 600,
                f"evaluate.max_eval_seconds: a record run is evaluated within the rules' 600 s, got {self.evaluate.max_eval_seconds}",
            )
            check(
                self.pack.size_cap_bytes <= 16_000_000,
                f"pack.size_cap_bytes: a record artifact fits the rules' 16,000,000 bytes, got {self.pack.size_cap_bytes}",
            )
            check(  # 0.01: pgolf.config.training.DEFAULT_MAX_VAL_OVERLAP_FRACTION, spelled out for the shipped copy
                self.data.max_val_overlap_fraction <= 0.01,
                "data.max_val_overlap_fraction: a record run accepts at most 0.01 of the validation documents with "
                "a copy in training (more is a wrong split, issue #2127), got "
                f"{self.data.max_val_overlap_fraction}",
            )
            check(
                self.model.smear_bos_mask or not self.model.smear_gate,
                "model.smear_bos_mask: a record run's SmearGate must not mix the last token of a document into the "
                "next document's BOS (the cross-document leak fixed in #1851); set it true",
            )
            check(
                self.train.prequant_ttt_epochs == 0,
                "train.prequant_ttt_epochs: training on validation tokens before scoring is illegal (C3/C4); a record "
                f"run must leave it 0, got {self.train.prequant_ttt_epochs} (run it as mode: sweep)",
            )
        check(
            self.evaluate.param_storage == self.train.param_storage,
            f"evaluate.param_storage: {self.evaluate.param_storage!r} must equal train.param_storage "
            f"({self.train.param_storage!r}): the artifact is evaluated under the storage it was trained under",
        )
        check(
            (self.tokenizer.source == "export") == (self.data.source == "export"),
            f"tokenizer.source: {self.tokenizer.source!r} with data.source {self.data.source!r}: a published export "
            "brings its own tokenizer (its shards were made with it), so tokenizer.source is 'export' exactly "
            "when data.source is",
        )
        check(
            self.model.vocab_size == self.tokenizer.vocab_size,
            f"model.vocab_size: {self.model.vocab_size} must equal tokenizer.vocab_size ({self.tokenizer.vocab_size})",
        )


def parse_run_config(data: Any, source: str = "config", lines: Optional[dict[tuple, int]] = None) -> RunConfig:
    """Validate a plain mapping (e.g. Snakemake's ``config``) into a RunConfig; errors start with ``source`` and,
    given ``lines`` (key path -> YAML line, from :func:`load_recipe`), the line of the offending key."""
    try:
        return from_mapping(RunConfig, data, "")
    except ConfigError as exc:
        # a check across two keys names the other one too: the line of whichever the recipe sets
        keys = [exc.key, *re.findall(r"\b[a-z_]+(?:\.[a-z_]+)+\b", str(exc))]
        line = next((found for key in keys if (found := line_of(key, lines or {}))), None)
        where = f"{source}:{line}" if line else source
        raise ConfigError(f"{where}: {str(exc).lstrip(': ')}", exc.key) from None


def line_of(key: Optional[str], lines: dict[tuple, int]) -> Optional[int]:
    """The YAML line of dotted ``key`` (``evaluate.ttt.lr``, ``seeds[2]``), else of its nearest parent."""
    if not key:
        return None
    parts: list = []
    for part in key.split("."):
        name, *indices = part.split("[")
        parts.append(name)
        parts.extend(int(i.rstrip("]")) for i in indices)
    while parts:
        if tuple(parts) in lines:
            return lines[tuple(parts)]
        parts.pop()
    return None


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that refuses a duplicate key (PyYAML keeps the last one silently: ``model:`` twice is a bug)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, line: int):
        super().__init__(f"{key}")
        self.key, self.first, self.line = key, first, line


def _key_lines(node: Any, prefix: tuple = (), out: Optional[dict[tuple, int]] = None) -> dict[tuple, int]:
    """Every key path of a composed YAML document -> its 1-based line (list items -> the item's line)."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (key_node.value,)
            out[path] = key_node.start_mark.line + 1
            _key_lines(value_node, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (i,)] = item.start_mark.line + 1
            _key_lines(item, prefix + (i,), out)
    return out


def load_recipe(path: str | Path) -> tuple[Any, dict[tuple, int]]:
    """Read a recipe YAML file: (data, key path -> line). Errors are one line: ``FILE:LINE[:COL]: problem``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable recipe file ({exc})") from None
    try:
        data = yaml.load(text, Loader=_RecipeLoader)
        lines = _key_lines(yaml.compose(text, Loader=yaml.SafeLoader)) if data is not None else {}
    except _DuplicateKey as dup:
        raise ConfigError(f"{path}:{dup.line}: {dup.key}: duplicate key (first at line {dup.first})") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = (exc.problem or exc.context or "unreadable").strip()
        hint = ("tabs cannot indent YAML; use spaces" if "'\\t'" in problem or "\\t" in problem
                else "check this line's indentation against the lines above it")
        raise ConfigError(f"{where}: not valid YAML: {problem} ({hint})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    return data, lines


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a recipe YAML file; an error is one line naming the file, the line and the key."""
    data, lines = load_recipe(path)
    return parse_run_config(data, str(path), lines)


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def recipe_from_snakemake(config: dict, configfiles: Any, default: str | Path) -> RunConfig:
    """The recipe of a Snakemake run, with line-numbered one-line errors (the Snakefile prints them and exits 2).

    - ``--config recipe=FILE``: FILE, read here (so even a YAML syntax error gets its line), with any other
      ``--config key=value`` merged over it;
    - ``--configfile FILE``: what Snakemake parsed; an error is located in FILE (the last one given) by key;
    - neither: ``default`` (config.yaml), with any ``--config key=value`` merged over it (``--config run=NAME``
      included); a config that already holds whole sections (Snakemake's API given a recipe as a dict) is that
      recipe, as a ``--configfile`` would be.
    """
    config = dict(config)
    recipe = config.pop("recipe", None)
    files = [Path(f) for f in (configfiles or [])]
    whole_recipe = any(isinstance(value, dict) for value in config.values())
    if recipe is not None or (not files and not whole_recipe):
        path = Path(str(recipe)) if recipe is not None else Path(default)
        data, lines = load_recipe(path)
        if config and isinstance(data, dict):
            lines = {k: v for k, v in lines.items() if k[0] not in config}  # overridden keys are not in the file
            data = _merge(data, config)
        return parse_run_config(data, str(path), lines)
    source = files[-1] if files else Path("--config")
    lines = {}
    if files:
        # re-read only to find lines; Snakemake's own reader keeps the last of two duplicate keys without a word.
        # A --config key=value merged over the file is not in it: its section's lines are not blamed.
        data, lines = load_recipe(source)
        overridden = {k for k in config if not isinstance(data, dict) or data.get(k) != config[k]}
        lines = {k: v for k, v in lines.items() if k[0] not in overridden}
    return parse_run_config(config, str(source), lines)


def section_from_json(cls: type, text: str, where: str) -> Any:
    """Parse one stage section passed as JSON on a stage's command line."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON: {exc}") from None
    if not where.startswith("-"):
        return from_mapping(cls, data, where)
    try:  # a command-line option: "--train-json: warmup_stepz: unknown key ..."
        return from_mapping(cls, data, "")
    except ConfigError as exc:
        message = str(exc).replace("allowed in the top level:", "allowed:")
        raise ConfigError(f"{where}: {message}", exc.key) from None



def json_schema() -> dict:
    """The JSON schema of a recipe file (written to workflow/schemas/config.schema.yaml)."""
    schema = schema_for(RunConfig)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "pgolf recipe", **schema}
