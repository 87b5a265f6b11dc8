"""Throughput of evaluation on synthetic data: diagnostic scoring and TTT with the record's model and settings.

    python benchmarks/bench_eval.py --docs 2000 --mode lora [--compile] [--model-json '{...}'] [--eval-json '{...}']

Documents have log-normal lengths (median ~600 tokens, mean ~950, like FineWeb validation); weights and tokens
are random - throughput does not depend on them. Prints one JSON line per phase: seconds, tokens/s, peak memory,
and the extrapolation to the record's 47,851,520 targets on 8 GPUs.

Measured on one H100 (torch 2.11, torch_varlen attention, record model, 2026-11-23):
  diagnostic rows of 65,536 tokens: eager 0.105 s/row; compiled 0.0385 s/row (1.7 M tok/s) after a 36 s compile;
  LoRA steps (64 slots, rank 80, all targets, checkpointed blocks): eager 0.26 s (L=128) .. 1.1 s (L=2048);
  compiled 0.063 s (L=128) .. 0.39 s (L=2048), peak 19.7 GiB, but ~107 s to compile each slot length (grad graph).
  Without checkpointing an eager L=2048 step runs out of 80 GB. torch.compile(dynamic=True) fails with
  checkpointing and did not finish compiling in 280 s without it.
Measured on one H200 (same software, 2026-12-01), compiled, no activation recompute: 0.061-0.080 s (L=128..512),
  0.139 s (L=1024), 0.276 s (L=2048, 59.5 GiB peak; 0.336 s with recompute), 81-97 s to compile each slot length.
  These prices feed ``pgolf eval-plan`` (benchmarks/eval_costs_*.json; docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from pgolf.config import EvaluateConfig, ModelConfig, TTTConfig, from_mapping
from pgolf.evaluate.stage import score_documents, warmup_scoring
from pgolf.model.gpt import GPT
from pgolf.evaluate.scoring import NllRunner
from pgolf.evaluate.ttt import run_ttt
from pgolf.evaluate.valdata import from_tokens

RECORD_TARGETS = 47_851_520


def synthetic_val(num_docs: int, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=6.4, sigma=0.9, size=num_docs), 2, 30_000).astype(np.int64)
    tokens = rng.integers(2, vocab, size=int(lengths.sum() + num_docs)).astype(np.uint16)
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    tokens[starts] = 1
    byte_counts = np.where(tokens == 1, 0, 4).astype(np.int32)
    return from_tokens(tokens, byte_counts)


def report(what: str, seconds: float, targets: int, device: torch.device, **extra) -> None:
    rate = targets / max(seconds, 1e-9)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    print(json.dumps({"what": what, "seconds": round(seconds, 2), "targets": targets, "tokens_per_s": round(rate),
                      "record_8gpu_s_estimate": round(RECORD_TARGETS / 8 / rate, 1) if rate else None, "peak_gib": round(peak, 2), **extra}),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--mode", choices=["none", "lora", "chunked"], default="lora")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--model-json", default="{}")
    parser.add_argument("--eval-json", default="{}")
    parser.add_argument("--skip-diagnostic", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_cfg = from_mapping(ModelConfig, json.loads(args.model_json), "--model-json")
    eval_data = json.loads(args.eval_json)
    eval_data.setdefault("compile", args.compile)
    eval_data.setdefault("progress_every_seconds", 30.0)
    eval_data["ttt"] = {**eval_data.get("ttt", {}), "mode": args.mode}
    cfg = from_mapping(EvaluateConfig, eval_data, "--eval-json")
    val = synthetic_val(args.docs, model_cfg.vocab_size, seed=0)
    print(json.dumps({"docs": val.num_docs, "targets": val.target_count, "device": str(device),
                      "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}), flush=True)

    torch.manual_seed(0)
    model = GPT(model_cfg).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.looping = model_cfg.loop_count > 1
    for p in model.parameters():
        p.requires_grad_(False)

    if not args.skip_diagnostic:
        runner = NllRunner(model, device, compile=cfg.compile)
        t = time.perf_counter()
        warm = warmup_scoring(runner, val, cfg, seed=0)
        report("diagnostic warm-up", time.perf_counter() - t, 0, device, warmup_s=round(warm, 2))
        torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
        t = time.perf_counter()
        result = score_documents(model, val, cfg, runner=runner)[0]
        report("diagnostic", time.perf_counter() - t, val.target_count, device, val_bpb=result.val_bpb)
    if cfg.ttt.mode != "none":
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out = run_ttt(model, val, cfg, 0, device=device)
        out.ledger.check_complete(val.target_mask())
        res = out.accumulator.local_result()
        report(f"ttt-{cfg.ttt.mode}", out.score_s, val.target_count, device, warmup_s=round(out.warmup_s, 2),
               val_bpb=res.val_bpb, summary={k: v for k, v in out.summary.items() if k != "phases"},
               phases=[{k: (round(v, 2) if isinstance(v, float) else v) for k, v in p.items()} for p in out.summary.get("phases", [])])


if __name__ == "__main__":
    main()
