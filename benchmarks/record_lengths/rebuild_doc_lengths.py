"""Rebuild the 50,000 validation document lengths of the record's evaluation from its own logs.

usage: python3 benchmarks/record_lengths/rebuild_doc_lengths.py [--out benchmarks/record_doc_lengths.txt] [--json]
(needs numpy and scipy; reads shared/reference/pr1855/train_seed*.log, or PR1855_DIR).

Writes benchmarks/record_doc_lengths.txt (one int per line; with --json also a .json beside it holding the method and
the verification report): the record's ``doc_len`` of every validation
document (``_find_docs``: its own tokens, BOS included, plus 1 for the next document's BOS, except the stream's
last document), sorted ascending (the record's batching sorts them so; stream order is not recoverable and no
schedule needs it). Targets per document = doc_len - 1 (the record scores the next BOS too).

How (every constraint below is checked at the end and reported):
 1. Anchors. ``ttp: bN/782 ... dl:MIN-MAX`` lines (rank 0 only, 213 distinct batches over the three seeds, all
    consistent) give the shortest and longest document of batch N. Batches are cut from the ascending sort, 64 per
    batch from the short end, so batch N covers sorted indices [64(N-1), 64N) (batch 782 holds the last 16):
    sorted[64(N-1)] = MIN and sorted[64(N-1)+n-1] = MAX.
 2. Base curve: monotone (PCHIP) interpolation of log(length) against the normal quantile z = probit((i+0.5)/N)
    through the anchors (a log-normal-like distribution is a straight line there); below the first anchor
    (index 128) a straight line in z with the slope of the first anchors.
 3. Corrections: each gap between consecutive anchors gets a smooth multiplicative bump exp(c_g sin(pi t)) (zero at
    both anchors, so anchors stay exact; ``c_g`` scaled by the gap's freedom log(MAX/MIN) across it), fitted by
    Gauss-Newton least squares to:
      - total: sum(doc_len) = 47,851,520 + 50,000 (data.md: 47,851,520 targets = sum(doc_len - 1));
      - phase sets: phase k trains on the first 833/1666/2500 scored documents in ascending batch order, i.e.
        sorted[47040+...]: phase 1 = sorted[48704:49537], phase 2 = sorted[47872:49538], phase 3 =
        sorted[47040:49540] (derivation in PLAN.md); its SGD runs ceil((sum(doc_len) - 1) / 32768) chunks, logged
        as 131 / 219 / 289 (``tttg: cI/N``), so 32768 (N-1) < sum - 1 <= 32768 N;
      - running losses: on rank 0, rl_k = (rl_{k-1} P_k + bl_k T_k) / (P_k + T_k) with T_k the targets of its k-th
        batch and P_k those of its earlier batches, so T_k / P_k = (rl_{k-1} - rl_k) / (rl_k - bl_k); with the
        4-decimal rounding this gives an interval per step; intervals narrower than 30 % are used (they pin down the
        sums of batches 782, 778, 771, 766 relative to the narrow batches 754, 752, 741, 740).
 4. Integer rounding, monotone repair, then the total is made exact by +-1 steps inside the widest gaps.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy.interpolate import PchipInterpolator
from scipy.special import ndtri

from record_logs import BATCH, NUM_BATCHES, NUM_DOCS, SUM_DL, TARGETS, all_logs, batch_ranges

HERE = Path(__file__).resolve().parent
PHASE_SETS = {1: (48704, 49537), 2: (47872, 49538), 3: (47040, 49540)}  # sorted index ranges, see PLAN.md
PHASE_CHUNKS = {1: 131, 2: 219, 3: 289}
CHUNK = 32768
ROUND = 5e-5  # half a unit of the 4th decimal


def batch_slice(b: int) -> slice:
    lo = BATCH * (b - 1)
    return slice(lo, min(lo + BATCH, NUM_DOCS))


def anchors_from(ranges: dict) -> list[tuple[int, int]]:
    pts = {}
    for b, (lo, hi) in ranges.items():
        s = batch_slice(b)
        pts[s.start] = lo
        pts[s.stop - 1] = hi
    return sorted(pts.items())


def ratio_constraints(logs) -> list[dict]:
    """T_k / P_k intervals from rank 0's running losses (see the module doc)."""
    out = []
    for seed, log in logs.items():
        seq = log.ttp
        for k in range(1, len(seq)):
            a, b, c = seq[k - 1].rl, seq[k].rl, seq[k].bl
            vals = []
            for da in (-ROUND, ROUND):
                for db in (-ROUND, ROUND):
                    for dc in (-ROUND, ROUND):
                        den = (b + db) - (c + dc)
                        if abs(den) < 1e-12:
                            vals.append(math.inf)
                            continue
                        vals.append(((a + da) - (b + db)) / den)
            lo, hi = min(vals), max(vals)
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0:
                continue
            mid = 0.5 * (lo + hi)
            if (hi - lo) / mid > 0.30:
                continue
            out.append({"seed": seed, "k": k, "batch": seq[k].batch, "prev": [t.batch for t in seq[:k]],
                        "lo": lo, "hi": hi, "mid": mid})
    return out


