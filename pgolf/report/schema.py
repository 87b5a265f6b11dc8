"""The JSON schema of submission.json and a small validator for the subset of JSON Schema it uses.

The schema is the source of ``workflow/schemas/submission.schema.json`` (``pgolf submission-schema`` prints it;
a test keeps the file equal to it). The validator exists so that validating at run time does not depend on the
``jsonschema`` package (installed with snakemake here, absent on the GPU machine); the tests check that both
agree.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from pgolf.artifact.minify import CODE_BYTES_CONVENTIONS

TRACK = "10min_16mb"

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_STR = {"type": "string"}
_STR_OR_NULL = {"type": ["string", "null"]}
_COUNT = {"type": "integer", "minimum": 0}
_HEX64 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}

SEED_RESULT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["val_loss", "val_bpb", "artifact_bytes", "steps", "step_avg_ms", "eval_time_s"],
    "properties": {
        "val_loss": _NUM,
        "val_bpb": _NUM,
        "artifact_bytes": _COUNT,
        "model_bytes": _COUNT,
        "code_bytes": _COUNT,
        "steps": _COUNT,
        "step_avg_ms": _NUM,
        "train_time_s": _NUM,
        "eval_time_s": _NUM,
        "artifact_sha256": _HEX64,
    },
}

SUBMISSION_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "pgolf submission.json (record-folder fields of PR #1855 + pgolf provenance and significance)",
    "type": "object",
    "additionalProperties": False,
    "required": [
        "author",
        "github_id",
        "name",
        "blurb",
        "date",
        "track",
        "val_loss",
        "val_bpb",
        "val_loss_std",
        "val_bpb_std",
        "std_kind",
        "seeds",
        "seed_results",
        "comparison_baseline_bpb",
        "delta_vs_leaderboard_bpb",
        "delta_vs_leaderboard_nats",
        "artifact_bytes_mean",
        "artifact_bytes_max",
        "bytes_total",
        "train_steps_mean",
        "step_avg_ms_mean",
        "hardware",
        "pytorch_version",
        "cuda_version",
        "flash_attn_version",
        "technique_summary",
        "provenance",
        "significance",
    ],
    "properties": {
        "author": _STR,
        "github_id": _STR,
        "name": {"type": "string", "minLength": 1},
        "blurb": _STR,
        "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
        "track": {"const": TRACK},
        "mode": {"enum": ["record", "sweep"]},
        "val_loss": _NUM,
        "val_loss_unit": {"const": "nats per token"},
        "val_bpb": _NUM,
        "val_loss_std": _NUM_OR_NULL,
        "val_bpb_std": _NUM_OR_NULL,
        "std_kind": {"const": "sample (ddof=1)"},
        "val_loss_std_population": _NUM_OR_NULL,
        "val_bpb_std_population": _NUM_OR_NULL,
        "seeds": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
        "missing_seeds": {"type": "array", "items": {"type": "integer"}},
        "seed_results": {
            "type": "object",
            "minProperties": 1,
            "patternProperties": {"^-?[0-9]+$": SEED_RESULT_SCHEMA},
            "additionalProperties": False,
        },
        "comparison_baseline_bpb": _NUM_OR_NULL,
        "comparison_baseline_name": _STR,
        "delta_vs_leaderboard_bpb": _NUM_OR_NULL,
        "delta_vs_leaderboard_nats": _NUM_OR_NULL,
        "artifact_bytes_mean": _NUM,
        "artifact_bytes_max": _COUNT,
        "bytes_total": _COUNT,
        "bytes_code": _COUNT,
        "train_steps_mean": _NUM,
        "step_avg_ms_mean": _NUM,
        "hardware": _STR,
        "pytorch_version": _STR,
        "cuda_version": _STR_OR_NULL,
        "flash_attn_version": _STR_OR_NULL,
        "technique_summary": _STR,
        "verdict": {
            "type": "object",
            "required": ["status", "reasons"],
            "additionalProperties": False,
            "properties": {
                "status": {"enum": ["record", "progression", "non-record"]},
                "reasons": {"type": "array", "items": _STR},
            },
        },
        "provenance": {
            "type": "object",
            "additionalProperties": False,
            "required": [
                "code_hash",
                "data_manifest_sha256",
                "config_sha256",
                "environment",
                "hardware",
                "code_bytes_convention",
            ],
            "properties": {
                "code_hash": _HEX64,
                "eval_code_hash": {"type": ["string", "null"]},
                "data_manifest_sha256": {"type": ["string", "null"]},
                "config_sha256": _HEX64,
                "environment": {"type": "object"},
                "hardware": _STR,
                "code_bytes_convention": {"enum": [*CODE_BYTES_CONVENTIONS, None]},
                "train_gpt_sha256": {"type": ["string", "null"]},
                "train_gpt_code_hash": {"type": ["string", "null"]},
                "mixed": {"type": "array"},
            },
        },
        "significance": {
            "type": "object",
            "required": [
                "unit",
                "tested",
                "readme_pass",
                "progression_pass",
                "readme_threshold_nats_per_token",
                "readme_p",
                "progression_p",
            ],
            "properties": {
                "unit": {"enum": ["nats_per_token", "bpb"]},
                "tested": {"type": "boolean"},
                "readme_pass": {"type": "boolean"},
                "progression_pass": {"type": "boolean"},
                "readme_threshold_nats_per_token": _NUM,
                "readme_p": _NUM,
                "readme_null": {"enum": ["zero", "threshold"]},
                "progression_p": _NUM,
                "nats_per_bpb": _NUM,
                "baseline_nats_per_token": {
                    "type": "object",
                    "required": ["mean", "std_sample_ddof1", "n"],
                    "properties": {"mean": _NUM, "std_sample_ddof1": {"type": ["number", "null"]}, "n": {"type": "integer"}},
                },
                "p_value": _NUM,
                "p_value_vs_threshold": _NUM,
                "t": _NUM,
                "df": _NUM,
                "test": {"enum": ["welch", "one_sample"]},
            },
        },
    },
}


def schema_text() -> str:
    """The schema file's content (workflow/schemas/submission.schema.json; a test keeps the two equal)."""
    return json.dumps(SUBMISSION_SCHEMA, indent=2) + "\n"


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def validate(value: Any, schema: dict, where: str = "$") -> list[str]:
    """Errors of ``value`` against the JSON-schema subset SUBMISSION_SCHEMA uses (no third-party validator needed).

    Keywords: type, const, enum, required, properties, patternProperties, additionalProperties, items, minItems,
    minProperties, minimum, minLength, pattern. JSON numbers must be finite (NaN/inf are not JSON).
    """
    errors: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            return [f"{where}: expected {' or '.join(types)}, got {type(value).__name__} {value!r:.60}"]
    if isinstance(value, float) and not math.isfinite(value):
        errors.append(f"{where}: {value} is not a finite JSON number")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: expected one of {schema['enum']}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and "minimum" in schema:
        if value < schema["minimum"]:
            errors.append(f"{where}: expected >= {schema['minimum']}, got {value}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{where}: expected at least {schema['minLength']} character(s)")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: expected at least {schema['minItems']} item(s)")
        if "items" in schema:
            for i, item in enumerate(value):
                errors += validate(item, schema["items"], f"{where}[{i}]")
    if isinstance(value, dict):
        if len(value) < schema.get("minProperties", 0):
            errors.append(f"{where}: expected at least {schema['minProperties']} key(s)")
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: missing required key '{key}'")
        props = schema.get("properties", {})
        patterns = schema.get("patternProperties", {})
        for key, item in value.items():
            sub = f"{where}.{key}"
            matched = False
            if key in props:
                errors += validate(item, props[key], sub)
                matched = True
            for pattern, pattern_schema in patterns.items():
                if re.search(pattern, key):
                    errors += validate(item, pattern_schema, sub)
                    matched = True
            extra = schema.get("additionalProperties", True)
            if not matched:
                if extra is False:
                    errors.append(f"{where}: unexpected key '{key}'")
                elif isinstance(extra, dict):
                    errors += validate(item, extra, sub)
    return errors
