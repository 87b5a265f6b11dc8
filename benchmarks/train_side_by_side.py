"""The record script's training loop and pgolf's record recipe side by side: same initial weights, same shards.

    python benchmarks/train_side_by_side.py --side record --out OUT    # the record's train_model (writes the init)
    python benchmarks/train_side_by_side.py --side pgolf --out OUT     # pgolf train from that init
    python benchmarks/train_side_by_side.py --side compare --out OUT    # the loss table (OUT/train_side_by_side.json)

Issue 22's GPU check: N steps of each on one GPU with accumulation 8 (786,432 tokens a step, the record's), the
record with shared/reference/shim standing in for FlashAttention 3 (``FA3_SHIM=torch``: document-exact varlen).
Both run eager (``torch.compile`` off on both sides: the comparison is of the loops and the models, and a compile
warm-up would cost minutes of a short device lease). The record side builds its model inside its own
``train_model`` after ``torch.manual_seed(seed)``, and saves that initial state; pgolf imports it
(``pgolf.train.record_import``, kind ``initial``) and trains from it with ``--init-checkpoint``.

The shards are written here (``--data``, made when absent): documents of lognormal length whose tokens follow a
sparse Markov chain (each token has 4 likely successors), so that the loss falls within a few dozen steps and the
two curves have something to agree about. ``--device cpu --micro-batch-tokens 1024 --steps 2`` is a smoke check
of the harness itself (the record model on a CPU, small batches).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECORD_ENV = {  # the record run's training settings (shared/reference/side_by_side.sh, its logs' header)
    "VOCAB_SIZE": "8192", "CASEOPS_ENABLED": "1", "SPARSE_ATTN_GATE_ENABLED": "1", "SPARSE_ATTN_GATE_SCALE": "0.5",
    "GATE_WINDOW": "12", "SMEAR_GATE_ENABLED": "1", "MATRIX_LR": "0.026", "MIN_LR": "0.1", "GRAD_CLIP_NORM": "0.3",
    "MUON_BACKEND_STEPS": "5", "WARMDOWN_FRAC": "0.85", "BETA2": "0.99", "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "1",
    "MAX_WALLCLOCK_SECONDS": "0",  # a step-based schedule: both loops read the fraction as step / iterations
}


def record_script(arg: str | None) -> Path:
    for c in (arg, os.environ.get("PGOLF_RECORD_SCRIPT"), ROOT.parent / "shared/reference/pr1855/train_gpt.py",
              ROOT / ".ref/pr1855/train_gpt.py"):
        if c and Path(c).is_file():
            return Path(c)
    sys.exit("record script not found; pass --record-script or set PGOLF_RECORD_SCRIPT")


def write_markov_shards(out: Path, train_tokens: int, val_tokens: int, vocab: int = 8192, seed: int = 0) -> None:
    """Train/val shards of documents (BOS first, lognormal lengths) whose tokens follow a sparse Markov chain."""
    from pgolf.data.shards import BOS_ID, shard_name, write_shard

    rng = np.random.default_rng(seed)
    successors = rng.integers(8, vocab, size=(vocab, 4))  # [vocab, 4]: each token's likely next tokens

    def stream(n: int) -> np.ndarray:
        """[n] tokens: a BOS at every document start, 20 % fresh tokens, the rest a successor of the previous."""
        starts = np.cumsum(np.maximum(rng.lognormal(6.5, 1.0, size=n // 64 + 2).astype(np.int64), 2))
        is_bos = np.zeros(n, dtype=bool)
        is_bos[0] = True
        is_bos[starts[starts < n]] = True
        reset = is_bos | (rng.random(n) < 0.2)
        tokens = np.where(is_bos, BOS_ID, rng.integers(8, vocab, size=n)).astype(np.int64)
        run_start = np.flatnonzero(reset)
        offset = np.arange(n) - run_start[np.cumsum(reset) - 1]  # [n]: distance from the last reset
        picks = rng.integers(0, 4, size=n)
        for k in range(1, int(offset.max()) + 1):  # chain step k of every run at once
            idx = np.flatnonzero(offset == k)
            tokens[idx] = successors[tokens[idx - 1], picks[idx]]
        return tokens.astype(np.uint16)

    out.mkdir(parents=True, exist_ok=True)
    write_shard(out / shard_name("val", 0), stream(val_tokens), "val")
    write_shard(out / shard_name("train", 0), stream(train_tokens), "train")


def load_record(script: Path, device: str):
    """The record script as a module: the test suite's CPU loader on a CPU, else its own code with the shim."""
    os.environ.update(RECORD_ENV)
    if device == "cpu":
        os.environ["PGOLF_RECORD_SCRIPT"] = str(script)
        sys.path.insert(0, str(ROOT / "tests"))
        import record_oracle

        return record_oracle.load_record(), record_oracle.cpu_patches
    import contextlib
    import importlib.util

    os.environ.setdefault("FA3_SHIM", "torch")
    sys.path.insert(0, str(script.parent.parent / "shim"))
    spec = importlib.util.spec_from_file_location("pr1855_train_gpt", script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["pr1855_train_gpt"] = mod
    spec.loader.exec_module(mod)
    return mod, contextlib.nullcontext


def run_record(args) -> dict:
    import torch

    mod, patches = load_record(record_script(args.record_script), args.device)
    h = mod.Hyperparameters()
    h.train_files = str(args.data / "fineweb_train_*.bin")
    h.val_files = str(args.data / "fineweb_val_*.bin")
    h.iterations, h.warmup_steps, h.max_wallclock_seconds, h.seed = args.steps, args.warmup, 0.0, args.seed
    h.train_batch_tokens = 8 * args.micro_batch_tokens
    h.train_seq_len = min(h.train_seq_len, args.micro_batch_tokens)
    h.logfile = None
    losses: list[float] = []
    real_gpt, real_compile, real_eval = mod.GPT, torch.compile, mod.eval_val

    def build(hp):  # train_model's GPT(h): keep the initial state and record every micro-batch loss
        model = real_gpt(hp)
        if args.device == "cpu":
            for block in model.blocks:
                block.mlp.use_fused = False
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, args.out / "record_init.pt")
        forward = model.forward

        def recording_forward(*a, **k):
            loss = forward(*a, **k)
            losses.append(float(loss.detach()))
            return loss

        model.forward = recording_forward
        return model

    mod.GPT, mod.eval_val = build, (lambda *a, **k: (0.0, 0.0))
    torch.compile = lambda fn=None, *a, **k: fn if fn is not None else (lambda f: f)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    try:
        with patches():
            mod.train_model(h, torch.device(args.device), None)
    finally:
        mod.GPT, torch.compile, mod.eval_val = real_gpt, real_compile, real_eval
    seconds = time.perf_counter() - t0
    micro = losses[-8 * args.steps:]
    return {"side": "record", "losses": [sum(micro[8 * i:8 * i + 8]) / 8 for i in range(args.steps)],
            "seconds_incl_warmup": seconds, "micro_batches": len(losses)}


