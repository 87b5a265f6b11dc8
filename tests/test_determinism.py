"""Identical inputs give identical bytes (issue 19): two preparations of the same documents (from two folders,
with 1 and 2 workers; the second in a fresh process of another string-hash seed, as another Snakemake job or
machine would be), then training, Hessians, quantization, packing and evaluation (LoRA TTT) in two separate trees,
give byte-identical shards, manifests, checkpoints, Hessians, quantized models and artifacts; every report (the
evaluation's scores among them) is equal apart from the fields pgolf.io.TIMING_FIELDS names (and the folder it was
written in); two aggregations of the same seed files
give the same submission.json apart from those fields. Every file follows the umask (0644 under 022).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datafiles import PUBLISHED_TOKENIZER, SAMPLE_DOCS
from report_fixtures import make_cpu_run
from stage_fixtures import TINY_MODEL, TINY_TRAIN

from pgolf.artifact.pack import run_pack_stage
from pgolf.config import (AggregateConfig, EvaluateConfig, HessianConfig, OptimConfig, PackConfig, QuantizeConfig,
                          TTTConfig, from_mapping)
from pgolf.data.prepare import prepare_shards
from pgolf.evaluate.stage import run_evaluation
from pgolf.io import TIMING_FIELDS, mask_timings
from pgolf.report.folder import seed_log_name
from pgolf.quantize.hessians import run_hessian_stage
from pgolf.quantize.stage import run_quantize_stage
from pgolf.report.aggregate import run_report
from pgolf.train.loop import train

pytestmark = pytest.mark.slow  # ~25 s of CPU: two small pipelines with evaluation

MODEL = dataclasses.replace(TINY_MODEL, vocab_size=8192)  # the published tokenizer's vocabulary
# one CPU thread for every stage that sums floats, as a recipe pins them (cpu_threads): the child process starts
# with torch's default thread count, and tests earlier in this process may have left another
TRAIN = dataclasses.replace(TINY_TRAIN, iterations=3, warmup_steps=1, cpu_threads=1)
EVAL = EvaluateConfig(eval_seq_len=24, eval_batch_tokens=96, compile=False, progress_every_seconds=1e9, cpu_threads=1,
                      ttt=TTTConfig(mode="lora", lora_rank=4, lora_alpha=8.0, chunk_tokens=8, docs_per_batch=3,
                                    context_tokens=24))  # LoRA TTT on the 40 validation documents: ~8 s of CPU
CONTENT = {  # outputs whose bytes must be identical (everything else is a report, compared below)
    "data/manifest.json", "train/checkpoint/model.pt", "train/checkpoint/checkpoint.json", "hessians/hessians.pt",
    "quantize/quantized.pt", "pack/artifact.pgolf",
}


def build_tree(root: Path, workers: int) -> None:
    """The same inputs through prepare -> train -> Hessians -> quantize -> pack, under ``root``."""
    old_umask, old_threads = os.umask(0o022), torch.get_num_threads()
    try:
        docs = root / "input" / "docs.jsonl"  # the same documents, read from another folder each time
        docs.parent.mkdir()
        shutil.copy(SAMPLE_DOCS, docs)
        prepare_shards(docs, PUBLISHED_TOKENIZER, root / "data", val_docs=40, shard_tokens=20_000,
                       workers=workers, max_docs=400, progress=io.StringIO())
        train(MODEL, OptimConfig(), TRAIN, 7, root / "data", root / "train", "cpu")
        ckpt = root / "train" / "checkpoint"
        hess = HessianConfig(batches=2, batch_rows=2, seq_len=48, cpu_threads=1)
        run_hessian_stage(ckpt, root / "data", hess, 7, root / "hessians" / "hessians.pt",
                          root / "hessians" / "hessian_report.json", "sweep", "cpu")
        quant = QuantizeConfig(passthrough_max_elements=1024, lqer_top_k=1, lqer_rank=2, lqer_group_size=16,
                               cpu_threads=1)
        run_quantize_stage(ckpt, root / "hessians" / "hessians.pt", quant, root / "quantize" / "quantized.pt",
                           root / "quantize" / "quantize_report.json")
        run_pack_stage(root / "quantize" / "quantized.pt", ckpt, PackConfig(brotli_quality=5), None,
                       root / "pack" / "artifact.pgolf", root / "pack" / "pack_report.json")
        _, code = run_evaluation(root / "pack" / "artifact.pgolf", EVAL, 7, root / "data", root / "eval" / "eval.json",
                                 checkpoint=ckpt, mode="sweep", device_kind="cpu",
                                 pack_report=root / "pack" / "pack_report.json")
        assert code == 0, f"{root}: the evaluation exited {code}"
    finally:
        os.umask(old_umask)
        torch.set_num_threads(old_threads)


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> tuple[Path, Path]:
    """Two trees: one built here, one by a child process whose string-hash seed differs from this one's (a fixed
    seed; this process's is random unless PYTHONHASHSEED fixes it, and then the child takes another). The child
    builds its tree while this process builds the other: every stage runs on one CPU thread (cpu_threads 1), so
    the two trees take the two cores at once instead of one after the other (~32 s -> ~22 s on CI's 2 cores);
    neither reads the other's folder."""
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    tests_dir = Path(__file__).resolve().parent
    code = f"import sys; sys.path.insert(0, {str(tests_dir)!r}); from test_determinism import build_tree; " \
           f"from pathlib import Path; build_tree(Path({str(b)!r}), workers=2)"
    env = {**os.environ, "PYTHONHASHSEED": seed}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        build_tree(a, workers=1)
    except BaseException:
        child.kill()
        child.communicate()
        raise
    _, stderr = child.communicate(timeout=600)
    assert child.returncode == 0, f"the second tree's process failed:\n{stderr[-3000:]}"
    return a, b


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file() and "input" not in p.parts}


