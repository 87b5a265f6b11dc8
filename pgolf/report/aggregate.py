"""The aggregate stage: pool a run's seeds, test the improvement against the leaderboard, write the reports.

    pgolf report --run-dir results/<run> --aggregate-json JSON --seeds 42 0 1234 \\
        [--mode record|sweep] [--out-dir results/<run>] [--code-dir results/<run>/code] [--recipe config.yaml]

writes, under ``--out-dir`` (default: the run directory):

    aggregate.json     every statistic, the test, the verdict and its reasons, provenance, missing seeds
    seeds.csv          the per-seed table
    report.html        self-contained figures (loss curves, bpb per seed, time and byte budgets)
    submission.json    the record folder's submission file (validated against its schema)
    records/track_10min_16mb/<date>_<name>/   the submission folder (skipped with --no-folder)

Statistics: mean, SAMPLE std (ddof=1) and population std (ddof=0), each labelled; a 95 % t interval of the
mean; a one-sided Welch t-test of "candidate mean < baseline mean" (see pgolf.report.stats). The unit is nats per
token unless the aggregate section says bpb; both are shown. Seeds whose code hash, data fingerprint or configs
differ are refused unless ``allow_mixed_provenance``; missing seeds are listed and make the verdict non-record.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

from pgolf.config import AggregateConfig
from pgolf.io import atomic_write_json, atomic_write_text, read_json, sha256_json
from pgolf.report.results import (
    RECORD_GPU,
    RECORD_WORLD_SIZE,
    MissingSeed,
    ResultsError,
    SeedResult,
    load_seeds,
)
from pgolf.report.stats import mean, mean_confidence_interval, std, welch_one_sided
from pgolf.report.submission import SIZE_CAP_BYTES
from pgolf.report.summary import README_NULL_WORDS, p_text

STD_KIND = "sample (ddof=1)"
TRAIN_BUDGET_SECONDS = 600.0  # training loop + Hessians (every read of training data counts)
EVAL_BUDGET_SECONDS = 600.0  # deserialization + warm-up + scoring
UNIT_LABELS = {"nats_per_token": "nats per token", "bpb": "bits per byte"}
PROVENANCE_FIELDS = {
    "code_hash": "pgolf code hash at training",
    "eval_code_hash": "pgolf code hash at evaluation",
    "data_manifest_sha256": "data manifest sha256",
    "config_sha256": "stage configs sha256",
    "validation_counts": "validation target tokens / bytes",
}


class MixedProvenanceError(ValueError):
    """Seeds produced by different code, data or configs would be pooled."""


# --------------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict:
    """n, mean, sample std (ddof=1), population std (ddof=0) and the 95 % t interval of the mean."""
    interval = mean_confidence_interval(values, 0.95)
    return {
        "n": len(values),
        "mean": mean(values),
        "std_sample_ddof1": std(values, ddof=1),
        "std_population_ddof0": std(values, ddof=0),
        "ci95": list(interval) if interval else None,
    }


def provenance_differences(seeds: Sequence[SeedResult]) -> list[dict]:
    """Fields whose value differs between seeds, each with the seeds behind every value."""
    differences = []
    for field, label in PROVENANCE_FIELDS.items():
        groups: dict[str, list[int]] = {}
        for s in seeds:
            value = f"{s.token_count}/{s.byte_sum}" if field == "validation_counts" else getattr(s, field)
            groups.setdefault(str(value), []).append(s.seed)
        if len(groups) > 1:
            differences.append({"field": field, "label": label, "values": groups})
    return differences


def check_provenance(seeds: Sequence[SeedResult], allow_mixed: bool) -> list[dict]:
    """Refuse to pool seeds of different provenance unless allowed; return the differences either way."""
    differences = provenance_differences(seeds)
    if differences and not allow_mixed:
        lines = []
        for d in differences:
            parts = "; ".join(f"{value[:16]}: seeds {seeds_}" for value, seeds_ in d["values"].items())
            lines.append(f"{d['label']} differs ({parts})")
        raise MixedProvenanceError(
            "refusing to pool seeds of different provenance: "
            + " | ".join(lines)
            + " (set aggregate.allow_mixed_provenance: true to pool them anyway; the report then lists them)"
        )
    return differences


def baseline_summary(cfg: AggregateConfig, nats_per_bpb: float) -> Optional[dict]:
    """The configured baseline in both units: mean, sample std (None = unknown), n, per-seed values."""
    if not cfg.has_baseline:
        return None
    to_nats = nats_per_bpb if cfg.baseline_unit == "bpb" else 1.0
    if cfg.baseline_seed_values:
        values = list(cfg.baseline_seed_values)
        base_mean, base_std, base_n = mean(values), std(values, ddof=1), len(values)
    else:
        values = []
        base_mean, base_std, base_n = cfg.baseline_mean, cfg.baseline_std, cfg.baseline_n
        if base_std is not None and cfg.baseline_std_ddof == 0:  # a published population std -> the sample std
            base_std *= math.sqrt(base_n / (base_n - 1))

    def in_unit(factor: float) -> dict:  # factor: given unit -> wanted unit
        return {
            "mean": base_mean * factor,
            "std_sample_ddof1": None if base_std is None else base_std * factor,
            "values": [v * factor for v in values],
        }

    nats = in_unit(to_nats)
    bpb = in_unit(to_nats / nats_per_bpb)
    return {
        "name": cfg.baseline_name,
        "given_unit": cfg.baseline_unit,
        "n": base_n,
        "std_known": base_std is not None,
        "nats_per_token": nats,
        "bpb": bpb,
    }


def significance(
    cand_nats: Sequence[float], cand_bpb: Sequence[float], baseline: Optional[dict], cfg: AggregateConfig,
    nats_per_bpb: float,
) -> dict:
    """One-sided Welch test in ``cfg.unit`` plus the README and progression rules.

    The test runs on the values in the reporting unit; since bpb and nats per token differ by one positive
    factor, t and p are the same in both units (the improvement is given in both). ``delta_bpb`` is the seeds'
    mean val_bpb minus the baseline's, the headline's own difference: with pooled seeds of different bytes per
    token (mixed provenance) the nats delta divided by the mean factor is not.
    """
    scale = 1.0 if cfg.unit == "nats_per_token" else 1.0 / nats_per_bpb  # nats -> reporting unit
    threshold_unit = cfg.readme_threshold_nats * scale
    out: dict[str, Any] = {
        "unit": cfg.unit,
        "nats_per_bpb": nats_per_bpb,
        "unit_label": UNIT_LABELS[cfg.unit],
        "one_sided": True,
        "hypothesis": "candidate mean < baseline mean (lower loss is better)",
        "readme_threshold_nats_per_token": cfg.readme_threshold_nats,
        "readme_threshold_in_unit": threshold_unit,
        "readme_p": cfg.readme_p,
        "readme_null": cfg.readme_null,
        "progression_p": cfg.progression_p,
        "delta_sign": "candidate - baseline (negative is better)",
        "tested": False,
        "readme_pass": False,
        "progression_pass": False,
    }
    if baseline is None:
        out["note"] = "no baseline configured: no test"
        return out
    base_nats = baseline["nats_per_token"]
    # what a reader needs to recompute the test (pgolf check-folder does): the baseline as tested, in nats per token
    out["baseline_nats_per_token"] = {"mean": base_nats["mean"], "std_sample_ddof1": base_nats["std_sample_ddof1"],
                                      "n": baseline["n"]}
    cand_mean_nats = mean(cand_nats)
    out["delta_nats_per_token"] = cand_mean_nats - base_nats["mean"]
    out["delta_bpb"] = mean(cand_bpb) - base_nats["mean"] / nats_per_bpb
    if len(cand_nats) < 2:
        out["note"] = "fewer than 2 candidate seeds: no sample std, no test"
        return out
    cand_std = std(cand_nats, ddof=1)
    base_std = base_nats["std_sample_ddof1"]

    def test(shift_nats: float):  # H1: the candidate beats the baseline by more than shift_nats
        return welch_one_sided((cand_mean_nats + shift_nats) * scale, cand_std * scale, len(cand_nats),
                               base_nats["mean"] * scale, None if base_std is None else base_std * scale, baseline["n"])

    result, against_threshold = test(0.0), test(cfg.readme_threshold_nats)
    improvement_nats = result.improvement / scale
    readme_p_value = result.p_value if cfg.readme_null == "zero" else against_threshold.p_value
    out.update(
        tested=True,
        test=result.kind,
        df=result.df,
        p_value=result.p_value,
        p_value_vs_threshold=against_threshold.p_value,  # H0: improvement <= the README threshold
        standard_error_in_unit=result.standard_error,
        improvement_in_unit=result.improvement,
        improvement_nats_per_token=improvement_nats,
        improvement_bpb=improvement_nats / nats_per_bpb,
        readme_pass=bool(improvement_nats >= cfg.readme_threshold_nats and readme_p_value < cfg.readme_p),
        progression_pass=bool(result.p_value < cfg.progression_p),
    )
    notes = []
    if math.isfinite(result.t):
        out["t"] = result.t
    else:  # JSON has no infinity: t is left out and the p-value (0 or 1) stands
        notes.append("standard error 0 (the seeds, and the baseline if its std is known, have no spread): t is "
                     "infinite and left out; the p-value follows the sign of the improvement")
    if result.kind == "one_sample":
        notes.append(
            "baseline std unknown: one-sample t-test against the baseline mean (the baseline is treated as exact, "
            "which is optimistic if it was noisy)"
        )
    if notes:
        out["note"] = "; ".join(notes)
    return out


def hardware_string(env: dict) -> str:
    gpu = env.get("gpu")
    count = env.get("gpu_count") or 0
    return f"{count}x{gpu}" if gpu else "CPU"


def seed_list(seeds: Sequence[int]) -> str:
    """``seed 1`` / ``seeds 1, 2, 3``."""
    return f"seed{'s' if len(seeds) != 1 else ''} {', '.join(str(s) for s in seeds)}"


def record_blockers(
    seeds: Sequence[SeedResult],
    missing: Sequence[MissingSeed],
    mode: str,
    differences: list[dict],
    baseline: Optional[dict],
) -> list[str]:
    """Every reason the run cannot be a record, whatever its statistics say; a reason several seeds share is one
    line naming them (``evaluated in mode 'sweep' (seeds 1, 2, 3)``). Time budgets are judged only on the record
    hardware (pgolf.report.results.record_hardware): elsewhere the hardware itself is the reason."""
    reasons = []
    if mode != "record":
        reasons.append(f"mode is '{mode}': a labelled non-record experiment")
    if missing:
        reasons.append("missing seeds: " + ", ".join(str(m.seed) for m in missing))
    if len(seeds) < 2:
        reasons.append(f"{len(seeds)} seed(s): a significance test needs at least 2")
    elif len({s.val_loss for s in seeds}) == 1:  # no training on a GPU gives equal losses for different seeds
        reasons.append("every seed gave the same val_loss: the seeds did not vary the run, and a test whose "
                       "standard error is 0 proves nothing")
    if baseline is None:
        reasons.append("no baseline configured (aggregate.baseline_*)")
    if differences:
        reasons.append("mixed provenance (" + ", ".join(d["label"] for d in differences) + ")")
    shared: dict[str, list[int]] = {}  # reason -> the seeds it applies to, in order
    for s in seeds:
        # judged against the rules' cap, whatever cap the recipe gated against
        if s.total_bytes > min(s.cap_bytes, SIZE_CAP_BYTES):
            reasons.append(f"seed {s.seed}: artifact {s.total_bytes:,} bytes is over the "
                           f"{min(s.cap_bytes, SIZE_CAP_BYTES):,}-byte cap")
        if s.cap_bytes > SIZE_CAP_BYTES:  # a tighter cap (record mode allows one) is within the rules
            shared.setdefault(f"gated against a cap of {s.cap_bytes:,} bytes, looser than the rules' "
                              f"{SIZE_CAP_BYTES:,}", []).append(s.seed)
        if not s.code_counted:
            shared.setdefault("size without the code: no gate report, and the pack report counted no code file",
                              []).append(s.seed)
        if s.eval_mode is not None and s.eval_mode != "record":
            shared.setdefault(f"evaluated in mode '{s.eval_mode}'", []).append(s.seed)
        if not s.on_record_hardware:
            shared.setdefault(f"not the record-track {RECORD_WORLD_SIZE}x{RECORD_GPU}: trained on "
                              f"{s.hardware_words}", []).append(s.seed)
            continue
        if s.eval_budget_exceeded or s.eval_total_s > EVAL_BUDGET_SECONDS:  # the recipe's limit, then the rules'
            reasons.append(f"seed {s.seed}: evaluation took {s.eval_total_s:.1f} s, over its budget "
                           f"({EVAL_BUDGET_SECONDS:.0f} s in the rules)")
        # the reading the run declared, as comply judges it: strict counts the Hessians, record the loop alone
        strict = s.budget_reading != "record"
        train_total = s.train_seconds + ((s.hessian_seconds or 0.0) if strict else 0.0)
        if train_total > TRAIN_BUDGET_SECONDS:
            what = "training + Hessians" if strict else "the training loop (budget_reading record)"
            reasons.append(f"seed {s.seed}: {what} took {train_total:.1f} s > {TRAIN_BUDGET_SECONDS:.0f} s")
    reasons += [f"{reason} ({seed_list(seeds_)})" for reason, seeds_ in shared.items()]
    return reasons


def stage_summaries(seeds: Sequence[SeedResult]) -> dict:
    """val_bpb at the three stages of the score, and the deltas, each summarized over the seeds that have them:
    ``pre_quant`` (the trained weights), ``post_quant`` (the packed artifact, no TTT), ``ttt`` (the scored
    val_bpb), ``quant_delta`` = post - pre, ``ttt_delta`` = ttt - post. None where no seed has the figures."""

    def over(values: list[Optional[float]]) -> Optional[dict]:
        present = [v for v in values if v is not None]
        return summarize(present) if present else None

    # one set of seeds for every column, so that the chain pre -> post -> scored and its deltas add up: the seeds
    # with every stage (a seed evaluated without its checkpoint has no pre-quant figure), else all of them
    complete = [s for s in seeds if s.pre_quant_bpb is not None and s.post_quant_bpb is not None]
    seeds = complete or list(seeds)
    pre = [s.pre_quant_bpb for s in seeds]
    post = [s.post_quant_bpb for s in seeds]
    ttt = [s.val_bpb for s in seeds]
    return {
        "pre_quant": over(pre),
        "post_quant": over(post),
        "ttt": over(ttt),
        "quant_delta": over([None if a is None or b is None else b - a for a, b in zip(pre, post)]),
        "ttt_delta": over([None if b is None else t - b for b, t in zip(post, ttt)]),
        "ttt_modes": sorted({s.ttt_mode for s in seeds if s.ttt_mode}),
        "seeds": [s.seed for s in seeds],
    }


def scored_documents(seeds: Sequence[SeedResult]) -> dict:
    """Documents, target tokens and bytes scored per seed, and the validation documents there were."""
    scored = [s.docs_scored for s in seeds if s.docs_scored is not None]
    totals = [s.docs_total for s in seeds if s.docs_total is not None]
    return {
        "docs_scored": max(scored) if scored else None,
        "docs_scored_min": min(scored) if scored else None,
        "docs_total": max(totals) if totals else None,
        "tokens_scored": max(s.token_count for s in seeds),
        "bytes_scored": max(s.byte_sum for s in seeds),
        "all_docs": bool(scored and totals and min(scored) >= max(totals)),
    }


def verdict(blockers: list[str], sig: dict) -> dict:
    if blockers:
        return {"status": "non-record", "reasons": blockers}
    if sig["readme_pass"]:
        return {"status": "record", "reasons": [
            f"README rule met: improvement >= threshold with p < readme_p {README_NULL_WORDS[sig['readme_null']]}"]}
    if sig["progression_pass"]:
        return {
            "status": "progression",
            "reasons": [
                f"README rule not met, but the one-sided {sig['test']} t-test gives p = "
                f"{p_text(sig, 3)} < "
                f"{sig['progression_p']} (the maintainers' progression cutoff)"
            ],
        }
    return {"status": "non-record", "reasons": ["no significant improvement over the baseline"]}


def seed_table(seeds: Sequence[SeedResult]):
    """The per-seed table (pandas), one row per seed, units in the column names."""
    import pandas as pd

    rows = [
        {
            "seed": s.seed,
            "val_loss_nats_per_token": s.val_loss,
            "val_bpb": s.val_bpb,
            "steps": s.steps,
            "ms_per_step": s.ms_per_step,
            "artifact_bytes": s.total_bytes,
            "model_bytes": s.model_bytes,
            "code_bytes": s.code_bytes,
            "train_seconds": s.train_seconds,
            "hessian_seconds": s.hessian_seconds,
            "eval_seconds": s.eval_total_s,
            "eval_load_s": s.eval_load_s,
            "eval_warmup_s": s.eval_warmup_s,
            "eval_score_s": s.eval_score_s,
        }
        for s in seeds
    ]
    return pd.DataFrame(rows).set_index("seed")


def aggregate(
    seeds: Sequence[SeedResult],
    missing: Sequence[MissingSeed],
    cfg: AggregateConfig,
    mode: str,
    run_name: str,
    extra_blockers: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> dict:
    """Everything the reports need, as plain JSON. Raises MixedProvenanceError (unless allowed).

    ``extra_blockers``: further reasons the run cannot be a record (e.g. the size gate counted another code file);
    ``notes``: provenance facts the reports state.
    """
    if not seeds:
        listing = "; ".join(f"seed {m.seed}: {m.reason}" for m in missing)
        raise ResultsError(f"no seed has complete results ({listing})")
    differences = check_provenance(seeds, cfg.allow_mixed_provenance)
    factors = [s.nats_per_bpb for s in seeds]
    nats_per_bpb = mean(factors)
    baseline = baseline_summary(cfg, nats_per_bpb)
    sig = significance([s.val_loss for s in seeds], [s.val_bpb for s in seeds], baseline, cfg, nats_per_bpb)
    blockers = record_blockers(seeds, missing, mode, differences, baseline) + list(extra_blockers)
    first = seeds[0]
    on_record_hardware = all(s.on_record_hardware for s in seeds)
    return {
        "run": run_name,
        "mode": mode,
        "seeds": [s.seed for s in seeds],
        "missing_seeds": [{"seed": m.seed, "missing_files": list(m.missing_files), "reason": m.reason}
                          for m in missing],
        "std_kind": STD_KIND,
        "unit": cfg.unit,
        "nats_per_bpb": nats_per_bpb,
        "bytes_per_token": first.byte_sum / first.token_count,
        "val_loss_nats_per_token": summarize([s.val_loss for s in seeds]),
        "val_bpb": summarize([s.val_bpb for s in seeds]),
        "artifact_bytes": {
            "mean": mean([s.total_bytes for s in seeds]),
            "max": max(s.total_bytes for s in seeds),
            "cap": first.cap_bytes,
        },
        "steps_mean": mean([s.steps for s in seeds]),
        "ms_per_step_mean": mean([s.ms_per_step for s in seeds]),
        "eval_seconds_mean": mean([s.eval_total_s for s in seeds]),
        "baseline": baseline,
        "significance": sig,
        "verdict": verdict(blockers, sig),
        "provenance": {
            "code_hash": first.code_hash,
            "eval_code_hash": first.eval_code_hash,
            "data_manifest_sha256": first.data_manifest_sha256,
            "config_sha256": first.config_sha256,
            "code_bytes_convention": first.code_bytes_convention,
            "environment": first.environment,
            "hardware": hardware_string(first.environment),
            "mixed": differences,
            "notes": list(notes),
            "per_seed": {
                str(s.seed): {
                    "code_hash": s.code_hash,
                    "eval_code_hash": s.eval_code_hash,
                    "data_manifest_sha256": s.data_manifest_sha256,
                    "config_sha256": s.config_sha256,
                    "artifact_sha256": s.artifact_sha256,
                }
                for s in seeds
            },
        },
        "budgets": {"train_seconds": TRAIN_BUDGET_SECONDS, "eval_seconds": EVAL_BUDGET_SECONDS},
        "record_hardware": on_record_hardware,  # the budgets apply (every seed on 8xH100)
        "hardware_words": sorted({s.hardware_words for s in seeds}),
        "stages": stage_summaries(seeds),
        "scored": scored_documents(seeds),
        "aggregate_config_sha256": sha256_json(_config_dict(cfg)),
    }


def compliance_summary(comply: Any) -> dict:
    """comply.json's verdicts grouped by status (FAIL, PASS, NOT-APPLICABLE), each rule with title and evidence."""
    if not isinstance(comply, dict) or not isinstance(comply.get("verdicts"), list):
        raise ResultsError("comply.json: expected an object with a 'verdicts' list")
    groups: dict[str, list[dict]] = {}
    for v in comply["verdicts"]:
        groups.setdefault(str(v.get("status")), []).append(
            {"rule": v.get("rule"), "title": v.get("title"), "evidence": v.get("evidence")}
        )
    order = ["FAIL", "PASS", "NOT-APPLICABLE"]
    return {
        "compliant": comply.get("compliant"),
        "seeds": comply.get("seeds"),  # the seeds the verdicts were reached on
        "counts": {status: len(items) for status, items in groups.items()},
        "failed_rules": [r["rule"] for r in groups.get("FAIL", [])],
        "groups": [{"status": k, "rules": groups[k]} for k in sorted(groups, key=lambda k: (k not in order,
                   order.index(k) if k in order else 0, k))],
    }


