"""benchmarks/record_warmup.py: the warm-up clock between the record's two training-loader constructions."""

import sys
import time
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import record_warmup  # noqa: E402


def fake_record(events: list):
    """A stand-in with the record's shape: main() builds a loader, warms up, builds a fresh loader, trains."""

    class DocumentPackingLoader:
        def __init__(self, h, device):
            events.append("loader")

    def main():
        DocumentPackingLoader(None, None)
        time.sleep(0.05)  # the warm-up
        events.append("warmup")
        DocumentPackingLoader(None, None)
        events.append("train")

    return types.SimpleNamespace(DocumentPackingLoader=DocumentPackingLoader, main=main, torch=None)


def test_the_warmup_is_the_time_between_the_two_loaders():
    events, seconds = [], []
    record = fake_record(events)
    record_warmup.install_warmup_clock(record, lambda s: (seconds.append(s), events.append("clock")))
    record.main()
    assert events == ["loader", "warmup", "clock", "loader", "train"]
    assert len(seconds) == 1 and 0.05 <= seconds[0] < 1.0


def test_warmups_start_from_empty_compile_caches_unless_told_otherwise():
    import shutil

    import compile_cache

    cold = compile_cache.compile_cache_env("cold", "pgolf_test_cache_")
    assert set(cold) == {"TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"}
    dirs = [Path(d) for d in cold.values()]
    assert len(set(dirs)) == 2 and all(d.is_dir() and not any(d.iterdir()) for d in dirs)
    again = compile_cache.compile_cache_env("cold", "pgolf_test_cache_")
    assert not set(again.values()) & set(cold.values())  # each measurement gets its own
    assert compile_cache.compile_cache_env("inherit", "x") == {}
    with pytest.raises(ValueError, match="--compile-cache: expected one of cold, inherit, got 'warm'"):
        compile_cache.compile_cache_env("warm", "x")
    for env in (cold, again):
        shutil.rmtree(Path(env["TORCHINDUCTOR_CACHE_DIR"]).parent)


def test_pgolf_warmup_runs_training_with_cold_caches_by_default(tmp_path, monkeypatch):
    """The measured training process gets the empty caches (cold) or the environment's own (inherit), and the
    figures say which."""
    import json
    import shutil
    import subprocess

    import pgolf_warmup

    seen = []

    def fake_run(cmd, check, env):  # the training stage: record its environment, write its summary
        seen.append(env)
        out_dir = Path(cmd[cmd.index("--out-dir") + 1])
        out_dir.mkdir(parents=True)
        (out_dir / "train_summary.json").write_text(json.dumps(
            {"compile_warmup_seconds": 1.0, "compile_warmup_by_loop_state": {"off": {"seconds": 1.0}}}))

    monkeypatch.setattr(subprocess, "run", fake_run)
    import synthetic_shards

    monkeypatch.setattr(synthetic_shards, "ensure_harness_shards", lambda *a: None)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "shared_cache"))
    config = str(Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml")
    for mode in ("cold", "inherit"):
        out = tmp_path / f"{mode}.json"
        flags = [] if mode == "cold" else ["--compile-cache", "inherit"]
        assert pgolf_warmup.main(["--config", config, "--data", str(tmp_path), "--out", str(out), *flags]) == 0
        result = json.loads(out.read_text())
        assert result["compile_cache"] == mode
    cold_env, inherit_env = seen
    assert cold_env["TORCHINDUCTOR_CACHE_DIR"] == json.loads((tmp_path / "cold.json").read_text())[
        "compile_cache_dirs"]["TORCHINDUCTOR_CACHE_DIR"] != str(tmp_path / "shared_cache")
    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        folder = Path(cold_env[variable])
        assert folder.is_dir() and not any(folder.iterdir())
    shutil.rmtree(Path(cold_env["TORCHINDUCTOR_CACHE_DIR"]).parent)
    assert inherit_env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "shared_cache")