def _parsed(path: Path, root: Path):
    """A report's content with the folder it lives in replaced by ROOT (a report may say where it wrote)."""
    text = path.read_text(encoding="utf-8").replace(str(root), "ROOT")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines()]
    return json.loads(text)


def test_identical_inputs_give_identical_bytes(trees) -> None:
    a, b = trees
    files_a, files_b = _files(a), _files(b)
    assert set(files_a) == set(files_b)
    assert CONTENT <= set(files_a)
    shards = [name for name in files_a if name.startswith("data/fineweb_")]
    assert len(shards) >= 3
    for name in sorted(CONTENT | set(shards)):
        assert files_a[name].read_bytes() == files_b[name].read_bytes(), f"{name} differs between identical runs"


def test_reports_differ_only_in_the_named_measurements(trees) -> None:
    a, b = trees
    for name, path in sorted(_files(a).items()):
        if path.suffix not in (".json", ".jsonl") or name in CONTENT:
            continue
        assert path.name in TIMING_FIELDS, f"{name}: a report, but pgolf.io.TIMING_FIELDS does not list it"
        left = mask_timings(path.name, _parsed(path, a))
        right = mask_timings(path.name, _parsed(b / name, b))
        assert left == right, f"{name}: differs beyond the fields TIMING_FIELDS names"


def test_outputs_follow_the_umask(trees) -> None:
    for root in trees:
        for path in root.rglob("*"):
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o755 if path.is_dir() else 0o644), f"{path}: {oct(mode)}"


def test_aggregating_the_same_seeds_twice_gives_the_same_submission(tmp_path) -> None:
    cfg = from_mapping(AggregateConfig, {"submission_name": "same"}, "aggregate")  # no date: today's, named
    outs = []
    for name in ("one", "two"):
        run_dir = make_cpu_run(tmp_path / name)
        run_report(run_dir, cfg, [1, 2, 3], mode="sweep", comply_path=run_dir / "comply.json")
        outs.append(run_dir)
    for report in ("submission.json", "aggregate.json"):
        left, right = (mask_timings(report, _parsed(d / report, d.parents[1])) for d in outs)
        assert left == right, report
    folders = [next((d / "records").glob("track_*/*")) for d in outs]
    logs = sorted(folders[0].glob("train_seed*.log"))
    assert len(logs) == 3
    for log in logs:  # its stage logs quote times: masked whole, under the name the folder writer gives them
        assert log.name == seed_log_name(int(log.stem.removeprefix("train_seed")))
        assert mask_timings(log.name, log.read_text()) == "<measured>"
    for name in ("submission.json", "train_gpt.py", "requirements.txt"):
        left, right = (mask_timings(name, (f / name).read_text()) if name.endswith(".py") or name.endswith(".txt")
                       else mask_timings(name, _parsed(f / name, f.parents[4])) for f in folders)
        assert left == right, name
