"""The size gate of the staged pipeline: compressed model bytes (pack report) + counted code bytes <= the cap.

    pgolf gate --pack-report pack_report.json --artifact artifact.pgolf --code train_gpt.py --pack-json JSON \
        --out gate_report.json

Why a stage of its own: the counted file (``train_gpt.py``, written by ``pgolf bundle``) embeds the whole resolved
recipe, so its bytes change with every knob, including evaluation ones. Keeping the code out of the pack stage
means a TTT knob reruns this check (milliseconds), not the model compression (minutes). ``pgolf comply`` and the
aggregation take every seed's gate report, so an artifact that does not fit is never submitted; the evaluation does
not wait for it (then a change of the shipped code alone would re-run every seed's evaluation), and the pack stage
has already refused a model that alone exceeds the cap.

Exit status: 0 within the cap (the report gives the headroom), 3 over it (the report and the message give the
overage), 2 on bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pgolf.config import PackConfig
from pgolf.io import atomic_write_json, read_json_object, sha256_file
from pgolf.artifact.cap import EXIT_OVER_CAP, size_gate
from pgolf.artifact.minify import counted_code_bytes


def run_gate(pack_report_path: str | Path, code: str | Path, artifact: str | Path, cfg: PackConfig, out: str | Path,
             code_id: str | None = None) -> tuple[dict[str, Any], int]:
    pack_report = read_json_object(pack_report_path, "pack report")
    model_bytes = pack_report.get("model_bytes")
    if not isinstance(model_bytes, int):
        raise ValueError(f"{pack_report_path}: expected an integer 'model_bytes', got {model_bytes!r}")
    artifact_sha256 = sha256_file(artifact)
    if artifact_sha256 != pack_report.get("artifact_sha256"):
        raise ValueError(f"{artifact}: sha256 differs from the one {pack_report_path} recorded (rerun the pack stage)")
    artifact_file_bytes = Path(artifact).stat().st_size  # the gate counts the file, not the report's word for it
    if artifact_file_bytes != model_bytes:
        raise ValueError(f"{pack_report_path}: 'model_bytes' is {model_bytes:,}, the artifact {artifact} holds "
                         f"{artifact_file_bytes:,} bytes (rerun the pack stage)")
    code_bytes, code_file_bytes, code_sha256 = counted_code_bytes(code, cfg.code_bytes_convention)
    gate = size_gate(model_bytes, code_bytes, cfg.size_cap_bytes)
    report = {
        "stage": "gate",
        "artifact_sha256": artifact_sha256,
        "model_bytes": model_bytes,
        "code_bytes": code_bytes,
        "code_bytes_convention": cfg.code_bytes_convention,
        "code_file": str(code),
        "code_file_bytes": code_file_bytes,
        "code_sha256": code_sha256,
        "code_hash": code_id,  # the CODE_HASH of that file: the code this artifact is shipped with (None: not given)
        **gate.report_fields(),
    }
    atomic_write_json(out, report)
    print(f"gate: {gate.message}", file=sys.stderr)
    return report, 0 if gate.ok else EXIT_OVER_CAP
