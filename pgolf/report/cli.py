"""Commands of the report stage: ``pgolf report`` (multi-seed aggregation: statistics, submission.json, the
submission folder, the HTML report), ``pgolf summary`` (what a run produced), ``pgolf check-folder`` and
``pgolf submission-schema``."""

from __future__ import annotations

import argparse
import sys

from pgolf.config.strict import positive_int


def _report(args: argparse.Namespace) -> int:
    from pgolf.config import AggregateConfig, ConfigError, section_from_json
    from pgolf.report.aggregate import run_report
    from pgolf.report.summary import summary_text

    try:
        if args.reproduce_command is not None and "{seed}" not in args.reproduce_command:
            raise ValueError(f"--reproduce-command {args.reproduce_command!r}: expected a command with {{seed}} where "
                             "each seed's number goes (the README lists one line per seed)")
        cfg = section_from_json(AggregateConfig, args.aggregate_json, "--aggregate-json")
        agg = run_report(
            args.run_dir,
            cfg,
            args.seeds,
            mode=args.mode,
            out_dir=args.out_dir,
            code_dir=args.code_dir,
            recipe=args.recipe,
            reproduce_command=args.reproduce_command,
            make_folder=not args.no_folder,
            comply_path=_comply_path(args),
        )
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"pgolf report: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(summary_text(agg))
    return 0


def _comply_path(args: argparse.Namespace):
    """--comply, else the run's comply.json when `pgolf comply` wrote one (the rule aggregate passes it too)."""
    from pathlib import Path

    if args.comply:
        if not Path(args.comply).is_file():
            raise FileNotFoundError(f"--comply {args.comply}: no such file")
        return args.comply
    default = Path(args.run_dir) / "comply.json"
    return default if default.is_file() else None


def _register_report(commands) -> None:
    parser = commands.add_parser("report", help="aggregate the seeds of a run: submission.json, report.html, the records folder")
    parser.add_argument("--run-dir", required=True, help="results/<run> (holds seed<s>/ and code/)")
    parser.add_argument("--aggregate-json", required=True, help="the aggregate section as JSON")
    parser.add_argument("--seeds", required=True, type=int, nargs="+", help="the run's seeds, in order")
    parser.add_argument("--mode", choices=["record", "sweep"], default="record", help="the recipe's mode")
    parser.add_argument("--out-dir", help="where the reports go (default: --run-dir)")
    parser.add_argument("--code-dir", help="bundled train_gpt.py + train_gpt.py.json (default: <run-dir>/code)")
    parser.add_argument("--recipe", help="recipe file named in the README's reproduction command")
    parser.add_argument("--reproduce-command", help="command line to run the bundled train_gpt.py, with {seed} "
                                                    "where the seed goes and optionally {nproc} where the seed's "
                                                    "process count goes (README; nothing else in it is replaced)")
    parser.add_argument("--no-folder", action="store_true", help="do not write the submission folder")
    parser.add_argument("--comply", help="the run's comply.json (default: <run-dir>/comply.json when present); its "
                                         "verdicts go into the report")
    parser.set_defaults(func=_report)


def _summary_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pgolf.report.summary import closing_summary

    if not Path(args.run_dir).is_dir():
        raise FileNotFoundError(f"{args.run_dir}: no such run folder")
    print(closing_summary(args.run_dir))
    return 0


def _register_summary(commands) -> None:
    p = commands.add_parser("summary", help="what a run produced: headline figures and where report.html, "
                                            "submission.json and the records folder are")
    p.add_argument("run_dir", help="results/<run>")
    p.set_defaults(func=_summary_cmd)


def _check_folder_cmd(args: argparse.Namespace) -> int:
    from pgolf.io import atomic_write_json
    from pgolf.report.folder import check_folder

    problems = check_folder(args.dir, args.cap_bytes)
    if args.json_out:
        atomic_write_json(args.json_out, {"folder": str(args.dir), "ok": not problems, "problems": problems})
    if problems:
        print(f"check-folder: {args.dir}: FAIL ({len(problems)} problem(s))", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"check-folder: {args.dir}: OK")
    return 0


def _schema_cmd(args: argparse.Namespace) -> int:
    from pgolf.report.schema import schema_text

    sys.stdout.write(schema_text())
    return 0


def _register_folder(commands) -> None:
    p = commands.add_parser("check-folder", help="check a submission folder (hashes, figures vs logs, size gate, files)")
    p.add_argument("dir", help="records/track_10min_16mb/<date>_<name>/")
    p.add_argument("--cap-bytes", type=positive_int, default=16_000_000, help="size cap (decimal bytes)")
    p.add_argument("--json-out", help="write {ok, problems} here")
    p.set_defaults(func=_check_folder_cmd)
    s = commands.add_parser("submission-schema", help="print the JSON schema of submission.json")
    s.set_defaults(func=_schema_cmd)


def register(commands) -> None:
    _register_report(commands)
    _register_summary(commands)
    _register_folder(commands)
