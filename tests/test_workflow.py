"""Snakemake wiring of the post-training DAG: a changed knob reruns exactly its stage and those after it.

A copy of the repository's Snakefile and workflow/ runs in a temporary directory. The data and training outputs
(and the counted code file) are made beforehand by the real stage code, outside Snakemake, with increasing
modification times, so Snakemake takes them as up to date; the three post-training rules then run for real, and
dry runs with edited recipes list the jobs a change would rerun.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import code_identities
import pytest
import yaml
from stage_fixtures import TINY_MODEL, TINY_TRAIN, train_checkpoint, write_shards

from pgolf.artifact.bundle import shipped_recipe
from pgolf.config import ModelConfig, load_run_config, to_dict
from pgolf.data.tokenizer import train_tokenizer

pytest.importorskip("snakemake")
pytestmark = pytest.mark.slow  # ~45 s of CPU: one real run (3 stage processes) and 3 dry runs, each starting torch

REPO = Path(__file__).resolve().parents[1]
VOCAB = 320  # a recipe's tokenizer needs >= 264 ids
MODEL = ModelConfig(**{**to_dict(TINY_MODEL), "vocab_size": VOCAB})
RECIPE = {
    "run": "wf",
    "mode": "sweep",
    "seeds": [1],
    "data": {"name": "syn", "source": "local", "docs_path": "docs.jsonl", "val_docs": 20, "shard_tokens": 100_000},
    "tokenizer": {"source": "train", "vocab_size": VOCAB, "caseops": False},
    "model": to_dict(MODEL),
    "train": to_dict(TINY_TRAIN),
    "hessians": {"batches": 2, "batch_rows": 2, "seq_len": 48},
    "quantize": {"passthrough_max_elements": 1024, "lqer_top_k": 1, "lqer_rank": 2, "lqer_group_size": 16},
    "pack": {"compressor": "brotli", "brotli_quality": 5},
    "evaluate": {
        "eval_seq_len": 48,
        "eval_batch_tokens": 256,
        "diagnostics": False,
        "compile": False,
        "max_docs": 6,
        "ttt": {"mode": "lora", "lora_rank": 2, "lora_alpha": 4.0, "chunk_tokens": 16, "docs_per_batch": 4,
                "context_tokens": 48, "phase_boundaries_docs": [], "phase_chunk_tokens": 256},
    },
    "aggregate": {"submission_name": "wf"},
}
ARTIFACT = "results/wf/seed1/pack/artifact.pgolf"
TARGET = "results/wf/submission.json"


def copy_workflow(work: Path) -> None:
    """The Snakefile, the rules and scripts, and the profiles (Snakemake loads profiles/default by itself)."""
    shutil.copy(REPO / "Snakefile", work / "Snakefile")
    for folder in ("workflow", "profiles"):
        shutil.copytree(REPO / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))


def _set_mtime(path: Path, when: float) -> None:
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (when, when))


def _snakemake(workdir: Path, recipe: dict, name: str, *extra: str) -> subprocess.Popen:
    recipe_path = workdir / f"recipe_{name}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(workdir / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(recipe_path),
        "--cores",
        "2",
        "--nolock",
        *extra,
        TARGET,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=240)
    return proc.returncode, out


def job_counts(text: str) -> dict[str, int]:
    """The 'Job stats' table Snakemake prints (jobs that would run / ran); empty when nothing is to be done."""
    if "Nothing to be done" in text:
        return {}
    match = re.search(r"Job stats:\njob\s+count\n[-\s]+\n(.*?)\ntotal\s+\d+", text, re.S)
    assert match, text[-3000:]
    return {name: int(count) for name, count in (line.split() for line in match.group(1).strip().splitlines())}


def seed_synthetic_data(work: Path) -> Path:
    """A workflow copy in ``work`` with a stand-in document file, a tokenizer and synthetic shards made directly
    under ``results/data/syn`` (returned); the real (non-CaseOps) tokenizer is there because evaluation's byte
    lookup table reads it."""
    copy_workflow(work)
    data = work / "results" / "data" / "syn"
    (work / "docs.jsonl").write_text('{"text": "stand-in: the shards below are made directly"}\n')
    data.mkdir(parents=True)
    train_tokenizer([f"Document {i}: the quick brown fox jumps over {i % 7} lazy dogs." for i in range(200)],
                    data / "tokenizer.model", vocab_size=VOCAB, caseops=False)
    write_shards(data / "shards", vocab=VOCAB)
    return data


def _changed(section: str, **knobs) -> dict:
    recipe = copy.deepcopy(RECIPE)
    recipe[section].update(knobs)
    return recipe


def dry_run_recipes() -> dict[str, dict]:
    """The edited recipes of the dry runs (``dry_runs``), by name."""
    return {
        "unchanged": RECIPE,
        "clip_sigma": _changed("quantize", mlp_clip_sigmas=9.0),
        "compressor": _changed("pack", compressor="lzma"),
        # how the code bytes are counted: the gate's business, not the model compression's
        "code_convention": _changed("pack", code_bytes_convention="file"),
        "ttt": _changed("evaluate", ttt={**RECIPE["evaluate"]["ttt"], "lr": 0.003}),
        # a switch the shipped form folds: train_gpt.py's code (and CODE_HASH) changes, the artifact must not
        "eval_switch": _changed("evaluate", diagnostics=True),
        "seed_added": {**copy.deepcopy(RECIPE), "seeds": [1, 2]},
        # the data stage's process count: no byte of the data, of the shipped recipe or of preflight's params
        "data_workers": _changed("data", workers=2),
        # where a docs or export source would download from, on a local source: only the shipped recipe holds it
        "data_unused": _changed("data", hub_repo="someone/elsewhere"),
    }


@pytest.fixture(scope="module")
def dry_run_identities(tmp_path_factory):
    """(recipe files, the process computing their code identities). Six of the dry runs' recipes change the
    shipped train_gpt.py, and each plan computed its code identity (seconds of shrinking, most of a dry run):
    tests/code_identities.py computes them while the base run's chain of jobs leaves a core idle, and each dry
    run waits for its own (~62 s -> ~45 s for workdir and dry_runs on CI's two cores). The recipes whose shipped
    form is the base run's are left to that run (its plan computes that table)."""
    folder = tmp_path_factory.mktemp("wf_recipes")
    files = {}
    for name, recipe in dry_run_recipes().items():
        files[name] = folder / f"recipe_{name}.yaml"
        files[name].write_text(yaml.safe_dump(recipe))
    base = to_dict(shipped_recipe(load_run_config(files["unchanged"])))
    ahead = [path for path in files.values() if to_dict(shipped_recipe(load_run_config(path))) != base]
    proc = code_identities.start(ahead, folder / "code_identities.txt")
    yield files, proc
    code_identities.stop(proc)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, dry_run_identities) -> Path:
    """The base run (its post-training rules, for real). ``dry_run_identities`` starts first, beside it."""
    work = tmp_path_factory.mktemp("wf")
    data = seed_synthetic_data(work)
    (data / "verified.json").write_text("{}\n")
    train_checkpoint(data / "shards", work / "results" / "wf" / "seed1" / "train", model=MODEL, seed=1)
    t0 = 1_700_000_000.0
    for script in (work / "workflow" / "scripts").glob("*.py"):  # the code predates the outputs made above
        _set_mtime(script, t0 - 10)  # (Snakemake reruns a script: rule whose outputs are older than its script)
    for i, path in enumerate(
        [
            work / "docs.jsonl",
            data / "tokenizer.model",
            data / "shards",
            data / "verified.json",
            work / "results" / "wf" / "seed1" / "train",
        ]
    ):
        _set_mtime(path, t0 + 10 * i)
    status, out = finish(_snakemake(work, RECIPE, "base"))
    assert status == 0, out[-4000:]
    # nothing upstream was rerun; the report takes the compliance verdict
    assert job_counts(out) == {
        "hessians": 1, "quantize": 1, "pack": 1, "bundle": 1, "gate": 1, "evaluate": 1, "comply": 1, "aggregate": 1
    }
    assert (work / ARTIFACT).exists() and (work / TARGET).exists()
    # the evaluation's progress reached the console through the tee, and its whole output the log
    assert "evaluate seed 1: " in out and "val_bpb" in (work / "results/wf/seed1/logs/evaluate.log").read_text()
    # the closing summary names the report and the submission
    assert "pgolf: run wf (sweep) finished" in out and "report.html" in out and "submission.json" in out
    return work


