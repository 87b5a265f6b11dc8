"""Reading one seed's results: the files the train, hessian, pack and evaluate stages leave under
``results/<run>/seed<s>/``, checked key by key.

A seed whose stage outputs are absent (a seed that failed under ``snakemake --keep-going``) is a
:class:`MissingSeed`, listed by the report; a file that exists but lacks a key or disagrees with its siblings
is an error naming the file and the key, because pooling a half-understood seed would corrupt the statistics.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Optional, Union

from pgolf.compliance.provenance import is_record_gpu
from pgolf.io import read_json_object, sha256_json


class ResultsError(ValueError):
    """A per-seed results file is malformed, incomplete or inconsistent with the other files of that seed."""


# Files a seed must have to be aggregated, relative to results/<run>/seed<s>/.
REQUIRED_FILES = {
    "train_summary": "train/train_summary.json",
    "checkpoint": "train/checkpoint/checkpoint.json",
    "pack_report": "pack/pack_report.json",
    "eval": "eval/eval.json",
}
OPTIONAL_FILES = {
    "metrics": "train/metrics.jsonl",
    "hessian_report": "hessians/hessian_report.json",
    # the staged DAG gates model + code in a stage of its own; a record run's pack report carries both itself
    "gate_report": "gate/gate_report.json",
}
LOGS_DIR = "logs"
RECORD_WORLD_SIZE = 8  # the record track: 8 processes ...
RECORD_GPU = "H100"  # ... on H100s (the hardware the 600 s budgets are stated for)
# Stage logs in pipeline order; any other *.log in logs/ follows alphabetically.
LOG_ORDER = ("record_run", "train", "hessians", "quantize", "pack", "eval", "evaluate")


@dataclasses.dataclass(frozen=True)
class MissingSeed:
    """A seed without a score: stage outputs that do not exist, or a ``problem`` with the ones that do (a diverged
    run's NaN loss)."""

    seed: int
    missing_files: tuple[str, ...]  # paths that do not exist
    problem: str = ""

    @property
    def reason(self) -> str:
        return self.problem or "missing " + ", ".join(self.missing_files)


@dataclasses.dataclass(frozen=True)
class SeedResult:
    """Everything the report needs from one seed. Units are in the names; bytes are decimal bytes."""

    seed: int
    seed_dir: Path
    # evaluation (eval.json)
    val_loss: float  # nats per scored token
    val_bpb: float
    loss_sum: float  # nats
    token_count: int
    byte_sum: int
    eval_load_s: float
    eval_warmup_s: float
    eval_score_s: float
    eval_total_s: float
    eval_budget_exceeded: Optional[bool]
    eval_mode: Optional[str]
    # training (train_summary.json)
    steps: int
    train_seconds: float
    ms_per_step: float
    tokens_per_s: Optional[float]
    peak_memory_gib: Optional[float]
    compile_warmup_seconds: Optional[float]
    ms_per_step_before_loop: Optional[float]
    ms_per_step_after_loop: Optional[float]
    world_size: Optional[int]
    # hessians (hessian_report.json; optional stage output)
    hessian_seconds: Optional[float]
    # how the run read the 600 s training budget (train.budget_reading: strict = loop + Hessians, record = loop)
    budget_reading: str
    # artifact (pack_report.json)
    artifact_sha256: str
    model_bytes: int
    code_bytes: int
    total_bytes: int
    cap_bytes: int  # the cap the seed's size report was gated against (the rules' is SIZE_CAP_BYTES)
    code_counted: bool  # False: a staged pack report, which sizes the model alone
    code_bytes_convention: Optional[str]
    code_sha256: Optional[str]  # sha256 of the counted train_gpt.py, when the pack report records it
    # provenance (checkpoint.json, eval.json)
    code_hash: str  # pgolf code hash at training time
    eval_code_hash: Optional[str]  # pgolf code hash at evaluation time
    data_manifest_sha256: Optional[str]
    config_sha256: str  # over every stage config this seed's files record
    configs: dict
    environment: dict
    # curves and logs
    loss_curve: tuple[tuple[int, float], ...]  # (step, training loss) from metrics.jsonl
    log_files: tuple[Path, ...]
    # the code identity the size gate paired this artifact with (gate or pack report ``code_hash``): the CODE_HASH
    # of the train_gpt.py whose bytes were counted with it
    artifact_code_id: Optional[str] = None
    # the three stages of the score (eval.json's diagnostics; None when diagnostics were off): the trained
    # weights, the packed artifact without TTT, and the artifact scored with TTT (= val_bpb)
    pre_quant_bpb: Optional[float] = None
    post_quant_bpb: Optional[float] = None
    pre_quant_loss: Optional[float] = None
    post_quant_loss: Optional[float] = None
    ttt_mode: Optional[str] = None
    # what was scored: documents (of how many in the validation shards), target tokens, bytes
    docs_scored: Optional[int] = None
    docs_total: Optional[int] = None

    @property
    def on_record_hardware(self) -> bool:
        return record_hardware(self.world_size, self.environment)

    @property
    def hardware_words(self) -> str:
        """``1 process, CPU`` / ``8 processes, NVIDIA H100 80GB HBM3``."""
        gpu = str(self.environment.get("gpu") or "") or "CPU"
        n = self.world_size
        return f"{n if n is not None else '?'} process{'es' if n != 1 else ''}, {gpu}"

    @property
    def nats_per_bpb(self) -> float:
        """val_loss / val_bpb = ln 2 * bytes per token: converts bpb to nats per token on this validation set."""
        return math.log(2.0) * self.byte_sum / self.token_count


SeedOutcome = Union[SeedResult, MissingSeed]


def record_hardware(world_size: Optional[int], environment: Optional[dict]) -> bool:
    """8 processes on H100 SXM GPUs: the hardware the 600 s budgets and the record track are stated for. Every
    budget line, budget reason and "reproduce on 8xH100" wording of the reports follows this one predicate."""
    return world_size == RECORD_WORLD_SIZE and is_record_gpu((environment or {}).get("gpu"))


# --------------------------------------------------------------------------------------------------------------
# Checked key access
# --------------------------------------------------------------------------------------------------------------


def _get(data: dict, key: str, path: Path, kind: type, required: bool = True) -> Any:
    """``data[key]`` (dotted keys descend), checked against ``kind``; errors name ``path`` and ``key``.

    ``kind`` float accepts any finite JSON number (returned as float); int rejects booleans and floats.
    """
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            if required:
                raise ResultsError(f"{path}: missing key '{key}'")
            return None
        node = node[part]
    if node is None and not required:
        return None
    if kind is float:
        ok = isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node)
    elif kind is int:
        ok = isinstance(node, int) and not isinstance(node, bool)
    else:
        ok = isinstance(node, kind)
    if not ok:
        expected = "a finite number" if kind is float else kind.__name__
        raise ResultsError(f"{path}: key '{key}' expected {expected}, got {type(node).__name__} {node!r}")
    return float(node) if kind is float else node


