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
            f"{sig['improvement_nats_per_token']:.6f} nats/token "
            f"({sig['improvement_bpb']:.6f} bpb); one-sided {sig['test']} t = {sig['t']:.3f}, df = {sig['df']:.2f}, "
            f"p = {sig['p_value']:.3g} (unit: {sig['unit_label']})"
        )
        lines.append(
            f"README rule (>= {sig['readme_threshold_nats_per_token']} nats/token, p < {sig['readme_p']}): "
            f"{'PASS' if sig['readme_pass'] else 'fail'}; progression cutoff (p < {sig['progression_p']}): "
            f"{'PASS' if sig['progression_pass'] else 'fail'}"
        )
    elif sig.get("note"):
        lines.append(sig["note"])
    v = agg["verdict"]
    lines.append(f"verdict: {v['status']}: " + "; ".join(v["reasons"]))
    return "\n".join(lines) + "\n"
