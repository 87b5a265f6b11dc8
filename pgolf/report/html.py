"""report.html: one self-contained page (inline CSS and SVG, no scripts, nothing fetched from the network).

Figures: training loss per seed; val_bpb per seed with the mean and its 95 % t interval (and the baseline);
the time budget per phase (training loop + Hessians, and evaluation load + warm-up + scoring, against 600 s
each); the byte budget (model + counted code against 16,000,000). Every mark carries ``data-*`` attributes
(seed, value, role) so tests can read the figures back from the DOM.
"""

from __future__ import annotations

import html
import math
from typing import Any, Optional, Sequence

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#8C564B", "#000000")
PHASE_COLORS = {
    "train": "#0072B2",
    "hessians": "#56B4E9",
    "load": "#009E73",
    "warmup": "#E69F00",
    "score": "#D55E00",
    "model": "#0072B2",
    "code": "#CC79A7",
}
WIDTH = 720
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 90, 30, 20, 46


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Optional[float], digits: int = 6) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) * 0.01 or 1.0)
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


class _Axes:
    """Linear mapping of data coordinates onto an SVG plot area."""

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float], height: int, top: int = MARGIN_TOP):
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range
        if self.x1 <= self.x0:
            self.x1 = self.x0 + 1.0
        if self.y1 <= self.y0:
            self.y1 = self.y0 + 1.0
        self.height = height
        self.left, self.right = MARGIN_LEFT, WIDTH - MARGIN_RIGHT
        self.top, self.bottom = top, height - MARGIN_BOTTOM

    def x(self, value: float) -> float:
        return self.left + (value - self.x0) / (self.x1 - self.x0) * (self.right - self.left)

    def y(self, value: float) -> float:
        return self.bottom - (value - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)

    def frame(self, x_label: str, y_label: str, x_ticks: list[float], y_ticks: list[float], x_fmt, y_fmt) -> list[str]:
        out = [
            f'<rect x="{self.left}" y="{self.top}" width="{self.right - self.left}" '
            f'height="{self.bottom - self.top}" fill="#fff" stroke="#999"/>'
        ]
        for t in x_ticks:
            if self.x0 <= t <= self.x1:
                x = self.x(t)
                out.append(f'<line x1="{x:.1f}" y1="{self.bottom}" x2="{x:.1f}" y2="{self.bottom + 4}" stroke="#555"/>')
                out.append(
                    f'<text x="{x:.1f}" y="{self.bottom + 16}" text-anchor="middle" class="tick">{_e(x_fmt(t))}</text>'
                )
        for t in y_ticks:
            if self.y0 <= t <= self.y1:
                y = self.y(t)
                out.append(f'<line x1="{self.left}" y1="{y:.1f}" x2="{self.right}" y2="{y:.1f}" stroke="#eee"/>')
                out.append(
                    f'<text x="{self.left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_e(y_fmt(t))}</text>'
                )
        out.append(
            f'<text x="{(self.left + self.right) / 2:.1f}" y="{self.height - 8}" text-anchor="middle" '
            f'class="axis">{_e(x_label)}</text>'
        )
        out.append(
            f'<text transform="translate(14,{(self.top + self.bottom) / 2:.1f}) rotate(-90)" '
            f'text-anchor="middle" class="axis">{_e(y_label)}</text>'
        )
        return out


def _svg(height: int, body: list[str], label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" '
        f'height="{height}" role="img" aria-label="{_e(label)}">' + "".join(body) + "</svg>"
    )


def _figure(fig_id: str, title: str, svg: str, caption: str) -> str:
    return (
        f'<figure id="{fig_id}"><figcaption><strong>{_e(title)}</strong> {_e(caption)}</figcaption>' f"{svg}</figure>"
    )


# --------------------------------------------------------------------------------------------------------------
# The four figures
# --------------------------------------------------------------------------------------------------------------


