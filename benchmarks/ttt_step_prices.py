"""Step prices of the record variant of LoRA TTT on this GPU, as a format-2 costs file for ``pgolf eval-plan``.

    python benchmarks/ttt_step_prices.py --out benchmarks/eval_costs_<gpu>_<date>.json [--eager] [--repeats 5]

On the record-size model (config.yaml, random weights) and random tokens it times, through the evaluation's own
code (:class:`pgolf.evaluate.ttt_record.RecordTTT`: rows built on the device, forward, scoring, ledger, backward,
fused AdamW):
  * the compile of the one dynamic graph and its warm-up (``compile_seconds``);
  * training steps of n rows x width w on a grid (n in 2..64, w in 48..2048) and score-only steps, then fits
    ``a + b n w`` (``step.a``, ``step.b``, ``step.score_only_factor``);
  * with CUDA graphs, replayed full-batch steps for w <= 480 (``step.graph_a``);
  * the phase SGD (8 rows of 4096 tokens per 32,768-token chunk on this one GPU: ``phase_tokens_per_s``);
  * one CPU draw of a lane's adapters (``adapter_draw_seconds``).
Prints the grid and writes the JSON (``load_seconds`` from ``--load-seconds``, measured by a real evaluation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pgolf.config import load_run_config  # noqa: E402
from pgolf.evaluate.stage import apply_embed_dtype  # noqa: E402
from pgolf.evaluate.ttt_graphs import StepGraphs  # noqa: E402
from pgolf.evaluate.ttt_phase import phase_sgd  # noqa: E402
from pgolf.evaluate.ttt_record import RecordTTT  # noqa: E402
from pgolf.evaluate.valdata import from_tokens  # noqa: E402
from pgolf.model.gpt import GPT  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eager", action="store_true", help="no torch.compile")
    parser.add_argument("--load-seconds", type=float, default=4.08, help="artifact load (measured 2026-11-23)")
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script: 4 documents, tiny grid")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    run_cfg = load_run_config(ROOT / "config.yaml")
    cfg = run_cfg.evaluate
    ttt = dataclasses.replace(cfg.ttt, lanes=1, inflight=0, side_batches=False, phase_rows=1, cuda_graphs=False)
    if args.smoke:
        ttt = dataclasses.replace(ttt, docs_per_batch=4, context_tokens=96)
    cfg = dataclasses.replace(cfg, ttt=ttt, compile=not args.eager and not args.smoke)
    torch.manual_seed(0)
    model = GPT(run_cfg.model).to(device)
    model.looping = True
    for p in model.parameters():
        p.requires_grad_(False)
    apply_embed_dtype(model, cfg)
    P, C, ctx = ttt.docs_per_batch, ttt.chunk_tokens, ttt.context_tokens
    doc = 4 * ctx  # long documents: every step has full windows
    rng = np.random.default_rng(0)
    tokens = rng.integers(8, run_cfg.model.vocab_size, size=P * doc).astype(np.uint16)
    tokens[::doc] = 1
    val = from_tokens(tokens, np.where(tokens == 1, 0, 2).astype(np.int32), score_next_bos=True)
    runner = RecordTTT(model, val, cfg, 0, device=device)
    t = time.perf_counter()
    compile_s = runner.compile() if cfg.compile else 0.0
    print(f"compile + warm-up: {compile_s:.1f} s ({time.perf_counter() - t:.1f} s)", flush=True)
    starts = torch.tensor(val.doc_starts, device=device)
    pred = torch.full((P,), doc - 1, device=device, dtype=torch.int64)
    nch = -(-pred // C)
    runner.workspace.begin_batch(P)
    rows, prices, score_only = [], [], []
    grid_n, grid_w = ((2, 4), (48, 96)) if args.smoke else ((2, 8, 16, 32, 64), (48, 192, 480, 768, 1536, 2048))
    for n in grid_n:
        for w in grid_w:
            c = w // C - 1 if w < ctx else ctx // C + 3
            meta = (starts[:n], pred[:n], nch[:n])
            s = timed(lambda: runner.step(meta, c, w, True, 0, n), args.repeats)
            rows.append((n, w))
            prices.append(s)
            if n == P:
                score_only.append((w, timed(lambda: runner.step(meta, c, w, False, 0, n), args.repeats), s))
            print(f"n {n:3d} w {w:5d}: {1e3 * s:8.2f} ms", flush=True)
    X = np.array([[1.0, n * w] for n, w in rows])
    (a, b), *_ = np.linalg.lstsq(X, np.array(prices), rcond=None)
    f = float(np.mean([(so - a) / (tr - a) for w, so, tr in score_only if w >= min(768, grid_w[-1])]))
    print(f"fit: a = {1e3 * a:.2f} ms/step, b = {b:.3e} s per row-token, score-only factor {f:.2f}")
    graph_a = None
    if device.type == "cuda":
        runner.graphs = graphs = StepGraphs(runner)
        meta_all = torch.stack([starts, pred, nch])
        replays = []
        for w in (48, 96, 192, 480):
            c = w // C - 1
            for _ in range(2):  # eager once, then the capture (and its first replay)
                graphs.run(runner, meta_all, c, w, True)
            s = timed(lambda: graphs.run(runner, meta_all, c, w, True), args.repeats)
            replays.append(s - b * P * w)
            print(f"graph n {P} w {w}: {1e3 * s:.2f} ms (failure: {graphs.failure})", flush=True)
        graph_a = float(np.mean(replays)) if graphs.failure is None else None
    stream = torch.from_numpy(rng.integers(8, run_cfg.model.vocab_size, size=(1 if args.smoke else 8) * 32768 + 1)).to(device)
    stream[::3000] = 1
    info = phase_sgd(model, stream, chunk_tokens=32768, seq_len=cfg.eval_seq_len, lr=1e-3, momentum=0.9, clip=1.0,
                     rows=8, autocast=runner.autocast)
    lane_draw = timed(lambda: runner.layout.draw_a_(runner.workspace.A, torch.Generator().manual_seed(0)), 1)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)"
    out = {"format": 2, "source": f"{args.out}: benchmarks/ttt_step_prices.py on one {gpu}, "
                                  f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}",
           "measured_with": {"docs_per_batch": P, "lora_rank": ttt.lora_rank, "model": "record (config.yaml)",
                             "device": gpu, "compile": cfg.compile},
           "step": {"a": float(a), "b": float(b), "score_only_factor": f, "graph_a": graph_a},
           "grid": [{"n": n, "w": w, "seconds": s} for (n, w), s in zip(rows, prices)],
           "compile_seconds": compile_s, "phase_tokens_per_s": info["tokens_per_s"], "phase_fixed_seconds": 1.0,
           "load_seconds": args.load_seconds, "adapter_draw_seconds": lane_draw}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "grid"}, indent=1))


if __name__ == "__main__":
    main()
