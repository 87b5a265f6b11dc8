"""report.html: one self-contained page (inline CSS and SVG, no scripts, nothing fetched from the network).

From the top: the verdict with its reasons (grouped across seeds) and the compliance verdict; val_bpb by stage
per seed (pre-quant, post-quant, scored with TTT, and the deltas) with the documents, tokens and bytes scored; the
statistics and the significance test; the figures (pgolf.report.figures); the bytes table; the per-seed table;
the compliance rules grouped by verdict; provenance. Tables and marks carry ``data-*`` attributes (seed, stage,
value) so tests can read the numbers back from the DOM.
"""

from __future__ import annotations

import html
import math
from typing import Any, Optional, Sequence

from pgolf.report.figures import (  # noqa: F401  (nice_ticks: part of this module's API)
    bpb_figure,
    bytes_figure,
    loss_figure,
    nice_ticks,
    stages_figure,
    time_figure,
)
from pgolf.report.summary import improvement_text, p_text, stage_chain, t_text


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Optional[float], digits: int = 6) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _signed(value: Optional[float], digits: int = 5) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


# --------------------------------------------------------------------------------------------------------------
# Tables and the page
# --------------------------------------------------------------------------------------------------------------


def _stats_table(agg: dict) -> str:
    rows = []
    for key, label in (
        ("val_loss_nats_per_token", "val_loss (nats per token)"),
        ("val_bpb", "val_bpb (bits per byte)"),
    ):
        st = agg[key]
        ci = "n/a" if not st["ci95"] else f"[{st['ci95'][0]:.6f}, {st['ci95'][1]:.6f}]"
        rows.append(
            f"<tr><td>{label}</td><td>{st['n']}</td><td>{_num(st['mean'], 8)}</td>"
            f"<td>{_num(st['std_sample_ddof1'], 8)}</td><td>{_num(st['std_population_ddof0'], 8)}</td>"
            f"<td>{ci}</td></tr>"
        )
    return (
        "<table id='stats'><tr><th>metric</th><th>n</th><th>mean</th><th>sample std (ddof=1)</th>"
        "<th>population std (ddof=0)</th><th>95 % t interval of the mean</th></tr>" + "".join(rows) + "</table>"
    )


SEED_COLUMNS = {  # table column -> (header, format)
    "val_loss_nats_per_token": ("val_loss (nats/tok)", "{:.8f}"),
    "val_bpb": ("val_bpb", "{:.8f}"),
    "steps": ("steps", "{:d}"),
    "ms_per_step": ("ms/step", "{:.2f}"),
    "artifact_bytes": ("artifact bytes", "{:,d}"),
    "model_bytes": ("model bytes", "{:,d}"),
    "code_bytes": ("code bytes", "{:,d}"),
    "train_seconds": ("train s", "{:.1f}"),
    "hessian_seconds": ("Hessians s", "{:.1f}"),
    "eval_seconds": ("eval s", "{:.1f}"),
    "eval_load_s": ("load s", "{:.1f}"),
    "eval_warmup_s": ("warm-up s", "{:.1f}"),
    "eval_score_s": ("score s", "{:.1f}"),
}


def _seed_table_html(table) -> str:
    columns = [c for c in SEED_COLUMNS if c in table.columns]
    head = "<tr><th>seed</th>" + "".join(f"<th>{_e(SEED_COLUMNS[c][0])}</th>" for c in columns) + "</tr>"
    rows = []
    for seed, row in table.to_dict("index").items():
        cells = []
        for col in columns:
            value = row[col]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                text = "n/a"
            else:
                fmt = SEED_COLUMNS[col][1]
                text = fmt.format(int(value) if fmt.endswith("d}") else float(value))
            cells.append(f"<td>{_e(text)}</td>")
        rows.append(f"<tr data-seed='{seed}'><td>{seed}</td>{''.join(cells)}</tr>")
    return f"<div class='scroll'><table id='seeds'>{head}{''.join(rows)}</table></div>"


