"""The quantize stage: checkpoint + Hessians -> quantized model (GPTQ, SDClip, LQER) + per-tensor error report.

    pgolf quantize --checkpoint DIR --hessians hessians.pt --quantize-json JSON \
        --out quantized.pt --report quantize_report.json [--device cpu|cuda|auto]

The numeric work is :func:`pgolf.quantize.gptq.quantize_state`; this module wires it to files. Roles come from the model
built (on the meta device, no memory) from the CHECKPOINT's model config, never from YAML.

``quantized.pt`` is the hand-off to the pack stage: a ``torch.save`` of plain data only, read back with
``weights_only=True`` (nothing pickled is executed)::

    {"format": "pgolf-quantized", "version": 1,
     "meta": {"quantize_config": {...}, "provenance": {...},
              "tensors": {name: {role, method, shape, bits, clip_sigmas, lqer: null | {mode, rank, group_size}}}},
     "arrays": {"<name>:<part>": tensor}}

Parts use the artifact's names (``q``, ``scale``, ``data``, ``lqer.a_codes``, ...; see docs/artifact-format.md).
``provenance`` holds the sha256 of the checkpoint weights and of the hessians file and the hash of the quantize
config, so the pack stage can refuse a quantized model that was made from another checkpoint.

Deterministic: same inputs, same device -> the same file. The default device is the CPU so the result does not
depend on which GPU (or none) the stage lands on; GPTQ's cost is not part of the training budget.
"""

from __future__ import annotations

import dataclasses
import io
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pgolf.config import QuantizeConfig, to_dict
from pgolf.quantize.lqer import LqerFactors
from pgolf.quantize.weights import QuantizedModel, QuantizedTensor, quantize_state
from pgolf.io import atomic_write_bytes, atomic_write_json, sha256_file, sha256_json

QUANTIZED_FORMAT = "pgolf-quantized"
QUANTIZED_VERSION = 1
_LQER_FIELDS = ("a_codes", "a_scales", "b_codes", "b_scales")


class QuantizedFileError(ValueError):
    """A quantized-model file is missing, of another format, or inconsistent with its own metadata."""


# --------------------------------------------------------------------------------------------------------------
# The quantized.pt hand-off file
# --------------------------------------------------------------------------------------------------------------


def _tensor_meta(qt: QuantizedTensor) -> dict:
    lqer = None
    if qt.lqer is not None:
        lqer = {"mode": qt.lqer.mode, "rank": qt.lqer.rank, "group_size": qt.lqer.group_size}
    return {
        "role": qt.role,
        "method": qt.method,
        "shape": list(qt.shape),
        "bits": qt.bits,
        "clip_sigmas": qt.clip_sigmas,
        "lqer": lqer,
    }


