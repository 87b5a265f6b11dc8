"""The pack stage: quantized model -> the artifact, behind the size gate.

    pgolf pack build --quantized quantized.pt --checkpoint DIR --pack-json JSON [--code train_gpt.py] \
        --out artifact.pgolf --report pack_report.json

- The model config stored in the artifact is the CHECKPOINT's (validated by ``ModelConfig``), never YAML's;
  the quantized model must come from that same checkpoint (its recorded weights sha256 is compared).
- ``input_hashes`` in the artifact header: checkpoint weights, hessians file and quantize config, the inputs the
  model bytes are a function of. Nothing that depends on the entry point, a path or a time enters the header,
  because header and payload are one brotli stream and any header byte moves the model bytes: the counted file's
  sha256, the data manifest's sha256 (the bare shards a reviewer runs train_gpt.py on have no manifest.json) and
  the code hash recorded at training time go to the report only. So does the code identity the artifact is
  shipped with (``code_hash``: the ``CODE_HASH`` of the recipe's train_gpt.py,
  :func:`pgolf.artifact.bundle.code_identity`), recorded by whichever step pairs the artifact with its counted
  code: the gate stage in the Snakemake DAG, this stage when ``--code`` is given. Kept out of the artifact, it
  cannot make a knob that only changes the shipped code (an evaluation switch the shipped form folds) re-compress
  every seed's model.
- Counted code bytes: ``--code`` under ``pack.code_bytes_convention`` (see pgolf/artifact/minify.py). Without
  ``--code`` (the Snakemake DAG) the model bytes alone are gated here and ``pgolf.artifact.gate`` adds the code.
- The artifact bytes are unpacked again and checked against the model config before anything is written.
- Size gate: counted code + compressed model <= ``pack.size_cap_bytes``. Over it, the report says by how many
  bytes, no artifact is written and the stage exits with status 3. Under it, the report gives the headroom.
- For comparison the report gives the size of the same model under plain brotli (quality 11, no shuffle, codes
  row by row and left to brotli: "brotli alone"):
  ``gain_vs_plain_brotli_bytes`` > 0 means the configured compressor wins (``pack.compare_plain_brotli: false``
  skips this second compression: both fields are null).

``pack_report.json`` is what the evaluation stage checks the artifact's sha256 against.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from pgolf.config import ConfigError, ModelConfig, PackConfig, to_dict
from pgolf.io import atomic_write_bytes, atomic_write_json, canonical_json, sha256_bytes
from pgolf.artifact.cap import EXIT_OVER_CAP, GATE_ONLY_PACK_KEYS, size_gate
from pgolf.artifact.format import ArtifactError, check_against_model_config, check_compressor_available, pack, unpack
from pgolf.artifact.minify import counted_code_bytes  # the one code counter
from pgolf.quantize.weights import QuantizedModel


PLAIN_BROTLI = PackConfig(
    compressor="brotli", brotli_quality=11, byte_shuffle=False, column_major_codes=False, codes_coder="compressor"
)


def expected_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the model a config describes (meta device: no memory)."""
    from pgolf.model.gpt import build_meta

    return {name: tuple(p.shape) for name, p in build_meta(model_cfg).named_parameters()}


def plain_brotli_bytes(qm, model_config: dict, input_hashes: dict, cfg: PackConfig, packed_len: int) -> Optional[int]:
    """Artifact size under plain brotli (quality 11, no shuffle, row-major codes, no rANS); None without brotli."""
    baseline = dataclasses.replace(
        cfg,
        compressor=PLAIN_BROTLI.compressor,
        brotli_quality=PLAIN_BROTLI.brotli_quality,
        byte_shuffle=PLAIN_BROTLI.byte_shuffle,
        column_major_codes=PLAIN_BROTLI.column_major_codes,
        codes_coder=PLAIN_BROTLI.codes_coder,
    )
    if baseline == cfg:
        return packed_len  # the configured compressor IS plain brotli
    try:
        return len(pack(qm, model_config, input_hashes, baseline, sha256_hex_chars=cfg.sha256_hex_chars))
    except ArtifactError:
        return None


def run_pack_stage(
    quantized: str | Path,
    checkpoint: str | Path,
    cfg: PackConfig,
    code: Optional[str | Path],
    out: str | Path,
    report_path: str | Path,
    *,
    code_id: Optional[str] = None,
) -> tuple[dict[str, Any], int]:
    """Pack, verify, gate; returns ``(report, exit status)``. The artifact is written only when it fits.

    ``code_id``: with ``code``, the identity of that code (the bundle's CODE_HASH), recorded in the report as
    ``code_hash`` beside the code bytes; never in the artifact (see the module docstring).

    With ``code=None`` (the staged pipeline) the gate here holds the model bytes alone against the cap and the
    separate gate stage (pgolf.artifact.gate) adds the counted code: the shipped file embeds the whole recipe, so its
    bytes change with any knob, and re-compressing the model for a TTT knob would waste minutes.
    """
    from pgolf.quantize.stage import load_quantized

    check_compressor_available(cfg)  # before any work
    qm, provenance = load_quantized(quantized)
    return pack_quantized(qm, provenance, str(quantized), checkpoint, cfg, code, out, report_path, code_id=code_id)


