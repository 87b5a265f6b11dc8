"""The figures of report.html: inline SVG, no scripts. Every mark carries ``data-*`` attributes (seed, stage,
value, role) so tests can read the figures back from the DOM.

- training loss per seed (colour, dash pattern and marker shape per seed, so coinciding curves stay visible);
- val_bpb by stage per seed: pre-quant -> post-quant -> scored (TTT), joined by arrows;
- val_bpb per seed with the mean, its 95 % t interval and the baseline;
- time per phase, with the 600 s budget lines only on the record hardware (8xH100);
- bytes per seed: compressed model + counted code, on an axis scaled to the artifact when it is far below the cap.
"""

from __future__ import annotations

import html
import math
from typing import Any, Optional, Sequence

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#8C564B", "#000000")
DASHES = ("", "7,3", "2,2", "9,3,2,3", "4,4", "1,3")  # per seed, with the colour: coinciding curves stay visible
MARKERS = ("circle", "square", "triangle", "diamond")
STAGES = (("pre_quant", "pre-quant"), ("post_quant", "post-quant"), ("ttt", "scored (TTT)"))
STAGE_COLORS = {"pre_quant": "#56B4E9", "post_quant": "#E69F00", "ttt": "#0072B2"}
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


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    # a range of a few float steps (values equal but for rounding) is widened like an empty one: a tick step
    # below the float resolution would never move
    if hi - lo <= 1e-9 * max(abs(lo), abs(hi), 1e-300):
        hi = lo + (abs(lo) * 0.01 or 1.0)
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    last = math.floor(hi / step + 1e-9)
    return [round(first + i * step, 12) for i in range(int(last - first / step) + 1)]


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


def _marker(kind: str, x: float, y: float, r: float, color: str, attrs: str = "") -> str:
    """A filled marker of shape ``kind`` centred on (x, y)."""
    if kind == "square":
        return f'<rect {attrs} x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r:.1f}" height="{2 * r:.1f}" fill="{color}"/>'
    if kind in ("triangle", "diamond"):
        pts = ([(x, y - r * 1.2), (x + r * 1.1, y + r * 0.8), (x - r * 1.1, y + r * 0.8)] if kind == "triangle"
               else [(x, y - r * 1.3), (x + r, y), (x, y + r * 1.3), (x - r, y)])
        points = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
        return f'<polygon {attrs} points="{points}" fill="{color}"/>'
    return f'<circle {attrs} cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" fill="{color}"/>'