def _significance_html(agg: dict) -> str:
    sig = agg["significance"]
    if not sig.get("tested"):
        return f"<p id='significance'>No test: {_e(sig.get('note', ''))}</p>"
    base = agg["baseline"]
    mark = lambda ok: "<b class='pass'>PASS</b>" if ok else "<b class='fail'>fail</b>"  # noqa: E731
    items = [
        f"Baseline {_e(base['name'] or '')}: {base['bpb']['mean']:.6f} bpb = {base['nats_per_token']['mean']:.6f} "
        f"nats/token (n = {base['n']}, std {'known' if base['std_known'] else 'unknown'}).",
        f"Improvement: {improvement_text(sig, 4)} nats per token = {sig['improvement_bpb']:.6f} bpb.",
        f"One-sided {_e(sig['test'])} t-test in {_e(sig['unit_label'])}: t = {t_text(sig, '.4f')}, df = {sig['df']:.3f}, "
        f"p = {p_text(sig, 4)}.",
        f"README rule (improvement >= {sig['readme_threshold_nats_per_token']} nats per token and p < "
        f"{sig['readme_p']}): {mark(sig['readme_pass'])}.",
        f"Maintainers' progression cutoff (p < {sig['progression_p']}): {mark(sig['progression_pass'])}.",
    ]
    if sig.get("note"):
        items.append(f"Note: {_e(sig['note'])}.")
    return "<ul id='significance'>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _provenance_html(agg: dict) -> str:
    prov = agg["provenance"]
    env = prov["environment"]
    rows = [
        ("pgolf code hash (training)", prov["code_hash"]),
        ("pgolf code hash (evaluation)", prov["eval_code_hash"]),
        ("data manifest sha256", prov["data_manifest_sha256"]),
        ("stage configs sha256", prov["config_sha256"]),
        ("code bytes convention", prov["code_bytes_convention"]),
        ("hardware", prov["hardware"]),
        (
            "torch / CUDA / triton / flash-attn",
            f"{env.get('torch')} / {env.get('cuda')} / {env.get('triton')} / " f"{env.get('flash_attn')}",
        ),
    ]
    out = (
        "<table id='provenance'>"
        + "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>" for k, v in rows)
        + "</table>"
    )
    if prov.get("notes"):
        out += "<ul id='provenance-notes'>" + "".join(f"<li>{_e(n)}</li>" for n in prov["notes"]) + "</ul>"
    if prov["mixed"]:
        out += "<div class='warn' id='mixed'><b>Mixed provenance (pooled because allowed):</b><ul>"
        for d in prov["mixed"]:
            groups = "; ".join(f"<code>{_e(v[:16])}</code>: seeds {_e(s)}" for v, s in d["values"].items())
            out += f"<li>{_e(d['label'])}: {groups}</li>"
        out += "</ul></div>"
    return out


def _stages_html(agg: dict, seeds: Sequence[Any]) -> str:
    """val_bpb at the three stages per seed, the deltas, and what was scored; a mean row; a note when only part
    of the validation set was scored."""
    head = (
        "<tr><th>seed</th><th>pre-quant</th><th>post-quant</th><th>\u0394 quant</th><th>scored (TTT)</th>"
        "<th>\u0394 TTT</th><th>documents scored</th><th>target tokens</th><th>bytes</th></tr>"
    )
    rows = []
    for s in seeds:
        quant = None if s.pre_quant_bpb is None or s.post_quant_bpb is None else s.post_quant_bpb - s.pre_quant_bpb
        ttt = None if s.post_quant_bpb is None else s.val_bpb - s.post_quant_bpb
        docs = "n/a" if s.docs_scored is None else f"{s.docs_scored:,}" + (
            f" of {s.docs_total:,}" if s.docs_total is not None else "")
        cells = [
            f"<td data-stage='pre_quant' data-value='{s.pre_quant_bpb!r}'>{_num(s.pre_quant_bpb)}</td>",
            f"<td data-stage='post_quant' data-value='{s.post_quant_bpb!r}'>{_num(s.post_quant_bpb)}</td>",
            f"<td data-delta='quant'>{_signed(quant)}</td>",
            f"<td data-stage='ttt' data-value='{s.val_bpb!r}'><b>{_num(s.val_bpb)}</b></td>",
            f"<td data-delta='ttt'>{_signed(ttt)}</td>",
            f"<td data-role='docs'>{_e(docs)}</td>",
            f"<td>{s.token_count:,}</td><td>{s.byte_sum:,}</td>",
        ]
        rows.append(f"<tr data-seed='{s.seed}'><td>{s.seed}</td>{''.join(cells)}</tr>")
    st = agg.get("stages") or {}

    def mean_of(key: str, signed: bool = False) -> str:
        value = (st.get(key) or {}).get("mean")
        return _signed(value) if signed else _num(value)

    label = "mean" if len(st.get("seeds") or seeds) == len(seeds) else \
        "mean of " + ", ".join(str(s) for s in st["seeds"])  # the seeds with every stage
    rows.append(
        f"<tr class='mean'><td>{_e(label)}</td><td>{mean_of('pre_quant')}</td><td>{mean_of('post_quant')}</td>"
        f"<td>{mean_of('quant_delta', True)}</td><td><b>{mean_of('ttt')}</b></td><td>{mean_of('ttt_delta', True)}</td>"
        "<td></td><td></td><td></td></tr>"
    )
    scored = agg.get("scored") or {}
    note = ""
    if scored.get("docs_scored") is not None and scored.get("docs_total") and not scored.get("all_docs"):
        note = (
            f"<div class='warn' id='partial-eval'>Scored {scored['docs_scored']:,} of {scored['docs_total']:,} "
            "validation documents per seed (evaluate.max_docs): a quick look, not comparable with a full "
            "evaluation.</div>"
        )
    modes = ", ".join(st.get("ttt_modes") or []) or "n/a"
    intro = (
        "<p>val_bpb of the trained weights (pre-quant), of the packed artifact without test-time training "
        f"(post-quant), and the score itself (TTT mode: {_e(modes)}). \u0394 quant = post - pre; \u0394 TTT = "
        "scored - post (negative is better).</p>"
    )
    return intro + note + f"<div class='scroll'><table id='stages'>{head}{''.join(rows)}</table></div>"


