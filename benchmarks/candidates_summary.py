"""Which speed candidates made the training step faster: the step A/B of ``benchmarks/gpu_candidates.sh``.

Reads ``OUT/ab_<name>.json`` (``pgolf bench train --out``, one loop state): ``base`` and ``base2`` (the same
configuration before and after the candidates: their spread is the noise of this lease) and one file per candidate.
A candidate is faster when its ms/step is below the bases' mean by more than ``max(0.5 %, the bases' spread)``.
Prints one line per candidate and writes ``OUT/candidates.json``.

    python benchmarks/candidates_summary.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MIN_GAIN = 0.005  # a candidate must beat the base by at least 0.5 % of the step
BASES = ("base", "base2")


def ms_per_step(path: Path) -> float:
    """The first phase's ms/step of a bench JSON."""
    return float(json.loads(path.read_text())["phases"][0]["ms_per_step"])


def summarize(out: Path) -> dict:
    """{"base_ms": [...], "threshold_ms": float, "candidates": {name: {"ms": float, "delta_ms": float, "faster": bool}}}."""
    runs = {p.stem[len("ab_"):]: ms_per_step(p) for p in sorted(out.glob("ab_*.json"))}
    bases = [runs[name] for name in BASES if name in runs]
    if not bases:
        raise SystemExit(f"candidates_summary: no ab_base.json in {out}: the base run did not finish")
    base = sum(bases) / len(bases)
    threshold = max(MIN_GAIN * base, max(bases) - min(bases))
    candidates = {name: {"ms": ms, "delta_ms": ms - base, "faster": base - ms > threshold}
                  for name, ms in runs.items() if name not in BASES}
    return {"base_ms": bases, "threshold_ms": threshold, "candidates": candidates}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit("usage: candidates_summary.py OUT")
    out = Path(argv[0])
    summary = summarize(out)
    print(f"base {', '.join(f'{m:.1f}' for m in summary['base_ms'])} ms/step; a candidate must gain "
          f"{summary['threshold_ms']:.1f} ms")
    for name, c in summary["candidates"].items():
        print(f"  {name:<10} {c['ms']:.1f} ms/step ({c['delta_ms']:+.1f}): {'faster' if c['faster'] else 'not faster'}")
    (out / "candidates.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
