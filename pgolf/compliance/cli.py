"""Commands of the compliance checks: ``pgolf comply RUN_DIR`` (the rules on a run's own records) and
``pgolf preflight`` (can this machine run a recipe)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def _load_config(args: argparse.Namespace):
    from pgolf.config import load_run_config, parse_run_config

    if args.config_json is not None:
        try:
            data = json.loads(args.config_json)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config-json: not valid JSON: {exc}") from None
        return parse_run_config(data, "--config-json")
    return load_run_config(args.config)


def _comply(args: argparse.Namespace) -> int:
    from pgolf.compliance.comply import run_comply

    config = _load_config(args)
    folder = Path(args.run_dir).resolve().name
    if Path(args.run_dir).is_dir() and folder != config.run:  # config.yaml judging another recipe's run
        source = "--config-json" if args.config_json is not None else args.config
        raise ValueError(f"{args.run_dir} holds run {folder!r}, but {source} is the recipe of run {config.run!r}: "
                         "give the run's own recipe with --config")
    return run_comply(args.run_dir, config, args.data_dir, args.json_out, gate=not args.report_only)


def _register_comply(commands) -> None:
    p = commands.add_parser("comply", help="check a run's own records against the challenge rules (exit 1 on a FAIL)")
    p.add_argument("run_dir", help="results/<run>")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--config", default="config.yaml",
                       help="the run's recipe (default: config.yaml); its run name must be RUN_DIR's folder name")
    which.add_argument("--config-json", help="the whole recipe as JSON (Snakemake passes it this way)")
    p.add_argument("--data-dir", help="results/data/<name> (default: beside the run, from the recipe's data.name)")
    p.add_argument("--json-out", help="write the verdicts as JSON (atomically)")
    p.add_argument("--report-only", action="store_true", help="exit 0 even when a rule fails (sweeps)")
    p.set_defaults(func=_comply)


def _preflight_cmd(args: argparse.Namespace) -> int:
    from pgolf.compliance.preflight import print_checks, run_preflight
    from pgolf.config import parse_run_config
    from pgolf.io import atomic_write_json

    if bool(args.config) == bool(args.config_json):
        raise ValueError("give exactly one of --config FILE and --config-json JSON")
    config = args.config or parse_run_config(json.loads(args.config_json), "--config-json")
    checks = run_preflight(config, args.data_dir, verify_now=not args.no_verify, seed=args.seed)
    print_checks(checks)
    failed = [c for c in checks if not c.ok and c.required]
    if args.json_out:
        atomic_write_json(
            args.json_out,
            {
                "ok": not failed,
                "config": str(args.config or "--config-json"),
                "checks": [dataclasses.asdict(c) | {"status": c.status} for c in checks],
            },
        )
    return 1 if failed else 0


def _register_preflight(commands) -> None:
    p = commands.add_parser("preflight", help="check this machine can run a recipe (packages, GPUs, binaries, disk, data)")
    p.add_argument("--config", help="recipe YAML")
    p.add_argument("--config-json", help="the whole resolved recipe as JSON (what the Snakemake rule passes)")
    p.add_argument(
        "--data-dir",
        help="data root (holds verified.json and shards/) or the shards directory "
        "(default: results/data/<data.name>)",
    )
    p.add_argument(
        "--no-verify", action="store_true", help="do not run the data verification when verified.json is missing"
    )
    p.add_argument("--seed", type=int, help="the seed a training job runs (printed instead of the recipe's seed list)")
    p.add_argument("--json-out", help="write the checks as JSON here")
    p.set_defaults(func=_preflight_cmd)


def register(commands) -> None:
    _register_comply(commands)
    _register_preflight(commands)
