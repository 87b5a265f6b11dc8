"""``pgolf comply RUN_DIR``: the challenge rules (docs: rules.md) checked on a run's OWN records.

Why a separate check: every stage already refuses what it can see (the Hessian stage the training budget, the gate
the size cap, the evaluation ledger C3), but each sees one seed and one stage. A record is a claim about the whole
run, so before packaging it this module re-reads the files the stages left behind and prints one verdict per rule
with the evidence it used:

    PASS            the rule holds on the evidence
    FAIL            the rule is broken, or the evidence it needs is missing or malformed
    NOT-APPLICABLE  the rule cannot apply here (e.g. the 600 s budgets are stated for 8xH100 SXM only; the
                    figure is still reported)

Exit status 0 only when no applicable rule fails (``--report-only`` always exits 0: sweeps report, not gate).

Inputs (all plain JSON; nothing is unpickled):
  results/<run>/seed<s>/{train/train_summary.json, train/checkpoint/checkpoint.json,
                         hessians/hessian_report.json, gate/gate_report.json, eval/eval.json}
  results/data/<name>/{shards/manifest.json, verified.json}
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

from pgolf.compliance.provenance import RECORD_GPU_COUNT, is_record_gpu
from pgolf.config import ModelConfig, RunConfig
from pgolf.config.training import DEFAULT_MAX_VAL_OVERLAP_FRACTION
from pgolf.io import sha256_file

PASS, FAIL, NOT_APPLICABLE = "PASS", "FAIL", "NOT-APPLICABLE"
Status = Literal["PASS", "FAIL", "NOT-APPLICABLE"]

OFFICIAL_VAL_DOCS = 50_000
TRAIN_BUDGET_SECONDS = 600.0
EVAL_BUDGET_SECONDS = 600.0
SIZE_CAP_BYTES = 16_000_000
# validation documents with an exact copy in training that a published split may keep (the data stage's default
# data.max_val_overlap_fraction, which record mode cannot raise): 500 of 50,000; more is a wrong split (#2127)
MAX_VAL_OVERLAP_DOCS = int(DEFAULT_MAX_VAL_OVERLAP_FRACTION * OFFICIAL_VAL_DOCS)
# what each of pgolf.artifact.minify.CODE_BYTES_CONVENTIONS counts, in the verdict's words
CONVENTION_TEXTS = {
    "wrapper": "brotli+base85 exec wrapper around the minified code (the top records' convention)",
    "file": "raw bytes of the shipped train_gpt.py",
}

SEED_FILES = {
    "summary": "train/train_summary.json",
    "checkpoint": "train/checkpoint/checkpoint.json",
    "hessians": "hessians/hessian_report.json",
    "gate": "gate/gate_report.json",
    "pack": "pack/pack_report.json",  # a one-process record run (pgolf.artifact.record_run) gates inside the pack report
    "eval": "eval/eval.json",
}


@dataclasses.dataclass(frozen=True)
class Verdict:
    rule: str  # short id, stable for scripts: "train_time", "ttt_ledger", ...
    title: str  # the rule in words
    status: Status
    evidence: str

    def line(self) -> str:
        return f"{self.status:<14} {self.rule:<16} {self.title}: {self.evidence}"


# --------------------------------------------------------------------------------------------------------------
# Evidence: the raw files, each either a dict or the reason it could not be read
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Evidence:
    """What the checks read. A file that is missing or not a JSON object is kept as its error string."""

    run_dir: Path
    cfg: RunConfig
    seed_dirs: dict[int, Path]  # every seed<N>/ directory present under run_dir
    seeds: dict[int, dict[str, Any]]  # declared seed -> file key -> dict | error string
    manifest: Any  # dict | None (a Hub export has none) | error string
    manifest_path: Path
    verified: Any  # dict | error string

    def files(self, key: str) -> dict[int, Any]:
        return {seed: files[key] for seed, files in self.seeds.items()}


def _read_object(path: Path) -> Any:
    """A JSON object, or a one-line reason why not (checks turn it into a FAIL naming the file)."""
    if not path.exists():
        return f"{path}: missing"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"{path}: not valid JSON ({exc})"
    if not isinstance(data, dict):
        return f"{path}: expected a JSON object, got {type(data).__name__}"
    return data


def seed_directories(run_dir: str | Path) -> dict[int, Path]:
    """Every ``seed<N>/`` directory under ``run_dir``: the results the run holds, declared or not."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return {}
    return {int(m.group(1)): child for child in sorted(run_dir.iterdir())
            if (m := re.fullmatch(r"seed(\d+)", child.name)) and child.is_dir()}


