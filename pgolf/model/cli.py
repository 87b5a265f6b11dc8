"""Command group ``pgolf model ...``: inspect an architecture without allocating it.

``pgolf model summary --config FILE`` (or ``--model-json JSON``) builds the model on the meta device and
prints parameter counts per optimizer group and per role; the last line is ``total_params: N`` so scripts
can read it with ``tail -n 1``.
"""

from __future__ import annotations

import argparse

from pgolf.config import ModelConfig, load_run_config, section_from_json


def _model_config(args: argparse.Namespace) -> ModelConfig:
    if args.model_json:
        return section_from_json(ModelConfig, args.model_json, "--model-json")
    if args.config:
        return load_run_config(args.config).model
    raise ValueError("give --config FILE or --model-json JSON")


def _summary(args: argparse.Namespace) -> int:
    from pgolf.model.gpt import summary_lines  # torch is imported only when the command runs

    for line in summary_lines(_model_config(args)):
        print(line)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("model", help="inspect the model architecture")
    model_sub = parser.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    summary = model_sub.add_parser("summary", help="parameter counts per group and role (meta device, no memory)")
    source = summary.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="recipe YAML file; its model section is used")
    source.add_argument("--model-json", help="the model section as JSON (what Snakemake passes)")
    summary.set_defaults(func=_summary)
