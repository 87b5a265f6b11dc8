"""The GPU scripts parse: they run only on a lent GPU, where a syntax error would cost a device call."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("*.sh")))
def test_gpu_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