def pack_quantized(qm: QuantizedModel, provenance: dict[str, Any], source: str, checkpoint: str | Path,
                   cfg: PackConfig, code: Optional[str | Path], out: str | Path, report_path: str | Path, *,
                   code_id: Optional[str] = None) -> tuple[dict[str, Any], int]:
    """:func:`run_pack_stage` on a quantized model in memory (``provenance`` as quantized.pt records it; ``source``
    names where it came from in errors): what the bundled record run calls after quantizing."""
    from pgolf.train.checkpoint import model_config_of, read_checkpoint_meta

    check_compressor_available(cfg)  # before any work
    meta = read_checkpoint_meta(checkpoint)
    model_cfg = model_config_of(meta, f"{checkpoint}/checkpoint.json")
    model_config = to_dict(model_cfg)
    if provenance.get("checkpoint_weights_sha256") != meta.get("weights_sha256"):
        raise ArtifactError(
            f"{source} was quantized from weights {str(provenance.get('checkpoint_weights_sha256'))[:16]}..., but "
            f"{checkpoint} holds {str(meta.get('weights_sha256'))[:16]}...: rerun the quantize stage"
        )
    if code is None:
        code_bytes, code_file_bytes, code_sha256 = 0, None, None
    else:
        code_bytes, code_file_bytes, code_sha256 = counted_code_bytes(code, cfg.code_bytes_convention)
    input_hashes = {  # a function of the inputs only: the same on every entry point (see the module docstring)
        "checkpoint_weights_sha256": meta["weights_sha256"],
        "hessians_sha256": provenance.get("hessians_sha256"),
        "quantize_config_sha256": provenance.get("quantize_config_sha256"),
    }
    input_hashes = {k: v for k, v in input_hashes.items() if v is not None}

    t0 = time.perf_counter()
    data = pack(qm, model_config, input_hashes, cfg, sha256_hex_chars=cfg.sha256_hex_chars)
    pack_seconds = time.perf_counter() - t0

    _, header = unpack(data)  # every table, hash and shape check of the reader, before anything is written
    check_against_model_config(header, expected_shapes(model_cfg))
    # decompressed body = uint32 length + canonical header JSON + payload (the entries tile the payload exactly)
    body_bytes = 4 + len(canonical_json(header).encode("utf-8")) + sum(int(e["nbytes"]) for e in header["entries"])

    gate = size_gate(len(data), code_bytes, cfg.size_cap_bytes)
    plain = plain_brotli_bytes(qm, model_config, input_hashes, cfg, len(data)) if cfg.compare_plain_brotli else None
    report: dict[str, Any] = {
        "stage": "pack",
        "artifact": str(out),
        "artifact_sha256": sha256_bytes(data) if gate.ok else None,
        "written": gate.ok,
        "model_bytes": gate.model_bytes,
        "code_bytes": gate.code_bytes,
        "code_bytes_convention": None if code is None else cfg.code_bytes_convention,
        "code_file": None if code is None else str(code),
        "code_file_bytes": code_file_bytes,
        "code_sha256": code_sha256,  # the file the code bytes were counted on (None: the gate stage counts it)
        "code_hash": code_id if code is not None else None,  # that file's CODE_HASH (the gate stage records it otherwise)
        "data_manifest_sha256": meta.get("data_manifest_sha256"),
        "training_code_hash": meta.get("code_hash"),  # the code that trained (checkpoint.json), for provenance
        **gate.report_fields(),
        "compressor": cfg.compressor,
        "byte_shuffle": cfg.byte_shuffle,
        "brotli_quality": cfg.brotli_quality if cfg.compressor == "brotli" else None,
        "pack_config": {key: value for key, value in to_dict(cfg).items() if key not in GATE_ONLY_PACK_KEYS},
        "uncompressed_body_bytes": body_bytes,
        "plain_brotli_model_bytes": plain,
        "gain_vs_plain_brotli_bytes": None if plain is None else plain - len(data),
        "pack_seconds": pack_seconds,
        "entries": len(header["entries"]),
        "input_hashes": input_hashes,
        "model_config": model_config,
    }
    if gate.ok:
        atomic_write_bytes(out, data)
    atomic_write_json(report_path, report)
    print(f"pack: {gate.message}", file=sys.stderr)
    return report, 0 if gate.ok else EXIT_OVER_CAP


def run_gated_stage(name: str, work: Callable[[], tuple[dict[str, Any], int]]) -> int:
    """Exit status of a stage behind a gate: 2 on bad input (message on stderr), else the stage's own status,
    with the gate's message when it refused (EXIT_OVER_CAP)."""
    try:
        report, status = work()
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    if status:
        print(f"{name}: refused: {report['message']}", file=sys.stderr)
    return status
