"""benchmarks/train_loop_speed.py: pgolf's real training loop timed, beside the record's loop (issue 16)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import train_loop_speed as speed  # noqa: E402

TOKENS = 1000  # tokens per step: 1,000 tokens/s is 1,000 ms per step


def _metrics(*windows):
    """metrics.jsonl lines: a header event, then (step, looping, tokens_per_s) per logged window."""
    lines = [json.dumps({"event": "attempt"})]
    lines += [json.dumps({"event": "train_step", "step": s, "looping": on, "tokens_per_s": tps}) for s, on, tps in windows]
    return lines


def test_windows_medians_and_ratios_from_known_figures():
    metrics = _metrics((1, False, 500.0), (10, False, 2000.0), (20, False, 1000.0), (30, False, 1250.0),
                       (40, True, 400.0), (50, True, 500.0), (60, True, 625.0))
    summary = {"ms_per_step_before_loop": 700.0, "ms_per_step_after_loop": 1800.0, "steps": 60,
               "train_seconds": 80.0, "peak_memory_gib": 3.5, "attention_backend": {"resolved": "torch"}}
    profile = {"windows": {"pre_loop": {"ms_per_step": 1000.0}, "post_loop": {"ms_per_step": 2000.0}},
               "peak_memory_allocated_gib": 4.0, "device": "GPU X"}
    result = speed.loop_speed(summary, metrics, TOKENS, profile)
    assert [(w["step"], w["ms_per_step"], w["mixed"]) for w in result["windows"]] == [
        (1, 2000.0, True), (10, 500.0, False), (20, 1000.0, False), (30, 800.0, False),
        (40, 2500.0, True), (50, 2000.0, False), (60, 1600.0, False)]
    # step 1 and the window that turned looping on are left out of the medians
    assert result["window_median_ms_per_step"] == {"before_loop": 800.0, "after_loop": 1800.0}
    assert result["record"] == {"before_loop": 1000.0, "after_loop": 2000.0, "peak_memory_gib": 4.0,
                                "device": "GPU X"}
    assert result["pgolf_over_record"] == {"before_loop": 0.7, "after_loop": 0.9}
    line = speed.summary_line(result)
    assert "700.0 / 1,800.0 ms/step" in line and "windows 800.0 / 1,800.0" in line and "attention torch" in line
    assert "record 1,000.0 / 2,000.0 ms/step, pgolf / record 0.700 / 0.900" in line

    # a run that never looped, against a profile without its looping window: no figure is made up
    short = speed.loop_speed({**summary, "ms_per_step_after_loop": None}, metrics[:4], TOKENS,
                             {"windows": {"pre_loop": {"ms_per_step": 1000.0}}})
    assert short["window_median_ms_per_step"] == {"before_loop": 750.0, "after_loop": None}
    assert short["pgolf_over_record"] == {"before_loop": 0.7, "after_loop": None}
    assert "/ - ms/step before" in speed.summary_line(short) and "0.700 / -" in speed.summary_line(short)


def test_a_short_cpu_run_through_the_training_stage(tmp_path, capsys):
    """The whole tool on the smoke recipe, on a CPU: a real `pgolf train` process with a 3 s budget."""
    import synthetic_shards

    data = tmp_path / "shards"
    synthetic_shards.write_shards(data, 1024, train_tokens=200_000, val_tokens=10_000, shard_tokens=100_000)
    out = tmp_path / "loop.json"
    profile = tmp_path / "anchor_profile.json"
    profile.write_text(json.dumps({"windows": {"pre_loop": {"ms_per_step": 100.0},
                                               "post_loop": {"ms_per_step": 200.0}}}))
    assert speed.main(["--config", str(ROOT / "recipes" / "smoke.yaml"), "--data", str(data), "--seconds", "3",
                       "--device", "cpu", "--record-profile", str(profile), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["seconds"] == 3.0 and result["steps"] >= 1 and result["train_seconds"] >= 3.0
    assert result["ms_per_step_before_loop"] > 0 and result["windows"][0]["step"] == 1
    assert result["pgolf_over_record"]["before_loop"] == pytest.approx(result["ms_per_step_before_loop"] / 100.0)
    assert capsys.readouterr().out.startswith(f"train_loop_speed: {result['steps']} steps in ")
    with pytest.raises(SystemExit):
        speed.main(["--seconds", "0", "--out", str(out)])
