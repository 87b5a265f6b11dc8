#!/usr/bin/env bash
# GPU check of the fused Triton kernels and speed benchmark of the record recipe on ONE GPU (H100 or H200).
#
#   OUT=/some/dir bash benchmarks/gpu_bench.sh          (from the repository root; OUT defaults to ./gpu_bench_out)
#
# Stages, most important first, each capped so the whole run stays inside BUDGET_S seconds (default 470, ~8 min);
# one process per compiled graph, so a slow compile costs one stage, never the JSON of another:
#   1. gpu_tests          pytest -m gpu tests/test_kernels.py (kernels vs fp64 truth in bf16; fused+compiled model)
#   2. train_fused_off    record config, fused kernels, torch.compile, accumulation 8 x 98,304 tokens, looping off
#   3. train_unfused_off  the same step in pure PyTorch (--no-fused): the fused kernels' speedup
#   4. train_fused_on     fused, looping on (17 block applications)
#   5. eval_fused         scoring and forward+backward throughput on 65,536-token rows, looping on (if time is left)
# Every stage prints its human line (stderr) and JSON (stdout); the JSON also lands in $OUT/<stage>.json and the
# full output in $OUT/<stage>.log. A summary (speedup, MFU, memory) closes the run. Needs no network and none of
# brotli / snakemake / flash-attn (python -m pgolf.train.bench imports only what it uses).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_bench_out}
BUDGET_S=${BUDGET_S:-470}
mkdir -p "$OUT"
START=$(date +%s)

STAGE_TAIL_LINES=1000  # the whole log of each stage on the console
# shellcheck source=benchmarks/stage.sh
source benchmarks/stage.sh  # stage NAME CAP COMMAND...

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader
python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

stage gpu_tests 90 python -m pytest tests/test_kernels.py -m gpu -q -rs -p no:cacheprovider
TRAIN="python -m pgolf.train.bench train --config config.yaml --steps 5 --warmup 2"
stage train_fused_off 110 $TRAIN --looping off --out "$OUT/train_fused_off.json"
stage train_unfused_off 100 $TRAIN --looping off --no-fused --out "$OUT/train_unfused_off.json"
stage train_fused_on 150 $TRAIN --looping on --out "$OUT/train_fused_on.json"
stage eval_fused 100 python -m pgolf.train.bench eval --config config.yaml --steps 3 --warmup 1 --out "$OUT/eval_fused.json"

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem != "summary"}
summary = {}
for name, r in runs.items():
    if r.get("bench") == "train":
        for p in r["phases"]:
            key = f"{name}/loop_{'on' if p['looping'] else 'off'}"
            summary[key] = {k: p[k] for k in ("ms_per_step", "tokens_per_s", "mfu", "peak_memory_allocated_gib",
                                              "warmup_seconds", "first_step_seconds", "recompiles_in_timed_steps")}
    elif r.get("bench") == "eval":
        summary[name] = {k: r[k] for k in ("projected_scoring_seconds", "projected_ttt_seconds")}
        summary[name].update(score_tokens_per_s=r["score"]["tokens_per_s"], ttt_tokens_per_s=r["ttt_step"]["tokens_per_s"])
fused, plain = summary.get("train_fused_off/loop_off"), summary.get("train_unfused_off/loop_off")
if fused and plain:
    summary["fused_speedup_loop_off"] = plain["ms_per_step"] / fused["ms_per_step"]
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print("== summary")
print(json.dumps(summary, indent=1))
PY
echo "== total $(($(date +%s) - START))s; JSON in $OUT"
