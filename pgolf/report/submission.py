"""The submission: ``submission.json`` (schema-checked), the record folder, and ``pgolf check-folder``.

The folder ``records/track_10min_16mb/YYYY-MM-DD_<Name>/`` holds README.md (results table and the exact
reproduction command), submission.json, the bundled train_gpt.py, one log per seed (``train_seed<s>.log``: the
stage logs plus a machine-readable summary line) and requirements.txt. Field names of submission.json follow the
current record (PR #1855); pgolf adds ``std_kind`` (this file reports the SAMPLE std, ddof=1, the record itself
used ddof=0), population stds, a ``provenance`` block, a ``significance`` block, the verdict and missing seeds.

Each seed log ends with one line ``pgolf_seed_summary {json}`` carrying the seed's figures and the sha256 of
train_gpt.py; ``check_folder`` recomputes every figure of submission.json from those lines, recompiles and
rehashes train_gpt.py, and applies the size gate, so a hand-edited json or a swapped script is caught.
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import functools
import importlib.metadata
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from pgolf.artifact.minify import CODE_BYTES_CONVENTIONS
from pgolf.io import read_json, sha256_file
from pgolf.report.schema import SUBMISSION_SCHEMA, TRACK, validate
from pgolf.report.summary import submission_date

TRACK_DIR = f"track_{TRACK}"
SIZE_CAP_BYTES = 16_000_000
SUMMARY_PREFIX = "pgolf_seed_summary "
FIGURE_ABS_TOLERANCE = 1e-8  # json vs logs, for float figures (losses); integers must match exactly
OPTIONAL_PREFIX = "# optional (used when importable): "  # the requirements.txt line of a guarded import
# {nproc}: the process count the seed ran with (the README's command must give the seed's own artifact and score)
DEFAULT_REPRODUCE_COMMAND = "torchrun --standalone --nproc_per_node {nproc} train_gpt.py --seed {seed} --data-dir ./data/"
REQUIRED_FOLDER_FILES = ("README.md", "submission.json", "train_gpt.py", "requirements.txt")


class SubmissionError(ValueError):
    """submission.json or the submission folder is invalid."""


def raise_if_invalid(submission: dict, where: str) -> None:
    errors = validate(submission, SUBMISSION_SCHEMA)
    if errors:
        raise SubmissionError(f"{where}: does not match the submission schema: " + "; ".join(errors))


# --------------------------------------------------------------------------------------------------------------
# The bundled train_gpt.py
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CodeBundle:
    """results/<run>/code/train_gpt.py and its description train_gpt.py.json (written by pgolf.artifact.bundle)."""

    path: Path
    sha256: str
    meta: dict  # sha256, bytes_file, bytes_wrapper, code_hash, third_party {required, optional}, ...
    blockers: tuple[str, ...]  # a seed's artifact names other code, or its size gate counted another file: no record
    notes: tuple[str, ...]  # facts the README states (the folder's script reproduces the claims)


def read_code_bundle(code_dir: Path, seeds: Sequence[Any]) -> CodeBundle:
    """Read the bundle and cross-check it with every seed: the folder's train_gpt.py must reproduce the claims.

    - Code identity: each seed's size gate records the code it paired the artifact with (``code_hash``, the
      CODE_HASH of the counted train_gpt.py); it must be this file's ``CODE_HASH``, or the seed was gated with
      other code than the folder ships (a record blocker).
    - Code bytes: counted once more here, on this file, by the one counting function
      (:func:`pgolf.artifact.minify.counted_code`); the bundle's own report, every seed's size gate (count and
      the sha256 of the file it counted) must agree with it (blockers otherwise).
    When everything agrees, a note says that the folder's train_gpt.py reproduces the claims (the README states it).
    """
    from pgolf.artifact.minify import counted_code_bytes

    path = code_dir / "train_gpt.py"
    meta_path = code_dir / "train_gpt.py.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: bundled train_gpt.py not found (the submission folder needs it; "
            "pass --no-folder to skip the folder)"
        )
    meta = read_json(meta_path, "train_gpt.py description")
    if not isinstance(meta, dict):
        raise SubmissionError(f"{meta_path}: expected a JSON object")
    actual = sha256_file(path)
    if meta.get("sha256") != actual:
        raise SubmissionError(
            f"{meta_path}: sha256 {str(meta.get('sha256'))[:16]}... does not match {path} ({actual[:16]}...)"
        )
    blockers, notes = [], []
    code_id = meta.get("code_hash")
    for s in seeds:
        if s.artifact_code_id != code_id:
            blockers.append(
                f"seed {s.seed}: its size gate paired the artifact with code {str(s.artifact_code_id)[:12]}..., "
                f"not this train_gpt.py's CODE_HASH {str(code_id)[:12]}... (rerun the gate and evaluation with "
                "this recipe and sources)"
            )
    counts: dict[str, int] = {}
    for convention in sorted({s.code_bytes_convention for s in seeds if s.code_bytes_convention in CODE_BYTES_CONVENTIONS}):
        counts[convention], _, _ = counted_code_bytes(path, convention)
        recorded = meta.get(f"bytes_{convention}")
        if recorded is not None and recorded != counts[convention]:
            blockers.append(
                f"{meta_path}: says {recorded:,} code bytes ({convention}), counted here: {counts[convention]:,} "
                f"(the count depends on Python and brotli: {meta.get('counted_with')} there)"
            )
    for s in seeds:
        if s.code_bytes_convention not in CODE_BYTES_CONVENTIONS:
            blockers.append(f"seed {s.seed}: its code bytes follow no convention pgolf counts "
                            f"({s.code_bytes_convention!r}; expected {' or '.join(CODE_BYTES_CONVENTIONS)})")
        if s.code_sha256 is not None and s.code_sha256 != actual:
            blockers.append(
                f"seed {s.seed}: its size gate counted a code file with sha256 {s.code_sha256[:12]}..., "
                f"not the bundled train_gpt.py ({actual[:12]}...)"
            )
        counted = counts.get(s.code_bytes_convention or "")
        if counted is not None and counted != s.code_bytes:
            blockers.append(
                f"seed {s.seed}: pack report counts {s.code_bytes:,} code bytes "
                f"({s.code_bytes_convention}), train_gpt.py counts {counted:,}"
            )
    if seeds and not blockers:
        conventions = ", ".join(f"{n:,} ({c})" for c, n in counts.items()) or "not recorded"
        notes.append(
            f"the folder's train_gpt.py reproduces these claims: every seed was gated with its CODE_HASH "
            f"{str(code_id)[:12]}..., and the code bytes are this file's (sha256 {actual[:12]}...): {conventions}. "
            "Rerun as below, its artifact and val_bpb are the seed's own (checked byte for byte on CPU by "
            "tests/test_reproduce.py; GPU training is not bit-reproducible)"
        )
    return CodeBundle(path=path, sha256=actual, meta=meta, blockers=tuple(blockers), notes=tuple(notes))


def _embedded_sources(source: str) -> list[str]:
    """Python sources carried as string literals: a bundle's module table, or a self-extracting wrapper
    ``exec(<decompress>(<b85decode|b64decode>("...")))``. Only literals are decoded; nothing is executed."""
    import lzma
    import zlib

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) > 64):
            continue
        text = node.value
        if "import " in text:
            found.append(text)  # a module's source (parsed later; prose that does not parse is skipped)
            continue
        if any(ch.isspace() for ch in text.strip()):
            continue
        for decode in (base64.b85decode, base64.b64decode):
            try:
                raw = decode(text.encode("ascii", "ignore"))
            except ValueError:
                continue
            for decompress in (_brotli_decompress, lzma.decompress, zlib.decompress):
                try:
                    found.append(decompress(raw).decode("utf-8"))
                    break
                except Exception:  # noqa: BLE001 - any failure means "not this codec"
                    continue
    return found


def _brotli_decompress(data: bytes) -> bytes:
    import brotli

    return brotli.decompress(data)


def third_party_imports(source: str) -> list[str]:
    """Top-level modules imported by the source and by the sources it embeds, minus the stdlib and pgolf
    (which a bundle serves from inside itself)."""
    modules: set[str] = set()
    for text in [source, *_embedded_sources(source)]:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return sorted(m for m in modules if m not in sys.stdlib_module_names and m not in ("__future__", "pgolf"))


# Module -> distribution, for modules not installed where the folder is written.
KNOWN_DISTRIBUTIONS = {
    "torch": "torch",
    "numpy": "numpy",
    "triton": "triton",
    "sentencepiece": "sentencepiece",
    "brotli": "brotli",
    "yaml": "PyYAML",
    "pandas": "pandas",
}


@functools.lru_cache(maxsize=1)
def _distributions_by_module() -> dict:
    """importlib.metadata's module -> distributions map (a scan of every installed package: cached)."""
    return dict(importlib.metadata.packages_distributions())


