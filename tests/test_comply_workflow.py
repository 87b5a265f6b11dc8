"""The comply rule in the DAG (dry runs): record mode packages only a compliant run (aggregate needs comply.json
and a FAIL stops the job); sweep mode still runs the check (the report shows its verdicts) but reports only."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("snakemake")

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("comply_wf")
    shutil.copy(REPO_ROOT / "Snakefile", work / "Snakefile")
    shutil.copy(REPO_ROOT / "config.yaml", work / "config.yaml")
    shutil.copytree(REPO_ROOT / "workflow", work / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO_ROOT / "recipes", work / "recipes")
    (work / "data" / "sample").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "data" / "sample" / "docs.jsonl", work / "data" / "sample" / "docs.jsonl")
    return work


def dry_run(workdir: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(workdir / "Snakefile"), "--directory", str(workdir),
           "--cores", "1", "--nolock", "-n", "-p", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def rule_block(text: str, rule: str) -> str:
    match = re.search(rf"\nrule {rule}:\n(.*?)(?:\n\n|\Z)", text, re.DOTALL)
    assert match, f"rule {rule} not planned:\n{text[-3000:]}"
    return match.group(1)


def test_record_mode_aggregate_needs_comply_and_comply_gates(workdir):
    out = dry_run(workdir)  # config.yaml: the record
    comply = rule_block(out, "comply")
    assert "output: results/record/comply.json" in comply
    assert "results/record/seed1234/eval/eval.json" in comply and "verified.json" in comply
    assert "results/record/comply.json" in rule_block(out, "aggregate").split("output:")[0]


def test_sweep_mode_runs_comply_without_gating(workdir):
    """The report shows the verdicts in both modes, so aggregate reads comply.json; a sweep's FAIL stops nothing
    (run_comply gates in record mode only)."""
    out = dry_run(workdir, "--configfile", str(workdir / "recipes" / "smoke.yaml"))
    assert "results/smoke/comply.json" in rule_block(out, "aggregate").split("output:")[0]
    assert "results/smoke/comply.json" in rule_block(out, "all")