def loss_figure(seeds: Sequence[Any]) -> str:
    curves = {s.seed: s.loss_curve for s in seeds if s.loss_curve}
    if not curves:
        return _figure("fig-loss", "Training loss", "<p class='empty'>no train_step events in metrics.jsonl</p>", "")
    steps = [st for c in curves.values() for st, _ in c]
    losses = [loss for c in curves.values() for _, loss in c]
    y_lo, y_hi = min(losses), max(losses)
    pad = (y_hi - y_lo) * 0.05 or 0.1
    ax = _Axes((0, max(steps)), (y_lo - pad, y_hi + pad), 320)
    body = ax.frame(
        "step",
        "training loss (nats/token)",
        nice_ticks(0, max(steps)),
        nice_ticks(y_lo - pad, y_hi + pad),
        lambda v: f"{v:g}",
        lambda v: f"{v:g}",
    )
    for i, (seed, curve) in enumerate(curves.items()):
        color = PALETTE[i % len(PALETTE)]
        points = " ".join(f"{ax.x(st):.1f},{ax.y(loss):.1f}" for st, loss in curve)
        body.append(
            f'<polyline data-seed="{seed}" data-points="{len(curve)}" points="{points}" fill="none" '
            f'stroke="{color}" stroke-width="1.6"/>'
        )
        body.append(
            f'<rect x="{ax.right - 110}" y="{ax.top + 10 + 16 * i}" width="12" height="3" fill="{color}"/>'
            f'<text x="{ax.right - 92}" y="{ax.top + 15 + 16 * i}" class="legend">seed {seed}</text>'
        )
    final = ", ".join(f"seed {seed}: {c[-1][1]:.4f} at step {c[-1][0]}" for seed, c in curves.items())
    return _figure(
        "fig-loss", "Training loss per seed.", _svg(320, body, "training loss per seed"), f"Last logged: {final}."
    )


def bpb_figure(agg: dict, seeds: Sequence[Any]) -> str:
    stats = agg["val_bpb"]
    values = [s.val_bpb for s in seeds]
    marks = list(values)
    if stats["ci95"]:
        marks += stats["ci95"]
    baseline = agg["baseline"]["bpb"]["mean"] if agg.get("baseline") else None
    if baseline is not None:
        marks.append(baseline)
    lo, hi = min(marks), max(marks)
    pad = (hi - lo) * 0.12 or 0.001
    rows = len(seeds) + 1
    top = MARGIN_TOP + 16  # room for the baseline's label above the plot
    height = top + MARGIN_BOTTOM + 30 * rows + 10
    ax = _Axes((lo - pad, hi + pad), (0, rows), height, top=top)
    body = ax.frame(
        "val_bpb (bits per byte, lower is better)", "", nice_ticks(lo - pad, hi + pad), [], lambda v: f"{v:.4f}", str
    )
    for i, s in enumerate(seeds):
        y = ax.y(rows - i - 0.5)
        color = PALETTE[i % len(PALETTE)]
        body.append(f'<text x="{ax.left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">seed {s.seed}</text>')
        body.append(
            f'<circle data-seed="{s.seed}" data-value="{s.val_bpb!r}" cx="{ax.x(s.val_bpb):.1f}" cy="{y:.1f}" '
            f'r="5" fill="{color}"/>'
        )
        body.append(f'<text x="{ax.x(s.val_bpb) + 8:.1f}" y="{y - 6:.1f}" class="value">{s.val_bpb:.5f}</text>')
    y = ax.y(0.5)
    body.append(f'<text x="{ax.left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">mean</text>')
    if stats["ci95"]:
        a, b = stats["ci95"]
        body.append(
            f'<line data-role="ci95" data-low="{a!r}" data-high="{b!r}" x1="{ax.x(a):.1f}" y1="{y:.1f}" '
            f'x2="{ax.x(b):.1f}" y2="{y:.1f}" stroke="#333" stroke-width="3"/>'
        )
        for end in (a, b):
            body.append(
                f'<line x1="{ax.x(end):.1f}" y1="{y - 6:.1f}" x2="{ax.x(end):.1f}" y2="{y + 6:.1f}" '
                'stroke="#333" stroke-width="2"/>'
            )
    body.append(
        f'<rect data-role="mean" data-value="{stats["mean"]!r}" x="{ax.x(stats["mean"]) - 5:.1f}" '
        f'y="{y - 5:.1f}" width="10" height="10" fill="#000"/>'
    )
    body.append(f'<text x="{ax.x(stats["mean"]) + 8:.1f}" y="{y - 8:.1f}" class="value">{stats["mean"]:.5f}</text>')
    if baseline is not None:
        x = ax.x(baseline)
        body.append(
            f'<line data-role="baseline" data-value="{baseline!r}" x1="{x:.1f}" y1="{ax.top}" x2="{x:.1f}" '
            f'y2="{ax.bottom}" stroke="#D55E00" stroke-dasharray="5,4" stroke-width="1.5"/>'
        )
        name = agg["baseline"]["name"] or "baseline"
        body.append(
            f'<text x="{x:.1f}" y="{ax.top - 5}" text-anchor="middle" class="value" fill="#D55E00">'
            f"{_e(name)} {baseline:.5f}</text>"
        )
    ci = "" if not stats["ci95"] else f"; 95 % t interval of the mean [{stats['ci95'][0]:.5f}, {stats['ci95'][1]:.5f}]"
    dashed = "; dashed: the baseline" if baseline is not None else ""
    caption = f"Mean {stats['mean']:.5f}{ci} (n = {stats['n']}){dashed}."
    return _figure("fig-bpb", "val_bpb per seed.", _svg(height, body, "val_bpb per seed"), caption)


