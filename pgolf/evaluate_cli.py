"""Command ``pgolf eval``: evaluate a packed artifact with a recipe's ``evaluate`` section (for people; the
pipeline calls ``python -m pgolf.evaluate`` with every knob as JSON).

    pgolf eval --artifact results/record/seed42/pack/artifact.bin --config config.yaml [--seed N]
               [--data-dir D] [--out F] [--checkpoint DIR] [--tokenizer T] [--allow-hash-mismatch]

Defaults follow the results tree of the Snakemake rules: ``--data-dir results/data/<data.name>/shards``, the
tokenizer beside the shards (or the data folder, or ``tokenizer.path``), ``--seed`` the recipe's first seed,
``--out`` ``eval.json`` beside the artifact. The artifact's sha256 must match ``pack_report.json`` beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional


def _default_tokenizer(cfg, data_dir: Path) -> Optional[Path]:
    candidates = [data_dir / "tokenizer.model", data_dir.parent / "tokenizer.model"]
    if cfg.tokenizer.source == "path" and cfg.tokenizer.path:
        candidates.insert(0, Path(cfg.tokenizer.path))
    return next((p for p in candidates if p.exists()), None)


def _eval(args: argparse.Namespace) -> int:
    from pgolf.config import load_run_config
    from pgolf.evaluate import run_evaluation
    from pgolf.ttt import LegalityError

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


def register(sub: argparse._SubParsersAction) -> None:
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
