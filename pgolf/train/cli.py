"""Commands of the training stage: ``pgolf train`` (the stage, run under torchrun; also ``python -m pgolf.train``)
and ``pgolf bench train`` (the training step timed on synthetic tokens).

Only argument parsing lives here; the work is in :mod:`pgolf.train.loop` and :mod:`pgolf.train.bench`, imported
when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from pgolf.config.strict import nonneg_int, positive_float, positive_int



def _train(args: argparse.Namespace) -> int:
    from pgolf.config import ModelConfig, OptimConfig, TrainConfig, section_from_json
    from pgolf.train.loop import train

    model_cfg = section_from_json(ModelConfig, args.model_json, "--model-json")
    optim_cfg = section_from_json(OptimConfig, args.optim_json, "--optim-json")
    train_cfg = section_from_json(TrainConfig, args.train_json, "--train-json")
    train(model_cfg, optim_cfg, train_cfg, args.seed, args.data_dir, args.out_dir, args.device, args.init_checkpoint,
          keep_resume=args.keep_resume)
    return 0


def _register_train(commands) -> None:
    p = commands.add_parser("train", help="train one seed (the training stage; run it under torchrun)")
    p.add_argument("--model-json", required=True, help="the model section as JSON")
    p.add_argument("--optim-json", required=True, help="the optim section as JSON")
    p.add_argument("--train-json", required=True, help="the train section as JSON")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--data-dir", required=True, help="shards directory (verified by the data stage)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument(
        "--init-checkpoint", default=None, metavar="DIR",
        help="start from this pgolf checkpoint's weights instead of the seeded init (e.g. the record script's initial "
        "weights imported with `pgolf checkpoint import-record`); its model_config must equal --model-json",
    )
    p.add_argument(
        "--keep-resume", action="store_true",
        help="leave OUT_DIR/resume/ (a sweep's state of the last step, the attempt record) for the caller to remove "
        "once it has accepted the outputs, as the Snakemake rule does: a job killed before that resumes at the end",
    )
    p.set_defaults(func=_train)


# ---------------------------------------------------------------------------------------------- pgolf bench ...
# `pgolf bench eval` (pgolf.evaluate.cli) shares these argument and output helpers.


def emit_bench_result(result: dict[str, Any], line: str, out: Optional[str]) -> None:
    """The summary line on stderr, the JSON on stdout, and the JSON to ``out`` when given."""
    print(line, file=sys.stderr, flush=True)
    print(json.dumps(result), flush=True)
    if out:
        from pgolf.io import atomic_write_json

        atomic_write_json(Path(out), result)


def compile_flag(args: argparse.Namespace) -> Optional[bool]:
    """False for --no-compile, True for --compile, None: the recipe decides."""
    if args.no_compile:
        return False
    return True if args.compile else None


def add_bench_arguments(p: argparse.ArgumentParser, steps: int, warmup: int) -> None:
    p.add_argument("--config", required=True, help="recipe YAML (its model/optim/train/evaluate sections are used)")
    p.add_argument("--steps", type=positive_int, default=steps, help=f"timed steps per phase (default {steps})")
    p.add_argument(
        "--warmup", type=nonneg_int, default=warmup, help=f"untimed steps first: compile and autotune (default {warmup})"
    )
    p.add_argument("--no-fused", action="store_true", help="pure PyTorch MLP activation and loss (no Triton kernels)")
    compile_group = p.add_mutually_exclusive_group()
    compile_group.add_argument("--no-compile", action="store_true", help="eager mode")
    compile_group.add_argument("--compile", action="store_true", help="compile even if the recipe says not to")
    p.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (default inductor on CUDA, aot_eager on CPU)"
    )
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument(
        "--attention-backend", choices=["auto", "fa3", "fa4", "torch"], default=None,
        help="attention kernels (default: the recipe's model.attention_backend); the result records the choice",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON result to this file")


def _switch(value: Optional[str]) -> Optional[bool]:
    """An ``on|off`` flag: None when not given (the recipe's value stands), else whether it is on."""
    return None if value is None else value == "on"


def _bench_train(args: argparse.Namespace) -> int:
    from pgolf.config import load_run_config
    from pgolf.train.bench import bench_train, train_summary_line

    result = bench_train(
        load_run_config(args.config),
        steps=args.steps,
        warmup=args.warmup,
        grad_accum=args.grad_accum,
        micro_batch_tokens=args.micro_batch_tokens,
        fused=not args.no_fused,
        compile=compile_flag(args),
        compile_backend=args.compile_backend,
        looping=args.looping,
        device_kind=args.device,
        peak_tflops=args.peak_tflops,
        seed=args.seed,
        profile_steps=args.profile_steps,
        attention_backend=args.attention_backend,
        max_fusion_io_buffers=args.max_fusion_io_buffers,
        mix_order_reduction=_switch(args.mix_order_reduction),
        qk_kernel=_switch(args.qk_kernel),
        xsa_kernel=_switch(args.xsa_kernel),
        fold_scales=_switch(args.fold_scales),
        qkv_matmul=_switch(args.qkv_matmul),
        repeat_kv=_switch(args.repeat_kv),
        data_dir=args.data,
        trace_dir=args.trace,
        cuda_graphs=_switch(args.cuda_graphs),
        fused_grad_accumulation=_switch(args.fused_grad_accumulation),
    )
    emit_bench_result(result, train_summary_line(result), args.out)
    return 0


def _register_bench_train(commands) -> None:
    bench = commands.group("bench", help="training and evaluation throughput on this device (synthetic tokens)")
    p = bench.add_parser("train", help="ms/step, tokens/s, MFU, memory, compile time; looping off and on")
    add_bench_arguments(p, steps=10, warmup=3)
    p.add_argument(
        "--grad-accum", type=positive_int, default=None,
        help="micro-batches per step (default: train_batch_tokens / micro-batch tokens)",
    )
    p.add_argument(
        "--micro-batch-tokens", type=positive_int, default=None, help="tokens per forward (default: train.micro_batch_tokens)"
    )
    p.add_argument("--looping", choices=["on", "off", "both"], default="both", help="depth recurrence phases to time")
    p.add_argument(
        "--max-fusion-io-buffers", type=nonneg_int, default=None,
        help="inductor's cap on the buffers one fused kernel reads and writes (0: no cap; default: the recipe's "
        "train.compile_max_fusion_io_buffers)",
    )
    p.add_argument(
        "--mix-order-reduction", choices=["on", "off"], default=None,
        help="inductor's mix-order reduction fusion (default: the recipe's train.compile_mix_order_reduction)",
    )
    p.add_argument(
        "--qk-kernel", choices=["on", "off"], default=None,
        help="the q/k norm + RoPE + q gain Triton kernel (default: the recipe's train.fused_qk_norm_rope)",
    )
    p.add_argument(
        "--xsa-kernel", choices=["on", "off"], default=None,
        help="the XSA + output gate Triton kernel (default: the recipe's train.fused_xsa_gate)",
    )
    p.add_argument(
        "--qkv-matmul", choices=["on", "off"], default=None,
        help="q, k, v as one matmul feeding the q/k kernel (default: the recipe's train.fused_qkv_matmul)",
    )
    p.add_argument(
        "--repeat-kv", choices=["on", "off"], default=None,
        help="k / v heads repeated per query head by the q, k, v op: attention without GQA; needs the q, k, v matmul "
        "and the q/k kernel on, else no effect (default: the recipe's train.repeat_kv_heads)",
    )
    p.add_argument(
        "--fold-scales", choices=["on", "off"], default=None,
        help="attn_scale / mlp_scale through the o / down weights (default: the recipe's train.fold_output_scales)",
    )
    p.add_argument(
        "--cuda-graphs", choices=["on", "off"], default=None,
        help="replay each micro-batch's forward and backward from a CUDA graph (CUDA only; default: the recipe's "
        "train.cuda_graphs)",
    )
    p.add_argument(
        "--fused-grad-accumulation", choices=["on", "off"], default=None,
        help="add each micro-batch's gradients into .grad inside the compiled backward (default: the recipe's "
        "train.fused_grad_accumulation)",
    )
    p.add_argument("--peak-tflops", type=positive_float, default=None, help="dense bf16 peak for MFU (default: by device name)")
    p.add_argument(
        "--profile-steps", type=nonneg_int, default=0,
        help="after timing, profile this many more steps per phase: GPU time by kernel category, top kernels",
    )
    p.add_argument(
        "--data", metavar="DIR", default=None,
        help="micro-batch rows from the start of DIR's training shards instead of synthetic tokens (attention's "
        "cost follows document lengths: give a trainer it is compared with the same shards)",
    )
    p.add_argument(
        "--trace", metavar="DIR", default=None,
        help="with --profile-steps: write the profiled steps' Chrome trace to DIR and report the GPU's idle gaps "
        "(where it waited for the host, and for which host operation)",
    )
    p.set_defaults(func=_bench_train)


def _import_record(args: argparse.Namespace) -> int:
    from pgolf.config import load_run_config
    from pgolf.train.checkpoint import load_checkpoint
    from pgolf.train.record_import import import_record

    recipe = load_run_config(args.config).model if args.config else None
    path = import_record(args.state_pt, args.out, log=args.log, recipe_model=recipe, recipe_path=args.config,
                         kind=args.kind, force=args.force)
    state, meta = load_checkpoint(path.parent)
    cfg = meta["model_config"]
    print(f"{path}: {len(state)} tensors, {sum(t.numel() for t in state.values()):,} parameters, "
          f"{cfg['num_layers']} layers x {cfg['model_dim']}, weights {meta['weights']}, param_storage "
          f"{meta['param_storage']}; model config from {meta['source']['model_config_from']}", file=sys.stderr)
    return 0


def _register_checkpoint(commands) -> None:
    group = commands.group("checkpoint", help="training checkpoints from elsewhere")
    p = group.add_parser(
        "import-record", help="a state dict saved by PR #1855's train_gpt.py (final_model.pt) as a pgolf checkpoint",
        description="Writes a pgolf checkpoint (model.pt + checkpoint.json) that the Hessian, quantize, pack and evaluate "
        "stages and `pgolf train --init-checkpoint` accept. The architecture comes from the record run's log or a recipe.",
    )
    p.add_argument("state_pt", metavar="STATE_PT", help="the record's torch.save(model.state_dict()) file")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--log", metavar="LOG", help="the record run's log (its 'Hyperparameters:' block)")
    source.add_argument("--config", metavar="RECIPE", help="a recipe whose model section describes the weights")
    p.add_argument("--kind", choices=["final", "initial"], default="final",
                   help="final: trained weights (final_model.pt); initial: the state a record run starts from")
    p.add_argument("--force", action="store_true", help="replace a checkpoint already in DIR")
    p.set_defaults(func=_import_record)


def register(commands) -> None:
    _register_train(commands)
    _register_bench_train(commands)
    _register_checkpoint(commands)
