"""Commands of the evaluation stage.

- ``pgolf evaluate ARGS`` (also ``python -m pgolf.evaluate``): the stage as the pipeline runs it, under torchrun,
  with every knob of the recipe's ``evaluate`` section as JSON;
- ``pgolf eval --artifact A --config C``: the same evaluation for people, with defaults from the results tree;
- ``pgolf eval-plan``: the LoRA-TTT evaluation time projected on N GPUs from measured step prices (and the
  record's own schedule replayed);
- ``pgolf bench eval``: scoring and TTT-like step throughput on synthetic tokens.

Defaults of ``pgolf eval`` follow the results tree of the Snakemake rules: ``--data-dir
results/data/<data.name>/shards``, the tokenizer beside the shards (or the data folder, or ``tokenizer.path``),
``--seed`` the recipe's first seed, ``--out`` ``eval.json`` beside the artifact. The artifact's sha256 must match
``pack_report.json`` beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from pgolf.train.cli import add_bench_arguments, compile_flag, emit_bench_result
from pgolf.config.strict import nonneg_float, positive_float, positive_int

RECORD_VAL_DOCS = 50_000  # data.md: the record scores RECORD_VAL_TOKENS targets over these documents
RECORD_VAL_TOKENS = 47_851_520


# ------------------------------------------------------------------------------------ pgolf evaluate (the stage)


def _evaluate_stage(args: argparse.Namespace) -> int:
    from pgolf.config import EvaluateConfig, section_from_json
    from pgolf.evaluate.stage import run_evaluation
    from pgolf.evaluate.ledger import LegalityError

    try:
        cfg = section_from_json(EvaluateConfig, args.eval_json, "--eval-json")
        _, code = run_evaluation(
            args.artifact, cfg, args.seed, args.data_dir, args.out, checkpoint=args.checkpoint,
            tokenizer=args.tokenizer, pack_report=args.pack_report, mode=args.mode,
            allow_hash_mismatch=args.allow_hash_mismatch, metrics=args.metrics, device_kind=args.device,
        )
    except (ValueError, FileNotFoundError, LegalityError, FloatingPointError) as exc:
        print(f"pgolf evaluate: error: {exc}", file=sys.stderr)
        return 2
    return code


def _register_stage(sub) -> None:
    parser = sub.add_parser("evaluate", help="the evaluation stage (run under torchrun; knobs as JSON)")
    parser.add_argument("--artifact", required=True, help="packed artifact (pgolf.artifact.format format)")
    parser.add_argument("--eval-json", required=True, help="the evaluate section as JSON (every knob)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--data-dir", required=True, help="shards directory with fineweb_val_*.bin")
    parser.add_argument("--out", required=True, help="result JSON (written atomically by rank 0)")
    parser.add_argument("--checkpoint", help="training checkpoint directory: adds the pre-quant diagnostic")
    parser.add_argument("--tokenizer", help="SentencePiece model: needed for lookup-table byte accounting")
    parser.add_argument("--pack-report", help="pack report holding artifact_sha256 (default: pack_report.json beside the artifact)")
    parser.add_argument("--mode", choices=["record", "sweep"], default="record")
    parser.add_argument("--allow-hash-mismatch", action="store_true", help="evaluate an artifact whose sha256 differs from the pack report")
    parser.add_argument("--metrics", help="JSON-lines progress file (default: <out stem>_metrics.jsonl beside --out)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.set_defaults(func=_evaluate_stage)


# ------------------------------------------------------------------------------------------------ pgolf eval


def _default_tokenizer(cfg, data_dir: Path) -> Optional[Path]:
    candidates = [data_dir / "tokenizer.model", data_dir.parent / "tokenizer.model"]
    if cfg.tokenizer.source == "path" and cfg.tokenizer.path:
        candidates.insert(0, Path(cfg.tokenizer.path))
    return next((p for p in candidates if p.exists()), None)


def _eval(args: argparse.Namespace) -> int:
    from pgolf.config import load_run_config
    from pgolf.evaluate.stage import run_evaluation
    from pgolf.evaluate.ledger import LegalityError

    cfg = load_run_config(args.config)
    data_dir = Path(args.data_dir) if args.data_dir else Path("results/data") / cfg.data.name / "shards"
    artifact = Path(args.artifact)
    out = Path(args.out) if args.out else artifact.parent / "eval.json"
    seed = args.seed if args.seed is not None else cfg.seeds[0]
    tokenizer = Path(args.tokenizer) if args.tokenizer else _default_tokenizer(cfg, data_dir)
    try:
        _, code = run_evaluation(
            artifact, cfg.evaluate, seed, data_dir, out, checkpoint=args.checkpoint, tokenizer=tokenizer,
            pack_report=args.pack_report, mode=cfg.mode, allow_hash_mismatch=args.allow_hash_mismatch,
            device_kind=args.device,
        )
    except LegalityError as exc:  # a rule violation is a refusal, not a crash
        print(f"pgolf: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return code


def _register_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a packed artifact: exact bpb, diagnostics, legal TTT")
    p.add_argument("--artifact", required=True, help="packed artifact file")
    p.add_argument("--config", required=True, help="recipe YAML (its evaluate section and mode are used)")
    p.add_argument("--seed", type=int, help="seed for TTT (default: the recipe's first seed)")
    p.add_argument("--data-dir", help="shards directory (default: results/data/<data.name>/shards)")
    p.add_argument("--out", help="result JSON (default: eval.json beside the artifact)")
    p.add_argument("--checkpoint", help="training checkpoint directory for the pre-quant diagnostic")
    p.add_argument("--tokenizer", help="SentencePiece model for lookup-table byte accounting")
    p.add_argument("--pack-report", help="pack report with artifact_sha256 (default: pack_report.json beside the artifact)")
    p.add_argument("--allow-hash-mismatch", action="store_true", help="evaluate even if the artifact's sha256 differs")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.set_defaults(func=_eval)


# ------------------------------------------------------------------------------------------- pgolf eval-plan


def _eval_plan(args: argparse.Namespace) -> int:
    from pgolf.evaluate.plan import eval_plan

    print(json.dumps(eval_plan(args), indent=2 if args.pretty else None))
    return 0


def _register_eval_plan(sub) -> None:
    p = sub.add_parser("eval-plan", help="project a recipe's LoRA-TTT evaluation time on N GPUs from measured costs")
    p.add_argument("--config", required=True, help="recipe YAML (its evaluate.ttt section is planned)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--costs", help="costs JSON (benchmarks/eval_costs_*.json; benchmarks/record_pr1855_costs.json "
                                     "for --schedule record)")
    src.add_argument("--from-eval", help="eval.json of a legacy LoRA-TTT run: prices from its slot_timing and phases")
    p.add_argument("--schedule", choices=["auto", "pgolf", "record", "legacy"], default="auto",
                   help="pgolf: the recipe's record-variant schedule (lanes, side batches, exact rows); record: PR "
                        "#1855's own 8-rank schedule replayed (dynamic claiming, pause flag); legacy: the legacy "
                        "variant's rounds; auto: pgolf or legacy after evaluate.ttt.variant")
    p.add_argument("--gpus", type=positive_int, default=8, help="processes (one per GPU) of the projected run")
    p.add_argument("--lengths", help="document lengths, one per line (the record's doc_len: own tokens + the next "
                                     "BOS) or JSON with doc_len; default: benchmarks/record_doc_lengths.txt")
    p.add_argument("--data-dir", help="shards directory: plan on its real validation documents")
    p.add_argument("--tokenizer", help="with --data-dir and no byte sidecar")
    p.add_argument("--docs", type=positive_int, help=f"synthetic log-normal lengths for this many documents instead "
                                            f"(e.g. {RECORD_VAL_DOCS})")
    p.add_argument("--mean-targets", type=positive_float, default=RECORD_VAL_TOKENS / RECORD_VAL_DOCS)
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic lengths")
    p.add_argument("--slot-lengths", help="legacy schedule: override evaluate.ttt.slot_lengths, e.g. 512,2048")
    p.add_argument("--compile-cache", choices=["cold", "warm"], default="cold")
    p.add_argument("--warm-compile-seconds", type=nonneg_float, help="warm-up with a warm inductor cache")
    p.add_argument("--record-warmup-seconds", type=nonneg_float,
                   help="schedule record: the record's logged compile warm-up (its recompile delays scale with it)")
    p.add_argument("--pretty", action="store_true")
    p.set_defaults(func=_eval_plan)


# ------------------------------------------------------------------------------------------ pgolf bench eval


def _bench_eval(args: argparse.Namespace) -> int:
    from pgolf.config import load_run_config
    from pgolf.evaluate.bench import bench_eval, eval_summary_line

    result = bench_eval(
        load_run_config(args.config),
        steps=args.steps,
        warmup=args.warmup,
        batch_tokens=args.batch_tokens,
        fused=not args.no_fused,
        compile=compile_flag(args),
        compile_backend=args.compile_backend,
        device_kind=args.device,
        val_tokens=args.val_tokens,
        seed=args.seed,
        attention_backend=args.attention_backend,
    )
    emit_bench_result(result, eval_summary_line(result), args.out)
    return 0


def _register_bench_eval(commands) -> None:
    bench = commands.group("bench", help="training and evaluation throughput on this device (synthetic tokens)")
    p = bench.add_parser("eval", help="scoring and TTT-like forward+backward throughput, looping on")
    add_bench_arguments(p, steps=5, warmup=2)
    p.add_argument(
        "--batch-tokens", type=positive_int, default=None, help="tokens per packed row (default: evaluate.eval_batch_tokens)"
    )
    p.add_argument("--val-tokens", type=positive_int, default=RECORD_VAL_TOKENS, help="tokens for the time projections")
    p.set_defaults(func=_bench_eval)


def register(commands) -> None:
    _register_stage(commands)
    _register_eval(commands)
    _register_eval_plan(commands)
    _register_bench_eval(commands)
