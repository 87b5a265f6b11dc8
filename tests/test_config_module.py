"""The shipped form's generated pgolf.config (pgolf.artifact.config_module): it gives back every recipe exactly,
reads a model section back as pgolf's strict loader does, keeps the record-mode refusals, and a bundle whose
embedded config does not give back its recipe is refused."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import pytest

from pgolf.artifact.bundle import BundleError, BundledModule, check_bundle, shipped_recipe
from pgolf.artifact.config_module import _kind, generated_config_source, shipped_config_changes
from pgolf.config import ModelConfig, load_run_config, to_dict

REPO = Path(__file__).resolve().parents[1]
RECIPES = [REPO / "config.yaml", *sorted((REPO / "recipes").glob("*.yaml"))]


def _generated(cfg) -> dict:
    namespace: dict = {}
    # dont_inherit: this file's `from __future__ import annotations` must not turn the fields' kinds into strings
    exec(compile(generated_config_source(cfg), "pgolf.config (generated)", "exec", dont_inherit=True), namespace)
    return namespace


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_the_generated_module_gives_back_every_recipe(path: Path) -> None:
    cfg = shipped_recipe(load_run_config(path))
    ns = _generated(cfg)
    recipe = ns["parse_run_config"](shipped_config_changes(cfg))
    assert ns["to_dict"](recipe) == to_dict(cfg)
    # the canonical JSON, hashed into checkpoints and artifacts, is the same text (field order, floats, lists)
    assert json.dumps(ns["to_dict"](recipe.model)) == json.dumps(to_dict(cfg.model))
    assert json.dumps(ns["to_dict"](recipe.quantize)) == json.dumps(to_dict(cfg.quantize))
    model = recipe.model
    assert (model.head_dim, model.mlp_hidden) == (cfg.model.head_dim, cfg.model.mlp_hidden)
    assert recipe.evaluate.ttt.inflight_batches == cfg.evaluate.ttt.inflight_batches


def test_a_model_section_read_back_converts_like_the_strict_loader_and_refuses_unknown_keys() -> None:
    cfg = shipped_recipe(load_run_config(REPO / "recipes" / "smoke.yaml"))
    ns = _generated(cfg)
    section = {**to_dict(cfg.model), "mlp_mult": 3, "rope_base": 500}  # JSON integers where the fields are floats
    read = ns["from_mapping"](ns["ModelConfig"], section, "header.model_config")
    assert ns["to_dict"](read) == to_dict(ModelConfig(**section))
    assert isinstance(read.mlp_mult, float) and read.mlp_mult == 3.0
    recipe = ns["parse_run_config"]({"run": "x", "seeds": [7, 8], "evaluate": {"ttt": {"slot_lengths": [1, 2]}}})
    assert recipe.seeds == (7, 8) and recipe.evaluate.ttt.slot_lengths == (1, 2)
    with pytest.raises(ns["ConfigError"], match="unknown keys \\['mlp_ratio'\\]"):
        ns["from_mapping"](ns["ModelConfig"], {**section, "mlp_ratio": 2}, "header.model_config")


def test_the_record_mode_refusals_stay() -> None:
    ns = _generated(shipped_recipe(load_run_config(REPO / "config.yaml")))
    with pytest.raises(ns["ConfigError"], match="50,000"):
        ns["parse_run_config"]({"run": "x", "data": {"val_docs": 100}})
    with pytest.raises(ns["ConfigError"], match="prequant_ttt_epochs"):
        ns["parse_run_config"]({"run": "x", "train": {"prequant_ttt_epochs": 1}})
    with pytest.raises(ns["ConfigError"], match="smear_bos_mask"):
        ns["parse_run_config"]({"run": "x", "model": {"smear_bos_mask": False}})
    with pytest.raises(ns["ConfigError"], match="max_val_overlap_fraction"):
        ns["parse_run_config"]({"run": "x", "data": {"max_val_overlap_fraction": 0.5}})


def test_a_field_type_without_a_generated_form_is_refused() -> None:
    assert _kind(Optional[float]) == "float" and _kind(tuple[float, ...]) == '"floats"'
    with pytest.raises(TypeError, match="one type besides None"):
        _kind(Optional[int | str])
    with pytest.raises(TypeError, match="no generated form"):
        _kind(dict)
    with pytest.raises(TypeError, match="a tuple of plain values"):
        _kind(tuple[tuple[float, float], ...])


def test_values_without_a_python_literal_are_written_as_expressions() -> None:
    cfg = shipped_recipe(load_run_config(REPO / "recipes" / "smoke.yaml"))
    cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, max_eval_seconds=float("inf")),
                              aggregate=dataclasses.replace(cfg.aggregate, baseline_seed_values=(1.5, float("nan"))))
    ns = _generated(cfg)
    recipe = ns["parse_run_config"]({"run": cfg.run})
    assert recipe.evaluate.max_eval_seconds == float("inf")
    assert recipe.aggregate.baseline_seed_values[0] == 1.5 and math.isnan(recipe.aggregate.baseline_seed_values[1])
    assert recipe.seeds == cfg.seeds and isinstance(recipe.seeds, tuple)


def test_a_validator_that_does_more_than_check_is_refused_at_generation() -> None:
    from pgolf.artifact.config_module import _methods

    @dataclasses.dataclass(frozen=True)
    class Normalizing:
        names: tuple = ()

        def __post_init__(self) -> None:
            object.__setattr__(self, "names", tuple(sorted(self.names)))

    with pytest.raises(TypeError, match="Normalizing.__post_init__ does more than check"):
        _methods(Normalizing, keep_post_init=False)
    assert _methods(Normalizing, keep_post_init=True)  # RunConfig's case: kept as written


def test_a_bundle_whose_config_does_not_give_back_its_recipe_is_refused(shipped_form) -> None:
    cfg = shipped_recipe(load_run_config(REPO / "recipes" / "smoke.yaml"))
    bundle = shipped_form(cfg)  # build_bundle(cfg, minify=True), shared with tests/test_code_bytes_tool.py
    config = next(m for m in bundle.modules if m.name == "pgolf.config")
    assert f"={cfg.model.num_layers}\n" in config.source
    tampered = [dataclasses.replace(m, source=m.source.replace(f"num_layers:int={cfg.model.num_layers}\n",
                                                               f"num_layers:int={cfg.model.num_layers + 1}\n"))
                if m.name == "pgolf.config" else m for m in bundle.modules]
    assert tampered != bundle.modules
    from pgolf.artifact.bundle import render_bundle

    with pytest.raises(BundleError, match="do not give back the config"):
        check_bundle(render_bundle(cfg, tampered, shipped=True), cfg, tampered)
    check_bundle(bundle.text, cfg, bundle.modules)  # the untouched one passes
    assert isinstance(bundle.modules[0], BundledModule)
