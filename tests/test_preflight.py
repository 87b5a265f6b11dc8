"""`pgolf preflight`: every failure listed at once, in seconds; record-track hardware; data verified or verified now."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from pgolf.cli import main as pgolf_main
from pgolf.compliance.preflight import batch_split_check, hardware_check, run_preflight, torch_version_check
from shard_fixtures import build_dir

REPO = Path(__file__).resolve().parents[1]


def recipe(tmp_path: Path, **overrides) -> Path:
    """A small sweep recipe whose data lives at tmp_path/data (val_docs matches shard_fixtures.build_dir)."""
    data = {
        "run": "t",
        "mode": "sweep",
        "seeds": [1],
        "data": {"name": "fixture", "source": "export", "val_docs": 40, "train_shards": 1, "shard_tokens": 1000},
        "tokenizer": {"source": "export", "vocab_size": 8192},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


def test_hardware_check():
    one_h200 = hardware_check("record", ["NVIDIA H200"])
    assert not one_h200.ok
    assert one_h200.detail == (
        "record-track hardware check: found 1 x NVIDIA H200, need 8 x H100 SXM (sweep mode allows it)"
    )
    assert not hardware_check("record", ["NVIDIA H100 PCIe"] * 8).ok
    assert hardware_check("record", ["NVIDIA H100 80GB HBM3"] * 8).ok
    assert not hardware_check("record", []).ok
    assert not hardware_check("record", ["NVIDIA H100 80GB HBM3"] * 7 + ["NVIDIA A100"]).ok
    assert hardware_check("record", ["NVIDIA H100 80GB HBM3"] * 8).ok
    assert hardware_check("sweep", []).ok and "sweep mode" in hardware_check("sweep", []).detail


def test_attention_backend_resolved_as_the_stages_will():
    """An explicit FlashAttention backend that cannot run here fails preflight; auto and torch pass, naming the
    kernels they resolve to."""
    from pgolf.compliance.preflight import attention_check

    fa3 = attention_check("fa3", "cpu")
    assert not fa3.ok and fa3.detail == "model.attention_backend 'fa3' cannot run on cpu: needs CUDA, got cpu"
    auto = attention_check("auto", "cpu")
    assert auto.ok and auto.detail.startswith("auto -> sdpa on cpu")


def test_version_and_batch_checks():
    assert torch_version_check("2.11.0+cu130").ok and torch_version_check("2.13.0+cpu").ok
    assert not torch_version_check("2.9.1").ok
    from pgolf.config import load_run_config

    cfg = load_run_config(REPO / "config.yaml")
    assert batch_split_check(cfg, 8).ok and batch_split_check(cfg, 1).ok
    bad = batch_split_check(cfg, 3)
    assert not bad.ok and "evenly over 3 processes" in bad.detail


def test_verified_data_passes_in_seconds(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "shards").mkdir(parents=True)
    (root / "verified.json").write_text(
        json.dumps({"ok": True, "checks": [], "summary": {"val_docs": 40, "train_shards": 1}})
    )
    start = time.perf_counter()
    out = tmp_path / "preflight.json"
    code = pgolf_main(["preflight", "--config", str(recipe(tmp_path)), "--data-dir", str(root), "--json-out", str(out)])
    elapsed = time.perf_counter() - start
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert elapsed < 20
    report = json.loads(out.read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is True
    for name in (
        "config",
        "import torch",
        "import brotli",
        "import sentencepiece",
        "hardware",
        "batch split",
        "binary torchrun",
        "data verified",
        "free disk",
    ):
        assert checks[name]["ok"], checks[name]
    assert checks["import flash_attn_interface"]["required"] is False  # optional everywhere
    assert "preflight: OK" in printed


def test_failures_are_all_listed(tmp_path, capsys):
    """Record mode on this machine, lrzip requested, no data: three failures in one run, exit status 1."""
    path = recipe(tmp_path, mode="record", data={"val_docs": 50_000}, pack={"compressor": "lrzip"})
    code = pgolf_main(["preflight", "--config", str(path), "--data-dir", str(tmp_path / "nowhere")])
    printed = capsys.readouterr().out
    assert code == 1
    failed = printed.splitlines()[-1]
    assert failed.startswith("preflight: FAILED:")
    assert "hardware" in failed and "data verified" in failed
    assert "record-track hardware check: found" in printed and "(sweep mode allows it)" in printed
    assert "no shards" in printed and "no network" in printed
    if shutil.which("lrzip") is None:
        assert "binary lrzip" in failed and "pack.compressor is lrzip" in printed


def test_local_documents_the_data_stage_will_tokenize_are_a_warning(tmp_path, capsys):
    """No shards yet, but the recipe's documents are on this machine: the pipeline builds them, so preflight warns
    and passes (the smoke recipe on a fresh checkout)."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "a"}\n')
    path = recipe(tmp_path, data={"source": "local", "docs_path": str(docs)}, tokenizer={"source": "train"})
    code = pgolf_main(["preflight", "--config", str(path), "--data-dir", str(tmp_path / "nowhere")])
    printed = capsys.readouterr().out
    assert code == 0 and f"the data stage will build them from {docs}" in printed
    assert printed.splitlines()[-1] == "preflight: OK"


def test_failed_verification_is_reported(tmp_path):
    root = tmp_path / "data"
    (root / "shards").mkdir(parents=True)
    (root / "verified.json").write_text(
        json.dumps(
            {
                "ok": False,
                "checks": [{"name": "train/val disjoint", "ok": False, "detail": "3 validation docs in train shards"}],
            }
        )
    )
    check = by_name(run_preflight(recipe(tmp_path), root))["data verified"]
    assert not check.ok and "verification FAILED: train/val disjoint: 3 validation docs in train shards" in check.detail


def test_unverified_shards_are_verified_now(tmp_path):
    shards = tmp_path / "data" / "shards"
    build_dir(shards, n_val=40, n_train=60)
    checks = by_name(run_preflight(recipe(tmp_path), shards))  # --data-dir may name the shards directory
    assert checks["data verified"].ok and "verified now" in checks["data verified"].detail
    wrong = by_name(run_preflight(recipe(tmp_path, data={"val_docs": 41}), shards))["data verified"]
    assert not wrong.ok and "val doc count" in wrong.detail
    skipped = by_name(run_preflight(recipe(tmp_path), shards, verify_now=False))["data verified"]
    assert not skipped.ok and "pgolf data verify" in skipped.detail


def test_bad_config_fails_first(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run: x\nmode: record\nmodel: {num_layers: zero}\n")
    checks = run_preflight(path)
    assert len(checks) == 1 and not checks[0].ok and "model.num_layers: expected int" in checks[0].detail


@pytest.mark.gpu
def test_gpu_is_seen():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    checks = by_name(run_preflight(REPO / "recipes" / "smoke.yaml"))
    assert checks["import triton"].ok
    assert str(torch.cuda.device_count()) in checks["CUDA"].detail


def test_all_train_shards_reserve_at_least_the_downloaders_default() -> None:
    """data.train_shards 0 downloads every train shard: the disk it reserves is not the smallest of all."""
    import dataclasses

    from pgolf.compliance.preflight import data_size_bytes
    from pgolf.config import load_run_config

    cfg = load_run_config(Path(__file__).resolve().parents[1] / "config.yaml")
    sizes = {n: data_size_bytes(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_shards=n)))
             for n in (0, 1, 80)}
    assert sizes[0] >= sizes[80] > sizes[1]