@pytest.fixture(scope="module")
def dry_runs(workdir: Path, dry_run_identities) -> dict[str, dict[str, int]]:
    """Jobs each edited recipe would run, from dry runs (each pays Snakemake's start-up)."""
    files, identities = dry_run_identities
    # as many at once as there are cores: all nine at once took 26 s on 2 cores, two at a time 7
    pending, running, results = list(dry_run_recipes().items()), {}, {}
    while pending or running:
        while pending and len(running) < (os.cpu_count() or 1):
            name, recipe = pending.pop(0)
            code_identities.wait_for(files[name], identities)  # the plan reads it instead of computing it again
            running[name] = _snakemake(workdir, recipe, name, "-n")
        name = next(iter(running))
        status, out = finish(running.pop(name))
        assert status == 0, out[-4000:]
        results[name] = job_counts(out)
    return results


def test_nothing_to_do_without_changes(dry_runs) -> None:
    assert dry_runs["unchanged"] == {}
    assert dry_runs["data_workers"] == {}


# A stage knob also rebuilds the shipped train_gpt.py (it embeds the recipe) and re-runs the gate that counts its
# bytes; evaluation follows whatever changes the artifact, compliance and aggregation the gate too.
AFTER_ARTIFACT = {"bundle": 1, "gate": 1, "evaluate": 1, "comply": 1, "aggregate": 1}
AFTER_CODE = {"bundle": 1, "gate": 1, "comply": 1, "aggregate": 1}  # the shipped code alone changed


def test_clip_sigma_reruns_quantize_and_pack_only(dry_runs) -> None:
    assert dry_runs["clip_sigma"] == {"quantize": 1, "pack": 1, **AFTER_ARTIFACT}


