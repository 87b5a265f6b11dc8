"""benchmarks/gpu_candidates.sh's summary (which speed candidates beat the base step by more than the noise), and
the GPU scripts parse (they run only on a lent GPU; a syntax error would cost a device call)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import candidates_summary  # noqa: E402


def _bench(out: Path, name: str, ms: float) -> None:
    (out / f"ab_{name}.json").write_text(json.dumps({"phases": [{"looping": False, "ms_per_step": ms}]}))


def test_a_candidate_is_faster_only_beyond_the_noise_and_half_a_percent(tmp_path):
    for name, ms in (("base", 650.0), ("base2", 652.0), ("resident", 640.0), ("head", 648.0), ("qkv", 660.0)):
        _bench(tmp_path, name, ms)
    summary = candidates_summary.summarize(tmp_path)
    assert summary["base_ms"] == [650.0, 652.0]
    assert summary["threshold_ms"] == pytest.approx(0.005 * 651.0)  # above the 2 ms spread of the bases
    verdicts = {name: c["faster"] for name, c in summary["candidates"].items()}
    assert verdicts == {"resident": True, "head": False, "qkv": False}
    assert summary["candidates"]["resident"]["delta_ms"] == pytest.approx(-11.0)


def test_a_noisy_lease_raises_the_bar(tmp_path):
    for name, ms in (("base", 640.0), ("base2", 660.0), ("resident", 637.0)):
        _bench(tmp_path, name, ms)
    summary = candidates_summary.summarize(tmp_path)
    assert summary["threshold_ms"] == pytest.approx(20.0)
    assert summary["candidates"]["resident"]["faster"] is False  # 13 ms below the mean, inside the bases' spread


def test_the_summary_says_when_the_base_run_is_missing(tmp_path):
    _bench(tmp_path, "resident", 640.0)
    with pytest.raises(SystemExit, match="no ab_base.json"):
        candidates_summary.summarize(tmp_path)


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("*.sh")))
def test_gpu_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