def _stacked_bars(
    fig_id: str,
    title: str,
    rows: list[tuple[str, str, list[tuple[str, float]]]],
    budget: float,
    unit_label: str,
    fmt,
    caption: str,
) -> str:
    """Horizontal stacked bars (one per row) against a budget line. rows: (row label, data-row, [(phase, value)])."""
    totals = [sum(v for _, v in segs) for _, _, segs in rows]
    top = max([budget, *totals]) * 1.16  # room right of the longest bar for its total
    height = MARGIN_TOP + MARGIN_BOTTOM + 30 * len(rows) + 30
    ax = _Axes((0, top), (0, len(rows)), height)
    body = ax.frame(unit_label, "", nice_ticks(0, top), [], fmt, str)
    for i, (label, row_id, segments) in enumerate(rows):
        y = ax.y(len(rows) - i - 0.5)
        body.append(f'<text x="{ax.left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_e(label)}</text>')
        start = 0.0
        for phase, value in segments:
            x0, x1 = ax.x(start), ax.x(start + value)
            body.append(
                f'<rect data-row="{_e(row_id)}" data-phase="{phase}" data-value="{value!r}" x="{x0:.1f}" '
                f'y="{y - 9:.1f}" width="{max(x1 - x0, 0.5):.1f}" height="18" '
                f'fill="{PHASE_COLORS.get(phase, "#777")}"><title>{_e(label)} {phase}: {_e(fmt(value))}</title></rect>'
            )
            start += value
        over = start > budget
        body.append(
            f'<text x="{ax.x(start) + 6:.1f}" y="{y + 4:.1f}" class="value{" over" if over else ""}">'
            f'{_e(fmt(start))}{" OVER" if over else ""}</text>'
        )
    x = ax.x(budget)
    body.append(
        f'<line data-role="budget" data-value="{budget!r}" x1="{x:.1f}" y1="{ax.top}" x2="{x:.1f}" '
        f'y2="{ax.bottom}" stroke="#c00" stroke-width="2"/>'
    )
    body.append(
        f'<text x="{x - 4:.1f}" y="{ax.bottom + 30}" text-anchor="end" class="value" fill="#c00">'
        f"budget {_e(fmt(budget))}</text>"
    )
    phases = []
    for _, _, segs in rows:
        phases += [p for p, _ in segs if p not in phases]
    legend = " ".join(
        f'<span class="swatch" style="background:{PHASE_COLORS.get(p, "#777")}"></span>{_e(p)}' for p in phases
    )
    return (
        f'<figure id="{fig_id}"><figcaption><strong>{_e(title)}</strong> {_e(caption)} '
        f'<span class="legend">{legend}</span></figcaption>{_svg(height, body, title)}</figure>'
    )