def undeclared_seeds(run_dir: str | Path, declared: Iterable[int]) -> list[int]:
    """Seeds with results under ``run_dir`` that the recipe does not declare (the ``seeds`` rule fails on them);
    the comply rule's params hold this list, so a stray seed folder re-judges a finished run."""
    return sorted(set(seed_directories(run_dir)) - set(declared))


def collect_evidence(run_dir: str | Path, cfg: RunConfig, data_dir: str | Path | None = None) -> Evidence:
    """Read every file the checks use. ``data_dir`` defaults to ``<results>/data/<cfg.data.name>`` beside the run."""
    run_dir = Path(run_dir)
    data = Path(data_dir) if data_dir is not None else run_dir.parent / "data" / cfg.data.name
    seed_dirs = seed_directories(run_dir)
    seeds = {
        seed: {key: _read_object(run_dir / f"seed{seed}" / rel) for key, rel in SEED_FILES.items()}
        for seed in cfg.seeds
    }
    manifest_path = data / "shards" / "manifest.json"
    # a Hub export has no pgolf manifest (its shards are checked by verify alone): absent is None, not an error
    manifest = _read_object(manifest_path) if manifest_path.exists() else None
    return Evidence(run_dir, cfg, seed_dirs, seeds, manifest, manifest_path, _read_object(data / "verified.json"))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _dig(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _on_record_hardware(world_size: Any, environment: Any) -> bool:
    """8 processes on H100 SXM GPUs (the hardware the 600 s budgets are stated for)."""
    gpu = environment.get("gpu") if isinstance(environment, dict) else None
    return world_size == RECORD_GPU_COUNT and is_record_gpu(gpu)


def _hardware_words(world_size: Any, environment: Any) -> str:
    gpu = environment.get("gpu") if isinstance(environment, dict) else None
    return f"{world_size if world_size is not None else '?'} x {gpu or 'CPU'}"


# --------------------------------------------------------------------------------------------------------------
# The rules. Each takes the evidence and returns one Verdict.
# --------------------------------------------------------------------------------------------------------------


def check_mode(ev: Evidence) -> Verdict:
    title = "record mode (not a labelled sweep)"
    if ev.cfg.mode != "record":
        return Verdict("mode", title, FAIL, f"recipe mode is {ev.cfg.mode!r}: a labelled non-record experiment")
    problems = [f"seed{s}: eval.json mode {e.get('mode')!r}" for s, e in ev.files("eval").items()
                if isinstance(e, dict) and e.get("mode") != "record"]
    if problems:
        return Verdict("mode", title, FAIL, "; ".join(problems))
    return Verdict("mode", title, PASS, "recipe and every seed's evaluation ran in mode 'record'")


def check_seeds(ev: Evidence) -> Verdict:
    title = "seeds declared before launch"
    declared = list(ev.cfg.seeds)
    found = sorted(ev.seed_dirs)
    problems = []
    missing = [s for s in declared if s not in ev.seed_dirs]
    extra = [s for s in found if s not in declared]
    if missing:
        problems.append(f"declared but absent: {missing}")
    if extra:
        problems.append(f"results for undeclared seeds {extra} (a seed chosen after seeing results?)")
    for seed, files in ev.seeds.items():
        for key in ("summary", "eval", "hessians"):
            data = files[key]
            if isinstance(data, dict) and "seed" in data and data["seed"] != seed:
                problems.append(f"seed{seed}/{SEED_FILES[key]} records seed {data['seed']!r}")
    if problems:
        return Verdict("seeds", title, FAIL, "; ".join(problems))
    return Verdict("seeds", title, PASS, f"recipe seeds {declared} == seeds with results {found}")


BUDGET_READING_TITLES = {
    "strict": f"training + Hessians <= {TRAIN_BUDGET_SECONDS:.0f} s on 8xH100",
    "record": f"training loop <= {TRAIN_BUDGET_SECONDS:.0f} s on 8xH100 (reading 'record': the Hessians run after "
              "the loop, uncounted, as in PR #1855's run; the strict sum is reported too)",
}


def _budget_reading(summary: dict, ckpt: Any) -> str:
    """The reading a seed's run declared (train_summary.json, else its checkpoint's train_config); runs from before
    the option used pgolf's strict reading."""
    reading = summary.get("budget_reading")
    if reading is None and isinstance(ckpt, dict):
        reading = _dig(ckpt, "train_config.budget_reading")
    return reading if isinstance(reading, str) else "strict"


def check_train_time(ev: Evidence) -> Verdict:
    figures, failures, missing, elsewhere = [], [], [], []
    readings: set[str] = set()
    for seed, files in ev.seeds.items():
        summary, hess, ckpt = files["summary"], files["hessians"], files["checkpoint"]
        if not isinstance(summary, dict) or not isinstance(hess, dict):
            missing.append(summary if not isinstance(summary, dict) else hess)
            continue
        train_s, hess_s = _number(summary.get("train_seconds")), _number(hess.get("hessian_seconds"))
        if train_s is None or hess_s is None:
            missing.append(f"seed{seed}: train_seconds={summary.get('train_seconds')!r}, "
                           f"hessian_seconds={hess.get('hessian_seconds')!r}")
            continue
        reading = _budget_reading(summary, ckpt)
        if reading not in BUDGET_READING_TITLES:
            missing.append(f"seed{seed}: unknown budget_reading {reading!r} (expected strict or record)")
            continue
        readings.add(reading)
        env = summary.get("environment") or (ckpt.get("environment") if isinstance(ckpt, dict) else None)
        total = train_s + hess_s
        strict = f"{train_s:.1f}+{hess_s:.1f}={total:.1f} s"
        if reading == "strict":
            figure, counted = f"seed{seed} {strict}", total
        else:
            over = f", over by {total - TRAIN_BUDGET_SECONDS:.1f} s" if total > TRAIN_BUDGET_SECONDS else ""
            figure, counted = f"seed{seed} loop {train_s:.1f} s (strict reading {strict}{over})", train_s
        if summary.get("warmup_restore") == "record":  # the record's practice, stated: not timed, not thrown away
            figure += " [Muon momentum of the untimed warm-up steps on training data kept: train.warmup_restore record]"
        if _on_record_hardware(summary.get("world_size"), env):
            figures.append(figure)
            if counted > TRAIN_BUDGET_SECONDS:
                failures.append(f"{figure} (over by {counted - TRAIN_BUDGET_SECONDS:.1f} s)")
        else:
            elsewhere.append(f"{figure} on {_hardware_words(summary.get('world_size'), env)}")
    if len(readings) == 1:
        title = BUDGET_READING_TITLES[readings.pop()]
    elif readings:
        title = f"training budget <= {TRAIN_BUDGET_SECONDS:.0f} s on 8xH100 (seeds declare different readings: " \
                f"{', '.join(sorted(readings))})"
    else:
        title = BUDGET_READING_TITLES["strict"]
    return _budget_verdict("train_time", title, figures, failures, missing, elsewhere)


def _budget_verdict(
    rule: str, title: str, figures: list, failures: list, missing: list, elsewhere: list
) -> Verdict:
    """A time-budget rule's verdict: FAIL on missing evidence or an overrun, NOT-APPLICABLE when no seed ran on the
    record hardware (the figures are still given), else PASS with every figure."""
    if missing or failures:
        return Verdict(rule, title, FAIL, "; ".join(missing + failures))
    if elsewhere and not figures:
        return Verdict(rule, title, NOT_APPLICABLE, "not on record hardware: " + "; ".join(elsewhere))
    return Verdict(rule, title, PASS, "; ".join(figures + [f"(elsewhere: {e})" for e in elsewhere]))


def check_eval_time(ev: Evidence) -> Verdict:
    title = f"evaluation (load + warm-up + scoring) <= {EVAL_BUDGET_SECONDS:.0f} s on 8xH100"
    figures, failures, missing, elsewhere = [], [], [], []
    for seed, files in ev.seeds.items():
        result, ckpt = files["eval"], files["checkpoint"]
        if not isinstance(result, dict):
            missing.append(result)
            continue
        parts = {k: _number(_dig(result, f"timings.{k}")) for k in ("load_s", "warmup_s", "score_s", "total_s")}
        if any(v is None for v in parts.values()):
            missing.append(f"seed{seed}/eval/eval.json: timings {parts}")
            continue
        total = parts["load_s"] + parts["warmup_s"] + parts["score_s"]
        if abs(total - parts["total_s"]) > 1e-3 * max(1.0, total):
            missing.append(f"seed{seed}: timings.total_s {parts['total_s']:.1f} != load+warmup+score {total:.1f}")
            continue
        env = (result.get("environment") or _dig(files, "summary.environment")
               or (ckpt.get("environment") if isinstance(ckpt, dict) else None))
        figure = (f"seed{seed} {parts['load_s']:.1f}+{parts['warmup_s']:.1f}+{parts['score_s']:.1f}"
                  f"={total:.1f} s")
        if _on_record_hardware(result.get("world_size", _dig(files, "summary.world_size")), env):
            figures.append(figure)
            if total > EVAL_BUDGET_SECONDS:
                failures.append(f"{figure} (over by {total - EVAL_BUDGET_SECONDS:.1f} s)")
        else:
            elsewhere.append(f"{figure} on {_hardware_words(result.get('world_size'), env)}")
    return _budget_verdict("eval_time", title, figures, failures, missing, elsewhere)


def _size_gate(files: dict[str, Any]) -> Any:
    """The gate report; else a pack report that counted the code itself (pgolf.artifact.record_run); else why neither.

    In the staged DAG the pack report gates the model alone (``code_file`` null): it is no evidence for the cap."""
    gate, pack = files["gate"], files["pack"]
    if isinstance(gate, dict):
        return gate
    if isinstance(pack, dict) and pack.get("code_file"):
        return pack
    return f"{gate} (and the pack report did not count the code)"


def check_size(ev: Evidence) -> Verdict:
    title = f"artifact (compressed model + counted code) <= {SIZE_CAP_BYTES:,} bytes"
    figures, problems = [], []
    for seed, files in ev.seeds.items():
        gate = _size_gate(files)
        if not isinstance(gate, dict):
            problems.append(gate)
            continue
        model_b, code_b, total_b = gate.get("model_bytes"), gate.get("code_bytes"), gate.get("total_bytes")
        cap, convention = gate.get("cap"), gate.get("code_bytes_convention")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (model_b, code_b, total_b, cap)):
            problems.append(f"seed{seed}: the size gate's model/code/total bytes and cap must be integers")
            continue
        if convention not in CONVENTION_TEXTS:
            problems.append(f"seed{seed}: code-bytes convention {convention!r} is not one of {sorted(CONVENTION_TEXTS)}")
            continue
        if total_b != model_b + code_b:
            problems.append(f"seed{seed}: total_bytes {total_b:,} != model {model_b:,} + code {code_b:,}")
        if cap > SIZE_CAP_BYTES:  # a tighter cap (record mode allows one) is within the rules
            problems.append(f"seed{seed}: gate cap {cap:,} is looser than the rules' {SIZE_CAP_BYTES:,}")
        if total_b > SIZE_CAP_BYTES:
            problems.append(f"seed{seed}: {total_b:,} bytes, over by {total_b - SIZE_CAP_BYTES:,}")
        scored = files["eval"]  # the size must be the scored artifact's (pgolf evaluate --allow-hash-mismatch)
        if isinstance(scored, dict) and (scored.get("artifact_sha256") != gate.get("artifact_sha256")
                                         or _dig(scored, "artifact.hash_check.hash_ok") is False):
            problems.append(f"seed{seed}: the scored artifact ({str(scored.get('artifact_sha256'))[:16]}...) is not "
                            f"the one gated ({str(gate.get('artifact_sha256'))[:16]}...)")
        figures.append(f"seed{seed} {total_b:,} (code {code_b:,}, '{convention}')")
    if problems:
        return Verdict("size", title, FAIL, "; ".join(str(p) for p in problems))
    conventions = sorted({_size_gate(f)["code_bytes_convention"] for f in ev.seeds.values()})
    named = "; ".join(f"'{c}' = {CONVENTION_TEXTS[c]}" for c in conventions)
    return Verdict("size", title, PASS, f"{'; '.join(figures)}; convention {named}")