def _tensor_arrays(name: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    parts = {"q": qt.q, "scale": qt.scale, "data": qt.data}
    if qt.lqer is not None:
        parts.update({f"lqer.{f}": getattr(qt.lqer, f) for f in _LQER_FIELDS})
    return {f"{name}:{part}": t.detach().cpu().contiguous() for part, t in parts.items() if t is not None}


def save_quantized(path: str | Path, qm: QuantizedModel, provenance: dict[str, Any]) -> None:
    """Write ``qm`` (without its report) and ``provenance`` atomically as plain tensors + plain metadata."""
    arrays: dict[str, torch.Tensor] = {}
    tensors_meta = {}
    for name, qt in sorted(qm.tensors.items()):
        if ":" in name:
            raise QuantizedFileError(f"tensor name {name!r} contains ':', which separates array parts")
        tensors_meta[name] = _tensor_meta(qt)
        arrays.update(_tensor_arrays(name, qt))
    blob = {
        "format": QUANTIZED_FORMAT,
        "version": QUANTIZED_VERSION,
        "meta": {"quantize_config": dict(qm.quantize_config), "provenance": provenance, "tensors": tensors_meta},
        "arrays": arrays,
    }
    # through memory: torch.save names its zip records after the file, so saving to a temp name would make
    # equal models differ in bytes (and in the sha256 the pack stage records)
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _required_parts(name: str, meta: dict, where: str) -> list[str]:
    method = meta.get("method")
    if method in ("gptq", "rtn"):
        parts = ["q", "scale"]
    elif method == "fp16":
        parts = ["data"]
    else:
        raise QuantizedFileError(f"{where}: {name} has unknown method {method!r}")
    if meta.get("lqer") is not None:
        if method != "gptq":
            raise QuantizedFileError(f"{where}: {name} has an LQER correction but method {method!r}")
        parts += [f"lqer.{f}" for f in _LQER_FIELDS]
    return parts


def load_quantized(path: str | Path) -> tuple[QuantizedModel, dict[str, Any]]:
    """Read ``quantized.pt`` (``weights_only=True``) into ``(QuantizedModel with empty report, provenance)``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: quantized model not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file; torch's own message suggests weights_only=False (runs code)
        raise QuantizedFileError(f"{path}: not a readable quantized model ({type(exc).__name__}: damaged, or holding "
                                 "objects other than tensors, which are never unpickled)") from None
    if not isinstance(blob, dict) or blob.get("format") != QUANTIZED_FORMAT:
        got = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise QuantizedFileError(f"{path}: format {got!r}, expected {QUANTIZED_FORMAT!r}")
    version = blob.get("version")
    if not isinstance(version, int) or not 1 <= version <= QUANTIZED_VERSION:
        raise QuantizedFileError(f"{path}: version {version!r}, this pgolf reads 1..{QUANTIZED_VERSION}")
    try:
        meta, arrays = blob["meta"], blob["arrays"]
        tensors_meta, config, provenance = meta["tensors"], meta["quantize_config"], meta["provenance"]
    except (KeyError, TypeError) as exc:
        raise QuantizedFileError(f"{path}: missing field {exc}") from None
    used: set[str] = set()
    tensors: dict[str, QuantizedTensor] = {}
    if not isinstance(tensors_meta, dict) or not isinstance(arrays, dict):
        raise QuantizedFileError(f"{path}: 'meta.tensors' and 'arrays' must be mappings")
    for name, tm in sorted(tensors_meta.items()):
        if not isinstance(tm, dict):
            raise QuantizedFileError(f"{path}: metadata of {name} is not a mapping")
        parts = {}
        for part in _required_parts(name, tm, str(path)):
            key = f"{name}:{part}"
            if key not in arrays:
                raise QuantizedFileError(f"{path}: array {key} is missing")
            parts[part] = arrays[key]
            used.add(key)
        try:
            shape = tuple(int(d) for d in tm["shape"])
            lqer = None
            if tm.get("lqer") is not None:
                lq = tm["lqer"]
                lqer = LqerFactors(
                    str(lq["mode"]),
                    (shape[0], shape[1]),
                    int(lq["rank"]),
                    int(lq["group_size"]),
                    *(parts[f"lqer.{f}"] for f in _LQER_FIELDS),
                )
            tensors[name] = QuantizedTensor(
                role=str(tm["role"]),
                method=str(tm["method"]),
                shape=shape,
                bits=int(tm["bits"]),
                clip_sigmas=None if tm.get("clip_sigmas") is None else float(tm["clip_sigmas"]),
                q=parts.get("q"),
                scale=parts.get("scale"),
                data=parts.get("data"),
                lqer=lqer,
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise QuantizedFileError(f"{path}: metadata of {name} is malformed ({exc!r})") from None
    extra = sorted(set(arrays) - used)
    if extra:
        raise QuantizedFileError(f"{path}: arrays not described by the metadata: {', '.join(extra[:5])}")
    return QuantizedModel(tensors, dict(config), []), dict(provenance)


def payload_bytes(qm: QuantizedModel) -> int:
    """Raw bytes of every stored array (the artifact payload before compression)."""
    total = 0
    for name, qt in qm.tensors.items():
        total += sum(t.numel() * t.element_size() for t in _tensor_arrays(name, qt).values())
    return total


# --------------------------------------------------------------------------------------------------------------
# Report totals (pure)
# --------------------------------------------------------------------------------------------------------------


def quantize_totals(report: list[dict]) -> dict[str, Any]:
    """Totals over the per-tensor report of :func:`pgolf.quantize.gptq.quantize_state`.

    ``final_error`` of a GPTQ tensor is its LQER error when the correction was kept, else its GPTQ error; sums
    are of absolute output errors ``trace(D H D^T)`` (comparable across runs with the same Hessians only).
    """
    params_by_method: dict[str, int] = {}
    params_by_bits: dict[str, int] = {}
    rtn_sum = gptq_sum = final_sum = 0.0
    lqer_applied = []
    for r in report:
        params_by_method[r["method"]] = params_by_method.get(r["method"], 0) + r["numel"]
        params_by_bits[str(r["bits"])] = params_by_bits.get(str(r["bits"]), 0) + r["numel"]
        if r["method"] == "gptq":
            rtn_sum += r["rtn_error"]
            gptq_sum += r["gptq_error"]
            final_sum += r["lqer_error"] if r["lqer_applied"] else r["gptq_error"]
        if r["lqer_applied"]:
            lqer_applied.append(r["name"])
    gptq = [r for r in report if r["method"] == "gptq"]
    # an infinite relative error (a matrix whose reference error is 0) ranks first; JSON has no Inf: null
    worst = sorted(gptq, key=lambda r: (-(r["gptq_rel_error"] or 0.0), r["name"]))[:5]
    return {
        "tensors": len(report),
        "params": sum(r["numel"] for r in report),
        "params_by_method": dict(sorted(params_by_method.items())),
        "params_by_bits": dict(sorted(params_by_bits.items(), key=lambda kv: int(kv[0]))),
        "rtn_error_sum": rtn_sum,
        "gptq_error_sum": gptq_sum,
        "final_error_sum": final_sum,
        "gptq_over_rtn": _finite_or_none(gptq_sum / rtn_sum) if rtn_sum > 0 else None,
        "lqer_applied": lqer_applied,
        "worst_gptq_rel_error": [{"name": r["name"], "gptq_rel_error": _finite_or_none(r["gptq_rel_error"])}
                                 for r in worst],
    }


def _finite_or_none(value: Any) -> Any:
    """JSON has no Inf/NaN: such report values become null (they only arise for all-zero references)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------------------------------------------
# Stage entry
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantizeOutcome:
    """A quantized checkpoint in memory: the model, its provenance (what the pack stage checks and the artifact
    header records) and the stage report (without ``quantized_sha256``: no file was written yet)."""

    model: QuantizedModel
    provenance: dict[str, Any]
    report: dict[str, Any]


def quantize_checkpoint(
    checkpoint: str | Path, hessians_path: str | Path, cfg: QuantizeConfig, device_kind: str = "cpu"
) -> QuantizeOutcome:
    """Quantize a checkpoint with its Hessians; writes nothing. The staged pipeline saves the result
    (:func:`run_quantize_stage`); the bundled record run hands it to the pack stage in memory."""
    from pgolf.train.checkpoint import load_checkpoint, model_config_of
    from pgolf.quantize.hessians import load_hessians
    from pgolf.model.gpt import build_meta
    from pgolf.io import set_cpu_threads

    set_cpu_threads(cfg.cpu_threads)  # GPTQ on the CPU: the same codes from the pipeline and train_gpt.py
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    device = torch.device(
        "cuda" if device_kind == "cuda" or (device_kind == "auto" and torch.cuda.is_available()) else "cpu"
    )
    state, meta = load_checkpoint(checkpoint)
    model_cfg = model_config_of(meta, f"{checkpoint}/checkpoint.json")
    roles = build_meta(model_cfg).param_roles()
    hessians = load_hessians(hessians_path, meta["weights_sha256"])

    t0 = time.perf_counter()
    state_on_device = {name: t.to(device) for name, t in state.items()}
    qm = quantize_state(state_on_device, roles, hessians, cfg, hessians_source=str(hessians_path))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    quantize_seconds = time.perf_counter() - t0

    provenance = {
        "checkpoint_weights_sha256": meta["weights_sha256"],
        "hessians_sha256": sha256_file(hessians_path),
        "quantize_config_sha256": sha256_json(to_dict(cfg)),
    }
    report = {
        "stage": "quantize",
        "device": str(device),
        "checkpoint": str(checkpoint),
        "quantize_config": to_dict(cfg),
        **provenance,
        "quantized_sha256": None,
        "payload_bytes": payload_bytes(qm),
        "quantize_seconds": quantize_seconds,
        "totals": quantize_totals(qm.report),
        "tensors": [{k: _finite_or_none(v) for k, v in r.items()} for r in qm.report],
    }
    return QuantizeOutcome(qm, provenance, report)


def write_quantize_report(report_path: str | Path, report: dict[str, Any]) -> None:
    """The report file, and its one-line summary on stderr."""
    atomic_write_json(report_path, report)
    totals = report["totals"]
    ratio = "n/a" if totals["gptq_over_rtn"] is None else f"{totals['gptq_over_rtn']:.4f}"
    print(
        f"quantize: {totals['tensors']} tensors, GPTQ/RTN output error {ratio}, "
        f"LQER on {len(totals['lqer_applied'])}, {report['quantize_seconds']:.1f} s on {report['device']}",
        file=sys.stderr,
    )


def run_quantize_stage(
    checkpoint: str | Path,
    hessians_path: str | Path,
    cfg: QuantizeConfig,
    out: str | Path,
    report_path: str | Path,
    device_kind: str = "cpu",
) -> dict[str, Any]:
    """Quantize a checkpoint with its Hessians; writes ``out`` (quantized.pt) and ``report_path``; returns the
    report."""
    done = quantize_checkpoint(checkpoint, hessians_path, cfg, device_kind)
    save_quantized(out, done.model, done.provenance)
    report = {**done.report, "quantized_sha256": sha256_file(out)}
    write_quantize_report(report_path, report)
    return report