def coinciding_seeds(curves: dict[int, Sequence[tuple[int, float]]], tol: float = 1e-4) -> list[list[int]]:
    """Groups of seeds whose loss curves agree within ``tol`` at every logged step (they would hide each other)."""
    groups: list[list[int]] = []
    for seed, curve in curves.items():
        for group in groups:
            other = curves[group[0]]
            if [st for st, _ in other] == [st for st, _ in curve] and all(
                abs(a - b) <= tol for (_, a), (_, b) in zip(other, curve)
            ):
                group.append(seed)
                break
        else:
            groups.append([seed])
    return [g for g in groups if len(g) > 1]


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
    order = list(curves.items())
    for i, (seed, curve) in reversed(list(enumerate(order))):  # the first seed drawn last, on top
        color, dash, marker = PALETTE[i % len(PALETTE)], DASHES[i % len(DASHES)], MARKERS[i % len(MARKERS)]
        points = " ".join(f"{ax.x(st):.1f},{ax.y(loss):.1f}" for st, loss in curve)
        body.append(
            f'<polyline data-seed="{seed}" data-points="{len(curve)}" points="{points}" fill="none" '
            f'stroke="{color}" stroke-width="1.3"' + (f' stroke-dasharray="{dash}"' if dash else "") + "/>"
        )
        every = max(len(order), len(curve) // 10)  # a few markers per curve, offset per seed: never on one spot
        for st, loss in curve[i % every :: every]:
            body.append(_marker(marker, ax.x(st), ax.y(loss), 3.0, color, f'data-seed="{seed}" data-role="marker"'))
    for i, (seed, curve) in enumerate(order):
        color, dash, marker = PALETTE[i % len(PALETTE)], DASHES[i % len(DASHES)], MARKERS[i % len(MARKERS)]
        y = ax.top + 12 + 16 * i
        x = ax.right - 236
        body.append(
            f'<line x1="{x}" y1="{y}" x2="{x + 26}" y2="{y}" stroke="{color}" stroke-width="1.6"'
            + (f' stroke-dasharray="{dash}"' if dash else "") + "/>"
            + _marker(marker, x + 13, y, 3.0, color)
            + f'<text x="{x + 32}" y="{y + 4}" class="legend">seed {seed}: {curve[-1][1]:.4f} at step {curve[-1][0]}'
            "</text>"
        )
    same = coinciding_seeds(curves)
    note = "".join(f" Seeds {', '.join(map(str, g))} coincide (within 1e-4 at every logged step)." for g in same)
    return _figure(
        "fig-loss", "Training loss per seed.", _svg(320, body, "training loss per seed"),
        "Each seed has its own colour, dash pattern and marker; the legend gives the last logged loss." + note,
    )


STAGE_SHAPES = {"pre_quant": "circle", "post_quant": "square", "ttt": "diamond"}  # a stage's shape, always


def stages_figure(seeds: Sequence[Any]) -> str:
    """Per seed, val_bpb of the trained weights, of the packed artifact and with TTT, joined by arrows."""
    rows = [(s.seed, {"pre_quant": s.pre_quant_bpb, "post_quant": s.post_quant_bpb, "ttt": s.val_bpb}) for s in seeds]
    values = [v for _, marks in rows for v in marks.values() if v is not None]
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.12 or 0.001
    top = MARGIN_TOP + 20
    height = top + MARGIN_BOTTOM + 44 * len(rows) + 6
    ax = _Axes((lo - pad, hi + pad), (0, len(rows)), height, top=top)
    body = ax.frame("val_bpb (bits per byte, lower is better)", "", nice_ticks(lo - pad, hi + pad), [],
                    lambda v: f"{v:.4f}", str)
    body.append('<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
                'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#666"/></marker></defs>')
    for i, (seed, marks) in enumerate(rows):
        y = ax.y(len(rows) - i - 0.5)
        body.append(f'<text x="{ax.left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">seed {seed}</text>')
        present = [(k, v) for k, v in marks.items() if v is not None]
        for k, ((_, a), (_, b)) in enumerate(zip(present, present[1:])):
            if abs(ax.x(b) - ax.x(a)) > 12:
                shrink = 7 if b > a else -7
                dy = -3.0 if k == 0 else 3.0  # pre -> post above the line of marks, post -> TTT below it
                body.append(f'<line x1="{ax.x(a) + shrink:.1f}" y1="{y + dy:.1f}" x2="{ax.x(b) - shrink:.1f}" '
                            f'y2="{y + dy:.1f}" stroke="#666" stroke-width="1.4" marker-end="url(#arrow)"/>')
        for j, (stage, value) in enumerate(present):
            attrs = f'data-seed="{seed}" data-stage="{stage}" data-value="{value!r}"'
            body.append(_marker(STAGE_SHAPES[stage], ax.x(value), y, 5.5, STAGE_COLORS[stage], attrs))
            label_y = y - 9 if j % 2 == 0 else y + 17
            body.append(f'<text x="{ax.x(value):.1f}" y="{label_y:.1f}" text-anchor="middle" class="value">'
                        f"{value:.4f}</text>")
    legend = " ".join(
        f'<span class="swatch" style="background:{STAGE_COLORS[k]}"></span>{_e(label)}' for k, label in STAGES
    )
    missing = "" if all(m["pre_quant"] is not None for _, m in rows) else (
        " A seed without a pre-quant figure was evaluated without evaluate.diagnostics or without its checkpoint.")
    return (
        f'<figure id="fig-stages"><figcaption><strong>val_bpb by stage.</strong> The trained weights (pre-quant), '
        f"the packed artifact without TTT (post-quant) and the score with test-time training, per seed.{missing} "
        f'<span class="legend">{legend}</span></figcaption>{_svg(height, body, "val_bpb by stage")}</figure>'
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
    budget: Optional[float],
    unit_label: str,
    fmt,
    caption: str,
    limit_label: Optional[str] = None,
) -> str:
    """Horizontal stacked bars (one per row). rows: (row label, data-row, [(phase, value)]), optionally with a
    fourth item: the part of the row the budget counts (default: the whole row).

    ``budget``: a limit drawn as a line (and rows whose counted part is over it marked OVER); None draws none. A
    limit far right of the bars (more than twice the longest) is not drawn to scale: the axis fits the bars and an
    arrow at the right edge names the limit (``limit_label``), so a small artifact's bars stay readable.
    """
    totals = [sum(v for _, v in row[2]) for row in rows]
    off_scale = budget is not None and budget > 2 * max(totals, default=0.0)
    scale_to = max(totals) if (budget is None or off_scale) else max([budget, *totals])
    top = scale_to * 1.16  # room right of the longest bar for its total
    height = MARGIN_TOP + MARGIN_BOTTOM + 30 * len(rows) + 30
    ax = _Axes((0, top), (0, len(rows)), height)
    body = ax.frame(unit_label, "", nice_ticks(0, top), [], fmt, str)
    for i, (label, row_id, segments, *counted) in enumerate(rows):
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
        over = budget is not None and (counted[0] if counted else start) > budget
        body.append(
            f'<text x="{ax.x(start) + 6:.1f}" y="{y + 4:.1f}" class="value{" over" if over else ""}">'
            f'{_e(fmt(start))}{" OVER" if over else ""}</text>'
        )
    if budget is not None and not off_scale:
        x = ax.x(budget)
        body.append(
            f'<line data-role="budget" data-value="{budget!r}" x1="{x:.1f}" y1="{ax.top}" x2="{x:.1f}" '
            f'y2="{ax.bottom}" stroke="#c00" stroke-width="2"/>'
        )
        body.append(
            f'<text x="{x - 4:.1f}" y="{ax.bottom + 30}" text-anchor="end" class="value" fill="#c00">'
            f"{_e(limit_label or 'budget ' + fmt(budget))}</text>"
        )
    elif budget is not None:
        y = ax.top + 12
        body.append(
            f'<text data-role="limit" data-value="{budget!r}" x="{ax.right - 6}" y="{y}" text-anchor="end" '
            f'class="value" fill="#c00">{_e(limit_label or fmt(budget))} \u2192</text>'
        )
    phases = []
    for row in rows:
        phases += [p for p, _ in row[2] if p not in phases]
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
        hessians = s.hessian_seconds or 0.0
        # what the training budget counts, as comply and the verdict read it: the loop alone under the record's
        # reading (train.budget_reading record), the loop and the Hessians under the strict one
        counted = s.train_seconds + (0.0 if s.budget_reading == "record" else hessians)
        rows.append((f"seed {s.seed} train", f"{s.seed}/train", [("train", s.train_seconds), ("hessians", hessians)],
                     counted))
        rows.append(
            (
                f"seed {s.seed} eval",
                f"{s.seed}/eval",
                [("load", s.eval_load_s), ("warmup", s.eval_warmup_s), ("score", s.eval_score_s)],
            )
        )
    budget = agg["budgets"]["train_seconds"]
    record_reading = [s.seed for s in seeds if s.budget_reading == "record"]
    training = "Training (loop + Hessians)"
    if record_reading:
        training = (f"Training (loop + Hessians; for seed(s) {', '.join(map(str, record_reading))} the loop alone, "
                    "the budget as PR #1855's run read it: train.budget_reading record, Hessians drawn, not counted)")
    if agg.get("record_hardware", True):
        caption = (
            f"{training} and evaluation (deserialize + compile warm-up + scoring) each have "
            f"{budget:.0f} s on 8xH100 SXM; compile warm-up of training is not counted."
        )
        limit: Optional[float] = budget
    else:
        where = "; ".join(agg.get("hardware_words") or ["not 8xH100"])
        caption = (
            f"Measured on {where}: the {budget:.0f} s budgets apply to 8xH100 SXM only, so no budget line is drawn. "
            "Training: loop + Hessians; evaluation: deserialize + compile warm-up + scoring."
        )
        limit = None
    return _stacked_bars("fig-time", "Time per phase.", rows, limit, "seconds", lambda v: f"{v:.0f} s", caption)


def bytes_figure(seeds: Sequence[Any]) -> str:
    rows = [
        (f"seed {s.seed}", str(s.seed), [("model", float(s.model_bytes)), ("code", float(s.code_bytes))]) for s in seeds
    ]
    cap = seeds[0].cap_bytes
    largest = max(s.total_bytes for s in seeds)
    scale = "" if largest * 2 >= cap else (
        f" The axis fits the artifact ({100.0 * largest / cap:.1f} % of the cap); the cap is off to the right.")
    return _stacked_bars(
        "fig-bytes",
        "Bytes per seed.",
        rows,
        float(cap),
        "bytes (decimal)",
        lambda v: f"{v / 1e6:.3f} MB" if v >= 1e6 else f"{v / 1e3:,.1f} KB",
        f"Compressed model + counted code against the {cap:,}-byte cap.{scale}",
        limit_label=f"cap {cap:,} bytes",
    )
