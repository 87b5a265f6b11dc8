"""The data stage through Snakemake: the duplicates policy reaches prepare_shards and verify_data by their params.

A copy of the Snakefile and workflow/ runs the data rules only (target ``verified.json``) on a small local corpus
whose training part repeats validation documents: the default drops the copies; changing either knob reruns
exactly preparation and verification; ``refuse`` then fails the rule naming the first copy's line.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from shard_fixtures import corpus_texts, published_model, write_jsonl
from test_workflow import finish, job_counts

pytest.importorskip("snakemake")
pytestmark = pytest.mark.slow  # a few Snakemake start-ups

REPO = Path(__file__).resolve().parents[1]
N_VAL = 12
DATA = "results/data/dup"
TARGET = f"{DATA}/verified.json"
RECIPE = {
    "run": "dw",
    "mode": "sweep",
    "seeds": [1],
    "data": {"name": "dup", "source": "local", "docs_path": "docs.jsonl", "val_docs": N_VAL, "shard_tokens": 200,
             "max_val_overlap_fraction": 0.25, "workers": 1},
    "tokenizer": {"source": "path", "path": str(published_model()), "vocab_size": 8192, "caseops": True},
}


def _snakemake(work: Path, recipe: dict, name: str, *extra: str) -> subprocess.Popen:
    path = work / f"recipe_{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(work / "Snakefile"), "--directory", str(work),
           "--configfile", str(path), "--cores", "1", "--nolock", *extra, TARGET]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _with(**knobs) -> dict:
    recipe = copy.deepcopy(RECIPE)
    recipe["data"].update(knobs)
    return recipe


def test_policy_reaches_the_data_rules(tmp_path):
    work = tmp_path
    shutil.copy(REPO / "Snakefile", work / "Snakefile")
    for folder in ("workflow", "profiles"):
        shutil.copytree(REPO / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    texts = corpus_texts(40, seed=11)
    # val doc 3 again as train docs 5 and 20 (lines 18 and 33), val doc 7 again at the end
    dup = texts[: N_VAL + 5] + [texts[3]] + texts[N_VAL + 5 : N_VAL + 19] + [texts[3]] + texts[N_VAL + 19 :] + [texts[7]]
    write_jsonl(work / "docs.jsonl", dup)

    status, out = finish(_snakemake(work, RECIPE, "base"))
    assert status == 0, out[-4000:]
    assert job_counts(out) == {"prepare_shards": 1, "verify_data": 1}
    manifest = json.loads((work / DATA / "shards" / "manifest.json").read_text())
    assert manifest["val_duplicates"] == {"val_docs_with_train_copies": 2, "train_docs_dropped": 3}
    assert manifest["settings"]["max_val_overlap_fraction"] == 0.25
    verified = json.loads((work / TARGET).read_text())
    assert verified["ok"] and verified["summary"]["train_docs_dropped"] == 3
    assert verified["summary"]["val_overlap_limit_docs"] == 3  # floor(0.25 * 12): the fraction reached verify

    dry = {
        "unchanged": RECIPE,
        "policy": _with(val_duplicates_policy="refuse"),
        "fraction": _with(max_val_overlap_fraction=0.5),
    }
    procs = {name: _snakemake(work, recipe, name, "-n") for name, recipe in dry.items()}
    jobs = {}
    for name, proc in procs.items():
        status, out = finish(proc)
        assert status == 0, out[-4000:]
        jobs[name] = job_counts(out)
    assert jobs == {"unchanged": {}, "policy": {"prepare_shards": 1, "verify_data": 1},
                    "fraction": {"prepare_shards": 1, "verify_data": 1}}

    status, out = finish(_snakemake(work, dry["policy"], "policy"))
    assert status != 0
    log = (work / DATA / "logs" / "prepare_shards.log").read_text()
    assert "leak: 2 validation documents also occur in the training split, first at train doc 5" in log
    assert f"docs.jsonl:{N_VAL + 6}" in log


def test_each_knob_reruns_only_the_rules_that_read_it(tmp_path):
    """On a recorded state (`snakemake --touch`) of a recipe that downloads its documents and trains its tokenizer,
    dry runs of edited copies: the download takes only the fields it reads (a preparation knob never downloads
    again), the tokenizer trainer gets tokenizer.train_max_sentence_chars, the data stage's process count reruns
    nothing, and the documents land under the name the Hub gives them."""
    work = tmp_path
    shutil.copy(REPO / "Snakefile", work / "Snakefile")
    for folder in ("workflow", "profiles"):
        shutil.copytree(REPO / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    recipe = {"run": "dl", "mode": "sweep", "seeds": [1],
              "data": {"name": "hub", "source": "docs", "docs_file": "datasets/docs_v2.jsonl", "val_docs": 12,
                       "shard_tokens": 200},
              "tokenizer": {"source": "train", "vocab_size": 1024, "caseops": True},
              "model": {"vocab_size": 1024}}
    data, seed = work / "results/data/hub", work / "results/dl/seed1/train"
    outputs = [data / "raw/docs_v2.jsonl", data / "tokenizer.model", data / "shards/placeholder", data / "verified.json",
               seed / "checkpoint/checkpoint.json", seed / "checkpoint/model.pt", seed / "train_summary.json",
               seed / "metrics.jsonl"]
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("placeholder\n")
    target = "results/dl/seed1/train/train_summary.json"

    def snakemake(edited: dict, name: str, *extra: str) -> subprocess.Popen:
        path = work / f"recipe_{name}.yaml"
        path.write_text(yaml.safe_dump(edited))
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(work / "Snakefile"), "--directory", str(work),
               "--configfile", str(path), "--cores", "1", "--nolock", *extra, target]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    status, out = finish(snakemake(recipe, "base", "--touch", "--forceall"))  # records every rule's params
    assert status == 0, out[-4000:]

    def edited(section: str, **knobs) -> dict:
        new = copy.deepcopy(recipe)
        new[section].update(knobs)
        return new

    after_tokenizer = {"prepare_shards": 1, "verify_data": 1, "train": 1}
    dry = {
        "unchanged": (recipe, {}),
        "workers": (edited("data", workers=3), {}),
        "shard_tokens": (edited("data", shard_tokens=300), after_tokenizer),
        "sentence_chars": (edited("tokenizer", train_max_sentence_chars=1000), {"train_tokenizer": 1, **after_tokenizer}),
        "revision": (edited("data", revision="v2"), {"download_docs": 1, "train_tokenizer": 1, **after_tokenizer}),
    }
    procs = {name: snakemake(new, name, "-n") for name, (new, _) in dry.items()}
    for name, proc in procs.items():
        status, out = finish(proc)
        assert status == 0, out[-4000:]
        assert job_counts(out) == dry[name][1], (name, out[-3000:])
