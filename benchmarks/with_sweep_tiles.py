"""Run ``pgolf bench train`` (or pytest) with the TMA kernels' tiles taken from kernel sweeps, in one process.

    MLP_SWEEP=mlp.json QKV_SWEEP=qkv.json python benchmarks/with_sweep_tiles.py train --config config.yaml ...
    MLP_SWEEP=mlp.json python benchmarks/with_sweep_tiles.py pytest -m gpu tests/test_kernels.py

``MLP_SWEEP`` / ``QKV_SWEEP``: the ``--out`` JSON of ``mlp_kernel_bench.py --sweep-tiles`` /
``qkv_kernel_bench.py --sweep-tiles``. Each direction takes its fastest tile when that beats the default by more
than 1 %. Why a script: a kernel sweep times one kernel alone; whether its fastest tile also shortens the step
(L2 and SM sharing with the kernels around it) is an A/B of the whole step, which this runs without editing
``triton_kernels.TMA_TILES`` or ``attn_triton.QKV_GEMM_TILE``. A sweep JSON that lists one tile forces it (the
old defaults, for the B side of an A/B). ``MLP_WS=forward,backward`` (either or both) turns on the warp-specialized
Gluon MLP kernel in those directions (``triton_kernels.MLP_WARP_SPECIALIZED``; ``none`` turns it off in both);
``QKV_WS=1`` / ``0`` the Gluon q, k, v kernel (``attn_triton.QKV_WARP_SPECIALIZED``). The chosen tiles are printed
first.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgolf.model import attn_triton  # noqa: E402
from pgolf.model import triton_kernels as tk  # noqa: E402

BETTER_BY = 0.99  # a tile must be 1 % faster than the default to replace it


def fastest_tile(rows: list[dict], key: str, default: tuple) -> tuple:
    """The fastest timed tile of ``rows`` when it beats ``default`` by more than 1 % or the default was not timed."""
    timed = [r for r in rows if key in r]
    if not timed:
        return tuple(default)
    base = next((r[key] for r in timed if tuple(r["tile"]) == tuple(default)), None)
    best = min(timed, key=lambda r: r[key])
    return tuple(best["tile"]) if base is None or best[key] < BETTER_BY * base else tuple(default)


def apply_sweeps(environ=os.environ) -> None:
    """Set the tiles from the sweeps named in ``environ`` (MLP_SWEEP, QKV_SWEEP)."""
    if environ.get("MLP_SWEEP"):
        sweep = json.loads(Path(environ["MLP_SWEEP"]).read_text())["tile_sweep"]
        for direction, backward in (("forward", False), ("backward", True)):
            tk.TMA_TILES[backward] = fastest_tile(sweep[direction], "ms", tk.TMA_TILES[backward])
    if environ.get("QKV_SWEEP"):
        sweep = json.loads(Path(environ["QKV_SWEEP"]).read_text())["tile_sweep"]
        attn_triton.QKV_GEMM_TILE = fastest_tile(sweep, "forward_ms", attn_triton.QKV_GEMM_TILE)
    if environ.get("MLP_WS"):
        directions = [] if environ["MLP_WS"] == "none" else environ["MLP_WS"].split(",")
        if not set(directions) <= {"forward", "backward"}:
            sys.exit(f"with_sweep_tiles.py: MLP_WS is none or lists forward and/or backward, not {environ['MLP_WS']!r}")
        for backward in (False, True):
            tk.MLP_WARP_SPECIALIZED[backward] = ("backward" if backward else "forward") in directions
    if environ.get("QKV_WS"):
        if environ["QKV_WS"] not in ("0", "1"):
            sys.exit(f"with_sweep_tiles.py: QKV_WS is 0 or 1, not {environ['QKV_WS']!r}")
        attn_triton.QKV_WARP_SPECIALIZED = environ["QKV_WS"] == "1"


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("train", "pytest"):
        sys.exit("usage: with_sweep_tiles.py train|pytest ARGS (MLP_SWEEP / QKV_SWEEP name the sweeps' JSON)")
    apply_sweeps()
    print(f"tiles: mlp {tk.TMA_TILES} qkv {attn_triton.QKV_GEMM_TILE} warp-specialized: mlp "
          f"{tk.MLP_WARP_SPECIALIZED} qkv {attn_triton.QKV_WARP_SPECIALIZED}", flush=True)
    if argv[0] == "pytest":
        import pytest

        return pytest.main(argv[1:])
    from pgolf.cli import main as pgolf_main

    return pgolf_main(["bench", *argv], modules=("pgolf.train.cli", "pgolf.evaluate.cli"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
