#!/usr/bin/env bash
# The SHIPPED train_gpt.py of a recipe, end to end on one GPU, with pgolf not importable: the file a submission
# ships (the `bundle` rule's minified form) trains, collects Hessians, quantizes, packs under the size gate and
# evaluates with TTT, every recipe switch as the recipe sets it (config.yaml: the Triton / Gluon kernels, CUDA
# graphs, fused gradient accumulation, FlashAttention 4 where installed).
#
#   OUT=dir TRAIN_SECONDS=30 bash benchmarks/gpu_shipped_run.sh [RECIPE]        (repository root)
#
# Why: the CPU tests run the shipped form of toy recipes (tests/test_bundle.py, tests/test_reproduce.py), where the
# GPU kernels do not run; this runs the minified kernels, custom ops and graphs themselves on the GPU.
# Only the training cap differs from RECIPE (TRAIN_SECONDS, default 30: both loop states are trained). Data:
# synthetic shards (benchmarks/synthetic_shards.py: VAL_TOKENS validation tokens, 120 M training tokens), so the
# scores are not comparable with FineWeb's; the file needs torch, triton, numpy and brotli (carry brotli's wheel
# to the lent GPU: shared/spec/gpu.md). $OUT gets the console, record_run.json, the stage reports and the log.
set -uo pipefail
cd "$(dirname "$0")/.."
RECIPE=${1:-config.yaml}
TRAIN_SECONDS=${TRAIN_SECONDS:-30}
VAL_TOKENS=${VAL_TOKENS:-1000000}
RUN_TIMEOUT=${RUN_TIMEOUT:-540}
QUANT_DEVICE=${QUANT_DEVICE:-cuda}  # cpu: checks this script on a CPU machine with a small recipe
mkdir -p "${OUT:=shipped_run_out}" "${WORK:=/tmp/pgolf_shipped}/folder"
OUT=$(cd "$OUT" && pwd)  # absolute: the run itself starts in another folder
W=$(cd "$WORK" && pwd)
export PYTHONUNBUFFERED=1

python3 - "$RECIPE" "$TRAIN_SECONDS" "$W/recipe.yaml" <<'PY' || exit 1
import sys
import yaml
recipe = yaml.safe_load(open(sys.argv[1]))
recipe["train"]["max_wallclock_seconds"] = float(sys.argv[2])
yaml.safe_dump(recipe, open(sys.argv[3], "w"), sort_keys=False)
PY
python3 -m pgolf bundle --config "$W/recipe.yaml" --out "$W/folder/train_gpt.py" --minify-modules | tail -2 || exit 1
VOCAB=$(python3 -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['model']['vocab_size'])" "$W/recipe.yaml")
[ -f "$W/syn/fineweb_val_000000.bin" ] || PYTHONPATH=$PWD python3 benchmarks/synthetic_shards.py --out "$W/syn" \
  --vocab "$VOCAB" --train-tokens "${TRAIN_TOKENS:-120000000}" --val-tokens "$VAL_TOKENS" | tail -1

# pgolf.artifact.bundle.LAUNCHER runs the file with pgolf unimportable (as tests/test_bundle.py does)
python3 -c "import sys; from pgolf.artifact.bundle import LAUNCHER; open(sys.argv[1], 'w').write(LAUNCHER)" \
  "$W/folder/launch_without_pgolf.py" || exit 1
cd "$W/folder" || exit 1
rm -rf "$W/out"
START=$(date +%s)
timeout "$RUN_TIMEOUT" python3 -m torch.distributed.run --standalone --nproc_per_node 1 launch_without_pgolf.py train_gpt.py --seed 42 --data-dir "$W/syn" \
  --out-dir "$W/out" --quantize-device "$QUANT_DEVICE" > "$OUT/console.txt" 2>&1
RC=$?
echo "train_gpt.py exit status $RC after $(( $(date +%s) - START )) s"
grep -E "^\[|: done|val_bpb|error|Error" "$OUT/console.txt" | grep -v -i warning | tail -30
cd "$W/out" 2>/dev/null && find . \( -name "*.json" -size -2M -o -name "*.log" -o -name "metrics.jsonl" \) \
  -exec cp --parents {} "$OUT/" \;
python3 - "$W/out/record_run.json" <<'PY'
import json
import sys
try:
    summary = json.load(open(sys.argv[1]))
except OSError as exc:
    sys.exit(f"no record_run.json: {exc}")
print("exit status", summary["exit_status"], summary.get("error", ""))
for name in ("train", "hessians", "quantize", "pack", "evaluate"):
    stage = summary["stages"].get(name)
    if stage:
        print(f"  {name:9s} status {stage['status']}  {stage['seconds']:8.1f} s")
for key in ("train", "hessians", "quantize", "pack", "evaluate"):
    print(f"  {key}: {json.dumps(summary.get(key))}")
PY
exit "$RC"