def base_curve(anchors: list[tuple[int, int]]) -> np.ndarray:
    idx = np.array([i for i, _ in anchors], dtype=np.float64)
    val = np.log(np.array([v for _, v in anchors], dtype=np.float64))
    z = ndtri((np.arange(NUM_DOCS) + 0.5) / NUM_DOCS)
    za = ndtri((idx + 0.5) / NUM_DOCS)
    f = PchipInterpolator(za, val, extrapolate=False)
    out = f(z)
    first = int(idx[0])
    # slope of the first anchors (indices < 1000) for the lower tail
    sel = idx < 1000
    slope = np.polyfit(za[sel], val[sel], 1)[0]
    out[:first] = val[0] + slope * (z[:first] - za[0])
    return out  # log lengths


def gaps_of(anchors):
    """(lo_index, hi_index, lo_value, hi_value) of every run of free indices, including the leading one."""
    gaps = []
    first_i, first_v = anchors[0]
    if first_i > 0:
        gaps.append((-1, first_i, None, first_v))
    for (i0, v0), (i1, v1) in zip(anchors, anchors[1:]):
        if i1 > i0 + 1:
            gaps.append((i0, i1, v0, v1))
    return gaps


def bump_matrix(gaps):
    """Per gap: (indices, weights) of its bump, and a prior scale for its coefficient."""
    bumps = []
    for i0, i1, v0, v1 in gaps:
        ii = np.arange(i0 + 1, i1)
        if v0 is None:  # leading gap: 1 at index 0, 0 at the first anchor
            w = (i1 - ii) / i1
            scale = 0.3
        else:
            t = (ii - i0) / (i1 - i0)
            w = np.sin(np.pi * t)
            scale = max(math.log(v1 / v0), 1e-3)
        bumps.append((ii, w, scale))
    return bumps


def linear_rows(ratios):
    """Constraint rows as (coefficient vector over x, target, tolerance, name)."""
    rows = []
    a = np.ones(NUM_DOCS)
    rows.append((a, float(SUM_DL), 0.5, "total"))
    for p, (lo, hi) in PHASE_SETS.items():
        a = np.zeros(NUM_DOCS)
        a[lo:hi] = 1.0
        n = PHASE_CHUNKS[p]
        rows.append((a, CHUNK * (n - 0.5) + 1, CHUNK / 4, f"phase{p}"))
    for r in ratios:
        # T_k - mid * P_k = 0 with T = sum(x) - n over the batch
        a = np.zeros(NUM_DOCS)
        s = batch_slice(r["batch"])
        a[s] += 1.0
        const = -(s.stop - s.start)
        for b in r["prev"]:
            sp = batch_slice(b)
            a[sp] -= r["mid"]
            const += r["mid"] * (sp.stop - sp.start)
        # tolerance: half the interval width times the predecessor mass (filled in after a first estimate)
        rows.append((a, -const, None, f"ratio s{r['seed']} b{r['batch']}<-{r['prev']}", r))
    return rows