def _verified_check(verified: Any, name: str) -> dict | None:
    if not isinstance(verified, dict):
        return None
    for check in verified.get("checks") or []:
        if isinstance(check, dict) and check.get("name") == name:
            return check
    return None


def _same_dir(a: Path, b: Path) -> bool:
    """Same directory; relative paths (Snakemake's, relative to the repository) compare by their last two parts
    (results/data/<name>/shards), since comply may run from another working directory."""
    if a.is_absolute() and b.is_absolute():
        return a.resolve() == b.resolve()
    return a.parts[-2:] == b.parts[-2:]


def check_val_docs(ev: Evidence) -> Verdict:
    title = f"validation = the first {OFFICIAL_VAL_DOCS:,} documents, all scored"
    if not isinstance(ev.verified, dict):
        return Verdict("val_docs", title, FAIL, str(ev.verified))
    problems = []
    verified_docs = _dig(ev.verified, "summary.val_docs")
    if verified_docs != OFFICIAL_VAL_DOCS:
        problems.append(f"verified.json: {verified_docs!r} validation docs, expected {OFFICIAL_VAL_DOCS:,}")
    if isinstance(ev.manifest, dict) and _dig(ev.manifest, "docs.val") != verified_docs:
        problems.append(f"{ev.manifest_path}: docs.val {_dig(ev.manifest, 'docs.val')!r} != verified {verified_docs!r}")
    for seed, result in ev.files("eval").items():
        if not isinstance(result, dict):
            problems.append(result)
            continue
        max_docs = _dig(result, "evaluate_config.max_docs") or _dig(result, "data.max_docs")
        if max_docs:
            problems.append(f"seed{seed}: evaluation scored only the first {max_docs} documents (max_docs)")
        evaluated = _dig(result, "data.data_dir")
        if isinstance(evaluated, str) and not _same_dir(Path(evaluated), ev.manifest_path.parent):
            problems.append(f"seed{seed}: evaluated {evaluated}, not the verified {ev.manifest_path.parent}")
    if problems:
        return Verdict("val_docs", title, FAIL, "; ".join(str(p) for p in problems))
    return Verdict("val_docs", title, PASS, f"verified.json: {verified_docs:,} validation docs; every seed scored all")