def _bytes_html(seeds: Sequence[Any]) -> str:
    head = (
        "<tr><th>seed</th><th>compressed model</th><th>counted code</th><th>convention</th><th>total</th>"
        "<th>cap</th><th>headroom</th><th>% of cap</th></tr>"
    )
    rows = "".join(
        f"<tr data-seed='{s.seed}'><td>{s.seed}</td><td>{s.model_bytes:,}</td><td>{s.code_bytes:,}</td>"
        f"<td>{_e(s.code_bytes_convention or 'n/a')}</td><td data-role='total'>{s.total_bytes:,}</td>"
        f"<td>{s.cap_bytes:,}</td><td>{s.cap_bytes - s.total_bytes:,}</td>"
        f"<td>{100.0 * s.total_bytes / s.cap_bytes:.2f} %</td></tr>"
        for s in seeds
    )
    return f"<div class='scroll'><table id='bytes'>{head}{rows}</table></div>"


def _compliance_html(agg: dict) -> str:
    comp = agg.get("compliance")
    if not comp:
        return "<p id='compliance'>No compliance verdict (<code>pgolf comply</code> was not run for this report).</p>"
    counts = comp.get("counts", {})
    status = "PASS" if comp.get("compliant") else "FAIL"
    summary = ", ".join(f"{n} {k.lower()}" for k, n in counts.items())
    parts = [
        f"<div id='compliance'><p>Compliance: <b class='{'pass' if status == 'PASS' else 'fail'}'>{status}</b> "
        f"({_e(summary)}).</p>"
    ]
    for group in comp.get("groups", []):
        names = ", ".join(str(r["rule"]) for r in group["rules"])
        items = "".join(
            f"<details data-rule='{_e(r['rule'])}' data-status='{_e(group['status'])}'><summary>"
            f"<code>{_e(r['rule'])}</code> {_e(r['title'])}</summary><p>{_e(r['evidence'])}</p></details>"
            for r in group["rules"]
        )
        parts.append(
            f"<div class='comply-group' data-status='{_e(group['status'])}'><p><b>{_e(group['status'])} "
            f"({len(group['rules'])})</b>: {_e(names)}</p>{items}</div>"
        )
    return "".join(parts) + "</div>"


def _headline(agg: dict) -> str:
    """One paragraph with the figures that matter: the score, its stages, what was scored, the largest artifact."""
    bpb, scored = agg["val_bpb"], agg.get("scored") or {}
    text = f"val_bpb <b>{bpb['mean']:.5f}</b> (mean of {bpb['n']} seed{'s' if bpb['n'] != 1 else ''})"
    if (chain := stage_chain(agg)) is not None:
        pre, post, scored_mean, with_stages = chain
        text += f": pre-quant {pre:.5f} \u2192 post-quant {post:.5f} \u2192 scored {scored_mean:.5f}"
        if with_stages != bpb["n"]:
            text += f" (the {with_stages} seeds with every stage)"
    if scored.get("docs_scored") is not None:
        total = f" of {scored['docs_total']:,}" if scored.get("docs_total") else ""
        text += (f"; {scored['docs_scored']:,}{total} validation documents, {scored['tokens_scored']:,} tokens, "
                 f"{scored['bytes_scored']:,} bytes scored")
    ab = agg["artifact_bytes"]
    text += f"; artifact {ab['max']:,} bytes at most (cap {ab['cap']:,})."
    return f"<p id='headline'>{text}</p>"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:980px;