def run_pgolf(args) -> dict:
    from pgolf.config import load_run_config, to_dict
    from pgolf.train.record_import import import_record

    cfg = load_run_config(ROOT / "config.yaml")
    init = args.out / "pgolf_init"
    import_record(args.out / "record_init.pt", init, recipe_model=cfg.model, recipe_path="config.yaml", kind="initial",
                  force=True)
    train = {**to_dict(cfg.train), "iterations": args.steps, "warmup_steps": args.warmup, "max_wallclock_seconds": 0.0,
             "compile": False, "log_every_steps": 1, "train_batch_tokens": 8 * args.micro_batch_tokens,
             "micro_batch_tokens": args.micro_batch_tokens,
             "train_seq_len": min(cfg.train.train_seq_len, args.micro_batch_tokens)}
    out_dir = args.out / "pgolf_run"
    cmd = [sys.executable, "-m", "pgolf.train", "--model-json", json.dumps(to_dict(cfg.model)),
           "--optim-json", json.dumps(to_dict(cfg.optim)), "--train-json", json.dumps(train), "--seed", str(args.seed),
           "--data-dir", str(args.data), "--out-dir", str(out_dir), "--device", args.device, "--init-checkpoint", str(init)]
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    seconds = time.perf_counter() - t0
    logged = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {"side": "pgolf", "losses": [r["loss"] for r in logged if r.get("event") == "train_step"],
            "seconds_incl_warmup": seconds}


def compare(out: Path) -> dict:
    rec = json.loads((out / "train_record.json").read_text())
    ours = json.loads((out / "train_pgolf.json").read_text())
    n = min(len(rec["losses"]), len(ours["losses"]))
    diffs = [ours["losses"][i] - rec["losses"][i] for i in range(n)]
    print("| step | record | pgolf | pgolf - record |\n|---:|---:|---:|---:|")
    for i in range(n):
        print(f"| {i + 1} | {rec['losses'][i]:.5f} | {ours['losses'][i]:.5f} | {diffs[i]:+.5f} |")
    report = {"steps": n, "record": rec, "pgolf": ours, "max_abs_diff": max(abs(d) for d in diffs),
              "mean_abs_diff": sum(abs(d) for d in diffs) / n}
    print(f"max |diff| {report['max_abs_diff']:.5f}, mean |diff| {report['mean_abs_diff']:.5f} over {n} steps")
    (out / "train_side_by_side.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["record", "pgolf", "compare"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, help="shard directory (made here when it has no shards)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per loop state (restored after)")
    parser.add_argument("--micro-batch-tokens", type=int, default=98_304, help="x 8 micro-batches a step")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--record-script")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.side == "compare":
        compare(args.out)
        return
    args.data = args.data or args.out / "shards"
    if not list(args.data.glob("fineweb_train_*.bin")):
        train_tokens = 8 * args.micro_batch_tokens * (args.steps + 4 * args.warmup + 2)
        write_markov_shards(args.data, train_tokens, 8 * args.micro_batch_tokens, seed=args.seed)
    result = run_record(args) if args.side == "record" else run_pgolf(args)
    (args.out / f"train_{args.side}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}), "losses", [round(x, 4) for x in result["losses"]])


if __name__ == "__main__":
    main()
