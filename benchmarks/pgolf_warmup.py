"""pgolf's compile warm-up of a record-recipe training run on one GPU, timed (issue 16's warm-up criterion).

The other side of ``benchmarks/record_warmup.py``: ``pgolf train`` with ``config.yaml``'s model, optim and train
sections as they are (``warmup_steps`` per loop state, ``warmup_cu_passes`` compile passes per ``cu_seqlens``
length, the recipe's attention backend), except ``iterations: 1``, so that the run ends one step after the warm-up
(it still writes its checkpoint and summary). The figures are the training stage's own: ``compile_warmup_seconds``
(from the first warm-up call to the restored state, after a device sync) and ``compile_warmup_by_loop_state``
(seconds, steps, compile passes and graphs compiled per loop state) from ``train_summary.json``.
Both scripts start from empty inductor and Triton caches unless given ``--compile-cache inherit``
(``benchmarks/compile_cache.py`` says why).

    # one GPU, shards in the record's format (benchmarks/synthetic_shards.py writes them when --data has none)
    python benchmarks/pgolf_warmup.py --data /tmp/syn --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from compile_cache import MODES, compile_cache_env  # noqa: E402

SUMMARY_FIELDS = ("compile_warmup_seconds", "compile_warmup_by_loop_state", "startup_seconds", "attention_backend",
                  "compiled_graphs", "cu_seqlens_shapes")


def warmup_only_train_section(train: dict) -> dict:
    """The recipe's train section with one step (the least it takes): the run stops right after its warm-up."""
    return {**train, "iterations": 1}


def run_training(cfg, train_section: dict, data: Path, run_dir: Path, device: str, extra_env: dict) -> dict:
    """``pgolf train`` of the recipe's model and optim sections with ``train_section``, in a process of its own
    (one rank, seed 42, ``extra_env`` added: the compile caches); returns its ``train_summary.json``. The run's
    other outputs (``metrics.jsonl``, the checkpoint) stay in ``run_dir``."""
    from pgolf.config import to_dict

    cmd = [sys.executable, "-m", "pgolf.train", "--model-json", json.dumps(to_dict(cfg.model)),
           "--optim-json", json.dumps(to_dict(cfg.optim)), "--train-json", json.dumps(train_section),
           "--seed", "42", "--data-dir", str(data), "--out-dir", str(run_dir), "--device", device]
    env = {**os.environ, **extra_env, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, env=env)
    return json.loads((run_dir / "train_summary.json").read_text())


def run_arguments(parser: argparse.ArgumentParser, compile_cache: str, compile_cache_help: str) -> None:
    """The options of a script that runs one training process: recipe, shards, output JSON, device, caches."""
    parser.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    parser.add_argument("--data", type=Path, default=Path("/tmp/syn"),
                        help="shard folder (the record harness's shards are written there when it has none)")
    parser.add_argument("--out", type=Path, required=True, help="JSON of the figures")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--compile-cache", choices=MODES, default=compile_cache, help=compile_cache_help)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    run_arguments(parser, "cold", "cold (default): empty inductor and Triton caches, as record_warmup.py starts; "
                                  "inherit: whatever the environment points at")
    args = parser.parse_args(argv)
    cache_env = compile_cache_env(args.compile_cache, "pgolf_warmup_cache_")
    from synthetic_shards import ensure_harness_shards

    from pgolf.config import load_run_config, to_dict

    cfg = load_run_config(args.config)
    ensure_harness_shards(args.data, cfg.model.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_training(cfg, warmup_only_train_section(to_dict(cfg.train)), args.data, Path(tmp) / "train",
                               args.device, cache_env)
    result = {key: summary.get(key) for key in SUMMARY_FIELDS}
    result.update(config=str(args.config), warmup_steps_per_loop_state=cfg.train.warmup_steps,
                  warmup_cu_passes=cfg.train.warmup_cu_passes, compile_cache=args.compile_cache,
                  compile_cache_dirs=cache_env)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"pgolf_warmup: {result['compile_warmup_seconds']:.1f} s "
          f"{json.dumps(result['compile_warmup_by_loop_state'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