color:#222}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4} #provenance td,#provenance th{text-align:left}
figure{margin:16px 0} figcaption{font-size:13px;margin-bottom:4px}
svg text{font-family:inherit} .tick{font-size:11px;fill:#444} .axis{font-size:12px;fill:#222} .legend{font-size:12px}
.value{font-size:11px;fill:#222} .over{fill:#c00;font-weight:bold}
.swatch{display:inline-block;width:10px;height:10px;margin:0 3px 0 10px}
.verdict{display:inline-block;padding:3px 10px;border-radius:4px;color:#fff;font-weight:bold}
.record{background:#1a7f37} .progression{background:#9a6700} .non-record{background:#777}
.warn{background:#fff4e5;border:1px solid #e69f00;padding:6px 12px;margin:10px 0}
.scroll{overflow-x:auto} .pass{color:#1a7f37} .fail{color:#c00} code{font-size:12px}
tr.mean td{font-weight:bold;background:#fafafa} #headline{font-size:15px}
details{font-size:13px;margin:2px 0 2px 16px} details p{margin:2px 0 6px 16px;color:#444}
.comply-group p{margin:6px 0 2px 0}
"""


def render(agg: dict, seeds: Sequence[Any], table) -> str:
    """The whole page as a string."""
    v = agg["verdict"]
    missing = ""
    if agg["missing_seeds"]:
        items = "".join(
            f"<li>seed {m['seed']}: {_e(m['reason'])}</li>" for m in agg["missing_seeds"]
        )
        title = "<b>Missing seeds</b> (aggregated over the rest):"
        missing = f"<div class='warn' id='missing-seeds'>{title}<ul>{items}</ul></div>"
    reasons = "".join(f"<li>{_e(r)}</li>" for r in v["reasons"])
    comp = agg.get("compliance")
    comply_line = "" if not comp else (
        f" Compliance: <b class='{'pass' if comp.get('compliant') else 'fail'}'>"
        f"{'PASS' if comp.get('compliant') else 'FAIL'}</b> (<a href='#compliance-rules'>rules</a>).")
    return "".join(
        [
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
            f"<title>pgolf report: {_e(agg['run'])}</title><style>{CSS}</style></head><body>",
            f"<h1>pgolf report: {_e(agg['run'])} <small>({_e(agg['mode'])})</small></h1>",
            _headline(agg),
            f"<p>Seeds {_e(', '.join(str(s) for s in agg['seeds']))}. Verdict: "
            f"<span id='verdict' class='verdict {_e(v['status'])}'>{_e(v['status'])}</span>{comply_line}</p>"
            f"<ul id='reasons'>{reasons}</ul>",
            missing,
            "<h2>val_bpb by stage</h2>",
            _stages_html(agg, seeds),
            stages_figure(seeds),
            "<h2>Statistics</h2>",
            f"<p>Unit of the test: {_e(agg['significance']['unit_label'])}; bpb converts with this run's "
            f"{agg['bytes_per_token']:.5f} validation bytes per token "
            f"(1 bpb = {agg['nats_per_bpb']:.5f} nats per token). "
            f"Std columns are labelled; submission.json reports the {_e(agg['std_kind'])} std.</p>",
            _stats_table(agg),
            "<h2>Significance</h2>",
            _significance_html(agg),
            "<h2>Figures</h2>",
            loss_figure(seeds),
            bpb_figure(agg, seeds),
            time_figure(agg, seeds),
            "<h2>Bytes</h2>",
            _bytes_html(seeds),
            bytes_figure(seeds),
            "<h2>Per seed</h2>",
            _seed_table_html(table),
            "<h2 id='compliance-rules'>Compliance</h2>",
            _compliance_html(agg),
            "<h2>Provenance</h2>",
            _provenance_html(agg),
            "</body></html>\n",
        ]
    )