def fit(anchors, ratios, iters=8):
    logx0 = base_curve(anchors)
    gaps = gaps_of(anchors)
    bumps = bump_matrix(gaps)
    rows = linear_rows(ratios)
    c = np.zeros(len(bumps))
    for _ in range(iters):
        logx = logx0.copy()
        for (ii, w, scale), cg in zip(bumps, c):
            logx[ii] += cg * scale * w
        x = np.exp(logx)
        # Jacobian of x wrt c: dx_i/dc_g = x_i * scale_g * w_gi
        J_rows, resid, tol = [], [], []
        for row in rows:
            a, target, t = row[0], row[1], row[2]
            if t is None:
                r = row[4]
                prev_mass = sum(x[batch_slice(b)].sum() - (batch_slice(b).stop - batch_slice(b).start) for b in r["prev"])
                t = 0.5 * (r["hi"] - r["lo"]) * prev_mass / 2
            jr = np.array([(a[ii] * x[ii] * scale * w).sum() for ii, w, scale in bumps])
            J_rows.append(jr / t)
            resid.append((target - a @ x) / t)
        J = np.array(J_rows)
        res = np.array(resid)
        # minimize |c + dc|^2 + |J dc - res|^2  ->  (I + J^T J) dc = J^T res - c
        H = np.eye(len(c)) + J.T @ J
        g = J.T @ res - c
        c = c + np.linalg.solve(H, g)
    logx = logx0.copy()
    for (ii, w, scale), cg in zip(bumps, c):
        logx[ii] += cg * scale * w
    return np.exp(logx), gaps, c, bumps


def integerize(x, anchors, gaps):
    xi = np.rint(x).astype(np.int64)
    for i, v in anchors:
        xi[i] = v
    xi = np.maximum(xi, 2)
    for i0, i1, v0, v1 in gaps:  # interiors stay between their anchors
        xi[i0 + 1 : i1] = np.clip(xi[i0 + 1 : i1], v0 if v0 is not None else 2, v1)
    xi = np.maximum.accumulate(xi)  # monotone repair (anchors are monotone, so they survive)
    for i, v in anchors:
        assert xi[i] == v, (i, xi[i], v)
    # exact total: +-1 steps on the free indices of the widest gaps, keeping the order
    diff = SUM_DL - int(xi.sum())
    order = sorted(gaps, key=lambda g: -(math.log(g[3] / g[2]) if g[2] else 0.0) * (g[1] - g[0]))
    step = 1 if diff > 0 else -1
    while diff != 0:
        moved = False
        for i0, i1, v0, v1 in order:
            lo = max(i0 + 1, 0)
            # move the largest (diff > 0) or smallest (diff < 0) index that still can move
            cand = range(i1 - 1, lo - 1, -1) if step > 0 else range(lo, i1)
            for i in cand:
                new = xi[i] + step
                left = xi[i - 1] if i > 0 else 2
                right = xi[i + 1] if i + 1 < NUM_DOCS else 10**9
                if left <= new <= right and new >= 2:
                    xi[i] = new
                    diff -= step
                    moved = True
                    break
            if diff == 0:
                break
        if not moved:
            raise RuntimeError(f"cannot place the remaining {diff} tokens")
    return xi