def requirements_text(source: str, run_environment: dict, third_party: Optional[dict] = None) -> str:
    """requirements.txt for the third-party modules train_gpt.py imports.

    ``third_party`` ({"required": [...], "optional": [...]}, from train_gpt.py.json) when known, else a scan of
    the file. Versions: the run's recorded environment for torch/numpy/triton/brotli (the numbers and the
    artifact's bytes were made with those), the installed distribution otherwise; optional imports (guarded by
    ``except ImportError``) and modules with no known distribution are comment lines. Every line names its module
    as ``# import <module>``.
    """
    if third_party is None:
        third_party = {"required": third_party_imports(source), "optional": []}
    recorded = {name: run_environment.get(name) for name in ("torch", "numpy", "triton", "brotli")}
    dist_of = _distributions_by_module()
    lines = ["# Third-party packages imported by train_gpt.py (pgolf submission folder)."]
    for module in sorted(third_party.get("required", [])):
        dist = (dist_of.get(module) or [KNOWN_DISTRIBUTIONS.get(module)])[0]
        if dist is None:
            lines.append(f"# {module}: no known distribution  # import {module}")
            continue
        version = recorded.get(dist.lower())
        if version is None:
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                version = None
        pin = f"=={str(version).split('+')[0]}" if version else ""  # local tags (+cu130) are not on PyPI
        lines.append(f"{dist}{pin}  # import {module}")
    for module in sorted(third_party.get("optional", [])):
        lines.append(f"{OPTIONAL_PREFIX}{module}  # import {module}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# submission.json
# --------------------------------------------------------------------------------------------------------------


def build_submission(agg: dict, seeds: Sequence[Any], cfg: Any, bundle: Optional[CodeBundle] = None) -> dict:
    """The record-folder json from the aggregate (see pgolf.report.aggregate.aggregate) and the seeds."""
    loss, bpb, sig = agg["val_loss_nats_per_token"], agg["val_bpb"], agg["significance"]
    env = agg["provenance"]["environment"]
    baseline = agg["baseline"]
    return {
        "author": cfg.author,
        "github_id": cfg.github_id,
        "name": cfg.submission_name or agg["run"],
        "blurb": cfg.blurb,
        "date": submission_date(cfg),
        "track": TRACK,
        "mode": agg["mode"],
        "val_loss": loss["mean"],
        "val_loss_unit": "nats per token",
        "val_bpb": bpb["mean"],
        "val_loss_std": loss["std_sample_ddof1"],
        "val_bpb_std": bpb["std_sample_ddof1"],
        "std_kind": agg["std_kind"],
        "val_loss_std_population": loss["std_population_ddof0"],
        "val_bpb_std_population": bpb["std_population_ddof0"],
        "seeds": list(agg["seeds"]),
        "missing_seeds": [m["seed"] for m in agg["missing_seeds"]],
        "seed_results": {
            str(s.seed): {
                "val_loss": s.val_loss,
                "val_bpb": s.val_bpb,
                "artifact_bytes": s.total_bytes,
                "model_bytes": s.model_bytes,
                "code_bytes": s.code_bytes,
                "steps": s.steps,
                "step_avg_ms": s.ms_per_step,
                "train_time_s": s.train_seconds,
                "eval_time_s": s.eval_total_s,
                "artifact_sha256": s.artifact_sha256,
            }
            for s in seeds
        },
        "comparison_baseline_bpb": baseline["bpb"]["mean"] if baseline else None,
        "comparison_baseline_name": baseline["name"] if baseline else "",
        "delta_vs_leaderboard_bpb": sig.get("delta_bpb"),
        "delta_vs_leaderboard_nats": sig.get("delta_nats_per_token"),
        "artifact_bytes_mean": agg["artifact_bytes"]["mean"],
        "artifact_bytes_max": agg["artifact_bytes"]["max"],
        "bytes_total": agg["artifact_bytes"]["max"],
        "bytes_code": max(s.code_bytes for s in seeds),
        "train_steps_mean": agg["steps_mean"],
        "step_avg_ms_mean": agg["ms_per_step_mean"],
        "hardware": agg["provenance"]["hardware"],
        "pytorch_version": str(env.get("torch") or ""),
        "cuda_version": env.get("cuda"),
        "flash_attn_version": env.get("flash_attn"),
        "technique_summary": cfg.technique_summary,
        "verdict": agg["verdict"],
        "provenance": {
            "code_hash": agg["provenance"]["code_hash"],
            "eval_code_hash": agg["provenance"]["eval_code_hash"],
            "data_manifest_sha256": agg["provenance"]["data_manifest_sha256"],
            "config_sha256": agg["provenance"]["config_sha256"],
            "environment": env,
            "hardware": agg["provenance"]["hardware"],
            "code_bytes_convention": agg["provenance"]["code_bytes_convention"],
            "train_gpt_sha256": bundle.sha256 if bundle else None,
            "train_gpt_code_hash": bundle.meta.get("code_hash") if bundle else None,
            "mixed": agg["provenance"]["mixed"],
        },
        "significance": sig,
    }


# --------------------------------------------------------------------------------------------------------------
# Seed logs
# --------------------------------------------------------------------------------------------------------------
