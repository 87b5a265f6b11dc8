"""The import path side by side: the record script trains briefly, then both implementations quantize, pack and
score the SAME weights on the SAME validation shards (issue 15's last done-when item).

    # one H200, one device call (record reference copied to .ref/, brotli wheel installed):
    python benchmarks/import_side_by_side.py --out OUT --record-script .ref/pr1855/train_gpt.py
    # the whole flow on a CPU, tiny model (the harness's own check):
    python benchmarks/import_side_by_side.py --out OUT --tiny

Stages (each timed; every size is a knob):

1. data: shards both sides read (``DATA_PATH`` of the record, ``--data-dir`` of pgolf): documents (BOS first,
   lognormal lengths) whose tokens follow a sparse Markov chain (``train_side_by_side.write_markov_shards``, so a
   few dozen steps learn something), written with pgolf's ``write_shard``; the validation byte sidecar
   ``fineweb_val_bytes_000000.bin`` gives every token a byte count that depends on its id (0 for BOS), so a token
   or byte misalignment on either side changes the sums. The record reads it with ``CASEOPS_ENABLED=1``; pgolf's
   ``load_validation`` with ``byte_accounting: auto`` (no manifest: the sidecar decides). The validation stream is
   ``val_batches`` whole batches of the record's one-GPU ``eval_val`` (32 x 2048 tokens) + 1, so neither side
   truncates. The record's tokenizer is loaded only for its vocabulary-size check (sentencepiece is required).
2. record: its own ``main()`` in a subprocess (eager: ``torch.compile`` is the identity; FlashAttention 3 replaced
   by ``shared/reference/shim``, ``FA3_SHIM=torch`` by default: document-exact), the record run's hyperparameters
   (``shared/reference/side_by_side.sh``) except: ``ITERATIONS=--steps`` with no wall-clock cap, no warm-up
   steps, ``TTT_ENABLED=0``, ``COMPRESSOR=brotli``, ``GPTQ_CALIBRATION_BATCHES=--calib-batches`` and
   ``EMA_DECAY=--ema-decay`` (0.9 by default: the record's 0.9965 is tuned for 4,900 steps and would leave ~90 %
   of the random init in a 30-step EMA). Its log gives the pre-quant (``diagnostic pre-quantization post-ema``)
   and post-quant (``diagnostic quantized``) val_bpb, the ``final_model.int6.ptz`` bytes and its code bytes; a
   wrapper of its ``_loss_bpb`` records the tokens and bytes each evaluation scored. On a CPU (``--tiny``) the
   script is loaded by tests/record_oracle.py (exact attention, fused CE and MLP off) and ``train_and_eval`` runs
   on the CPU device directly: ``main()`` refuses without CUDA.
3. pgolf on the same weights, each stage's own entry point as the Snakemake rules call it (config.yaml's sections,
   mode ``sweep``): ``checkpoint import-record final_model.pt --log LOG``, ``hessians``, ``quantize``,
   ``pack build``, ``pgolf.evaluate`` with TTT off and the diagnostics on (pre-quant from the checkpoint,
   post-quant from the artifact). The knobs that follow the one-GPU record run instead of the 8-GPU record:
   ``hessians.sampler_world_size: 1`` and ``evaluate.record_flat_world_size: 1``; the batch sizes follow the
   record's environment (equal to config.yaml's at full size); ``evaluate.compile: false`` (eager, as the record
   here).
4. optional (``--record-bytes``): ``benchmarks/record_bytes.py --ptz`` on the record's own quantized file: pgolf's
   pack of exactly the record's codes (like-for-like bytes); record size only, ~4 min of brotli on the device.
5. a table on stdout and ``OUT/import_side_by_side.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SEQ_GPU, BATCH_SEQS_GPU = 2048, 32  # the record's eval_val on one GPU: 524,288 / 8 tokens = 32 rows of 2048
# The record run's environment (shared/reference/side_by_side.sh, the record's logs), TTT off and eager.
RECORD_ENV = {
    "VOCAB_SIZE": "8192", "CASEOPS_ENABLED": "1", "EMBED_BITS": "7", "MATRIX_LR": "0.026", "MIN_LR": "0.1",
    "MLP_CLIP_SIGMAS": "11.5", "ATTN_CLIP_SIGMAS": "13.0", "EMBED_CLIP_SIGMAS": "14.0", "GRAD_CLIP_NORM": "0.3",
    "TTT_CHUNK_SIZE": "48", "MUON_BACKEND_STEPS": "5", "GLOBAL_TTT_MOMENTUM": "0.9", "WARMDOWN_FRAC": "0.85",
    "BETA2": "0.99", "TTT_BETA2": "0.99", "TTT_WEIGHT_DECAY": "0.5", "TTT_LORA_RANK": "80",
    "SPARSE_ATTN_GATE_SCALE": "0.5", "GPTQ_RESERVE_SECONDS": "0", "VAL_LOSS_EVERY": "0",
    "GATED_ATTN_QUANT_GATE": "1", "SPARSE_ATTN_GATE_ENABLED": "1", "GATE_WINDOW": "12", "SMEAR_GATE_ENABLED": "1",
    "LQER_ENABLED": "1", "LQER_ASYM_ENABLED": "1", "LQER_RANK": "4", "LQER_FACTOR_BITS": "4", "LQER_ASYM_GROUP": "64",
    "LQER_TOP_K": "3", "COMPRESSOR": "brotli", "TRAIN_LOG_EVERY": "5", "SEED": "42",
    "TTT_ENABLED": "0", "WARMUP_STEPS": "0", "MAX_WALLCLOCK_SECONDS": "0"
}  # no RANK/WORLD_SIZE: with both set the record calls itself distributed (all-reduce without a process group)
# --tiny: a small model of the record's layout features (loop, two lanes, XSA, partial RoPE, gates), vocabulary
# 8192 (the record checks it against the tokenizer); MLP matrices of 192 x 768 > 65,536 elements get GPTQ.
TINY_ENV = {"NUM_LAYERS": "6", "MODEL_DIM": "192", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "ROPE_DIMS": "8",
            "XSA_LAST_N": "4", "LOOP_START": "1", "LOOP_END": "2", "PARALLEL_START_LAYER": "4"}
TINY_SEQ, TINY_ROWS, TINY_BATCH_SEQS = 64, 2, 4


def child_env(**extra) -> dict:
    """The environment of a subprocess: this checkout first on PYTHONPATH (``python -m pgolf`` from any cwd)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}