def check_disjoint(ev: Evidence) -> Verdict:
    title = "no validation document in the training data"
    problems = []
    if isinstance(ev.manifest, str):
        problems.append(ev.manifest)
    elif isinstance(ev.manifest, dict):
        overlap = _dig(ev.manifest, "fingerprints.train_val_overlap_docs")
        if overlap != 0:
            problems.append(f"{ev.manifest_path}: fingerprints.train_val_overlap_docs = {overlap!r}, expected 0")
    check = _verified_check(ev.verified, "train/val disjoint")
    if check is None:
        problems.append("verified.json: no 'train/val disjoint' check" if isinstance(ev.verified, dict) else str(ev.verified))
    elif not check.get("ok"):
        problems.append(f"verified.json: train/val disjoint failed: {check.get('detail')}")
    manifest_sha = sha256_file(ev.manifest_path) if isinstance(ev.manifest, dict) else None
    for seed, ckpt in ev.files("checkpoint").items():
        recorded = ckpt.get("data_manifest_sha256") if isinstance(ckpt, dict) else None
        if recorded is not None and recorded != manifest_sha:
            problems.append(f"seed{seed}: trained on data whose manifest sha256 {recorded[:12]}... is not that of "
                            f"{ev.manifest_path} ({(manifest_sha or 'absent')[:12]}), so this check does not cover it")
    # an export may keep a few exact duplicates of its published split (accepted by the gate up to
    # data.max_val_overlap_fraction); prepared data holds none but says how many training copies it dropped
    overlap = _dig(ev.verified, "summary.train_val_overlap_docs") or 0
    if not isinstance(overlap, int) or overlap > MAX_VAL_OVERLAP_DOCS:
        problems.append(f"verified.json: {overlap!r} validation documents have a copy in training, more than the "
                        f"{MAX_VAL_OVERLAP_DOCS} a published split may keep (a wrong split, issue #2127)")
    if problems:
        return Verdict("disjoint", title, FAIL, "; ".join(str(p) for p in problems))
    source = "manifest fingerprints + verified.json" if ev.manifest is not None else "verified.json (no pgolf manifest)"
    dropped = _dig(ev.manifest, "val_duplicates.train_docs_dropped") if isinstance(ev.manifest, dict) else None
    evidence = f"overlap {overlap} docs ({source})"
    if overlap:
        evidence += ", accepted as published"
    if dropped:
        evidence += f"; {dropped} training copies of validation documents dropped at preparation"
    return Verdict("disjoint", title, PASS, f"{evidence}: {check.get('detail')}")


