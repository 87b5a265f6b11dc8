"""A JSON-able and a human-readable description of an artifact: what ``pgolf pack inspect`` prints.

The whole artifact is read and verified first (body and entry hashes, table consistency), so describing a
damaged artifact fails with the reason.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


def read_artifact(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: artifact not found") from None


def inspect_artifact(data: bytes, source: str = "artifact") -> dict[str, Any]:
    """A JSON-able description of artifact bytes (raises ArtifactError, naming ``source``, for anything the reader
    refuses)."""
    from pgolf.io import canonical_json, sha256_bytes
    from pgolf.artifact.format import COMPRESSOR_IDS, PREFIX_BYTES, unpack

    qm, header = unpack(data, source)
    version = struct.unpack_from("<I", data, 8)[0]
    compressor_id = data[12]
    compressor = {v: k for k, v in COMPRESSOR_IDS.items()}.get(compressor_id, f"unknown ({compressor_id})")
    entries = header["entries"]
    payload_bytes = sum(int(e["nbytes"]) for e in entries)
    header_bytes = len(canonical_json(header).encode("utf-8"))
    by_part: dict[str, dict[str, int]] = {}
    for e in entries:
        part = e["name"].split(":", 1)[1]
        slot = by_part.setdefault(part, {"entries": 0, "bytes": 0})
        slot["entries"] += 1
        slot["bytes"] += int(e["nbytes"])
    by_method: dict[str, dict[str, int]] = {}
    tensors = []
    for name, qt in sorted(qm.tensors.items()):
        numel = 1
        for d in qt.shape:
            numel *= d
        slot = by_method.setdefault(qt.method, {"tensors": 0, "params": 0})
        slot["tensors"] += 1
        slot["params"] += numel
        tensors.append(
            {
                "name": name,
                "role": qt.role,
                "method": qt.method,
                "bits": qt.bits,
                "shape": list(qt.shape),
                "clip_sigmas": qt.clip_sigmas,
                "lqer": None if qt.lqer is None else f"{qt.lqer.mode} r{qt.lqer.rank}",
            }
        )
    return {
        "file_bytes": len(data),
        "sha256": sha256_bytes(data),
        "format_version": version,
        "compressor": compressor,
        "sections": {
            "prefix_bytes": PREFIX_BYTES,
            "compressed_body_bytes": len(data) - PREFIX_BYTES,
            "uncompressed_body_bytes": 4 + header_bytes + payload_bytes,
            "header_json_bytes": header_bytes,
            "payload_bytes": payload_bytes,
        },
        "pack": header.get("pack"),
        "model_config": header.get("model_config"),
        "input_hashes": header.get("input_hashes"),
        "quantize_config": header.get("quantization", {}).get("config"),
        "entries": len(entries),
        "entries_by_part": dict(sorted(by_part.items())),
        "tensors_by_method": dict(sorted(by_method.items())),
        "lqer_tensors": [t["name"] for t in tensors if t["lqer"]],
        "tensors": tensors,
    }


def inspect_lines(info: dict[str, Any]) -> list[str]:
    """Human-readable form of :func:`inspect_artifact`."""
    s = info["sections"]
    ratio = s["uncompressed_body_bytes"] / max(s["compressed_body_bytes"], 1)
    lines = [
        f"artifact: {info['file_bytes']:,} bytes, sha256 {info['sha256']}",
        f"format: version {info['format_version']}, compressor {info['compressor']}; all hashes verified",
        f"sections: prefix {s['prefix_bytes']} B + compressed body {s['compressed_body_bytes']:,} B "
        f"(body uncompressed {s['uncompressed_body_bytes']:,} B = header JSON {s['header_json_bytes']:,} B "
        f"+ payload {s['payload_bytes']:,} B; ratio {ratio:.3f})",
        f"pack: {json.dumps(info['pack'], sort_keys=True)}",
        f"model_config: {json.dumps(info['model_config'], sort_keys=True)}",
        f"quantize_config: {json.dumps(info['quantize_config'], sort_keys=True)}",
        "input_hashes:",
        *[f"  {k}: {v}" for k, v in sorted((info["input_hashes"] or {}).items())],
        f"entries: {info['entries']}",
        *[f"  part {p}: {v['entries']} entries, {v['bytes']:,} B" for p, v in info["entries_by_part"].items()],
        "tensors by method: "
        + ", ".join(f"{m} {v['tensors']} ({v['params']:,} params)" for m, v in info["tensors_by_method"].items()),
        f"LQER on: {', '.join(info['lqer_tensors']) or 'none'}",
        f"{'tensor':<40} {'role':<10} {'method':<6} {'bits':>4}  shape  lqer",
    ]
    for t in info["tensors"]:
        lines.append(
            f"{t['name']:<40} {t['role']:<10} {t['method']:<6} {t['bits']:>4}  {t['shape']}  {t['lqer'] or '-'}"
        )
    return lines