def log(msg: str) -> None:
    print(f"[import_side_by_side] {msg}", flush=True)


def find_record_script(arg: str | None) -> Path:
    for c in (arg, os.environ.get("PGOLF_RECORD_SCRIPT"), ROOT / ".ref/pr1855/train_gpt.py",
              ROOT.parent / "shared/reference/pr1855/train_gpt.py"):
        if c and Path(c).is_file():
            return Path(c).resolve()
    sys.exit("record script not found; pass --record-script or set PGOLF_RECORD_SCRIPT")


# ------------------------------------------------------------------------------------------------------- data


def sidecar_bytes(tokens: np.ndarray) -> np.ndarray:
    """[n] uint16: 0 for BOS, else 1..6 bytes by token id (a synthetic stand-in for the CaseOps sidecar)."""
    from pgolf.data.shards import BOS_ID

    per_id = 1 + (np.arange(8192, dtype=np.int64) * 7919) % 6
    return np.where(tokens == BOS_ID, 0, per_id[tokens.astype(np.int64)]).astype(np.uint16)


def make_data(data: Path, train_tokens: int, val_tokens: int, seed: int) -> dict:
    from pgolf.data.shards import read_shard, shard_name, write_shard
    from train_side_by_side import write_markov_shards

    if not (data / shard_name("val_bytes", 0)).is_file():
        write_markov_shards(data, train_tokens, val_tokens, seed=seed)
        write_shard(data / shard_name("val_bytes", 0), sidecar_bytes(read_shard(data / shard_name("val", 0))), "val_bytes")
    val = read_shard(data / shard_name("val", 0))
    side = read_shard(data / shard_name("val_bytes", 0))
    return {"val_tokens": int(val.size), "val_bytes_total": int(side.astype(np.int64).sum()),
            "train_tokens": int(read_shard(data / shard_name("train", 0)).size), "source": "markov synthetic"}


