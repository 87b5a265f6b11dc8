"""report.html: self-contained, and its figures survive a real browser (headless Chromium --dump-dom)."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pgolf.config import AggregateConfig, from_mapping
from pgolf.report.aggregate import run_report
from pgolf.report.html import nice_ticks
from report_fixtures import RECORD_BPB, make_run

CFG = {"baseline_name": "pr1787", "baseline_mean": 1.06335, "baseline_n": 3, "date": "2026-11-24"}
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Elements(HTMLParser):
    """Every start tag as (tag, attributes, id of the enclosing <figure>)."""

    def __init__(self):
        super().__init__()
        self.items: list[tuple[str, dict, str | None]] = []
        self.figure: str | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self.figure = attrs.get("id")
        self.items.append((tag, attrs, self.figure))

    def handle_endtag(self, tag):
        if tag == "figure":
            self.figure = None

    def handle_data(self, data):
        self.text.append(data)

    def find(self, figure: str, tag: str, **attrs) -> list[dict]:
        return [
            a for t, a, f in self.items if f == figure and t == tag and all(a.get(k) == v for k, v in attrs.items())
        ]


def parse(html: str) -> Elements:
    parser = Elements()
    parser.feed(html)
    return parser


@pytest.fixture
def report(tmp_path) -> tuple[Path, dict]:
    run_dir = make_run(tmp_path)
    agg = run_report(run_dir, from_mapping(AggregateConfig, CFG, "aggregate"), list(RECORD_BPB), make_folder=False)
    return run_dir / "report.html", agg


def check_figures(dom: Elements, agg: dict) -> None:
    """The four figures carry the numbers of the aggregate."""
    lines = dom.find("fig-loss", "polyline")
    assert sorted(int(a["data-seed"]) for a in lines) == sorted(RECORD_BPB)
    assert all(int(a["data-points"]) > 10 for a in lines)
    dots = {int(a["data-seed"]): float(a["data-value"]) for a in dom.find("fig-bpb", "circle")}
    assert dots == RECORD_BPB
    (mean,) = dom.find("fig-bpb", "rect", **{"data-role": "mean"})
    assert float(mean["data-value"]) == pytest.approx(agg["val_bpb"]["mean"], rel=1e-15)
    (ci,) = dom.find("fig-bpb", "line", **{"data-role": "ci95"})
    assert [float(ci["data-low"]), float(ci["data-high"])] == pytest.approx(agg["val_bpb"]["ci95"], rel=1e-15)
    (baseline,) = dom.find("fig-bpb", "line", **{"data-role": "baseline"})
    assert float(baseline["data-value"]) == pytest.approx(1.06335)
    phases = {
        (a["data-row"], a["data-phase"]): float(a["data-value"])
        for a in dom.find("fig-time", "rect")
        if "data-phase" in a
    }
    assert phases[("42/train", "train")] == 591.5 and phases[("42/train", "hessians")] == 7.5
    assert (
        phases[("0/eval", "load")] == 6.0
        and phases[("0/eval", "warmup")] == 40.0
        and phases[("0/eval", "score")] == 480.0
    )
    assert float(dom.find("fig-time", "line", **{"data-role": "budget"})[0]["data-value"]) == 600.0
    sizes = {
        (a["data-row"], a["data-phase"]): float(a["data-value"])
        for a in dom.find("fig-bytes", "rect")
        if "data-phase" in a
    }
    assert sizes[("1234", "model")] == 15_868_000 and sizes[("1234", "code")] == 32_000
    assert float(dom.find("fig-bytes", "line", **{"data-role": "budget"})[0]["data-value"]) == 16_000_000
    text = " ".join(dom.text)
    assert "sample std (ddof=1)" in text and "population std (ddof=0)" in text
    assert "nats per token" in text and "progression" in text


def test_report_is_self_contained_and_carries_the_figures(report):
    path, agg = report
    html = path.read_text()
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in html
    check_figures(parse(html), agg)


def find_chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium not installed (Debian: apt-get update && apt-get install -y chromium)")


def test_report_renders_in_headless_chromium(report, tmp_path):
    chromium = find_chromium()
    path, agg = report
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", path.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = parse(done.stdout)
    assert any(tag == "svg" for tag, _, _ in dom.items), "no SVG in the rendered DOM"
    check_figures(dom, agg)


def test_nice_ticks():
    assert nice_ticks(0, 600) == [0, 200, 400, 600]  # steps of 1, 2 or 5 x 10^k, about 5 intervals
    assert nice_ticks(0, 16_640_000) == [0, 5e6, 10e6, 15e6]
    ticks = nice_ticks(1.0583, 1.0642)
    assert ticks[0] >= 1.0583 and ticks[-1] <= 1.0642 and 3 <= len(ticks) <= 7
