"""The text summary of an aggregate (the report stage's stdout and the folder README) and the submission date."""

from __future__ import annotations

import datetime
from typing import Optional


def submission_date(cfg) -> str:
    """The configured date, or today (a record folder is named by its date)."""
    return cfg.date or datetime.date.today().isoformat()


# --------------------------------------------------------------------------------------------------------------
# Text summary (stdout and the README)
# --------------------------------------------------------------------------------------------------------------


def _fmt(value: Optional[float], digits: int = 8) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def beside(value: float, thresholds: tuple[float, ...], digits: int) -> str:
    """``value`` with ``digits`` significant digits, or more where fewer would print it as one of ``thresholds``:
    a printed figure never seems to meet a rule its exact value misses (0.0049996 is not "0.005")."""
    for d in range(digits, 18):
        text = f"{value:.{d}g}"
        if all(value == t or float(text) != t for t in thresholds):
            return text
    return repr(value)


# aggregate.readme_null: which p the README rule reads
README_NULL_WORDS = {"zero": "against no improvement", "threshold": "against an improvement of the threshold"}


def p_text(sig: dict, digits: int) -> str:
    """The p-value beside the README's and the progression cutoffs."""
    return beside(sig["p_value"], (sig["readme_p"], sig["progression_p"]), digits)


def improvement_text(sig: dict, digits: int) -> str:
    """The improvement in nats per token beside the README's threshold."""
    return beside(sig["improvement_nats_per_token"], (sig["readme_threshold_nats_per_token"],), digits)


def t_text(sig: dict, spec: str) -> str:
    """The t statistic of a significance block, or ``inf`` where it was left out (standard error 0)."""
    if "t" in sig:
        return format(sig["t"], spec)
    return "inf" if sig["improvement_in_unit"] > 0 else "-inf"


def summary_text(agg: dict) -> str:
    loss, bpb, sig = agg["val_loss_nats_per_token"], agg["val_bpb"], agg["significance"]
    lines = [
        f"run {agg['run']} ({agg['mode']}): {loss['n']} seed(s) {agg['seeds']}",
        f"val_loss (nats/token): mean {_fmt(loss['mean'])}, sample std (ddof=1) {_fmt(loss['std_sample_ddof1'])}, "
        f"population std (ddof=0) {_fmt(loss['std_population_ddof0'])}",
        f"val_bpb: mean {_fmt(bpb['mean'])}, sample std (ddof=1) {_fmt(bpb['std_sample_ddof1'])}, "
        f"population std (ddof=0) {_fmt(bpb['std_population_ddof0'])}",
    ]
    if agg["missing_seeds"]:
        lines.append("MISSING seeds: " + ", ".join(str(m["seed"]) for m in agg["missing_seeds"]))
    if sig.get("tested"):
        lines.append(
            f"vs {agg['baseline']['name'] or 'baseline'}: improvement "
            f"{improvement_text(sig, 4)} nats/token "
            f"({sig['improvement_bpb']:.6f} bpb); one-sided {sig['test']} t = {t_text(sig, '.3f')}, df = {sig['df']:.2f}, "
            f"p = {p_text(sig, 3)} (unit: {sig['unit_label']})"
        )
        threshold = sig["readme_threshold_nats_per_token"]
        lines.append(f"  against an improvement of {threshold} nats/token (H0: improvement <= {threshold}): "
                     f"p = {beside(sig['p_value_vs_threshold'], (sig['readme_p'],), 3)}")
        lines.append(
            f"README rule (>= {threshold} nats/token, p < {sig['readme_p']} {README_NULL_WORDS[sig['readme_null']]}): "
            f"{'PASS' if sig['readme_pass'] else 'fail'}; progression cutoff (p < {sig['progression_p']}): "
            f"{'PASS' if sig['progression_pass'] else 'fail'}"
        )
    elif sig.get("note"):
        lines.append(sig["note"])
    v = agg["verdict"]
    lines.append(f"verdict: {v['status']}: " + "; ".join(v["reasons"]))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# The closing summary of a pipeline run (Snakefile onsuccess, `pgolf summary RUN_DIR`)
# --------------------------------------------------------------------------------------------------------------


def _load(path) -> Optional[dict]:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stage_chain(agg: dict) -> Optional[tuple[float, float, float, int]]:
    """Mean val_bpb pre-quant, post-quant and scored over the seeds with every stage, and their count; None when
    no seed has the pre- and post-quant figures (evaluated without diagnostics or its checkpoint). The closing
    summary and the HTML report's headline both state this chain."""
    stages = agg.get("stages") or {}
    pre, post = (stages.get("pre_quant") or {}).get("mean"), (stages.get("post_quant") or {}).get("mean")
    if pre is None or post is None:
        return None
    return pre, post, stages["ttt"]["mean"], stages["ttt"]["n"]