# ------------------------------------------------------------------------------------------------ record side


def record_env(args, work: Path) -> dict:
    env = dict(RECORD_ENV)
    seq = TINY_SEQ if args.tiny else SEQ_GPU
    rows = TINY_ROWS if args.tiny else 48
    env.update({
        "DATA_PATH": str(work / "data"), "DATA_DIR": str(work), "ARTIFACT_DIR": str(work / "record"), "RUN_ID": "record",
        "TOKENIZER_PATH": str(args.record_script.parent / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"),
        "ITERATIONS": str(args.steps), "GPTQ_CALIBRATION_BATCHES": str(args.calib_batches),
        "EMA_DECAY": str(args.ema_decay), "TRAIN_BATCH_TOKENS": str(8 * rows * seq),
        "VAL_BATCH_TOKENS": str(8 * (TINY_BATCH_SEQS if args.tiny else BATCH_SEQS_GPU) * seq),
        "FA3_SHIM": os.environ.get("FA3_SHIM", "exact" if args.device == "cpu" else "torch"),
    })
    if args.tiny:
        env.update(TINY_ENV)
        env.update({"TRAIN_SEQ_LEN": str(seq), "EVAL_SEQ_LEN": str(seq), "ROPE_TRAIN_SEQ_LEN": str(seq),
                    "TTT_EVAL_SEQ_LEN": str(seq)})
    if args.device == "cpu":
        env["FUSED_CE_ENABLED"] = "0"
    return env


def run_record_here(work: Path, device: str) -> None:
    """Inside the record subprocess: the record's main() (GPU) or train_and_eval on the CPU, with probes."""
    import torch

    script = Path(os.environ["PGOLF_RECORD_SCRIPT"])
    probes = {"evals": [], "optimizer_steps": 0, "seconds": {}}
    if device == "cpu":
        sys.path.insert(0, str(ROOT / "tests"))
        import record_oracle

        mod = record_oracle.load_record()
    else:
        import importlib.util

        torch.compile = lambda model=None, **kw: (lambda f: f) if model is None else model  # eager
        sys.path.insert(0, str(script.parent.parent / "shim"))
        spec = importlib.util.spec_from_file_location("pr1855_train_gpt", script)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["pr1855_train_gpt"] = mod
        spec.loader.exec_module(mod)
    state = {"label": "end of training (live weights)"}

    real_loss_bpb = mod._loss_bpb

    def loss_bpb(loss_sum, token_count, byte_count):
        loss, bpb = real_loss_bpb(loss_sum, token_count, byte_count)
        probes["evals"].append({"label": state["label"], "val_loss": loss, "val_bpb": bpb,
                                "tokens": int(token_count.item()), "bytes": int(byte_count.item())})
        return loss, bpb

    real_timed_eval = mod.timed_eval

    def timed_eval(label, fn, *a, **k):
        state["label"] = label
        return real_timed_eval(label, fn, *a, **k)

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                probes["seconds"][name] = probes["seconds"].get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    real_step = mod.Optimizers.step

    def step(self, *a, **k):
        probes["optimizer_steps"] += 1
        return real_step(self, *a, **k)

    mod._loss_bpb, mod.timed_eval, mod.Optimizers.step = loss_bpb, timed_eval, step
    mod.train_model = timed("train_model", mod.train_model)
    mod.serialize = timed("serialize", mod.serialize)
    mod.deserialize = timed("deserialize", mod.deserialize)
    mod.eval_val = timed("eval_val", mod.eval_val)
    t0 = time.perf_counter()
    if device == "cpu":
        cpu = torch.device("cpu")
        real_gpt, real_loader, real_collect = mod.GPT, mod.ShuffledSequenceLoader, mod.collect_hessians

        class CpuGPT(real_gpt):  # the fused Triton MLP cannot run on a CPU
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                for block in self.blocks:
                    block.mlp.use_fused = False

        mod.GPT = CpuGPT
        # serialize() builds its calibration loader on torch.device("cuda"): the CPU instead
        mod.ShuffledSequenceLoader = lambda h, dev: real_loader(h, cpu)
        mod.collect_hessians = timed("collect_hessians", lambda model, loader, h, dev, **k: real_collect(model, loader, h, cpu, **k))
        h = mod.Hyperparameters()
        mod.set_logging_hparams(h)
        os.makedirs(h.artifact_dir, exist_ok=True)
        # the block main() logs first (import-record reads the architecture from it)
        mod.log("Hyperparameters:", console=True)
        for k, v in sorted(vars(type(h)).items()):
            if not k.startswith("_"):
                mod.log(f"  {k}: {v}", console=True)
        with record_oracle.cpu_patches():
            mod.train_and_eval(h, cpu)
        probes["device"] = "cpu"
    else:
        mod.collect_hessians = timed("collect_hessians", mod.collect_hessians)
        mod.main()
        probes["device"] = torch.cuda.get_device_name()
    probes["seconds"]["main"] = time.perf_counter() - t0
    (work / "record" / "probes.json").write_text(json.dumps(probes, indent=1) + "\n")


def parse_record_log(path: Path) -> dict:
    text = path.read_text(encoding="utf-8", errors="replace")

    def grab(pattern, cast=float):
        found = re.findall(pattern, text)
        return cast(found[-1]) if found else None

    return {
        "pre_quant_val_bpb_log": grab(r"diagnostic pre-quantization post-ema val_loss:\S+ val_bpb:(\S+)"),
        "post_quant_val_bpb_log": grab(r"diagnostic quantized val_loss:\S+ val_bpb:(\S+)"),
        "model_bytes": grab(r"Serialized model quantized\+\w+: (\d+) bytes", int),
        "code_bytes": grab(r"Code size \(compressed\): (\d+) bytes", int),
        "code_bytes_uncompressed": grab(r"Code size \(uncompressed\): (\d+) bytes", int),
        "total_bytes": grab(r"Total submission size quantized\+\w+: (\d+) bytes", int),
        "final_model_pt_bytes": grab(r"Serialized model: (\d+) bytes", int),
        "model_params": grab(r"model_params:(\d+)", int),
    }


def start_record(args, work: Path):
    """The record's subprocess (None with --skip-record: WORK/record holds an earlier run)."""
    env = child_env(**record_env(args, work), PGOLF_RECORD_SCRIPT=str(args.record_script))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    (work / "record").mkdir(parents=True, exist_ok=True)
    if args.skip_record:
        return None
    for stale in ("record.txt", "final_model.pt", "final_model.int6.ptz", "probes.json"):
        (work / "record" / stale).unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--record-subprocess", "--work", str(work),
           "--device", args.device]
    out = open(work / "record" / "stdout.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for_final_model(proc, work: Path) -> float:
    """Block until the record has written final_model.pt (its log's ``Serialized model: N bytes`` line follows the
    save); returns the seconds waited. A record that died first ends the run with its output's tail."""
    t0 = time.perf_counter()
    logfile = work / "record" / "record.txt"
    while proc is not None and proc.poll() is None:
        # a line of its own: main() also copies its source, which spells the same words, into this log
        if logfile.is_file() and re.search(r"^Serialized model: \d+ bytes", logfile.read_text(errors="replace"), re.M):
            break
        time.sleep(0.5)
    if proc is not None and proc.poll() not in (None, 0):  # died before saving: pgolf would find no final_model.pt
        finish_record(proc, work)
    return time.perf_counter() - t0


def finish_record(proc, work: Path) -> dict:
    if proc is not None and proc.wait() != 0:
        tail = (work / "record" / "stdout.log").read_text(errors="replace")[-4000:]
        raise SystemExit(f"record run failed ({proc.returncode}):\n{tail}")
    return collect_record(work)


def collect_record(work: Path) -> dict:
    result = parse_record_log(work / "record" / "record.txt")
    probes = json.loads((work / "record" / "probes.json").read_text())
    evals = {e["label"]: e for e in probes["evals"]}
    pre, post = evals["diagnostic pre-quantization post-ema"], evals["diagnostic quantized"]
    result.update(pre_quant=pre, post_quant=post, evals=probes["evals"], training_steps=probes["optimizer_steps"],
                  seconds=probes["seconds"], device=probes["device"],
                  ptz_bytes=(work / "record" / "final_model.int6.ptz").stat().st_size)
    return result


# ------------------------------------------------------------------------------------------------- pgolf side


def pgolf_sections(args, work: Path) -> dict:
    import dataclasses

    from pgolf.config import load_run_config, to_dict

    cfg = load_run_config(ROOT / "config.yaml")
    seq = TINY_SEQ if args.tiny else SEQ_GPU
    batch_seqs = TINY_BATCH_SEQS if args.tiny else BATCH_SEQS_GPU
    hessians = dataclasses.replace(cfg.hessians, batches=args.calib_batches, batch_rows=TINY_ROWS if args.tiny else 48,
                                   seq_len=seq, sampler_world_size=1, sampler_rank=0, cpu_threads=args.threads)
    ev = dataclasses.replace(cfg.evaluate, ttt=dataclasses.replace(cfg.evaluate.ttt, mode="none"), diagnostics=True,
                             compile=False, eval_seq_len=seq, eval_batch_tokens=batch_seqs * seq,
                             record_flat_world_size=1, record_flat_batch_seqs=batch_seqs, max_docs=0,
                             cpu_threads=args.threads)
    pack = cfg.pack if args.brotli_quality is None else dataclasses.replace(cfg.pack, brotli_quality=args.brotli_quality)
    # a briefly trained model compresses worse than a record's: the comparison is of bytes, so the gate's cap is a
    # knob here (the record script reports its size and refuses nothing)
    pack = dataclasses.replace(pack, size_cap_bytes=args.size_cap_bytes)
    return {"hessians": to_dict(hessians), "quantize": to_dict(cfg.quantize), "pack": to_dict(pack), "evaluate": to_dict(ev)}


def bundle_code(work: Path) -> dict:
    """pgolf's counted code: the single-file train_gpt.py of config.yaml as the bundle rule writes it (shipped
    recipe, minified modules; --help not run here)."""
    from pgolf.artifact.bundle import shipped_recipe, write_bundle
    from pgolf.config import load_run_config

    out = work / "pgolf" / "train_gpt.py"
    out.parent.mkdir(parents=True, exist_ok=True)
    rep = write_bundle(shipped_recipe(load_run_config(ROOT / "config.yaml")), out, minify=True, verify=False)
    return {"file": str(out), "bytes_file": rep["bytes_file"], "bytes_wrapper": rep["bytes_wrapper"]}


def pgolf_step(name: str, argv: list[str], work: Path, timings: dict, env: dict) -> None:
    t0 = time.perf_counter()
    with open(work / "pgolf" / f"{name}.log", "w") as out:
        proc = subprocess.run([sys.executable, "-m", *argv], stdout=out, stderr=subprocess.STDOUT, env=env)
    timings[name] = time.perf_counter() - t0
    text = (work / "pgolf" / f"{name}.log").read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"pgolf {name} failed ({proc.returncode}):\n{text[-4000:]}")
    log(f"pgolf {name}: {timings[name]:.1f} s  | {text.strip().splitlines()[-1][:160] if text.strip() else ''}")


