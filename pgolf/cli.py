"""The ``pgolf`` command line: it only collects the commands each stage's ``cli`` module registers.

Every stage subpackage has one ``cli.py`` with ``register(commands)``; it adds its commands and imports its
implementation only when a command runs, so ``pgolf --help`` and the cheap commands stay fast (no torch).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# the stage subpackages, in the order of the DAG; each module's `register(commands)` adds its commands
COMMAND_MODULES = (
    "pgolf.config.cli",
    "pgolf.data.cli",
    "pgolf.model.cli",
    "pgolf.train.cli",
    "pgolf.quantize.cli",
    "pgolf.artifact.cli",
    "pgolf.evaluate.cli",
    "pgolf.report.cli",
    "pgolf.compliance.cli",
)


class Commands:
    """The top-level subcommands, plus named groups (``pgolf bench ...``) that several stages add to."""

    def __init__(self, subparsers: argparse._SubParsersAction):
        self._subparsers = subparsers
        self._groups: dict[str, argparse._SubParsersAction] = {}

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self._subparsers.add_parser(name, **kwargs)

    def group(self, name: str, help: str) -> argparse._SubParsersAction:
        """The subcommands of group ``name`` (created by the first stage that asks for it)."""
        if name not in self._groups:
            parser = self._subparsers.add_parser(name, help=help)
            self._groups[name] = parser.add_subparsers(dest=f"{name}_command", required=True, metavar="SUBCOMMAND")
        return self._groups[name]


def build_parser(modules: tuple[str, ...] = COMMAND_MODULES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgolf", description="Parameter Golf pipeline")
    commands = Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    for name in modules:
        importlib.import_module(name).register(commands)
    return parser


# the argparse destinations that name what a command WRITES (--out, --report, --json-out, --metrics)
OUTPUT_FILE_DESTS = ("out", "report", "json_out", "metrics")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _word_dests(parser: argparse.ArgumentParser) -> set[str]:
    """Destinations of arguments that take a word from a fixed list (``--mode sweep``, ``data download tokenizer``),
    in every subcommand: their values are never paths, even where a file of that name exists."""
    dests: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                dests |= _word_dests(sub)
        elif action.choices is not None:
            dests.add(action.dest)
    return dests


def overwrite_problems(args: argparse.Namespace, words: set[str] = frozenset()) -> list[str]:
    """An output file named twice, or naming a file the command reads: the run would destroy its own input (a
    quantized model replaced by its artifact, a pack report by the gate's) or one of its results. ``words``: the
    destinations whose values are words, not paths (:func:`_word_dests`)."""
    paths = {dest: Path(value).resolve() for dest, value in vars(args).items()
             if isinstance(value, str) and value and dest not in words}
    outputs = {dest: path for dest, path in paths.items() if dest in OUTPUT_FILE_DESTS}
    problems = []
    for dest, path in outputs.items():
        for other, other_path in paths.items():
            if other == dest or other_path != path:
                continue
            if other in OUTPUT_FILE_DESTS and other < dest:
                continue  # a pair of outputs: said once
            if other in OUTPUT_FILE_DESTS or path.is_file():
                problems.append(f"{_flag(dest)} {getattr(args, dest)} is also {_flag(other)}: the command would "
                                f"overwrite {'another of its outputs' if other in OUTPUT_FILE_DESTS else 'its input'}")
    return problems


def main(argv: list[str] | None = None, modules: tuple[str, ...] = COMMAND_MODULES) -> int:
    parser = build_parser(modules)
    args = parser.parse_args(argv)
    from pgolf.config import ConfigError

    problems = overwrite_problems(args, _word_dests(parser))
    if problems:
        print("\n".join(f"pgolf: error: {problem}" for problem in problems), file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    # OSError: a folder for a file, a missing or unwritable path; FloatingPointError: a diverged training or TTT run
    except (ConfigError, ValueError, OSError, FloatingPointError) as exc:
        print(f"pgolf: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
