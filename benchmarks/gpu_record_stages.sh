#!/usr/bin/env bash
# Record-size model on ONE GPU, real text: data -> brief training -> Hessians -> GPTQ+LQER -> pack -> diagnostics.
#
#   OUT=dir bash benchmarks/gpu_record_stages.sh      (repository root; wheels in .whl/, inputs in .gpu/)
#
# Inputs (carried to the device machine, which has no network):
#   .gpu/corpus.jsonl.xz        docs from `benchmarks/local_corpus.py` (not FineWeb: scores are not comparable)
#   .gpu/record_tokenizer.model the record's CaseOps SentencePiece model (shared/conformance/)
# Knobs (environment): TRAIN_SECONDS (training cap, default 150), VAL_DOCS (2000), WARMUP_STEPS (3 per loop state),
# CONFIG (config.yaml; recipes/smoke.yaml with QUANT_DEVICE=cpu checks this script on a CPU machine).
#
# The stages are the pipeline's own entry points with the record's model/optimizer/quantize settings (config.yaml);
# only the training cap, the compile warm-up step count and the evaluation's max_docs differ. The fused Triton
# kernels are switched on only if their GPU tests pass first. Everything small lands in $OUT/stages.tar.gz; the
# brotli-11 artifact and the quantized model (in 15 MB parts) come back beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_stages_out}
TRAIN_SECONDS=${TRAIN_SECONDS:-150}
VAL_DOCS=${VAL_DOCS:-2000}
WARMUP_STEPS=${WARMUP_STEPS:-3}
CONFIG=${CONFIG:-config.yaml}
QUANT_DEVICE=${QUANT_DEVICE:-cuda}
W=/tmp/pgolf_stages
mkdir -p "$OUT" "$W/logs"
export PYTHONUNBUFFERED=1
START=$(date +%s)
t() { echo "== [$(($(date +%s) - START))s] $*"; }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"

t "data: corpus -> CaseOps shards with the record tokenizer"
xz -d -T0 -c .gpu/corpus.jsonl.xz > "$W/corpus.jsonl" || exit 1
python -m pgolf.cli data prepare --docs "$W/corpus.jsonl" --tokenizer .gpu/record_tokenizer.model \
  --out "$W/shards" --val-docs "$VAL_DOCS" --workers 16 2>&1 | tail -2 | tee "$W/logs/prepare.log" || exit 1

t "fused kernel GPU tests (kernels only; the compiled model test runs in gpu_bench.sh)"
FUSED=false
if timeout 150 python -m pytest -q -m gpu tests/test_kernels.py -k "not compiled" -p no:cacheprovider 2>&1 \
  | tee "$W/logs/kernel_tests.log" | tail -3 && grep -q " passed" "$W/logs/kernel_tests.log" \
  && ! grep -q "failed\|error" "$W/logs/kernel_tests.log"; then
  FUSED=true
fi
echo "fused_kernels=$FUSED"

python - "$W" "$TRAIN_SECONDS" "$WARMUP_STEPS" "$FUSED" "$VAL_DOCS" "$CONFIG" <<'PY'
import dataclasses, json, sys
from pathlib import Path
from pgolf.config import load_run_config, to_dict
w, seconds, warmup, fused, val_docs = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "true", int(sys.argv[5])
cfg = load_run_config(sys.argv[6])
train = dataclasses.replace(cfg.train, max_wallclock_seconds=seconds, reserve_seconds=0.0,
                            warmup_steps=warmup, fused_kernels=fused, log_every_steps=5)
ev = dataclasses.replace(cfg.evaluate, ttt=dataclasses.replace(cfg.evaluate.ttt, mode="none"), max_docs=val_docs)
for name, section in {"model": cfg.model, "optim": cfg.optim, "train": train, "hessians": cfg.hessians,
                      "quantize": cfg.quantize, "pack": cfg.pack, "evaluate": ev,
                      "pack_fast": dataclasses.replace(cfg.pack, brotli_quality=5)}.items():
    (w / f"{name}.json").write_text(json.dumps(to_dict(section)))
PY
[ -f "$W/model.json" ] || exit 1
j() { cat "$W/$1.json"; }

t "train (cap ${TRAIN_SECONDS}s, record model and optimizer)"
timeout $((TRAIN_SECONDS + 330)) python -m pgolf.train --model-json "$(j model)" --optim-json "$(j optim)" \
  --train-json "$(j train)" --seed 42 --data-dir "$W/shards" --out-dir "$W/train" 2>&1 | tee "$W/logs/train.log" \
  | grep -E "step +[0-9]*[05]0 |warm|done|rror" || true
[ -f "$W/train/checkpoint/checkpoint.json" ] || { t "training failed"; tail -30 "$W/logs/train.log"; exit 1; }

t "hessians"
python -m pgolf hessians --checkpoint "$W/train/checkpoint" --data-dir "$W/shards" --hessian-json "$(j hessians)" \
  --seed 42 --mode sweep --out "$W/hessians.pt" --report "$W/hessian_report.json" 2>&1 | tail -2
t "quantize (GPTQ + LQER on the GPU)"
python -m pgolf quantize --checkpoint "$W/train/checkpoint" --hessians "$W/hessians.pt" --quantize-json "$(j quantize)" \
  --device "$QUANT_DEVICE" --out "$W/quantized.pt" --report "$W/quantize_report.json" 2>&1 | tail -2

t "pack: brotli 11 (the recipe's, in the background) and brotli 5 (for the diagnostics now)"
mkdir -p "$W/pack11" "$W/pack5"
(python -m pgolf pack build --quantized "$W/quantized.pt" --checkpoint "$W/train/checkpoint" --pack-json "$(j pack)" \
  --out "$W/pack11/artifact.pgolf" --report "$W/pack11/pack_report.json" > "$W/logs/pack11.log" 2>&1) &
PACK11=$!
python -m pgolf pack build --quantized "$W/quantized.pt" --checkpoint "$W/train/checkpoint" --pack-json "$(j pack_fast)" \
  --out "$W/pack5/artifact.pgolf" --report "$W/pack5/pack_report.json" 2>&1 | tail -1

t "diagnostics: pre-quant (checkpoint) and post-quant (artifact) bpb, no TTT, first $VAL_DOCS validation docs"
timeout 200 python -m pgolf.evaluate --artifact "$W/pack5/artifact.pgolf" --eval-json "$(j evaluate)" --seed 42 \
  --data-dir "$W/shards" --checkpoint "$W/train/checkpoint" --mode sweep --out "$W/eval_diag.json" 2>&1 | tail -4

t "waiting for the brotli-11 pack"
wait $PACK11; tail -2 "$W/logs/pack11.log"
t "collect"
cp "$W"/train/checkpoint/checkpoint.json "$W"/train/train_summary.json "$W"/train/*.jsonl "$W/logs/" 2>/dev/null
tar -czf "$OUT/stages.tar.gz" -C "$W" logs hessian_report.json quantize_report.json pack11/pack_report.json \
  pack5/pack_report.json eval_diag.json model.json optim.json train.json hessians.json quantize.json pack.json \
  evaluate.json shards/manifest.json 2>/dev/null
cp "$W/pack11/artifact.pgolf" "$OUT/" 2>/dev/null
split -b 15000000 -d "$W/quantized.pt" "$OUT/quantized.pt.part"
ls -la "$OUT"
t "done"