def _read_object(path: Path, what: str) -> dict:
    try:
        return read_json_object(path, what)
    except ValueError as exc:
        raise ResultsError(str(exc)) from None


def read_loss_curve(path: Path) -> tuple[tuple[int, float], ...]:
    """(step, loss) of every ``train_step`` event in a metrics JSON-lines file; a bad line is an error."""
    if not path.exists():
        return ()
    curve = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ResultsError(f"{path}:{line_number}: not valid JSON ({exc})") from None
        if isinstance(record, dict) and record.get("event") == "train_step":
            where = Path(f"{path}:{line_number}")
            curve.append((_get(record, "step", where, int), _get(record, "loss", where, float)))
    return tuple(curve)


def _log_files(seed_dir: Path) -> tuple[Path, ...]:
    logs = seed_dir / LOGS_DIR
    if not logs.is_dir():
        return ()
    found = sorted(logs.glob("*.log"))
    rank = {name: i for i, name in enumerate(LOG_ORDER)}
    return tuple(sorted(found, key=lambda p: (rank.get(p.stem, len(rank)), p.name)))


def config_fingerprint(checkpoint: dict, evaluation: dict, pack_report: dict, hessian_report: dict) -> tuple[str, dict]:
    """sha256 over every stage config a seed's files record: model/optim/train (checkpoint), Hessians, the
    quantize config's hash (pack report's input hashes), pack, evaluate. Sections a file does not record are left
    out (the same code writes the same keys for every seed)."""
    input_hashes = pack_report.get("input_hashes") if isinstance(pack_report.get("input_hashes"), dict) else {}
    configs = {
        "model": checkpoint.get("model_config"),
        "optim": checkpoint.get("optim_config"),
        "train": checkpoint.get("train_config"),
        "hessians": hessian_report.get("hessian_config"),
        "quantize_sha256": input_hashes.get("quantize_config_sha256"),
        "pack": pack_report.get("pack_config"),
        "evaluate": evaluation.get("evaluate_config"),
    }
    configs = {name: value for name, value in configs.items() if value is not None}
    return sha256_json(configs), configs


# --------------------------------------------------------------------------------------------------------------
# One seed
# --------------------------------------------------------------------------------------------------------------