def check_bos(ev: Evidence) -> Verdict:
    title = "every document starts with BOS (id 1)"
    check = _verified_check(ev.verified, "BOS per document")
    if check is None:
        return Verdict("bos", title, FAIL, "verified.json: no 'BOS per document' check" if isinstance(ev.verified, dict)
                       else str(ev.verified))
    problems = [] if check.get("ok") else [f"verified.json: {check.get('detail')}"]
    if isinstance(ev.manifest, dict):
        for split in ("train", "val"):
            bos, docs = _dig(ev.manifest, f"bos.{split}"), _dig(ev.manifest, f"docs.{split}")
            if bos != docs:
                problems.append(f"{ev.manifest_path}: {split} has {bos!r} BOS tokens for {docs!r} documents")
    if problems:
        return Verdict("bos", title, FAIL, "; ".join(problems))
    return Verdict("bos", title, PASS, f"verified.json: {check.get('detail')}")


def check_doc_isolation(ev: Evidence) -> Verdict:
    """The scored model's own configuration (eval.json's ``model_config``, read from the artifact's header): a
    SmearGate without its BOS mask mixes the last token of one document into the next one's first prediction
    (the #1797 audit; fixed in #1851)."""
    title = "no token mixing across documents at evaluation (SmearGate masked at BOS)"
    defaults, problems, figures = ModelConfig(), [], []
    for seed, result in ev.files("eval").items():
        model = result.get("model_config") if isinstance(result, dict) else None
        if not isinstance(model, dict):
            problems.append(result if not isinstance(result, dict) else f"seed{seed}/eval/eval.json: no model_config")
            continue
        smear = model.get("smear_gate", defaults.smear_gate)
        masked = model.get("smear_bos_mask", defaults.smear_bos_mask)
        if smear and not masked:
            problems.append(f"seed{seed}: the scored model's SmearGate has smear_bos_mask false (leaks across documents)")
        figures.append(f"seed{seed} SmearGate {'masked at BOS' if smear else 'off'}")
    if problems:
        return Verdict("doc_isolation", title, FAIL, "; ".join(str(p) for p in problems))
    return Verdict("doc_isolation", title, PASS, "; ".join(figures))