def closing_summary(run_dir) -> str:
    """A few lines on what a run produced, from its own files: the headline figures (val_bpb by stage, documents
    scored, artifact bytes, verdict and compliance) and where report.html, submission.json and the records folder
    are. Only the lines whose files exist (a `partial` target has no folder). Reads JSON only: no torch."""
    from pathlib import Path

    run_dir = Path(run_dir)
    # the newer of the full aggregation and the `partial` rule's (its report.html and submission.json sit beside it)
    found = [d for d in (run_dir, run_dir / "partial") if (d / "aggregate.json").is_file()]
    if not found:
        return f"pgolf: run {run_dir.name}: no aggregate.json yet (the stage logs are under {run_dir}/)"
    out_dir = max(found, key=lambda d: (d / "aggregate.json").stat().st_mtime_ns)
    agg = _load(out_dir / "aggregate.json")
    try:
        if agg is None:
            raise ValueError("not a JSON object")
        return _summary_lines(agg, out_dir)
    except (KeyError, TypeError, ValueError) as exc:  # a damaged or hand-edited file: said, never a traceback
        return (f"pgolf: run {run_dir.name}: {out_dir / 'aggregate.json'} is unreadable or lacks a figure ({exc!r}); "
                f"`snakemake --forcerun aggregate` writes it again")


def _summary_lines(agg: dict, out_dir) -> str:
    """:func:`closing_summary`'s text from a readable aggregate.json in ``out_dir``."""
    from pathlib import Path

    bpb, scored = agg["val_bpb"], agg.get("scored") or {}
    n = bpb["n"]
    lines = [f"pgolf: run {agg['run']} ({agg['mode']}) finished: {n} seed{'s' if n != 1 else ''} {agg['seeds']}"]
    line = f"  val_bpb {bpb['mean']:.5f}"
    if bpb.get("std_sample_ddof1") is not None:
        line += f" (sample std {bpb['std_sample_ddof1']:.5f})"
    if (chain := stage_chain(agg)) is not None:
        pre, post, scored_mean, with_stages = chain
        line += (f"; pre-quant {pre:.5f} -> post-quant {post:.5f} ({post - pre:+.5f}) -> scored {scored_mean:.5f} "
                 f"({scored_mean - post:+.5f})" + (f" (the {with_stages} seeds with every stage)" if with_stages != n else ""))
    lines.append(line)
    if scored.get("docs_scored") is not None:
        of = f" of {scored['docs_total']:,}" if scored.get("docs_total") else ""
        cut = "" if scored.get("all_docs") else " (evaluate.max_docs: a quick look, not the full set)"
        lines.append(f"  scored {scored['docs_scored']:,}{of} validation documents per seed, "
                     f"{scored['bytes_scored']:,} bytes{cut}")
    ab = agg["artifact_bytes"]
    lines.append(f"  artifact {ab['max']:,} bytes at most (cap {ab['cap']:,}, headroom {ab['cap'] - ab['max']:,})")
    verdict = agg["verdict"]
    comply = agg.get("compliance")
    compliance = ""
    if comply:
        counts = comply.get("counts") or {}
        failed = comply.get("failed_rules") or []
        parts = [f"{counts.get('PASS', 0)} pass", f"{counts.get('FAIL', 0)} fail"
                 + (f" ({', '.join(failed)})" if failed else ""), f"{counts.get('NOT-APPLICABLE', 0)} not applicable"]
        compliance = f"; compliance {'PASS' if comply.get('compliant') else 'FAIL'}: {', '.join(parts)}"
    lines.append(f"  verdict {verdict['status']}{compliance}")
    for reason in verdict["reasons"][:8]:
        lines.append(f"    - {reason}")
    report = out_dir / "report.html"
    if report.exists():
        lines.append(f"  report      {report.resolve().as_uri()}")
    if (out_dir / "submission.json").exists():
        lines.append(f"  submission  {out_dir / 'submission.json'}")
    # the folder this aggregation wrote (an earlier one under another date or name may still be there), found
    # under the aggregate's own folder whatever directory the path in aggregate.json is relative to
    recorded = Path(agg["submission_folder"]) if agg.get("submission_folder") else None
    folder = out_dir / "records" / recorded.parent.name / recorded.name if recorded else None
    if folder is not None and folder.is_dir():
        lines.append(f"  records     {folder}/")
    return "\n".join(lines)


def failure_hint(run_dir, data_dir=None, tail_lines: int = 6) -> str:
    """What to read after a failed or interrupted run, and how to go on: the last lines of the newest log."""
    from pathlib import Path

    logs = [p for d in (run_dir, data_dir) if d for p in Path(d).rglob("*.log") if p.is_file()]
    lines = ["pgolf: the run stopped. Every job's whole output is in its log (results/<run>/seed<s>/logs/, "
             "results/<run>/logs/, results/data/<name>/logs/)."]
    try:  # a job being cleaned up after Ctrl-C may remove its log between the listing and the read
        newest = max(logs, key=lambda p: p.stat().st_mtime) if logs else None
        tail = newest.read_text(encoding="utf-8", errors="replace").splitlines()[-tail_lines:] if newest else []
    except OSError:
        newest, tail = None, []
    if newest is not None:
        lines.append(f"  the newest, {newest}, ends with:")
        lines += [f"    {line[:200]}" for line in tail]
    lines.append("  After a fix, or after Ctrl-C, the same command resumes: finished jobs are kept, and a sweep's "
                 "training resumes from its last saved state (train.resume_every_steps).")
    return "\n".join(lines)