def verify(xi, ranges, ratios) -> dict:
    rep = {"count": int(len(xi)), "sum_doc_len": int(xi.sum()), "targets": int((xi - 1).sum()),
           "sorted": bool(np.all(np.diff(xi) >= 0)), "min": int(xi.min()), "max": int(xi.max())}
    assert rep["count"] == NUM_DOCS and rep["sum_doc_len"] == SUM_DL and rep["targets"] == TARGETS and rep["sorted"]
    bad = []
    for b, (lo, hi) in ranges.items():
        s = xi[batch_slice(b)]
        if int(s.min()) != lo or int(s.max()) != hi:
            bad.append(b)
    rep["batches_checked"] = len(ranges)
    rep["batch_range_mismatches"] = bad
    assert not bad
    rep["phase_chunks"] = {}
    for p, (lo, hi) in PHASE_SETS.items():
        total_tokens = int(xi[lo:hi].sum()) - 1
        n = -(-total_tokens // CHUNK)
        rep["phase_chunks"][p] = {"docs": hi - lo, "tokens": int(xi[lo:hi].sum()), "chunks": n, "logged": PHASE_CHUNKS[p]}
        assert n == PHASE_CHUNKS[p], rep["phase_chunks"][p]
    viol = []
    for r in ratios:
        T = lambda b: int(xi[batch_slice(b)].sum()) - (batch_slice(b).stop - batch_slice(b).start)
        val = T(r["batch"]) / sum(T(b) for b in r["prev"])
        if not (r["lo"] <= val <= r["hi"]):
            viol.append((r["seed"], r["batch"], round(val, 4), round(r["lo"], 4), round(r["hi"], 4)))
    rep["ratio_constraints"] = len(ratios)
    rep["ratio_violations"] = viol
    assert not viol, viol
    rep["batch_782"] = {"docs": 16, "sum": int(xi[batch_slice(782)].sum()), "lengths": xi[batch_slice(782)].tolist()}
    rep["longest_batch_maxes"] = {b: int(xi[batch_slice(b)].max()) for b in range(775, 783)}
    rep["quantiles"] = {q: int(np.quantile(xi, q)) for q in (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0)}
    rep["mean_targets"] = float((xi - 1).mean())
    return rep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE.parent / "record_doc_lengths.txt"))
    ap.add_argument("--json", action="store_true", help="also write the .json with the method and verification")
    args = ap.parse_args()
    logs = all_logs()
    ranges = batch_ranges(logs)
    assert max(ranges) == NUM_BATCHES
    anchors = anchors_from(ranges)
    ratios = ratio_constraints(logs)
    x, gaps, c, bumps = fit(anchors, ratios)
    xi = integerize(x, anchors, gaps)
    rep = verify(xi, ranges, ratios)
    rep["anchors"] = len(anchors)
    rep["gaps"] = len(gaps)
    rep["max_abs_correction_log"] = float(max(abs(cg * s) for cg, (_, _, s) in zip(c, bumps)))
    rep["ratio_used"] = [(r["seed"], r["batch"], r["prev"], round(r["lo"], 4), round(r["hi"], 4)) for r in ratios]
    out = Path(args.out)
    doc = {
        "what": "PR #1855 validation doc_len (record _find_docs convention: own tokens incl. BOS + the next BOS; "
                "targets = doc_len - 1), sorted ascending; rebuilt from the record's logs",
        "how": __doc__.strip(),
        "num_docs": NUM_DOCS, "sum_doc_len": SUM_DL, "targets": TARGETS,
        "verification": {k: v for k, v in rep.items() if k not in ("batch_782",)},
        "doc_len": xi.tolist(),
    }
    if args.json:
        out.with_suffix(".json").write_text(json.dumps(doc))
    out.with_suffix(".txt").write_text("\n".join(str(int(v)) for v in xi) + "\n")
    print(json.dumps({k: v for k, v in rep.items() if k != "ratio_used"}, indent=1, default=str))
    print(f"ratio constraints used: {len(ratios)}")
    for r in rep["ratio_used"]:
        print("  ", r)
    print(f"wrote {out.with_suffix('.txt')}")


if __name__ == "__main__":
    main()
