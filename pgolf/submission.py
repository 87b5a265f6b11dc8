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

import argparse
import ast
import base64
import dataclasses
import functools
import importlib.metadata
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from pgolf.io import atomic_dir, atomic_write_json, read_json, sha256_bytes, sha256_file
from pgolf.submission_schema import SUBMISSION_SCHEMA, TRACK, schema_text, validate

TRACK_DIR = f"track_{TRACK}"
SIZE_CAP_BYTES = 16_000_000
SUMMARY_PREFIX = "pgolf_seed_summary "
FIGURE_ABS_TOLERANCE = 1e-8  # json vs logs, for float figures (losses); integers must match exactly
DEFAULT_REPRODUCE_COMMAND = "torchrun --standalone --nproc_per_node 8 train_gpt.py --seed {seed} --data-dir ./data/"
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
    """results/<run>/code/train_gpt.py and its description train_gpt.py.json (written by pgolf.bundle)."""

    path: Path
    sha256: str
    meta: dict  # sha256, bytes_file, bytes_wrapper, code_hash, third_party {required, optional}, ...
    blockers: tuple[str, ...]  # the seeds' size gate counted another file: no record
    notes: tuple[str, ...]  # facts the README states (e.g. the seeds ran the staged pipeline, not this file)


def read_code_bundle(code_dir: Path, seeds: Sequence[Any]) -> CodeBundle:
    """Read the bundle and cross-check it with every seed.

    The link that matters is the size gate: each seed's pack report records the sha256 of the code file it
    counted (``code_sha256``) and its counted bytes; both must match the bundled file, or the reported artifact
    size is not the size of what ships (a record blocker). The pgolf code hash differs by design when the seeds
    ran the staged pipeline (the hash of the installed sources) rather than the bundled file itself (the hash of
    the bundled sources): that is stated, not refused.
    """
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
    bundle_code_hash = meta.get("code_hash")
    staged = [s.seed for s in seeds if bundle_code_hash is not None and s.code_hash != bundle_code_hash]
    if staged:
        notes.append(
            f"seed(s) {staged} were not produced by this train_gpt.py itself (their pgolf code hash "
            f"{seeds[0].code_hash[:12]}... differs from the bundle's {str(bundle_code_hash)[:12]}...): "
            "they ran the staged pipeline; train_gpt.py bundles the same stage functions"
        )
    for s in seeds:
        if s.code_sha256 is not None and s.code_sha256 != actual:
            blockers.append(
                f"seed {s.seed}: its size gate counted a code file with sha256 {s.code_sha256[:12]}..., "
                f"not the bundled train_gpt.py ({actual[:12]}...)"
            )
        counted = {"wrapper": meta.get("bytes_wrapper"), "file": meta.get("bytes_file")}.get(
            s.code_bytes_convention or ""
        )
        if counted is not None and counted != s.code_bytes:
            blockers.append(
                f"seed {s.seed}: pack report counts {s.code_bytes:,} code bytes "
                f"({s.code_bytes_convention}), train_gpt.py.json says {counted:,}"
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
    the file. Versions: the run's recorded environment for torch/numpy/triton (the numbers were made with those),
    the installed distribution otherwise; optional imports (guarded by ``except ImportError``) and modules with
    no known distribution are comment lines. Every line names its module as ``# import <module>``.
    """
    if third_party is None:
        third_party = {"required": third_party_imports(source), "optional": []}
    recorded = {
        "torch": run_environment.get("torch"),
        "numpy": run_environment.get("numpy"),
        "triton": run_environment.get("triton"),
    }
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
        lines.append(f"# optional (used when importable): {module}  # import {module}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# submission.json
# --------------------------------------------------------------------------------------------------------------


def build_submission(agg: dict, seeds: Sequence[Any], cfg: Any, bundle: Optional[CodeBundle] = None) -> dict:
    """The record-folder json from the aggregate (see pgolf.report.aggregate) and the seeds."""
    from pgolf.report import submission_date

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


def seed_log_name(seed: int) -> str:
    return f"train_seed{seed}.log"


def seed_summary(s: Any, train_gpt_sha256: str) -> dict:
    return {
        "seed": s.seed,
        "val_loss": s.val_loss,
        "val_bpb": s.val_bpb,
        "artifact_bytes": s.total_bytes,
        "model_bytes": s.model_bytes,
        "code_bytes": s.code_bytes,
        "steps": s.steps,
        "step_avg_ms": s.ms_per_step,
        "eval_time_s": s.eval_total_s,
        "artifact_sha256": s.artifact_sha256,
        "code_hash": s.code_hash,
        "train_gpt_sha256": train_gpt_sha256,
    }


def render_seed_log(s: Any, run: str, train_gpt_sha256: str) -> str:
    """One seed's log: header, every stage log of the seed, the evaluation summary, the summary line."""
    parts = [
        f"pgolf seed log: run {run}, seed {s.seed}",
        f"train_gpt.py sha256: {train_gpt_sha256}",
        f"pgolf code hash (training): {s.code_hash}",
        f"data manifest sha256: {s.data_manifest_sha256}",
        "",
    ]
    for log in s.log_files:
        parts += [
            f"===== {log.parent.name}/{log.name} =====",
            log.read_text(encoding="utf-8", errors="replace").rstrip(),
            "",
        ]
    if not s.log_files:
        parts += ["(no stage logs were found under logs/)", ""]
    parts += [
        "===== evaluation summary (eval/eval.json) =====",
        f"val_loss {s.val_loss:.8f} nats/token  val_bpb {s.val_bpb:.8f}  ({s.token_count:,} target tokens, "
        f"{s.byte_sum:,} bytes)",
        f"eval time {s.eval_total_s:.1f} s (load {s.eval_load_s:.1f} + warm-up {s.eval_warmup_s:.1f} + "
        f"score {s.eval_score_s:.1f})",
        f"train: {s.steps} steps, {s.train_seconds:.1f} s, {s.ms_per_step:.2f} ms/step",
        f"artifact {s.total_bytes:,} bytes (model {s.model_bytes:,} + code {s.code_bytes:,}), "
        f"sha256 {s.artifact_sha256}",
        SUMMARY_PREFIX + json.dumps(seed_summary(s, train_gpt_sha256), sort_keys=True),
    ]
    return "\n".join(parts) + "\n"


def parse_seed_log(path: Path) -> dict:
    """The summary of a seed log (its last ``pgolf_seed_summary`` line)."""
    lines = [
        ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.startswith(SUMMARY_PREFIX)
    ]
    if not lines:
        raise SubmissionError(f"{path}: no '{SUMMARY_PREFIX.strip()}' line")
    try:
        summary = json.loads(lines[-1][len(SUMMARY_PREFIX) :])
    except json.JSONDecodeError as exc:
        raise SubmissionError(f"{path}: summary line is not valid JSON ({exc})") from None
    if not isinstance(summary, dict):
        raise SubmissionError(f"{path}: summary line must hold a JSON object")
    return summary


# --------------------------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------------------------


def folder_name(date: str, name: str) -> str:
    return f"{date}_{name}"


def _f8(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.8f}"


def readme_text(agg: dict, sub: dict, seeds: Sequence[Any], reproduce_command: str, recipe: Optional[str]) -> str:
    from pgolf.report import summary_text

    loss, bpb, sig = agg["val_loss_nats_per_token"], agg["val_bpb"], agg["significance"]
    lines = [
        f"# {sub['name']}",
        "",
        f"**val_bpb {bpb['mean']:.8f}** (mean of {bpb['n']} seed(s); "
        f"sample std, ddof=1: {_f8(bpb['std_sample_ddof1'])}), "
        f"val_loss {loss['mean']:.8f} nats per token. Verdict: **{agg['verdict']['status']}**.",
        "",
    ]
    if sub["blurb"]:
        lines += [sub["blurb"], ""]
    if sub["technique_summary"]:
        lines += [f"Techniques: {sub['technique_summary']}", ""]
    lines += [
        "## Results",
        "",
        "| seed | val_loss (nats/token) | val_bpb | steps | ms/step | artifact bytes | train s | eval s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in seeds:
        lines.append(
            f"| {s.seed} | {s.val_loss:.8f} | {s.val_bpb:.8f} | {s.steps} | {s.ms_per_step:.2f} | "
            f"{s.total_bytes:,} | {s.train_seconds:.1f} | {s.eval_total_s:.1f} |"
        )
    lines += [
        "",
        f"Mean val_bpb {bpb['mean']:.8f}; sample std (ddof=1) {_f8(bpb['std_sample_ddof1'])}; "
        f"population std (ddof=0) {_f8(bpb['std_population_ddof0'])}. "
        f"Artifact bytes = compressed model + counted code ({agg['provenance']['code_bytes_convention']} "
        f"convention), cap {SIZE_CAP_BYTES:,}.",
        "",
    ]
    if agg["missing_seeds"]:
        lines += ["## Missing seeds", ""]
        lines += [f"- seed {m['seed']}: missing {', '.join(m['missing_files'])}" for m in agg["missing_seeds"]]
        lines.append("")
    lines += ["## Significance", "", "```", summary_text(agg).rstrip(), "```", ""]
    if sig.get("note"):
        lines += [f"Note: {sig['note']}.", ""]
    if agg["provenance"]["notes"] or agg["provenance"]["mixed"]:
        lines += ["## Provenance notes", ""]
        lines += [f"- {note}" for note in agg["provenance"]["notes"]]
        lines += [
            f"- mixed provenance, pooled because allowed: {d['label']}: "
            + "; ".join(f"{value[:16]} (seeds {seeds_})" for value, seeds_ in d["values"].items())
            for d in agg["provenance"]["mixed"]
        ]
        lines.append("")
    seed_list = " ".join(str(s.seed) for s in seeds)
    lines += [
        "## Reproduce",
        "",
        f"From inside this folder, on {sub['hardware'] if 'H100' in sub['hardware'] else '8xH100 SXM'}, for each "
        f"seed in {seed_list},",
        f"with the verified validation and training shards (data manifest sha256 "
        f"{str(agg['provenance']['data_manifest_sha256'])[:16]}...) under `./data/`:",
        "",
        "```bash",
        "pip install -r requirements.txt",
        *[reproduce_command.format(seed=s.seed) for s in seeds],
        "```",
        "",
    ]
    if recipe:
        lines += [
            f"With the pgolf pipeline (code hash {agg['provenance']['code_hash'][:16]}...):",
            "",
            "```bash",
            f"snakemake --cores all --configfile {recipe}",
            "```",
            "",
        ]
    lines += [
        "## Files",
        "",
        "- `submission.json`: figures, provenance (code hash, data manifest sha256, config sha256, environment) "
        "and the significance test",
        "- `train_gpt.py`: the bundled training + evaluation script",
        *[f"- `{seed_log_name(s.seed)}`: stage logs and the evaluation summary of seed {s.seed}" for s in seeds],
        "- `requirements.txt`: third-party packages `train_gpt.py` imports",
        "",
    ]
    return "\n".join(lines)


def write_folder(
    out_dir: Path,
    agg: dict,
    sub: dict,
    seeds: Sequence[Any],
    bundle: CodeBundle,
    reproduce_command: Optional[str] = None,
    recipe: Optional[str] = None,
) -> Path:
    """Write records/track_10min_16mb/<date>_<name>/ atomically (complete or absent); returns its path."""
    folder = Path(out_dir) / "records" / TRACK_DIR / folder_name(sub["date"], sub["name"])
    command = reproduce_command or bundle.meta.get("run_command") or DEFAULT_REPRODUCE_COMMAND
    source = bundle.path.read_bytes()
    env = agg["provenance"]["environment"]
    with atomic_dir(folder) as tmp:
        (tmp / "train_gpt.py").write_bytes(source)
        atomic_write_json(tmp / "submission.json", sub)
        for s in seeds:
            (tmp / seed_log_name(s.seed)).write_text(render_seed_log(s, agg["run"], bundle.sha256), encoding="utf-8")
        third_party = bundle.meta.get("third_party") if isinstance(bundle.meta.get("third_party"), dict) else None
        (tmp / "requirements.txt").write_text(
            requirements_text(source.decode("utf-8"), env, third_party), encoding="utf-8"
        )
        (tmp / "README.md").write_text(readme_text(agg, sub, seeds, command, recipe), encoding="utf-8")
    return folder


# --------------------------------------------------------------------------------------------------------------
# pgolf check-folder
# --------------------------------------------------------------------------------------------------------------


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=FIGURE_ABS_TOLERANCE)
    return a == b


def check_folder(folder: str | Path, cap_bytes: int = SIZE_CAP_BYTES) -> list[str]:
    """Every reason the folder is not a valid submission (empty list: it passes)."""
    from pgolf.stats import mean, std

    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: not a directory"]
    problems = [
        f"{folder / name}: required file missing" for name in REQUIRED_FOLDER_FILES if not (folder / name).exists()
    ]
    log_paths = {
        int(m.group(1)): p
        for p in folder.glob("train_seed*.log")
        if (m := re.fullmatch(r"train_seed(-?\d+)\.log", p.name))
    }
    if not log_paths:
        problems.append(f"{folder}: no seed logs (train_seed<seed>.log)")

    code = folder / "train_gpt.py"
    code_sha = None
    if code.exists():
        source = code.read_bytes()
        code_sha = sha256_bytes(source)
        try:
            compile(source, str(code), "exec")
        except (SyntaxError, ValueError) as exc:
            problems.append(f"{code}: does not compile: {exc}")
        req = folder / "requirements.txt"
        if req.exists():
            listed = req.read_text(encoding="utf-8")
            for module in third_party_imports(source.decode("utf-8", errors="replace")):
                if f"import {module}" not in listed:
                    problems.append(f"{req}: train_gpt.py imports '{module}', which requirements.txt does not list")

    logs: dict[int, dict] = {}
    for seed, path in sorted(log_paths.items()):
        try:
            logs[seed] = parse_seed_log(path)
        except SubmissionError as exc:
            problems.append(str(exc))
            continue
        recorded = logs[seed].get("train_gpt_sha256")
        if code_sha is not None and recorded != code_sha:
            problems.append(
                f"{path}: records train_gpt.py sha256 {str(recorded)[:16]}..., but the folder's "
                f"train_gpt.py has {code_sha[:16]}..."
            )
        artifact = logs[seed].get("artifact_bytes")
        if not isinstance(artifact, int) or artifact > cap_bytes:
            problems.append(f"{path}: artifact {artifact!r} bytes is over the {cap_bytes:,}-byte cap")

    sub_path = folder / "submission.json"
    if not sub_path.exists():
        return problems
    try:
        sub = read_json(sub_path, "submission.json")
    except ValueError as exc:
        return problems + [str(exc)]
    schema_errors = validate(sub, SUBMISSION_SCHEMA)
    problems += [f"{sub_path}: {e}" for e in schema_errors]
    if schema_errors:
        return problems
    prov_sha = sub["provenance"].get("train_gpt_sha256")
    if code_sha is not None and prov_sha is not None and prov_sha != code_sha:
        problems.append(
            f"{sub_path}: provenance.train_gpt_sha256 {prov_sha[:16]}... differs from train_gpt.py ({code_sha[:16]}...)"
        )
    if sorted(sub["seeds"]) != sorted(log_paths):
        problems.append(f"{sub_path}: seeds {sorted(sub['seeds'])} but the folder has logs for {sorted(log_paths)}")
    if sorted(int(k) for k in sub["seed_results"]) != sorted(sub["seeds"]):
        problems.append(f"{sub_path}: seed_results keys {sorted(sub['seed_results'])} differ from seeds {sub['seeds']}")
    for seed, log in logs.items():
        result = sub["seed_results"].get(str(seed))
        if result is None:
            continue
        for key in ("val_loss", "val_bpb", "artifact_bytes", "steps", "step_avg_ms", "eval_time_s"):
            if not _close(result.get(key), log.get(key)):
                problems.append(
                    f"{sub_path}: seed_results.{seed}.{key} = {result.get(key)!r}, but "
                    f"{seed_log_name(seed)} says {log.get(key)!r}"
                )
        if result["artifact_bytes"] > cap_bytes:
            problems.append(
                f"{sub_path}: seed {seed} artifact {result['artifact_bytes']:,} bytes "
                f"is over the {cap_bytes:,}-byte cap"
            )
    complete = [logs[s] for s in sub["seeds"] if s in logs]
    if complete and len(complete) == len(sub["seeds"]):
        try:
            bpb = [float(x["val_bpb"]) for x in complete]
            loss = [float(x["val_loss"]) for x in complete]
            sizes = [int(x["artifact_bytes"]) for x in complete]
        except (KeyError, TypeError, ValueError) as exc:
            return problems + [f"{folder}: a seed log summary lacks a figure ({exc})"]
        expected = {
            "val_bpb": mean(bpb),
            "val_loss": mean(loss),
            "val_bpb_std": std(bpb, ddof=1),
            "val_loss_std": std(loss, ddof=1),
            "artifact_bytes_max": max(sizes),
            "artifact_bytes_mean": mean(sizes),
            "bytes_total": max(sizes),
        }
        for key, value in expected.items():
            if not _close(sub[key], value):
                problems.append(f"{sub_path}: {key} = {sub[key]!r}, but the seed logs give {value!r}")
    if sub["artifact_bytes_max"] > cap_bytes or sub["bytes_total"] > cap_bytes:
        problems.append(
            f"{sub_path}: artifact_bytes_max {sub['artifact_bytes_max']:,} is over the {cap_bytes:,}-byte cap"
        )
    return problems


def _check_folder_cmd(args: argparse.Namespace) -> int:
    problems = check_folder(args.dir, args.cap_bytes)
    if args.json_out:
        atomic_write_json(args.json_out, {"folder": str(args.dir), "ok": not problems, "problems": problems})
    if problems:
        print(f"check-folder: {args.dir}: FAIL ({len(problems)} problem(s))", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"check-folder: {args.dir}: OK")
    return 0


def _schema_cmd(args: argparse.Namespace) -> int:
    sys.stdout.write(schema_text())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-folder", help="check a submission folder (hashes, figures vs logs, size gate, files)")
    p.add_argument("dir", help="records/track_10min_16mb/<date>_<name>/")
    p.add_argument("--cap-bytes", type=int, default=SIZE_CAP_BYTES, help="size cap (decimal bytes)")
    p.add_argument("--json-out", help="write {ok, problems} here")
    p.set_defaults(func=_check_folder_cmd)
    s = sub.add_parser("submission-schema", help="print the JSON schema of submission.json")
    s.set_defaults(func=_schema_cmd)
