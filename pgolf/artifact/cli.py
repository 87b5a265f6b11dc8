"""Commands of the artifact stage: ``pgolf pack build|inspect|check``, ``pgolf gate`` and ``pgolf bundle``.

- ``pgolf pack build``: the pack stage (quantized model -> artifact; refused when the model alone is over the cap);
- ``pgolf pack inspect ARTIFACT [--json]``: container fields, section sizes, pack settings, model config, input
  hashes and a summary of the tensor table (the artifact is verified first);
- ``pgolf pack check ARTIFACT --code train_gpt.py [--convention wrapper|file] [--cap N]``: verifies the artifact
  (also against the model config in its own header), counts the code, prints the counted total and exits with
  status 3 over the cap (0 when it fits; 2 for an unreadable artifact);
- ``pgolf gate``: the size gate of the staged pipeline (model bytes + counted code bytes);
- ``pgolf bundle``: the single-file ``train_gpt.py`` of a records folder.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pgolf.artifact.minify import CODE_BYTES_CONVENTIONS
from pgolf.config.strict import positive_int


def _pack_build(args: argparse.Namespace) -> int:
    from pgolf.artifact.pack import run_gated_stage, run_pack_stage
    from pgolf.config import PackConfig, section_from_json

    def work() -> tuple[dict[str, Any], int]:
        cfg = section_from_json(PackConfig, args.pack_json, "--pack-json")
        return run_pack_stage(args.quantized, args.checkpoint, cfg, args.code, args.out, args.report,
                              code_id=args.code_id)

    return run_gated_stage("pgolf pack build", work)


def _gate(args: argparse.Namespace) -> int:
    from pgolf.artifact.gate import run_gate
    from pgolf.artifact.pack import run_gated_stage
    from pgolf.config import PackConfig, section_from_json

    def work() -> tuple[dict[str, Any], int]:
        cfg = section_from_json(PackConfig, args.pack_json, "--pack-json")
        return run_gate(args.pack_report, args.code, args.artifact, cfg, args.out, code_id=args.code_id)

    return run_gated_stage("pgolf gate", work)


def _register_gate(commands) -> None:
    p = commands.add_parser("gate", help="the size gate: compressed model + counted code <= the cap (exit 3 over)")
    p.add_argument("--pack-report", required=True)
    p.add_argument("--artifact", required=True)
    p.add_argument("--code", required=True, help="the counted code file (train_gpt.py)")
    p.add_argument("--code-id", default=None, help="that file's CODE_HASH, recorded in the report (the submission checks it)")
    p.add_argument("--pack-json", required=True, help="the pack section as JSON (convention and cap)")
    p.add_argument("--out", required=True, help="gate report JSON (written also when over the cap)")
    p.set_defaults(func=_gate)


def _inspect(args: argparse.Namespace) -> int:
    from pgolf.artifact.inspect import inspect_artifact, inspect_lines, read_artifact

    info = inspect_artifact(read_artifact(args.artifact), args.artifact)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print("\n".join(inspect_lines(info)))
    return 0


def _check(args: argparse.Namespace) -> int:
    from pgolf.artifact.cap import EXIT_OVER_CAP, size_gate
    from pgolf.artifact.format import check_against_model_config, unpack
    from pgolf.artifact.inspect import read_artifact
    from pgolf.artifact.minify import counted_code_bytes
    from pgolf.artifact.pack import expected_shapes
    from pgolf.config import ModelConfig, from_mapping

    data = read_artifact(args.artifact)
    _, header = unpack(data, args.artifact)
    model_cfg = from_mapping(ModelConfig, header.get("model_config"), f"{args.artifact}: header.model_config")
    check_against_model_config(header, expected_shapes(model_cfg), str(args.artifact))
    code_bytes, _, _ = counted_code_bytes(args.code, args.convention)
    gate = size_gate(len(data), code_bytes, args.cap)
    print(f"model bytes: {gate.model_bytes:,}")
    print(f"code bytes ({args.convention}): {gate.code_bytes:,}")
    print(f"total bytes: {gate.total_bytes:,}")
    print(gate.message)
    return 0 if gate.ok else EXIT_OVER_CAP


def _register_pack(commands) -> None:
    pack_sub = commands.group("pack", help="build, inspect and check packed artifacts")
    build = pack_sub.add_parser("build", help="the pack stage: quantized model -> artifact (refused over the cap)")
    build.add_argument("--quantized", required=True, help="quantized model of the quantize stage")
    build.add_argument("--checkpoint", required=True, help="training checkpoint directory (its model config is stored)")
    build.add_argument("--pack-json", required=True, help="the pack section as JSON")
    build.add_argument("--code", default=None, help="the counted code file (train_gpt.py); without it the gate stage counts it")
    build.add_argument("--code-id", default=None,
                       help="with --code: that file's CODE_HASH (pgolf.artifact.bundle.code_identity), recorded in "
                            "the report beside the code bytes (never in the artifact)")
    build.add_argument("--out", required=True, help="artifact file, written only if it fits the cap")
    build.add_argument("--report", required=True, help="pack report JSON")
    build.set_defaults(func=_pack_build)
    inspect = pack_sub.add_parser(
        "inspect", help="sections, sizes, model config, hashes and tensor table of an artifact"
    )
    inspect.add_argument("artifact")
    inspect.add_argument("--json", action="store_true", help="print the description as JSON")
    inspect.set_defaults(func=_inspect)
    check = pack_sub.add_parser("check", help="verify an artifact and apply the size gate (exit 3 over the cap)")
    check.add_argument("artifact")
    check.add_argument("--code", required=True, help="the counted code file (train_gpt.py)")
    check.add_argument("--convention", choices=CODE_BYTES_CONVENTIONS, default="wrapper", help="code-bytes convention")
    check.add_argument("--cap", type=positive_int, default=16_000_000, help="size cap in bytes (decimal)")
    check.set_defaults(func=_check)


def _bundle(args: argparse.Namespace) -> int:
    from pgolf.artifact.bundle import BundleError, report_path, shipped_recipe, write_bundle
    from pgolf.config import load_run_config, parse_run_config

    if args.config:
        cfg = load_run_config(args.config)
    else:
        try:
            data = json.loads(args.config_json)
        except json.JSONDecodeError as exc:
            raise BundleError(f"--config-json: not valid JSON: {exc}") from None
        cfg = parse_run_config(data, "--config-json")
    # the recipe as the bundle rule embeds it (first seed, report-only settings at their defaults): one file identity
    report = write_bundle(shipped_recipe(cfg), args.out, minify=args.minify_modules, verify=not args.no_verify)
    print(f"{args.out}: {report['bytes_file']:,} bytes, {len(report['modules'])} modules, code hash {report['code_hash'][:16]}")
    print(f"counted code bytes: file {report['bytes_file']:,}, wrapper {report['bytes_wrapper']:,} "
          f"(recipe convention: {cfg.pack.code_bytes_convention})")
    print(f"third-party: {', '.join(report['third_party']['required'])}"
          + (f" (optional: {', '.join(report['third_party']['optional'])})" if report["third_party"]["optional"] else ""))
    print(report_path(args.out))
    return 0


def _register_bundle(commands) -> None:
    p = commands.add_parser("bundle", help="write the single-file train_gpt.py of a records folder (record run + config)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="recipe YAML")
    source.add_argument("--config-json", help="the whole recipe as JSON")
    p.add_argument("--out", required=True, help="output file, e.g. records/.../train_gpt.py (report: <out>.json)")
    p.add_argument("--minify-modules", action="store_true", help="embed the shipped, shrunk form of the modules (fewer counted bytes; pgolf.artifact.shrink)")
    p.add_argument("--no-verify", action="store_true", help="skip running --help of the file and its wrapper form")
    p.set_defaults(func=_bundle)


def register(commands) -> None:
    _register_pack(commands)
    _register_gate(commands)
    _register_bundle(commands)
