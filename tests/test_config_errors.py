"""A recipe mistake is one line naming the file, the YAML line and the key, with what was expected: through
`pgolf config check` and through Snakemake (no schema dump); cheap commands never import torch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_workflow import copy_workflow

from conftest import REPO_ROOT

SMOKE = (REPO_ROOT / "recipes" / "smoke.yaml").read_text()
LINE = r"^{path}:\d+(:\d+)?: "
# name -> (recipe text, what the one line must say)
BAD = {
    "unknown_key": (SMOKE.replace("  val_docs: 400", "  val_doc: 400"),
                    "data.val_doc: unknown key (did you mean 'val_docs'?); allowed in data: "),
    "unknown_top": (SMOKE + "\nevalute:\n  max_docs: 3\n", "evalute: unknown key (did you mean 'evaluate'?)"),
    "unknown_ttt": (SMOKE.replace("    lora_rank: 4", "    lora_rnk: 4"),
                    "evaluate.ttt.lora_rnk: unknown key (did you mean 'lora_rank'?)"),
    "wrong_type": (SMOKE.replace("  num_layers: 5", "  num_layers: five"),
                   "model.num_layers: expected int, got str 'five'"),
    "out_of_range": (SMOKE.replace("  num_layers: 5", "  num_layers: 0"), "model.num_layers: expected 1..1024, got 0"),
    "bad_enum": (SMOKE.replace("mode: sweep", "mode: swep"), "mode: expected one of 'record' | 'sweep', got 'swep'"),
    "bad_seed": (SMOKE.replace("seeds: [1, 2, 3]", "seeds:\n  - 1\n  - x"), "seeds[1]: expected int, got str 'x'"),
    "indent": (SMOKE.replace("  num_layers: 5", "   num_layers: 5"), "not valid YAML: mapping values are not allowed"),
    "tab": (SMOKE.replace("  caseops: true\n", "\tcaseops: true\n"), "tabs cannot indent YAML"),
    "duplicate": (SMOKE + "\nmodel:\n  num_layers: 3\n", "model: duplicate key (first at line"),
    "record_resume": (SMOKE.replace("mode: sweep", "mode: record").replace("val_docs: 400", "val_docs: 50000"),
                      "train.resume_every_steps: a record run is one uninterrupted timed run"),
}
SYNTAX = {"indent", "tab"}  # Snakemake itself parses --configfile first: its own message, without the line


def _write(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(BAD[name][0])
    return path


@pytest.mark.parametrize("name", sorted(BAD))
def test_config_check_prints_one_line(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, name)
    done = subprocess.run([sys.executable, "-m", "pgolf", "config", "check", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert re.match(LINE.format(path=re.escape(f"pgolf: error: {path}")), lines[0]), lines[0]
    assert BAD[name][1] in lines[0]


def test_config_check_is_silent_on_a_good_recipe() -> None:
    done = subprocess.run([sys.executable, "-m", "pgolf", "config", "check", str(REPO_ROOT / "recipes/smoke.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == done.stderr == ""


@pytest.mark.slow
def test_snakemake_prints_the_same_one_line(tmp_path: Path) -> None:
    """`snakemake -n --config recipe=FILE` and `--configfile FILE`: one `pgolf: error:` line, exit status 2, no
    schema dump. Dry runs in parallel (each pays Snakemake's start-up)."""
    copy_workflow(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    runs = {}
    for name in ("unknown_top", "unknown_ttt", "wrong_type", "indent", "duplicate"):
        path = _write(tmp_path, name)
        for how in ("recipe", "configfile"):
            args = ["--config", f"recipe={path}"] if how == "recipe" else ["--configfile", str(path)]
            runs[name, how] = subprocess.Popen([sys.executable, "-m", "snakemake", "-n", "--cores", "1", *args],
                                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True, env=env)
    for (name, how), proc in runs.items():
        out, _ = proc.communicate(timeout=300)
        if how == "configfile" and name in SYNTAX:
            assert proc.returncode != 0 and "not valid JSON or YAML" in out  # Snakemake's own message
            continue
        errors = [line for line in out.splitlines() if line.startswith("pgolf: error:")]
        assert proc.returncode == 2, out[-2000:]
        assert len(errors) == 1 and BAD[name][1] in errors[0], out[-2000:]
        assert "Failed validating" not in out and "additionalProperties" not in out
        assert len(out.splitlines()) <= 3, out  # the workflow-profile note and the one line


def test_config_overrides_merge_over_config_yaml() -> None:
    """``--config run=NAME`` alone is config.yaml under another run name, not pgolf's dataclass defaults; a config
    holding whole sections (Snakemake's API given a recipe dict) is that recipe."""
    from pgolf.config import load_run_config, recipe_from_snakemake

    default = REPO_ROOT / "config.yaml"
    renamed = recipe_from_snakemake({"run": "myrun"}, [], default)
    record = load_run_config(default)
    assert renamed.run == "myrun" and renamed.train == record.train and renamed.seeds == record.seeds
    given = recipe_from_snakemake({"run": "x", "seeds": [7], "train": {"iterations": 3}}, [], default)
    assert given.seeds == (7,) and given.train.iterations == 3 and given.train.data_stream != record.train.data_stream


def test_a_config_override_is_not_blamed_on_the_configfile_line() -> None:
    """``--configfile recipes/smoke.yaml --config seeds=7``: Snakemake merged 7 over the file's list; the error
    names the key, not the file's line that says [1, 2, 3]."""
    import yaml

    from pgolf.config import ConfigError, recipe_from_snakemake

    smoke = REPO_ROOT / "recipes" / "smoke.yaml"
    merged = {**yaml.safe_load(smoke.read_text()), "seeds": 7}
    with pytest.raises(ConfigError) as excinfo:
        recipe_from_snakemake(merged, [str(smoke)], REPO_ROOT / "config.yaml")
    assert str(excinfo.value).startswith(f"{smoke}: seeds: expected")


def test_data_verify_refuses_a_negative_count(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pgolf", "data", "verify", str(tmp_path), "--val-docs", "-1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "argument --val-docs: expected an integer >= 1, got -1" in done.stderr


CHEAP = [["--help"], ["config", "show", "recipes/smoke.yaml"], ["config", "check", "config.yaml"],
         ["recipe", "list"], ["config", "schema"], ["submission-schema"], ["eval-plan", "--help"],
         ["pack", "--help"], ["report", "--help"], ["summary", "--help"]]
NO_TORCH = """
import sys
from pgolf.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("TORCH" if "torch" in sys.modules else "NO-TORCH", file=sys.stderr)
"""


@pytest.mark.parametrize("args", CHEAP, ids=lambda a: " ".join(a))
def test_cheap_commands_do_not_import_torch(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=120)
    assert done.stderr.strip().splitlines()[-1] == "NO-TORCH", done.stderr[-2000:]