def run_pgolf(args, work: Path) -> dict:
    p = work / "pgolf"
    p.mkdir(parents=True, exist_ok=True)
    sec = pgolf_sections(args, work)
    (p / "sections.json").write_text(json.dumps(sec, indent=1) + "\n")
    env = child_env(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    code = p / "train_gpt.py"  # bundle_code's
    t: dict = {}
    ck, data = p / "checkpoint", work / "data"
    pgolf_step("import", ["pgolf", "checkpoint", "import-record", str(work / "record" / "final_model.pt"), "--out", str(ck),
                          "--log", str(work / "record" / "record.txt"), "--force"], work, t, env)
    pgolf_step("hessians", ["pgolf", "hessians", "--checkpoint", str(ck), "--data-dir", str(data), "--hessian-json",
                            json.dumps(sec["hessians"]), "--seed", "42", "--mode", "sweep", "--out", str(p / "hessians.pt"),
                            "--report", str(p / "hessian_report.json"), "--device", args.device], work, t, env)
    pgolf_step("quantize", ["pgolf", "quantize", "--checkpoint", str(ck), "--hessians", str(p / "hessians.pt"),
                            "--quantize-json", json.dumps(sec["quantize"]), "--device", args.quantize_device or args.device,
                            "--out", str(p / "quantized.pt"), "--report", str(p / "quantize_report.json"),
                            "--threads", str(args.threads)], work, t, env)
    pgolf_step("pack", ["pgolf", "pack", "build", "--quantized", str(p / "quantized.pt"), "--checkpoint", str(ck),
                        "--pack-json", json.dumps(sec["pack"]), "--code", str(code), "--out", str(p / "artifact.pgolf"),
                        "--report", str(p / "pack_report.json")], work, t, env)
    pgolf_step("evaluate", ["pgolf.evaluate", "--artifact", str(p / "artifact.pgolf"), "--eval-json",
                            json.dumps(sec["evaluate"]), "--seed", "42", "--data-dir", str(data), "--checkpoint", str(ck),
                            "--mode", "sweep", "--out", str(p / "eval.json"), "--device", args.device], work, t, env)
    ev = json.loads((p / "eval.json").read_text())
    pack = json.loads((p / "pack_report.json").read_text())
    hrep = json.loads((p / "hessian_report.json").read_text())
    qrep = json.loads((p / "quantize_report.json").read_text())
    diag = ev["diagnostics"]
    return {"pre_quant": diag["pre_quant"], "post_quant": diag["post_quant"],
            "documents_score": {k: ev.get(k) for k in ("val_bpb", "val_loss", "token_count", "byte_sum")},
            "model_bytes": pack["model_bytes"], "code_bytes": pack["code_bytes"], "total_bytes": pack["total_bytes"],
            "plain_brotli_model_bytes": pack.get("plain_brotli_model_bytes"), "pack_seconds": pack.get("pack_seconds"),
            "calibration_tokens": hrep.get("calibration_tokens"), "quantize_seconds": qrep.get("quantize_seconds"),
            "lqer_applied": qrep.get("totals", {}).get("lqer_applied"), "seconds": t,
            "byte_accounting": ev.get("byte_accounting")}


def run_record_bytes(args, work: Path) -> dict:
    t0 = time.perf_counter()
    out = work / "record_bytes.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "record_bytes.py"), "--ptz", str(work / "record" / "final_model.int6.ptz"),
           "--no-pergroup", "--json", str(out)]
    env = child_env(PGOLF_RECORD_SCRIPT=str(args.record_script))
    with open(work / "record_bytes.log", "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        return {"error": (work / "record_bytes.log").read_text(errors="replace")[-2000:]}
    return {**json.loads(out.read_text()), "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------------ report


def table(report: dict) -> str:
    r, p = report["record"], report["pgolf"]

    def bpb(x):
        return f"{x['val_bpb']:.6f}" if x else "-"

    rows = [
        ("pre-quant val_bpb", bpb(r["pre_quant"]), bpb(p["pre_quant"])),
        ("post-quant val_bpb", bpb(r["post_quant"]), bpb(p["post_quant"])),
        ("quantization gap (bpb)", f"{r['post_quant']['val_bpb'] - r['pre_quant']['val_bpb']:+.6f}",
         f"{p['post_quant']['val_bpb'] - p['pre_quant']['val_bpb']:+.6f}"),
        ("tokens scored (pre / post)", f"{r['pre_quant']['tokens']:,} / {r['post_quant']['tokens']:,}",
         f"{p['pre_quant']['token_count']:,} / {p['post_quant']['token_count']:,}"),
        ("bytes scored (pre / post)", f"{r['pre_quant']['bytes']:,} / {r['post_quant']['bytes']:,}",
         f"{p['pre_quant']['byte_sum']:,} / {p['post_quant']['byte_sum']:,}"),
        ("model bytes (compressed)", f"{r['model_bytes']:,} (brotli)", f"{p['model_bytes']:,} (pack)"),
        ("pgolf's codes, plain brotli q11 (pack report)", "", f"{p['plain_brotli_model_bytes']:,}" if p.get("plain_brotli_model_bytes") else "-"),
        ("counted code bytes (wrapper)", f"{r['code_bytes']:,}" if r.get("code_bytes") else "-", f"{p['code_bytes']:,}"),
        ("model + code", f"{r['total_bytes']:,}" if r.get("total_bytes") else "-", f"{p['total_bytes']:,}"),
    ]
    if report.get("record_bytes") and "pgolf_pack_bytes" in report["record_bytes"]:
        rb = report["record_bytes"]
        rows.append(("record's codes, pgolf pack", f"{rb.get('record_file_bytes', 0):,}", f"{rb['pgolf_pack_bytes']:,}"))
    lines = ["| | record script | pgolf |", "|---|---:|---:|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where the JSON, the table and the logs go")
    parser.add_argument("--work", type=Path, help="working directory (default: OUT/work)")
    parser.add_argument("--record-script", help="PR #1855 train_gpt.py (default: $PGOLF_RECORD_SCRIPT, .ref/, ../shared)")
    parser.add_argument("--tiny", action="store_true", help="a small model and a few steps (the CPU check)")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    parser.add_argument("--steps", type=int, help="record training steps (default 30; tiny 6)")
    parser.add_argument("--val-batches", type=int, help="validation = N x 32 x 2048 tokens + 1 (default 8; tiny 4 x 4 x 64)")
    parser.add_argument("--train-tokens", type=int, help="training tokens written (default: steps + calibration + 2 batches)")
    parser.add_argument("--calib-batches", type=int, help="GPTQ calibration batches on both sides (default 16; tiny 2)")
    parser.add_argument("--ema-decay", type=float, default=0.9, help="the record's EMA_DECAY for a brief run (record: 0.9965)")
    parser.add_argument("--quantize-device", choices=["cuda", "cpu"], help="pgolf's GPTQ device (default: --device)")
    parser.add_argument("--brotli-quality", type=int, help="pgolf pack's brotli quality (default: config.yaml's 11)")
    parser.add_argument("--threads", type=int, default=8, help="CPU threads of pgolf's Hessian/quantize/evaluate stages")
    parser.add_argument("--record-bytes", action="store_true", help="also benchmarks/record_bytes.py --ptz (slow: brotli)")
    parser.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                        help="run pgolf's stages while the record quantizes and compresses (default on)")
    parser.add_argument("--copy-artifacts", action="store_true",
                        help="copy the record's .ptz, pgolf's artifact and the logs (tar.gz) into OUT")
    parser.add_argument("--size-cap-bytes", type=int, default=64_000_000,
                        help="pgolf pack's cap for this comparison (default 64,000,000: a 30-step model may not fit 16 MB)")
    parser.add_argument("--skip-record", action="store_true", help="reuse WORK/record from an earlier run")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--record-subprocess", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.record_subprocess:
        run_record_here(args.work, args.device)
        return 0
    if args.out is None:
        parser.error("--out is required")
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.steps = args.steps or (6 if args.tiny else 30)
    args.calib_batches = args.calib_batches or (2 if args.tiny else 16)
    args.record_script = find_record_script(args.record_script)
    seq = TINY_SEQ if args.tiny else SEQ_GPU
    batch_tokens = 8 * (TINY_ROWS if args.tiny else 48) * seq
    val_tokens = (args.val_batches or 4 if args.tiny else args.val_batches or 8) * (TINY_BATCH_SEQS if args.tiny else BATCH_SEQS_GPU) * seq + 1
    train_tokens = args.train_tokens or batch_tokens * (args.steps + args.calib_batches + 2)
    out = args.out.resolve()
    work = (args.work or out / "work").resolve()
    out.mkdir(parents=True, exist_ok=True)
    (work / "data").mkdir(parents=True, exist_ok=True)
    report: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "seconds": {}}
    start = time.perf_counter()

    def stage(name, fn, *a):
        t0 = time.perf_counter()
        log(f"[{t0 - start:.0f}s] {name} ...")
        value = fn(*a)
        report["seconds"][name] = time.perf_counter() - t0
        log(f"{name}: {report['seconds'][name]:.1f} s")
        return value

    report["data"] = stage("data", make_data, work / "data", train_tokens, val_tokens, args.seed)
    # the record's GPTQ (CPU) and brotli take minutes after it saves final_model.pt: with --overlap (the default)
    # pgolf's stages start from that file meanwhile (both GPU processes fit an H200; timings then share the CPU)
    t0 = time.perf_counter()
    log("[0s] record (subprocess) ...")
    proc = start_record(args, work)
    report["pgolf_code"] = stage("pgolf_bundle", bundle_code, work)  # CPU only: while the record trains
    if not args.overlap:
        report["record"] = finish_record(proc, work)
        report["seconds"]["record"] = time.perf_counter() - t0
        log(f"record: {report['seconds']['record']:.1f} s")
    else:
        report["seconds"]["record_until_final_model"] = wait_for_final_model(proc, work)
        log(f"record wrote final_model.pt after {report['seconds']['record_until_final_model']:.1f} s")
    report["pgolf"] = stage("pgolf", run_pgolf, args, work)
    if args.overlap:
        report["record"] = finish_record(proc, work)
        report["seconds"]["record"] = time.perf_counter() - t0
        log(f"record finished after {report['seconds']['record']:.1f} s")
    if args.record_bytes:
        report["record_bytes"] = stage("record_bytes", run_record_bytes, args, work)
    r, p = report["record"], report["pgolf"]
    report["same_scored"] = {w: {"tokens": r[w]["tokens"] == p[w]["token_count"], "bytes": r[w]["bytes"] == p[w]["byte_sum"]}
                             for w in ("pre_quant", "post_quant")}
    report["diff_pgolf_minus_record"] = {
        "pre_quant_val_bpb": p["pre_quant"]["val_bpb"] - r["pre_quant"]["val_bpb"],
        "post_quant_val_bpb": p["post_quant"]["val_bpb"] - r["post_quant"]["val_bpb"],
        "model_bytes": p["model_bytes"] - r["model_bytes"]}
    report["seconds"]["total"] = time.perf_counter() - start
    text = table(report)
    print(text)
    print(f"same tokens/bytes scored: {report['same_scored']}; differences (pgolf - record): "
          f"{json.dumps(report['diff_pgolf_minus_record'])}")
    print("seconds:", json.dumps({k: round(v, 1) for k, v in report["seconds"].items()}),
          "record:", json.dumps({k: round(v, 1) for k, v in r["seconds"].items()}),
          "pgolf:", json.dumps({k: round(v, 1) for k, v in p["seconds"].items()}))
    (out / "import_side_by_side.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "import_side_by_side.md").write_text(text + "\n")
    if args.copy_artifacts:  # each < 16 MiB at record size: what a device call can bring back
        import shutil
        import tarfile

        shutil.copy(work / "record" / "final_model.int6.ptz", out / "record_final_model.int6.ptz")
        shutil.copy(work / "pgolf" / "artifact.pgolf", out / "pgolf_artifact.pgolf")
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
            for f in [*(work / "record").glob("*.txt"), *(work / "record").glob("*.log"), *(work / "record").glob("*.json"),
                      *(work / "pgolf").glob("*.log"), *(work / "pgolf").glob("*.json")]:
                tar.add(f, arcname=f"{f.parent.name}/{f.name}")
    ok = all(all(v.values()) for v in report["same_scored"].values()) and not math.isnan(p["post_quant"]["val_bpb"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