def seed_dir(run_dir: str | Path, seed: int) -> Path:
    return Path(run_dir) / f"seed{seed}"


def load_seed(run_dir: str | Path, seed: int) -> SeedOutcome:
    """Read and cross-check one seed; a MissingSeed when any required stage output does not exist."""
    base = seed_dir(run_dir, seed)
    paths = {name: base / rel for name, rel in REQUIRED_FILES.items()}
    absent = tuple(str(p) for p in paths.values() if not p.exists())
    if absent:
        return MissingSeed(seed=seed, missing_files=absent)

    summary = _read_object(paths["train_summary"], "train summary")
    ckpt = _read_object(paths["checkpoint"], "checkpoint metadata")
    pack = _read_object(paths["pack_report"], "pack report")
    ev = _read_object(paths["eval"], "evaluation result")
    p_sum, p_ckpt, p_pack, p_ev = paths["train_summary"], paths["checkpoint"], paths["pack_report"], paths["eval"]

    eval_seed = _get(ev, "seed", p_ev, int, required=False)
    if eval_seed is not None and eval_seed != seed:
        raise ResultsError(f"{p_ev}: key 'seed' is {eval_seed}, but the file lives under seed{seed}/")
    summary_seed = _get(summary, "seed", p_sum, int, required=False)
    if summary_seed is not None and summary_seed != seed:
        raise ResultsError(f"{p_sum}: key 'seed' is {summary_seed}, but the file lives under seed{seed}/")

    not_finite = [key for key in ("val_loss", "val_bpb") if isinstance(ev.get(key), float) and not math.isfinite(ev[key])]
    if not_finite:  # a diverged seed failed; it is listed with the missing ones, not fatal to the report
        key = not_finite[0]
        return MissingSeed(seed=seed, missing_files=(), problem=f"{p_ev}: {key} is {ev[key]} (the run diverged)")
    val_loss = _get(ev, "val_loss", p_ev, float)
    val_bpb = _get(ev, "val_bpb", p_ev, float)
    token_count = _get(ev, "token_count", p_ev, int)
    byte_sum = _get(ev, "byte_sum", p_ev, int)
    if token_count <= 0 or byte_sum <= 0:
        raise ResultsError(f"{p_ev}: token_count and byte_sum must be > 0, got {token_count} and {byte_sum}")
    implied_bpb = val_loss * token_count / (math.log(2.0) * byte_sum)
    if not math.isclose(implied_bpb, val_bpb, rel_tol=1e-6):
        raise ResultsError(
            f"{p_ev}: val_bpb {val_bpb} disagrees with val_loss * token_count / (ln 2 * byte_sum) = {implied_bpb}"
        )

    eval_sha = _get(ev, "artifact_sha256", p_ev, str)
    pack_sha = _get(pack, "artifact_sha256", p_pack, str)
    if eval_sha != pack_sha:
        raise ResultsError(
            f"{p_ev}: artifact_sha256 {eval_sha[:16]}... differs from {p_pack} ({pack_sha[:16]}...): "
            "the evaluation scored a different artifact than the one whose size is reported"
        )
    gate_path = base / OPTIONAL_FILES["gate_report"]
    size, p_size = (_read_object(gate_path, "gate report"), gate_path) if gate_path.exists() else (pack, p_pack)
    # the gate always counts the code; a pack report only when it was given the code file (the bundled record run)
    code_counted = gate_path.exists() or bool(pack.get("code_file"))
    if _get(size, "artifact_sha256", p_size, str) != pack_sha:
        raise ResultsError(f"{p_size}: artifact_sha256 differs from {p_pack}: the gate checked another artifact")
    model_bytes = _get(size, "model_bytes", p_size, int)
    code_bytes = _get(size, "code_bytes", p_size, int)
    total_bytes = _get(size, "total_bytes", p_size, int)
    if total_bytes != model_bytes + code_bytes:
        raise ResultsError(
            f"{p_size}: total_bytes {total_bytes} != model_bytes {model_bytes} + code_bytes {code_bytes}"
        )
    cap = size.get("cap", size.get("cap_bytes", 16_000_000))
    if isinstance(cap, float) and cap.is_integer():
        cap = int(cap)
    if not isinstance(cap, int) or isinstance(cap, bool) or cap <= 0:
        raise ResultsError(f"{p_size}: key 'cap' expected a positive integer byte count, got {cap!r}")

    hessian_seconds = None
    hessian_report: dict = {}
    hessian_path = base / OPTIONAL_FILES["hessian_report"]
    if hessian_path.exists():
        hessian_report = _read_object(hessian_path, "hessian report")
        hessian_seconds = _get(hessian_report, "hessian_seconds", hessian_path, float)

    budget = ev.get("budget") if isinstance(ev.get("budget"), dict) else {}
    exceeded = budget.get("exceeded") if budget.get("budget_applies", ev.get("budget_applies")) else None
    config_sha, configs = config_fingerprint(ckpt, ev, pack, hessian_report)
    world_size = _get(summary, "world_size", p_sum, int, required=False)
    loss_sum = _get(ev, "loss_sum", p_ev, float, required=False)

    return SeedResult(
        seed=seed,
        seed_dir=base,
        val_loss=val_loss,
        val_bpb=val_bpb,
        loss_sum=loss_sum if loss_sum is not None else val_loss * token_count,
        token_count=token_count,
        byte_sum=byte_sum,
        eval_load_s=_get(ev, "timings.load_s", p_ev, float),
        eval_warmup_s=_get(ev, "timings.warmup_s", p_ev, float),
        eval_score_s=_get(ev, "timings.score_s", p_ev, float),
        eval_total_s=_get(ev, "timings.total_s", p_ev, float),
        eval_budget_exceeded=bool(exceeded) if exceeded is not None else None,
        eval_mode=_get(ev, "mode", p_ev, str, required=False),
        steps=_get(summary, "steps", p_sum, int),
        train_seconds=_get(summary, "train_seconds", p_sum, float),
        ms_per_step=_get(summary, "ms_per_step", p_sum, float),
        tokens_per_s=_get(summary, "tokens_per_s", p_sum, float, required=False),
        peak_memory_gib=_get(summary, "peak_memory_gib", p_sum, float, required=False),
        compile_warmup_seconds=_get(summary, "compile_warmup_seconds", p_sum, float, required=False),
        ms_per_step_before_loop=_get(summary, "ms_per_step_before_loop", p_sum, float, required=False),
        ms_per_step_after_loop=_get(summary, "ms_per_step_after_loop", p_sum, float, required=False),
        world_size=world_size,
        hessian_seconds=hessian_seconds,
        # as comply reads it: train_summary.json, else the checkpoint's train_config; strict before the option
        budget_reading=(_get(summary, "budget_reading", p_sum, str, required=False)
                        or _get(ckpt, "train_config.budget_reading", p_ckpt, str, required=False) or "strict"),
        artifact_sha256=pack_sha,
        model_bytes=model_bytes,
        code_bytes=code_bytes,
        total_bytes=total_bytes,
        cap_bytes=cap,
        code_counted=code_counted,
        code_bytes_convention=_get(size, "code_bytes_convention", p_size, str, required=False),
        code_sha256=_get(size, "code_sha256", p_size, str, required=False),
        code_hash=_get(ckpt, "code_hash", p_ckpt, str),
        eval_code_hash=_get(ev, "code_hash", p_ev, str, required=False),
        data_manifest_sha256=_get(ckpt, "data_manifest_sha256", p_ckpt, str, required=False),
        config_sha256=config_sha,
        configs=configs,
        # the machine is a measurement (train_summary.json); checkpoints written before that carried it
        environment=(_get(summary, "environment", p_sum, dict, required=False)
                     or _get(ckpt, "environment", p_ckpt, dict, required=False) or {}),
        loss_curve=read_loss_curve(base / OPTIONAL_FILES["metrics"]),
        log_files=_log_files(base),
        artifact_code_id=_get(size, "code_hash", p_size, str, required=False),
        pre_quant_bpb=_get(ev, "diagnostics.pre_quant.val_bpb", p_ev, float, required=False),
        post_quant_bpb=_get(ev, "diagnostics.post_quant.val_bpb", p_ev, float, required=False),
        pre_quant_loss=_get(ev, "diagnostics.pre_quant.val_loss", p_ev, float, required=False),
        post_quant_loss=_get(ev, "diagnostics.post_quant.val_loss", p_ev, float, required=False),
        ttt_mode=_get(ev, "ttt_mode", p_ev, str, required=False),
        docs_scored=_get(ev, "doc_count", p_ev, int, required=False),
        docs_total=_get(ev, "data.total_docs", p_ev, int, required=False),
    )


def load_seeds(run_dir: str | Path, seeds: list[int]) -> tuple[list[SeedResult], list[MissingSeed]]:
    """Load every seed in the given order; duplicates are an error."""
    if len(set(seeds)) != len(seeds):
        raise ResultsError(f"--seeds: duplicates in {seeds}")
    present: list[SeedResult] = []
    missing: list[MissingSeed] = []
    for seed in seeds:
        outcome = load_seed(run_dir, seed)
        (missing if isinstance(outcome, MissingSeed) else present).append(outcome)
    return present, missing
