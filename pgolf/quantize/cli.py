"""Commands of the post-training stages: ``pgolf hessians`` (calibration statistics from TRAINING data) and
``pgolf quantize`` (GPTQ + SDClip + LQER). The work is in :mod:`pgolf.quantize.hessians` and
:mod:`pgolf.quantize.stage`, imported when a command runs."""

from __future__ import annotations

import argparse
import sys

from pgolf.config.strict import nonneg_int


def _hessians(args: argparse.Namespace) -> int:
    from pgolf.config import ConfigError, HessianConfig, section_from_json
    from pgolf.quantize.hessians import run_hessian_stage

    try:
        cfg = section_from_json(HessianConfig, args.hessian_json, "--hessian-json")
        report, status = run_hessian_stage(
            args.checkpoint, args.data_dir, cfg, args.seed, args.out, args.report, args.mode, args.device
        )
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"pgolf hessians: error: {exc}", file=sys.stderr)
        return 2
    if status:
        print(f"pgolf hessians: refused (record mode): {report['message']}", file=sys.stderr)
    return status


def _register_hessians(commands) -> None:
    parser = commands.add_parser("hessians", help="the Hessian stage: X^T X per quantized matrix from training data")
    parser.add_argument("--checkpoint", required=True, help="training checkpoint directory")
    parser.add_argument("--data-dir", required=True, help="shards directory (only fineweb_train_*.bin are read)")
    parser.add_argument("--hessian-json", required=True, help="the hessians section as JSON")
    parser.add_argument("--seed", type=int, required=True, help="the run seed: picks the calibration offsets")
    parser.add_argument(
        "--mode",
        choices=["record", "sweep"],
        default="record",
        help="record: exit 3 when train + Hessians exceed the training cap",
    )
    parser.add_argument("--out", required=True, help="hessians file (torch.save of {weight name: H})")
    parser.add_argument("--report", required=True, help="report JSON")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.set_defaults(func=_hessians)


def _quantize(args: argparse.Namespace) -> int:
    import torch

    from pgolf.config import ConfigError, QuantizeConfig, section_from_json
    from pgolf.quantize.stage import run_quantize_stage

    try:
        cfg = section_from_json(QuantizeConfig, args.quantize_json, "--quantize-json")
        if args.threads < 0:
            raise ValueError(f"--threads: expected >= 0, got {args.threads}")
        if args.threads:
            torch.set_num_threads(args.threads)
        run_quantize_stage(args.checkpoint, args.hessians, cfg, args.out, args.report, args.device)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"pgolf quantize: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _register_quantize(commands) -> None:
    parser = commands.add_parser("quantize", help="the quantize stage: GPTQ + SDClip + LQER on the CPU by default")
    parser.add_argument("--checkpoint", required=True, help="training checkpoint directory")
    parser.add_argument("--hessians", required=True, help="hessians file of the Hessian stage")
    parser.add_argument("--quantize-json", required=True, help="the quantize section as JSON")
    parser.add_argument("--out", required=True, help="quantized model file (read by the pack stage)")
    parser.add_argument("--report", required=True, help="per-tensor error report JSON")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda", "auto"],
        default="cpu",
        help="cpu (default): results independent of the GPU the stage lands on",
    )
    parser.add_argument("--threads", type=nonneg_int, default=0, help="CPU threads for torch when the quantize section's cpu_threads is 0 (0: torch's default)")
    parser.set_defaults(func=_quantize)


def register(commands) -> None:
    _register_hessians(commands)
    _register_quantize(commands)
