"""Time the hessians -> quantize -> pack stages at record size on synthetic data (weights random, not trained).

    python benchmarks/post_training_stages.py --work DIR [--hessian-device cuda] [--quantize-device cpu]

Builds a record-config checkpoint (random weights; the zero-initialized matrices get noise so every activation is
non-trivial), synthetic training shards, and runs the three stage entries as the Snakemake rules do. Prints the
timing and size figures of their reports. Sizes are NOT the record's: random weights compress worse than trained.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_shards import synthetic_stream  # noqa: E402

from pgolf.train.checkpoint import save_checkpoint  # noqa: E402
from pgolf.config import HessianConfig, ModelConfig, PackConfig, QuantizeConfig, TrainConfig, to_dict  # noqa: E402
from pgolf.data.shards import shard_name, write_shard  # noqa: E402
from pgolf.model.gpt import GPT  # noqa: E402


def make_inputs(work: Path, train_tokens: int) -> tuple[Path, Path]:
    data = work / "shards"
    if not data.exists():
        data.mkdir(parents=True)
        rng = np.random.default_rng(0)
        write_shard(data / shard_name("train", 0), synthetic_stream(train_tokens, 8192, rng))
        write_shard(data / shard_name("val", 0), synthetic_stream(100_000, 8192, rng))
    cfg = ModelConfig()
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and float(p.abs().max()) == 0.0:
                p.normal_(0.0, 0.02)
    meta = {"model_config": to_dict(cfg), "train_config": to_dict(TrainConfig()), "train_seconds": 0.0}
    save_checkpoint(work / "checkpoint", {n: p.detach() for n, p in model.named_parameters()}, meta)
    return data, work / "checkpoint"


def run(args: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(proc.stderr.strip().splitlines()[-1], flush=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--train-tokens", type=int, default=20_000_000)
    parser.add_argument("--hessian-device", default="auto")
    parser.add_argument("--quantize-device", default="cpu")
    parser.add_argument("--batches", type=int, default=HessianConfig().batches, help="calibration batches (record: 16)")
    parser.add_argument(
        "--batch-rows", type=int, default=HessianConfig().batch_rows, help="rows per batch (record: 48)"
    )
    args = parser.parse_args()
    work = Path(args.work)
    data, ckpt = make_inputs(work, args.train_tokens)
    (work / "train_gpt.py").write_text(Path(__file__).read_text())
    figures = {}
    figures["hessian_process_s"] = run(
        [
            "pgolf.quantize.hessians",
            "--checkpoint",
            str(ckpt),
            "--data-dir",
            str(data),
            "--seed",
            "42",
            "--mode",
            "sweep",
            "--hessian-json",
            json.dumps(to_dict(HessianConfig(batches=args.batches, batch_rows=args.batch_rows))),
            "--device",
            args.hessian_device,
            "--out",
            str(work / "hessians.pt"),
            "--report",
            str(work / "hessian_report.json"),
        ]
    )
    figures["quantize_process_s"] = run(
        [
            "pgolf.quantize.stage",
            "--checkpoint",
            str(ckpt),
            "--hessians",
            str(work / "hessians.pt"),
            "--quantize-json",
            json.dumps(to_dict(QuantizeConfig())),
            "--device",
            args.quantize_device,
            "--out",
            str(work / "quantized.pt"),
            "--report",
            str(work / "quantize_report.json"),
        ]
    )
    figures["pack_process_s"] = run(
        [
            "pgolf.artifact.pack",
            "--quantized",
            str(work / "quantized.pt"),
            "--checkpoint",
            str(ckpt),
            "--pack-json",
            json.dumps(to_dict(PackConfig())),
            "--code",
            str(work / "train_gpt.py"),
            "--out",
            str(work / "artifact.pgolf"),
            "--report",
            str(work / "pack_report.json"),
        ]
    )
    h = json.loads((work / "hessian_report.json").read_text())
    q = json.loads((work / "quantize_report.json").read_text())
    p = json.loads((work / "pack_report.json").read_text())
    figures.update(
        {
            "device": h["device"],
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "calibration_tokens": h["calibration_tokens"],
            "hessian_seconds": h["hessian_seconds"],
            "hessian_data_read_seconds": h["data_read_seconds"],
            "hessian_forward_seconds": h["forward_seconds"],
            "hessian_load_and_build_seconds": h["not_counted"]["load_checkpoint_and_build_seconds"],
            "quantize_device": q["device"],
            "quantize_seconds": q["quantize_seconds"],
            "payload_bytes": q["payload_bytes"],
            "model_bytes_random_weights": p["model_bytes"],
            "pack_seconds": p["pack_seconds"],
        }
    )
    print(json.dumps(figures, indent=2))
    (work / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
