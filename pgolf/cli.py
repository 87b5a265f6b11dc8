"""The ``pgolf`` command line. Each command group lives beside the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

from pgolf.config import ConfigError

# module -> that module's `register(subparsers)` adds its command group
COMMAND_MODULES = [
    "pgolf.config_cli",
    "pgolf.data.cli",
    "pgolf.model_cli",
    "pgolf.evaluate_cli",
    "pgolf.eval_plan",
    "pgolf.bundle",
    "pgolf.pack_cli",
    "pgolf.submission",
    "pgolf.preflight",
    "pgolf.bench",
    "pgolf.comply",
    "pgolf.recipe_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgolf", description="Parameter Golf pipeline")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"pgolf: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