def check_ttt_ledger(ev: Evidence) -> Verdict:
    title = "TTT ledger: every target scored exactly once, no update before its score (C3/C4)"
    problems, figures = [], []
    for seed, result in ev.files("eval").items():
        if not isinstance(result, dict):
            problems.append(result)
            continue
        ledger = result.get("ledger")
        if not isinstance(ledger, dict):
            problems.append(f"seed{seed}/eval/eval.json: no ledger summary")
            continue
        if _dig(result, "evaluate_config.ttt.debug_update_before_score"):
            problems.append(f"seed{seed}: evaluate.ttt.debug_update_before_score is on (update before score)")
        if not (ledger.get("complete") is True and ledger.get("complete_checked") is True):
            problems.append(f"seed{seed}: ledger complete={ledger.get('complete')!r}, "
                            f"complete_checked={ledger.get('complete_checked')!r}")
        expected, scored = ledger.get("targets_expected"), result.get("token_count")
        if expected != scored:
            problems.append(f"seed{seed}: {scored!r} targets scored, ledger expected {expected!r}")
        # the run's totals (every rank's ledger; older eval.json files hold rank 0's alone)
        counts = ledger.get("all_ranks") if isinstance(ledger.get("all_ranks"), dict) else ledger
        positions = ledger.get("positions")
        used = ledger.get("positions_used_by_updates")
        if isinstance(used, int) and isinstance(positions, int) and used > positions:
            problems.append(f"seed{seed}: updates used {used} positions of {positions}")
        mode = _dig(result, "evaluate_config.ttt.mode") or result.get("ttt_mode")
        if mode == "none" and counts.get("updates"):
            problems.append(f"seed{seed}: ttt mode 'none' but the ledger records {counts.get('updates')} updates")
        figures.append(f"seed{seed} {expected:,} targets once, {counts.get('updates', 0):,} updates ({mode})"
                       if isinstance(expected, int) else f"seed{seed}")
    if problems:
        return Verdict("ttt_ledger", title, FAIL, "; ".join(str(p) for p in problems))
    return Verdict("ttt_ledger", title, PASS, "; ".join(figures))


