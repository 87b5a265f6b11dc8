"""The size gate stage: compressed model bytes (pack report) + counted code bytes against the cap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pgolf.io import sha256_bytes
from pgolf.artifact.minify import CODE_BYTES_CONVENTIONS, count_code_bytes


def _inputs(tmp_path: Path, model_bytes: int = 1000) -> tuple[Path, Path, Path]:
    artifact = tmp_path / "artifact.pgolf"
    artifact.write_bytes(b"\x01" * model_bytes)
    report = tmp_path / "pack_report.json"
    report.write_text(json.dumps({"model_bytes": model_bytes, "artifact_sha256": sha256_bytes(artifact.read_bytes())}))
    code = tmp_path / "train_gpt.py"
    code.write_text("import sys\n\n\ndef main():\n    '''entry'''\n    print(sys.argv)\n\n\nmain()\n")
    return report, artifact, code


def _gate(report: Path, artifact: Path, code: Path, pack: dict, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pgolf", "gate", "--pack-report", str(report), "--artifact", str(artifact),
         "--code", str(code), "--pack-json", json.dumps(pack), "--out", str(out)],
        capture_output=True, text=True,
    )


def test_within_the_cap_reports_headroom(tmp_path: Path) -> None:
    report, artifact, code = _inputs(tmp_path)
    code_bytes = count_code_bytes(code.read_text(), "file")
    proc = _gate(report, artifact, code, {"code_bytes_convention": "file", "size_cap_bytes": 1000 + code_bytes}, tmp_path / "g.json")
    assert proc.returncode == 0, proc.stderr
    gate = json.loads((tmp_path / "g.json").read_text())
    assert gate["ok"] and gate["total_bytes"] == 1000 + code_bytes and gate["headroom_bytes"] == 0
    assert gate["code_bytes_convention"] == "file" and gate["code_sha256"] == sha256_bytes(code.read_bytes())


def test_over_the_cap_is_refused_with_the_overage(tmp_path: Path) -> None:
    report, artifact, code = _inputs(tmp_path)
    code_bytes = count_code_bytes(code.read_text(), "wrapper")
    cap = 1000 + code_bytes - 7
    proc = _gate(report, artifact, code, {"code_bytes_convention": "wrapper", "size_cap_bytes": cap}, tmp_path / "g.json")
    assert proc.returncode == 3
    assert "over the" in proc.stderr and "by 7 bytes" in proc.stderr
    gate = json.loads((tmp_path / "g.json").read_text())
    assert not gate["ok"] and gate["overage_bytes"] == 7


def test_an_artifact_other_than_the_packed_one_is_refused(tmp_path: Path) -> None:
    report, artifact, code = _inputs(tmp_path)
    artifact.write_bytes(b"\x02" * 1000)
    proc = _gate(report, artifact, code, {}, tmp_path / "g.json")
    assert proc.returncode == 2 and "sha256 differs" in proc.stderr
    assert not (tmp_path / "g.json").exists()


def test_the_code_bytes_conventions_are_the_counters_everywhere() -> None:
    """The recipe key, comply's verdict texts and the submission schema name exactly the conventions the one
    counter counts (pgolf.artifact.minify): a convention added or renamed in one place fails here."""
    import typing

    from pgolf.compliance.comply import CONVENTION_TEXTS
    from pgolf.config import PackConfig
    from pgolf.report.schema import SUBMISSION_SCHEMA

    recipe_values = typing.get_args(typing.get_type_hints(PackConfig)["code_bytes_convention"])
    assert set(recipe_values) == set(CODE_BYTES_CONVENTIONS) == set(CONVENTION_TEXTS)
    for convention in CODE_BYTES_CONVENTIONS:
        assert count_code_bytes("x = 1\n", convention) > 0
    assert SUBMISSION_SCHEMA["properties"]["provenance"]["properties"]["code_bytes_convention"]["enum"] == [
        *CODE_BYTES_CONVENTIONS, None]


def test_the_gate_job_does_not_import_torch() -> None:
    """The gate job reads two JSON files and counts one file: importing torch was most of its time."""
    probe = "import sys, pgolf.artifact.gate; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


def test_a_report_that_understates_the_artifact_is_refused(tmp_path: Path) -> None:
    """The gate counts the artifact file: a stale or edited report's model_bytes cannot let 16 MB through."""
    report, artifact, code = _inputs(tmp_path)
    claims = json.loads(report.read_text())
    report.write_text(json.dumps({**claims, "model_bytes": 10}))  # the right sha256, the wrong size
    proc = _gate(report, artifact, code, {"code_bytes_convention": "file"}, tmp_path / "g.json")
    assert proc.returncode == 2 and "'model_bytes' is 10" in proc.stderr and "holds 1,000 bytes" in proc.stderr
    assert not (tmp_path / "g.json").exists()