def compliance_blockers(compliance: Optional[dict], seeds: Sequence[int]) -> list[str]:
    """A record needs the run's compliance verdicts, reached on the seeds this report takes (a subset would let
    a seed that compliance saw be left out after its score was known), and no failed rule among them."""
    if compliance is None:
        return ["no compliance verdicts (comply.json): `pgolf comply RUN_DIR --config RECIPE` checks the run"]
    checked = compliance.get("seeds")
    if not isinstance(checked, list) or sorted(map(str, checked)) != sorted(map(str, seeds)):
        return [f"comply.json checked the seeds {checked}, this report takes {sorted(seeds)}: report the seeds "
                "compliance checked, or run `pgolf comply RUN_DIR --config RECIPE` on these"]
    if compliance["failed_rules"] or compliance["compliant"] is not True:
        failed = ", ".join(str(r) for r in compliance["failed_rules"]) or "compliant is not true"
        return [f"compliance checks failed (comply.json): {failed}"]
    return []


def _config_dict(cfg: AggregateConfig) -> dict:
    from pgolf.config import to_dict

    return to_dict(cfg)


# --------------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------------


def run_report(
    run_dir: str | Path,
    cfg: AggregateConfig,
    seeds: list[int],
    *,
    mode: str = "record",
    out_dir: str | Path | None = None,
    code_dir: str | Path | None = None,
    recipe: Optional[str] = None,
    reproduce_command: Optional[str] = None,
    make_folder: bool = True,
    comply_path: str | Path | None = None,
) -> dict:
    """Aggregate, then write aggregate.json, seeds.csv, report.html, submission.json and the folder.

    ``comply_path``: the run's comply.json (pgolf.compliance.comply); its verdicts go into the report. A record
    verdict needs them, all passed, and the folder's code checked against the seeds (``make_folder``): a report
    without either (the ``partial`` rule, ``pgolf report --no-folder``) is never a record."""
    from pgolf.report import folder, submission
    from pgolf.report import html as report_html

    if mode not in ("record", "sweep"):
        raise ValueError(f"--mode: expected record or sweep, got {mode!r}")
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir
    present, missing = load_seeds(run_dir, seeds)
    bundle = None
    if make_folder and present:
        bundle = submission.read_code_bundle(Path(code_dir) if code_dir else run_dir / "code", present)
    compliance = None
    if comply_path is not None:
        compliance = compliance_summary(read_json(comply_path, "compliance verdicts"))
    blockers = list(bundle.blockers) if bundle else [
        "the code was not checked against the seeds' artifacts (no submission folder was made)"]
    blockers += compliance_blockers(compliance, seeds)
    agg = aggregate(present, missing, cfg, mode, run_dir.name, blockers, bundle.notes if bundle else ())
    if compliance is not None:
        agg["compliance"] = compliance
    table = seed_table(present)
    sub = submission.build_submission(agg, present, cfg, bundle)
    submission.raise_if_invalid(sub, "submission.json")
    if bundle is not None:
        folder_path = folder.write_folder(out_dir, agg, sub, present, bundle, reproduce_command, recipe)
        agg["submission_folder"] = str(folder_path)
    atomic_write_text(out_dir / "seeds.csv", table.to_csv(float_format="%.10g"))
    atomic_write_text(out_dir / "report.html", report_html.render(agg, present, table))
    atomic_write_json(out_dir / "submission.json", sub)
    atomic_write_json(out_dir / "aggregate.json", agg)
    return agg