def check_no_prequant_ttt(ev: Evidence) -> Verdict:
    title = "no training on validation tokens before scoring (pre-quant TTT; C3/C4)"
    problems = []
    epochs = getattr(ev.cfg.train, "prequant_ttt_epochs", 0)
    if epochs:
        problems.append(f"recipe: train.prequant_ttt_epochs = {epochs} (AdamW on validation tokens before GPTQ)")
    for seed, ckpt in ev.files("checkpoint").items():
        if not isinstance(ckpt, dict):
            problems.append(ckpt)
            continue
        tokens = ckpt.get("prequant_ttt_val_tokens", 0)
        if tokens:
            problems.append(f"seed{seed}/train/checkpoint/checkpoint.json: prequant_ttt_val_tokens = {tokens!r}")
        seed_epochs = _dig(ckpt, "train_config.prequant_ttt_epochs")
        if seed_epochs:
            problems.append(f"seed{seed}: checkpoint train_config.prequant_ttt_epochs = {seed_epochs!r}")
    if problems:
        return Verdict("no_prequant_ttt", title, FAIL, "; ".join(str(p) for p in problems))
    return Verdict("no_prequant_ttt", title, PASS,
                   "no checkpoint records validation tokens seen in training (prequant_ttt_val_tokens absent or 0)")


CHECKS: tuple[Callable[[Evidence], Verdict], ...] = (
    check_mode, check_seeds, check_train_time, check_eval_time, check_size, check_val_docs, check_disjoint,
    check_bos, check_doc_isolation, check_ttt_ledger, check_no_prequant_ttt,
)


# --------------------------------------------------------------------------------------------------------------
# Whole run
# --------------------------------------------------------------------------------------------------------------


def check_run(run_dir: str | Path, cfg: RunConfig, data_dir: str | Path | None = None) -> list[Verdict]:
    """Every rule on one run; a check that crashes on odd evidence becomes a FAIL naming the exception."""
    ev = collect_evidence(run_dir, cfg, data_dir)
    verdicts = []
    for check in CHECKS:
        try:
            verdicts.append(check(ev))
        except (KeyError, TypeError, ValueError, AttributeError, OSError) as exc:
            rule = check.__name__.removeprefix("check_")
            verdicts.append(Verdict(rule, rule, FAIL, f"evidence could not be read: {type(exc).__name__}: {exc}"))
    return verdicts


def is_compliant(verdicts: list[Verdict]) -> bool:
    return all(v.status != FAIL for v in verdicts)


def comply_report(run_dir: str | Path, cfg: RunConfig, verdicts: list[Verdict]) -> dict:
    counts = {s: sum(v.status == s for v in verdicts) for s in (PASS, FAIL, NOT_APPLICABLE)}
    return {
        "run": cfg.run,
        "run_dir": str(run_dir),
        "mode": cfg.mode,
        "seeds": list(cfg.seeds),
        "compliant": is_compliant(verdicts),
        "counts": counts,
        "failed_rules": [v.rule for v in verdicts if v.status == FAIL],
        "verdicts": [dataclasses.asdict(v) for v in verdicts],
    }


def run_comply(run_dir, cfg: RunConfig, data_dir=None, json_out=None, gate: Optional[bool] = None) -> int:
    """Check a run, print one line per rule and the outcome, write the verdicts to ``json_out``; the exit status.

    ``gate`` (default: record mode) makes a FAIL the status 1 and writes no ``json_out``, so that the pipeline
    packages no submission for a non-compliant record run; without it the verdicts are written and the status is 0
    (sweeps report, they gate nothing).
    """
    from pgolf.io import atomic_write_json

    gate = cfg.mode == "record" if gate is None else gate
    if not Path(run_dir).is_dir():  # a mistyped folder: one line, not a FAIL for every rule
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    verdicts = check_run(run_dir, cfg, data_dir)
    report = comply_report(run_dir, cfg, verdicts)
    for verdict in verdicts:
        print(verdict.line())
    outcome = "COMPLIANT" if report["compliant"] else "NOT COMPLIANT: " + ", ".join(report["failed_rules"])
    print(f"{cfg.run}: {outcome}")
    if gate and not report["compliant"]:
        return 1
    if json_out:
        atomic_write_json(json_out, report)
    return 0
