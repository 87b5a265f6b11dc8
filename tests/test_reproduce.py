"""Issue 21: a submission folder's train_gpt.py reproduces its own claims, byte for byte (CPU).

The staged pipeline runs for one seed (Snakemake: data stage, tokenizer, bundle, train, Hessians, quantize, pack,
gate, evaluation, aggregation and the records folder) on the bundled sample corpus with the record recipe's
switches at toy sizes (config.yaml, sizes and CPU settings changed: RECIPE below). Then the folder's train_gpt.py
runs alone in a scratch folder, with pgolf hidden, on copies of the same shards WITHOUT pgolf's manifest.json or
tokenizer (what a reviewer's ./data/ holds), and with OMP_NUM_THREADS=1 where the Snakemake jobs had 2 threads (a
reviewer's machine differs): the recipe's cpu_threads must decide. Both must give the same val_bpb, the same
artifact (sha256), the same model / code / total bytes, and submission.json and the folder README must state those
numbers and that the script reproduces them.

The same run is the equality test of the bundle's transforms (pgolf.artifact.shrink): the pipeline runs pgolf's
own sources, the folder's script their shrunk, minified copies, with the record recipe's switches folded.

PGOLF_REPRO_WORKDIR=<dir> reuses a finished pipeline run of this recipe in <dir> (for working on the assertions).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import early_runs
from pgolf.artifact.bundle import run_isolated

pytest.importorskip("snakemake")
pytestmark = pytest.mark.slow  # ~100 CPU-seconds: one pipeline run (~12 stage processes) and one bundle run

REPO = Path(__file__).resolve().parents[1]
RUN, SEED, THREADS = "repro", 1, 2
EARLY_RUN = "reproduce pipeline"  # the name tests/conftest.py starts start_pipeline under


def recipe() -> dict:
    """config.yaml with toy sizes: every switch of the record recipe stays, except the ones a CPU run or a sweep
    must change (named here): mode sweep (a record must score 50,000 documents), local data and a tokenizer
    trained here, no compile, a step-based schedule, and fixed CPU thread counts."""
    rec = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    rec.update(run=RUN, mode="sweep", seeds=[SEED])
    rec["data"] = {"name": "repro_sample", "source": "local", "docs_path": str(REPO / "data/sample/docs.jsonl"),
                   "max_docs": 1200, "val_docs": 60, "shard_tokens": 100_000, "train_shards": 0, "workers": 1}
    rec["tokenizer"] = {"source": "train", "vocab_size": 512, "caseops": True, "train_docs": 0}
    rec["model"].update(vocab_size=512, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=4,
                        xsa_last_n=3, attn_gate_window=8, smear_gate_window=8, loop_start=1, loop_end=1,
                        loop_count=2, parallel_residual_start=2)
    rec["train"].update(train_batch_tokens=1024, micro_batch_tokens=512, train_seq_len=128,
                        max_wallclock_seconds=0.0, reserve_seconds=0.0, iterations=4, warmup_steps=1,
                        warmup_cu_passes=1, compile=False, ema_decay=0.5, log_every_steps=1, cpu_threads=THREADS)
    # Hessians big enough that x.T @ x differs between 1 and 2 CPU threads (tests/test_reproducible.py)
    rec["hessians"].update(batches=2, batch_rows=4, seq_len=256, cpu_threads=THREADS)
    rec["quantize"].update(passthrough_max_elements=1024, lqer_top_k=1, lqer_rank=2, lqer_group_size=16,
                           cpu_threads=THREADS)
    # the record's flat diagnostics over 2 ranks x 4 rows (8 x 32 rows of 64 tokens is more than the 8 documents)
    rec["evaluate"].update(eval_seq_len=64, eval_batch_tokens=512, compile=False, max_docs=8,
                           progress_every_seconds=1000.0, cpu_threads=THREADS, record_flat_world_size=2,
                           record_flat_batch_seqs=4)
    # the record variant with one lane and nothing in flight, so its phases fire over 8 documents
    # (tests/test_recipe_runs.py shrinks it the same way)
    rec["evaluate"]["ttt"].update(lora_rank=2, lora_alpha=4.0, chunk_tokens=32, docs_per_batch=2,
                                  context_tokens=64, phase_boundaries_docs=[2, 4], phase_chunk_tokens=256,
                                  stream_chunk_tokens=512, lanes=1, inflight=0, phase_rows=1)
    rec["aggregate"] = {"unit": "nats_per_token", "submission_name": "pgolf_repro", "blurb": "issue 21",
                        "technique_summary": "the record recipe at toy sizes"}
    return rec


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start_pipeline(work: Path) -> tuple[Path, subprocess.Popen]:
    """The staged pipeline of :func:`recipe` in ``work`` (a copy of the workflow), started; its console goes to
    ``work/console.txt``. tests/conftest.py starts it when the session starts (tests/early_runs.py)."""
    shutil.copy(REPO / "Snakefile", work / "Snakefile")
    shutil.copytree(REPO / "workflow", work / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe()))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(work / "console.txt", "w") as console:
        proc = subprocess.Popen(
            [sys.executable, "-m", "snakemake", "--snakefile", str(work / "Snakefile"), "--directory", str(work),
             "--configfile", str(work / "recipe.yaml"), "--cores", "2", "--nolock"],
            stdout=console, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return work, proc


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    reuse = os.environ.get("PGOLF_REPRO_WORKDIR")
    if reuse:
        return Path(reuse)
    work, proc = early_runs.take(EARLY_RUN) or start_pipeline(tmp_path_factory.mktemp("repro"))
    try:
        proc.wait(timeout=900)
    finally:
        early_runs.kill_group(proc)  # after a timeout: Snakemake and its jobs
    assert proc.returncode == 0, (work / "console.txt").read_text()[-8000:]
    return work


def test_the_folder_train_gpt_reproduces_its_claims(pipeline: Path, tmp_path: Path, monkeypatch) -> None:
    run_dir = pipeline / "results" / RUN
    (folder,) = (run_dir / "records" / "track_10min_16mb").iterdir()
    submission = json.loads((folder / "submission.json").read_text())
    staged = run_dir / f"seed{SEED}"
    pack = json.loads((staged / "pack" / "pack_report.json").read_text())
    gate = json.loads((staged / "gate" / "gate_report.json").read_text())
    staged_eval = json.loads((staged / "eval" / "eval.json").read_text())
    bundle_meta = json.loads((run_dir / "code" / "train_gpt.py.json").read_text())

    # a reviewer's scratch folder: the script and the shards, nothing else (no manifest.json, no tokenizer)
    scratch = tmp_path / "reviewer"
    (scratch / "data").mkdir(parents=True)
    shutil.copy(folder / "train_gpt.py", scratch / "train_gpt.py")
    shards = pipeline / "results" / "data" / recipe()["data"]["name"] / "shards"
    for shard in sorted(shards.glob("fineweb_*.bin")):
        shutil.copy(shard, scratch / "data" / shard.name)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the Snakemake jobs ran with 2: the recipe must decide
    proc = run_isolated(scratch / "train_gpt.py", ["--seed", str(SEED), "--data-dir", "./data/", "--device", "cpu"],
                        timeout_seconds=600, cwd=scratch)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    alone = scratch / "results" / f"seed{SEED}"
    alone_pack = json.loads((alone / "pack" / "pack_report.json").read_text())
    alone_eval = json.loads((alone / "eval" / "eval.json").read_text())
    alone_summary = json.loads((alone / "record_run.json").read_text())

    # the same trained weights and the same artifact, byte for byte
    assert sha256(alone / "train/checkpoint/model.pt") == sha256(staged / "train/checkpoint/model.pt")
    assert sha256(alone / "hessians/hessians.pt") == sha256(staged / "hessians/hessians.pt")
    assert sha256(alone / "pack" / "artifact.pgolf") == sha256(staged / "pack" / "artifact.pgolf") \
        == pack["artifact_sha256"] == gate["artifact_sha256"] == alone_pack["artifact_sha256"]
    assert "pgolf_code_hash" not in pack["input_hashes"]  # the artifact names no code: both paths pack the same bytes
    assert gate["code_hash"] == alone_pack["code_hash"] == bundle_meta["code_hash"] == alone_summary["code_hash"]
    # the same score, exactly
    assert alone_eval["val_bpb"] == staged_eval["val_bpb"]
    # the same bytes, counted once, on the same file
    claims = {"model": gate["model_bytes"], "code": gate["code_bytes"], "total": gate["total_bytes"]}
    assert {"model": alone_pack["model_bytes"], "code": alone_pack["code_bytes"],
            "total": alone_pack["total_bytes"]} == claims
    assert claims["code"] == bundle_meta[f"bytes_{gate['code_bytes_convention']}"]
    assert gate["code_sha256"] == alone_pack["code_sha256"] == sha256(folder / "train_gpt.py") == bundle_meta["sha256"]
    # submission.json and the README state these numbers, and that the folder's script reproduces them
    seed_row = submission["seed_results"][str(SEED)]
    assert seed_row["val_bpb"] == staged_eval["val_bpb"]
    assert seed_row["artifact_sha256"] == pack["artifact_sha256"]
    assert (seed_row["model_bytes"], seed_row["code_bytes"], seed_row["artifact_bytes"]) == \
        (claims["model"], claims["code"], claims["total"])
    assert submission["provenance"]["train_gpt_sha256"] == sha256(folder / "train_gpt.py")
    readme = (folder / "README.md").read_text()
    assert f"{claims['total']:,}" in readme
    assert "the folder's train_gpt.py reproduces these claims" in readme
    # the texts of the shipped form's error tags beside the script (the bundle report's table)
    messages = json.loads((folder / "train_gpt_messages.json").read_text())
    assert messages and messages == bundle_meta["messages"]
    shipped = (folder / "train_gpt.py").read_text()
    assert all(repr(tag) in shipped or f'"{tag}"' in shipped for tag in messages)  # each one the script can raise


def test_the_recipe_keeps_the_record_switches() -> None:
    """What the test recipe changes from config.yaml, beside sizes: the reason each run above is the record's."""
    record = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    ours = recipe()
    changed = {
        (section, key)
        for section in ("model", "optim", "train", "hessians", "quantize", "pack")
        for key in set(record.get(section) or {}) | set(ours.get(section) or {})
        if (record.get(section) or {}).get(key) != (ours.get(section) or {}).get(key)
    }
    sizes = {("model", k) for k in ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "rope_dims",
                                     "xsa_last_n", "attn_gate_window", "smear_gate_window", "loop_start", "loop_end",
                                     "loop_count", "parallel_residual_start")}
    sizes |= {("train", k) for k in ("train_batch_tokens", "micro_batch_tokens", "train_seq_len", "iterations",
                                      "warmup_steps", "warmup_cu_passes", "ema_decay", "log_every_steps",
                                      "max_wallclock_seconds", "reserve_seconds")}
    sizes |= {("hessians", k) for k in ("batches", "batch_rows", "seq_len")}
    sizes |= {("quantize", k) for k in ("passthrough_max_elements", "lqer_top_k", "lqer_rank", "lqer_group_size")}
    cpu = {("train", "compile"), ("train", "cpu_threads"), ("hessians", "cpu_threads"), ("quantize", "cpu_threads")}
    assert changed <= sizes | cpu, sorted(changed - sizes - cpu)
    assert copy.deepcopy(ours["pack"]) == record["pack"]