def time_figure(agg: dict, seeds: Sequence[Any]) -> str:
    rows = []
    for s in seeds:
        rows.append(
            (
                f"seed {s.seed} train",
                f"{s.seed}/train",
                [("train", s.train_seconds), ("hessians", s.hessian_seconds or 0.0)],
            )
        )
        rows.append(
            (
                f"seed {s.seed} eval",
                f"{s.seed}/eval",
                [("load", s.eval_load_s), ("warmup", s.eval_warmup_s), ("score", s.eval_score_s)],
            )
        )
    budget = agg["budgets"]["train_seconds"]
    caption = (
        f"Training (loop + Hessians) and evaluation (deserialize + compile warm-up + scoring) each have "
        f"{budget:.0f} s on 8xH100 SXM; compile warm-up of training is not counted."
    )
    return _stacked_bars("fig-time", "Time budget per phase.", rows, budget, "seconds", lambda v: f"{v:.0f} s", caption)


def bytes_figure(seeds: Sequence[Any]) -> str:
    rows = [
        (f"seed {s.seed}", str(s.seed), [("model", float(s.model_bytes)), ("code", float(s.code_bytes))]) for s in seeds
    ]
    cap = seeds[0].cap_bytes
    headroom = ", ".join(f"seed {s.seed}: {cap - s.total_bytes:,}" for s in seeds)
    return _stacked_bars(
        "fig-bytes",
        "Byte budget.",
        rows,
        float(cap),
        "bytes (decimal)",
        lambda v: f"{v / 1e6:.3f} MB",
        f"Compressed model + counted code vs {cap:,} bytes; headroom {headroom} bytes.",
    )


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
        f"Improvement: {sig['improvement_nats_per_token']:.6f} nats per token = {sig['improvement_bpb']:.6f} bpb.",
        f"One-sided {_e(sig['test'])} t-test in {_e(sig['unit_label'])}: t = {sig['t']:.4f}, df = {sig['df']:.3f}, "
        f"p = {sig['p_value']:.4g}.",
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
"""


def render(agg: dict, seeds: Sequence[Any], table) -> str:
    """The whole page as a string."""
    v = agg["verdict"]
    missing = ""
    if agg["missing_seeds"]:
        items = "".join(
            f"<li>seed {m['seed']}: missing {_e(', '.join(m['missing_files']))}</li>" for m in agg["missing_seeds"]
        )
        title = "<b>Missing seeds</b> (aggregated over the rest):"
        missing = f"<div class='warn' id='missing-seeds'>{title}<ul>{items}</ul></div>"
    reasons = "".join(f"<li>{_e(r)}</li>" for r in v["reasons"])
    return "".join(
        [
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
            f"<title>pgolf report: {_e(agg['run'])}</title><style>{CSS}</style></head><body>",
            f"<h1>pgolf report: {_e(agg['run'])} <small>({_e(agg['mode'])})</small></h1>",
            f"<p>Seeds {_e(', '.join(str(s) for s in agg['seeds']))}. Verdict: "
            f"<span id='verdict' class='verdict {_e(v['status'])}'>{_e(v['status'])}</span></p><ul>{reasons}</ul>",
            missing,
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
            bytes_figure(seeds),
            "<h2>Per seed</h2>",
            _seed_table_html(table),
            "<h2>Provenance</h2>",
            _provenance_html(agg),
            "</body></html>\n",
        ]
    )