def test_compressor_reruns_pack_only(dry_runs) -> None:
    assert dry_runs["compressor"] == {"pack": 1, **AFTER_ARTIFACT}


def test_code_bytes_convention_reruns_the_gate_not_pack_nor_evaluation(dry_runs) -> None:
    """Only the gate counts the code, and only comply and the aggregation read the gate report: the evaluation
    (10 minutes of 8 GPUs per seed in a record run) is not re-run for a change of how the code is counted."""
    assert dry_runs["code_convention"] == AFTER_CODE


def test_ttt_knob_reruns_evaluation_only(dry_runs) -> None:
    """No training, Hessians, quantization or packing: only evaluate and aggregate, plus the shipped file (it
    embeds the recipe) and the millisecond gate that counts its bytes."""
    assert dry_runs["ttt"] == {"bundle": 1, "gate": 1, "evaluate": 1, "comply": 1, "aggregate": 1}


def test_evaluation_switch_that_changes_the_shipped_code_does_not_repack(dry_runs) -> None:
    """The code identity is recorded by the gate, not packed into the artifact: a knob that changes the shipped
    code (and its CODE_HASH) re-runs the millisecond gate, never the model compression."""
    assert dry_runs["eval_switch"] == {"bundle": 1, "gate": 1, "evaluate": 1, "comply": 1, "aggregate": 1}


def test_a_data_field_no_stage_of_this_source_reads_retrains_nothing(dry_runs) -> None:
    """Preflight's params hold only the data fields it reads: a Hub repository that a local source never downloads
    from changes the shipped recipe (bundle, gate, comply, aggregate), not the training job."""
    assert dry_runs["data_unused"] == AFTER_CODE


def test_added_seed_runs_only_that_seed(dry_runs) -> None:
    jobs = dry_runs["seed_added"]
    per_seed = {name: jobs.get(name) for name in ("train", "hessians", "quantize", "pack", "gate", "evaluate")}
    assert per_seed == {name: 1 for name in per_seed}  # seed 2 only: seed 1's outputs stay
    assert "bundle" not in jobs and jobs["aggregate"] == 1


def test_a_stray_seed_folder_re_judges_the_run(workdir: Path, dry_runs) -> None:
    """comply's seeds rule fails on results of a seed the recipe does not declare (cherry-picking); the folders it
    finds are part of its params, so a stray seed<N>/ re-runs the check (a finished run kept its stale PASS)."""
    stray = workdir / "results" / "wf" / "seed9"
    stray.mkdir()
    try:
        status, out = finish(_snakemake(workdir, RECIPE, "stray", "-n"))
    finally:
        stray.rmdir()
    assert status == 0, out[-4000:]
    assert job_counts(out) == {"comply": 1, "aggregate": 1}


def test_the_bundles_description_is_a_declared_output(workdir: Path, dry_runs) -> None:
    """The reports read code/train_gpt.py.json (hashes, third-party modules, the error tags' texts): the bundle
    rule declares it and the reports take it as an input, so an aggregation run without one rebuilds it first
    instead of failing on the missing file."""
    described = workdir / "results" / "wf" / "code" / "train_gpt.py.json"
    aside = described.with_name("aside.json")
    described.rename(aside)
    try:
        status, out = finish(_snakemake(workdir, RECIPE, "no_description", "-n", "--forcerun", "aggregate"))
    finally:
        aside.rename(described)
    assert status == 0, out[-4000:]
    assert job_counts(out).get("bundle") == 1 and job_counts(out).get("aggregate") == 1


def test_partial_leaves_out_a_seed_whose_gate_failed(workdir: Path, dry_runs) -> None:
    """A seed evaluated but refused by its size gate has no gate report: `partial` reports without it (listing it
    as missing) instead of running its gate again, which would fail again and stop the report."""
    gate = workdir / "results" / "wf" / "seed1" / "gate" / "gate_report.json"
    aside = gate.with_name("aside.json")
    gate.rename(aside)
    recipe = workdir / "recipe_partial.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "snakemake", "--snakefile", str(workdir / "Snakefile"), "--directory", str(workdir),
             "--configfile", str(recipe), "--cores", "2", "--nolock", "-n", "partial"],
            capture_output=True, text=True, timeout=240)
    finally:
        aside.rename(gate)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert job_counts(out) == {"partial": 1}


def test_gpu_jobs_run_one_at_a_time_without_a_profile(workdir: Path, dry_runs) -> None:
    """The Snakefile caps gpu_jobs at 1 by itself: seeds' GPU jobs never share the GPUs, even under a plain
    `snakemake --cores N` (Snakemake leaves a resource that --resources does not name unlimited). A real run (the
    last of this module: comply and the report again, seconds) states the resources it schedules with."""
    status, out = finish(_snakemake(workdir, RECIPE, "gpu_jobs", "--forcerun", "comply"))
    assert status == 0, out[-4000:]
    provided = [line for line in out.splitlines() if line.startswith("Provided resources:")]
    assert provided and "gpu_jobs" in provided[0], out[:3000]
