"""The recipe files and the strict config loader."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pgolf.config import ConfigError, ModelConfig, OptimConfig, TrainConfig, load_run_config, parse_run_config
from pgolf.config.cli import schema_text

from conftest import REPO_ROOT

RECIPES = [REPO_ROOT / "config.yaml", *sorted((REPO_ROOT / "recipes").glob("*.yaml"))]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(path: Path) -> None:
    cfg = load_run_config(path)
    assert cfg.run


# The record's training-loop choices where the dataclass defaults keep pgolf's (issue 22, issue 15 item 5).
RECORD_OPTIM_OPTIONS = dict(muon_precision="record_bf16", adam_fused="always")
RECORD_TRAIN_OPTIONS = dict(
    budget_reading="record", reserve_seconds=0.5, warmup_steps=20, warmup_cu_passes=3, warmup_restore="record",
    data_stream="record", micro_batch_order="interleaved", cu_seqlens_pad="multiple_of_64", clip_scope="per_rank",
    param_storage="record",
    cpu_threads=1,  # not a loop choice: a fixed CPU thread count, so both entry points compute alike (issue 21)
)


def test_record_recipe_is_the_dataclass_defaults() -> None:
    cfg = load_run_config(REPO_ROOT / "config.yaml")
    assert cfg.model == ModelConfig()
    assert cfg.optim == dataclasses.replace(OptimConfig(), **RECORD_OPTIM_OPTIONS)
    assert cfg.train == dataclasses.replace(TrainConfig(), **RECORD_TRAIN_OPTIONS)
    for name, value in {**RECORD_OPTIM_OPTIONS, **RECORD_TRAIN_OPTIONS}.items():  # each is a real difference
        section = OptimConfig() if name in RECORD_OPTIM_OPTIONS else TrainConfig()
        assert getattr(section, name) != value, name
    assert cfg.mode == "record" and cfg.data.val_docs == 50_000 and cfg.seeds == (42, 0, 1234)


def test_schema_file_is_current() -> None:
    committed = (REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text(encoding="utf-8")
    assert committed == schema_text(), "run: pgolf config schema > workflow/schemas/config.schema.yaml"


def test_schema_rejects_what_the_dataclasses_reject() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = yaml.safe_load(schema_text())
    good = yaml.safe_load((REPO_ROOT / "recipes" / "smoke.yaml").read_text())
    jsonschema.validate(good, schema)
    bad = dict(good, data=dict(good["data"], val_dcs=3))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"data": {"val_dcs": 1}}, "data.val_dcs: unknown key (did you mean 'val_docs'?); allowed in data:"),
        ({"data": {"val_docs": "10"}}, "data.val_docs: expected int, got str"),
        ({"data": {"val_docs": True}}, "data.val_docs: expected int, got bool"),
        ({"data": {"source": "ftp"}}, "data.source: expected one of"),
        ({"train": {"micro_batch_tokens": 100_000}}, "train_batch_tokens: expected a multiple"),
        ({"model": {"loop_end": 11}}, "loop_start/loop_end"),
        ({"seeds": [1, 1]}, "seeds: duplicates"),
        ({"mode": "record", "data": {"val_docs": 10}}, "official 50,000 validation documents"),
        ({"extra": 1}, "extra: unknown key; allowed in the top level:"),
        ({"model": {"num_layers": 0}}, "model.num_layers: expected 1..1024, got 0"),
        ({"mode": "record", "data": {"val_docs": 50_000}, "train": {"resume_every_steps": 5}},
         "train.resume_every_steps: a record run is one uninterrupted timed run and restarts from scratch"),
        ({"train": {"resume_every_steps": -1}}, "train.resume_every_steps: expected >= 0"),
        ({"train": {"param_storage": "record"}}, "evaluate.param_storage: 'fp32' must equal train.param_storage ('record')"),
        ({"evaluate": {"diagnostic_scoring": "record_flat"}}, "evaluate.score_next_bos: diagnostic_scoring 'record_flat'"),
        ({"seeds": [3, -1]}, "seeds: expected seeds >= 0, got [3, -1]"),
        ({"mode": "record", "data": {"val_docs": 50_000}, "train": {"max_wallclock_seconds": 0}},
         "train.max_wallclock_seconds: a record run trains under the rules' 600 s"),
        ({"mode": "record", "data": {"val_docs": 50_000}, "evaluate": {"max_eval_seconds": 900}},
         "evaluate.max_eval_seconds: a record run is evaluated within the rules' 600 s"),
        ({"mode": "record", "data": {"val_docs": 50_000}, "pack": {"size_cap_bytes": 17_000_000}},
         "pack.size_cap_bytes: a record artifact fits the rules' 16,000,000 bytes"),
        ({"mode": "record", "data": {"val_docs": 50_000, "max_val_overlap_fraction": 0.011}},
         "data.max_val_overlap_fraction: a record run accepts at most 0.01 of the validation documents"),
        ({"mode": "record", "data": {"val_docs": 50_000}, "model": {"smear_gate": True, "smear_bos_mask": False}},
         "model.smear_bos_mask: a record run's SmearGate must not mix the last token of a document into the next"),
        ({"data": {"source": "local", "docs_path": "d.jsonl"}, "tokenizer": {"source": "export"}},
         "tokenizer.source: 'export' with data.source 'local': a published export brings its own tokenizer"),
        ({"data": {"source": "export"}, "tokenizer": {"source": "hub"}},
         "tokenizer.source: 'hub' with data.source 'export'"),
        ({"run": "my run"}, "run: expected letters, digits, '_', '.', '-' (it names a folder), got 'my run'"),
        ({"optim": {"embed_lr": -1.0}}, "optim.embed_lr: expected a finite number >= 0, got -1.0"),
        ({"quantize": {"attn_clip_sigmas": float("inf")}}, "quantize.attn_clip_sigmas: expected a finite number > 0"),
        ({"quantize": {"gptq_damp": float("inf")}}, "quantize.gptq_damp: expected a finite number >= 0, got inf"),
        ({"model": {"mlp_mult": -1.0}}, "model.mlp_mult: expected a finite number with mlp_mult * model_dim >= 1"),
        ({"model": {"mlp_mult": float("inf")}}, "model.mlp_mult: expected a finite number"),
        ({"model": {"num_layers": 10**30}}, "model.num_layers: expected 1..1024"),
        ({"model": {"num_heads": 0}}, "model.num_heads: expected >= 1, got 0"),
        ({"model": {"rope_base": float("nan")}}, "model.rope_base: expected a finite number > 0"),
        ({"model": {"logit_softcap": -5.0}}, "model.logit_softcap: expected a finite number >= 0"),
        ({"optim": {"scalar_lr": float("nan")}}, "optim.scalar_lr: expected a finite number >= 0, got nan"),
        ({"optim": {"scalar_weight_decay": -3.0}}, "optim.scalar_weight_decay: expected a finite number >= 0"),
        ({"optim": {"adam_beta2": 1.0}}, "optim.adam_beta2: expected 0 <= value < 1, got 1.0"),
        ({"optim": {"adam_eps": 0.0}}, "optim.adam_eps: expected a finite number > 0"),
        ({"train": {"grad_clip_norm": -1.0}}, "train.grad_clip_norm: expected a finite number >= 0 (0 = no clipping)"),
        ({"train": {"max_wallclock_seconds": float("inf")}}, "train.max_wallclock_seconds: expected a finite number"),
        ({"data": {"name": "a/b"}}, "data.name: expected letters, digits, '_', '.', '-' (it names a folder)"),
        ({"evaluate": {"score_next_bos": True, "ttt": {"mode": "lora", "variant": "legacy"}}},
         "evaluate.score_next_bos: the legacy LoRA variant scores each document's own targets only"),
    ],
)
def test_bad_values_name_the_key(override: dict, message: str) -> None:
    base = {"run": "t", "mode": "sweep"}
    base.update(override)
    with pytest.raises(ConfigError) as excinfo:
        parse_run_config(base, "recipe.yaml")
    assert message in str(excinfo.value)
    assert str(excinfo.value).startswith("recipe.yaml:")


def test_floats_accept_ints_and_lists_become_tuples() -> None:
    cfg = parse_run_config({"run": "t", "mode": "sweep", "seeds": [3, 4], "train": {"max_wallclock_seconds": 10}})
    assert cfg.train.max_wallclock_seconds == 10.0 and isinstance(cfg.train.max_wallclock_seconds, float)
    assert cfg.seeds == (3, 4)


@pytest.mark.parametrize("lines, expected", [
    ("train:\n  param_storage: record\nevaluate:\n  param_storage: fp32\n", ":6: evaluate.param_storage: 'fp32' must"),
    ("tokenizer:\n  vocab_size: 1000\n", ":4: model.vocab_size: 8192 must equal tokenizer.vocab_size (1000)"),
    ("tokenizer:\n  source: export\n", ":4: tokenizer.source: 'export' with data.source 'docs'"),
])
def test_a_mistake_between_two_keys_names_a_line_too(tmp_path: Path, lines: str, expected: str) -> None:
    """README: recipe mistakes are one line, FILE:LINE: key: problem -- the checks across two keys included."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: x\nmode: sweep\n" + lines)
    proc = subprocess.run([sys.executable, "-m", "pgolf", "config", "check", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and f"{bad}{expected}" in proc.stderr, proc.stderr


def test_cli_reports_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: x\nmode: sweep\ndata:\n  val_docs: many\n")
    proc = subprocess.run([sys.executable, "-m", "pgolf", "config", "show", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "data.val_docs: expected int, got str 'many'" in proc.stderr


@pytest.mark.parametrize("name", ["r", "my_run-2.x", "my run", "a/b", "-x", ".x", "é", "x\n", "ab;rm"])
def test_run_and_data_names_follow_one_rule(name: str) -> None:
    """Names that become folders and travel through shell commands: the run's validator (spelled with builtins for
    the shipped file) and the data section's (a regex) accept the same names."""
    from pgolf.config.strict import FOLDER_NAME

    ok = FOLDER_NAME.fullmatch(name) is not None
    assert ok == (name in ("r", "my_run-2.x"))
    for recipe in ({"run": name, "mode": "sweep"}, {"run": "t", "mode": "sweep", "data": {"name": name}}):
        if ok:
            parse_run_config(recipe)
        else:
            with pytest.raises(ConfigError, match="it names a folder"):
                parse_run_config(recipe)


def test_the_record_modes_overlap_limit_is_the_data_stages_default() -> None:
    """The record-mode refusal spells the default out (the shipped train_gpt.py's copy of the validator has no
    pgolf.config.training): the two must agree, and a sweep may still loosen it or keep the leaky SmearGate."""
    from pgolf.config.training import DEFAULT_MAX_VAL_OVERLAP_FRACTION

    record = {"run": "t", "mode": "record", "data": {"val_docs": 50_000}}
    at_default = {**record, "data": {"val_docs": 50_000, "max_val_overlap_fraction": DEFAULT_MAX_VAL_OVERLAP_FRACTION}}
    assert parse_run_config(at_default).data.max_val_overlap_fraction == DEFAULT_MAX_VAL_OVERLAP_FRACTION
    above = {**record, "data": {"val_docs": 50_000, "max_val_overlap_fraction": DEFAULT_MAX_VAL_OVERLAP_FRACTION * 1.01}}
    with pytest.raises(ConfigError, match="max_val_overlap_fraction"):
        parse_run_config(above)
    sweep = {"run": "t", "mode": "sweep", "data": {"max_val_overlap_fraction": 0.5},
             "model": {"smear_gate": True, "smear_bos_mask": False}}
    assert not parse_run_config(sweep).model.smear_bos_mask
    assert parse_run_config({**record, "model": {"smear_gate": False, "smear_bos_mask": False}}).model.smear_gate is False
