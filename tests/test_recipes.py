"""The recipes of public submissions (recipes/*.yaml) and ``pgolf recipe``: every recipe loads, and each states
the facts seeds.md gives for its submission."""

from __future__ import annotations

import pytest
from conftest import REPO_ROOT

from pgolf.cli import main as cli_main
from pgolf.config import ConfigError, load_run_config, parse_run_config, to_dict
from pgolf.config.recipes import config_diff, flatten, recipe_names, recipe_path

PUBLIC = ("pr1487", "pr1523", "pr1530", "pr1572", "pr1787")


RECIPES = sorted((REPO_ROOT / "recipes").glob("*.yaml")) + [REPO_ROOT / "config.yaml"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(path):
    cfg = load_run_config(path)
    assert cfg.run and cfg.seeds


def test_every_public_recipe_exists():
    assert set(PUBLIC) <= set(recipe_names())
    assert recipe_path("pr1855") == REPO_ROOT / "config.yaml"


def test_pr1530_plain_export_recurrence_from_its_parameter_count_lora_chunk_32():
    cfg = load_run_config(recipe_path("pr1530"))
    assert (cfg.mode, cfg.data.hub_repo, cfg.data.train_shards) == ("record", "kevclark/parameter-golf", 128)
    assert cfg.tokenizer.caseops is False and cfg.evaluate.byte_accounting == "lut"
    assert cfg.model.loop_count == 3  # what its reported 35,944,602 parameters imply (see the recipe)
    assert (cfg.optim.ns_coefficients, cfg.train.min_lr_fraction) == ("fixed", 0.0)
    assert (cfg.evaluate.ttt.mode, cfg.evaluate.ttt.chunk_tokens) == ("lora", 32)


def test_pr1572_recurrence_x2_parallel_from_7_chunked_ttt():
    cfg = load_run_config(recipe_path("pr1572"))
    m = cfg.model
    assert (m.loop_start, m.loop_end, m.loop_count, m.parallel_residual_start) == (3, 5, 2, 7)
    assert cfg.train.loop_enable_fraction == 0.35
    assert cfg.evaluate.ttt.mode == "chunked" and cfg.evaluate.ttt.stream_chunk_tokens == 32768


def test_pr1523_triple_recurrence_momentum_ttt_lr():
    cfg = load_run_config(recipe_path("pr1523"))
    m = cfg.model
    assert (m.loop_start, m.loop_end, m.loop_count) == (3, 5, 3)
    assert m.num_layers + (m.loop_count - 1) * (m.loop_end - m.loop_start + 1) == 17  # virtual layers
    assert cfg.optim.muon_momentum == 0.97
    assert (cfg.evaluate.ttt.mode, cfg.evaluate.ttt.chunk_lr) == ("chunked", 0.01)
    assert (cfg.evaluate.ttt.bigram_hash_buckets, cfg.evaluate.ttt.bigram_hash_dim) == (16384, 512)


def test_pr1487_is_a_sweep_with_prequant_ttt_and_cannot_be_a_record():
    cfg = load_run_config(recipe_path("pr1487"))
    assert cfg.mode == "sweep" and cfg.train.prequant_ttt_epochs == 10
    assert (cfg.model.loop_start, cfg.model.loop_end, cfg.model.parallel_residual_start) == (3, 5, 7)
    assert (cfg.train.ema_decay, cfg.model.q_gain_init) == (0.9965, 5.25)
    as_record = {**to_dict(cfg), "mode": "record"}
    with pytest.raises(ConfigError, match=r"train\.prequant_ttt_epochs: .*illegal \(C3/C4\)"):
        parse_run_config(as_record, "pr1487")


def test_pr1787_caseops_polar_express_sparse_gate_phased_ttt():
    cfg = load_run_config(recipe_path("pr1787"))
    assert cfg.tokenizer.caseops is True and cfg.data.export_variant.startswith("sp8192_lossless_caps_caseops")
    assert (cfg.optim.ns_coefficients, cfg.train.min_lr_fraction) == ("polar_express", 0.10)
    assert (cfg.model.attn_gate, cfg.model.attn_gate_window) == ("sparse", 12)
    t = cfg.evaluate.ttt
    assert (t.mode, t.lora_alpha, t.warm_start_a, t.weight_decay) == ("lora", 144.0, True, 1.0)
    assert len(t.phase_boundaries_docs) > 0


def test_older_recipes_use_the_fixed_newton_schulz_tuple_and_no_lr_floor():
    for name in ("pr1487", "pr1523", "pr1530", "pr1572"):
        cfg = load_run_config(recipe_path(name))
        assert (cfg.optim.ns_coefficients, cfg.train.min_lr_fraction) == ("fixed", 0.0), name


def test_prequant_ttt_epochs_must_be_non_negative():
    with pytest.raises(ConfigError, match="prequant_ttt_epochs: expected >= 0"):
        parse_run_config({"run": "x", "mode": "sweep", "train": {"prequant_ttt_epochs": -1}}, "t")


def test_config_diff_lists_changed_keys_only():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    other = {"a": {"b": 2, "c": [1, 2]}, "d": "x", "e": None}
    assert flatten(base) == {"a.b": 1, "a.c": [1, 2], "d": "x"}
    assert config_diff(base, other) == [("a.b", 1, 2), ("e", None, None)]  # a new key differs even when null
    assert config_diff(base, base) == []


def test_recipe_show_prints_resolved_config_and_diff(capsys):
    assert cli_main(["recipe", "show", "pr1572"]) == 0
    out = capsys.readouterr().out
    resolved, diff = out.split("# differences from ")
    assert "loop_count: 2" in resolved and "prequant_ttt_epochs: 0" in resolved  # defaults filled in
    lines = {line.split()[0]: line for line in diff.splitlines()[1:]}
    assert lines["model.loop_count"].split(None, 1)[1] == "3 -> 2"
    assert lines["model.parallel_residual_start"].split(None, 1)[1] == "8 -> 7"
    assert lines["evaluate.ttt.mode"].split(None, 1)[1] == "lora -> chunked"
    assert "model.num_layers" not in lines  # unchanged keys are not listed
    assert cli_main(["recipe", "show", "pr1855", "--diff-only"]) == 0
    assert "(0 keys)" in capsys.readouterr().out


def test_recipe_show_unknown_name_is_an_error(capsys):
    assert cli_main(["recipe", "show", "pr9999"]) == 2
    assert "known recipes:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "recipe, reported",
    [("config.yaml", 35_945_671), ("recipes/pr1787.yaml", 35_945_658), ("recipes/pr1530.yaml", 35_944_602)],
)
def test_reported_parameter_counts(recipe: str, reported: int) -> None:
    """The parameter counts the submissions reported (built on the meta device: shapes only)."""
    from pgolf.config import load_run_config
    from pgolf.model.gpt import count_parameters

    cfg = load_run_config(REPO_ROOT / recipe)
    assert sum(count_parameters(cfg.model).values()) == reported


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_fixes_its_cpu_thread_counts(path):
    """CPU float sums depend on the thread count, and 0 leaves it to how the process was started (Snakemake's
    --cores, torchrun, a plain run): a shipped recipe fixes every stage's count, so its artifacts are the same bytes
    whatever machine share the run is given."""
    cfg = load_run_config(path)
    counts = {name: getattr(cfg, name).cpu_threads for name in ("train", "hessians", "quantize", "evaluate")}
    assert all(n > 0 for n in counts.values()), counts
