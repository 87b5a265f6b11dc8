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
from pathlib import Path
from typing import Any, Literal

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
        check(bool(self.run) and "/" not in self.run, f"run: expected a non-empty name without '/', got {self.run!r}")
        check(len(self.seeds) >= 1, "seeds: expected at least one seed")
        check(len(set(self.seeds)) == len(self.seeds), f"seeds: duplicates in {list(self.seeds)}")
        if self.mode == "record":
            check(
                self.data.val_docs == 50_000,
                f"data.val_docs: a record run must score the official 50,000 validation documents, got {self.data.val_docs}",
            )
            check(
                self.train.prequant_ttt_epochs == 0,
                "train.prequant_ttt_epochs: training on validation tokens before scoring is illegal (C3/C4); a record "
                f"run must leave it 0, got {self.train.prequant_ttt_epochs} (run it as mode: sweep)",
            )
        check(
            self.evaluate.param_storage == self.train.param_storage,
            f"evaluate.param_storage ({self.evaluate.param_storage}) must equal train.param_storage "
            f"({self.train.param_storage}): the artifact is evaluated under the storage it was trained under",
        )
        check(
            self.model.vocab_size == self.tokenizer.vocab_size,
            f"model.vocab_size ({self.model.vocab_size}) must equal tokenizer.vocab_size ({self.tokenizer.vocab_size})",
        )


def parse_run_config(data: Any, source: str = "config") -> RunConfig:
    """Validate a plain mapping (e.g. Snakemake's ``config``) into a RunConfig; errors start with ``source``."""
    try:
        return from_mapping(RunConfig, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {str(exc).lstrip(': ')}") from None


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a recipe YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_run_config(data, str(path))


def section_from_json(cls: type, text: str, where: str) -> Any:
    """Parse one stage section passed as JSON on a stage's command line."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON: {exc}") from None
    return from_mapping(cls, data, where)



def json_schema() -> dict:
    """The JSON schema of a recipe file (written to workflow/schemas/config.schema.yaml)."""
    schema = schema_for(RunConfig)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "pgolf recipe", **schema}
