#!/usr/bin/env bash
# Phased LoRA TTT evaluation of a record-size artifact on ONE GPU, on real text (the validation documents that
# benchmarks/gpu_record_stages.sh trained next to: same corpus, same tokenizer, same split).
#
#   OUT=dir bash benchmarks/gpu_ttt_eval.sh     (repository root; wheels in .whl/, inputs in .gpu/)
#
# Inputs: .gpu/corpus.jsonl.xz, .gpu/record_tokenizer.model, .gpu/artifact.pgolf and .gpu/pack_report.json.
# Knobs (environment): VAL_DOCS (split size used at training, default 1000), MAX_DOCS (documents scored, 512),
# PHASES (phase boundaries in documents, "128,256,384"), SLOT_LENGTHS (LoRA slot lengths, one compiled graph each,
# "2048"), TTT_TIMEOUT (seconds for the TTT run, 480; an eager no-TTT run of the same documents follows).
# Everything else is the record's evaluate section (config.yaml): rank 80, alpha 144, chunks of 48,
# 64 documents per batch, AdamW 1e-4, phase SGD 1e-3, compile on, warm-up on random tokens.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_ttt_out}
VAL_DOCS=${VAL_DOCS:-1000}
MAX_DOCS=${MAX_DOCS:-512}
PHASES=${PHASES:-128,256,384}
SLOT_LENGTHS=${SLOT_LENGTHS:-2048}
CORPUS=${CORPUS:-.gpu/corpus.jsonl.xz}  # only its first VAL_DOCS + 1 lines are read: a head of it carries faster
CONFIG=${CONFIG:-config.yaml}  # its evaluate section; a CPU check of this script: CONFIG=recipes/smoke.yaml-like
W=/tmp/pgolf_ttt
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1
START=$(date +%s)
t() { echo "== [$(($(date +%s) - START))s] $*"; }

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
t "validation shards (the first $VAL_DOCS documents of the corpus, as at training)"
(set +o pipefail; xz -d -c "$CORPUS" 2>/dev/null | head -n $((VAL_DOCS + 1)) > "$W/docs.jsonl")
[ -s "$W/docs.jsonl" ] || exit 1
python -m pgolf.cli data prepare --docs "$W/docs.jsonl" --tokenizer .gpu/record_tokenizer.model --out "$W/shards" \
  --val-docs "$VAL_DOCS" --workers 16 2>&1 | tail -1 || exit 1

python - "$W" "$MAX_DOCS" "$PHASES" "$SLOT_LENGTHS" "$CONFIG" <<'PY' || exit 1
import dataclasses, json, sys
from pathlib import Path
from pgolf.config import load_run_config, to_dict
w, max_docs = Path(sys.argv[1]), int(sys.argv[2])
phases = tuple(int(x) for x in sys.argv[3].split(",") if x)
slots = tuple(int(x) for x in sys.argv[4].split(",") if x)
ev = load_run_config(sys.argv[5]).evaluate
# diagnostics off: the no-TTT score of the same documents is the separate eager run below
ev = dataclasses.replace(ev, max_docs=max_docs, diagnostics=False,
                         ttt=dataclasses.replace(ev.ttt, phase_boundaries_docs=phases, slot_lengths=slots))
(w / "evaluate.json").write_text(json.dumps(to_dict(ev)))
plain = dataclasses.replace(ev, compile=False, ttt=dataclasses.replace(ev.ttt, mode="none"))
(w / "evaluate_no_ttt.json").write_text(json.dumps(to_dict(plain)))
print(json.dumps(to_dict(ev.ttt)))
PY

t "evaluate: phased LoRA TTT, first $MAX_DOCS documents, phases at $PHASES, slot lengths $SLOT_LENGTHS"
timeout "${TTT_TIMEOUT:-480}" python -m pgolf.evaluate --artifact .gpu/artifact.pgolf --pack-report .gpu/pack_report.json \
  --eval-json "$(cat "$W/evaluate.json")" --seed 42 --data-dir "$W/shards" --mode sweep --out "$OUT/eval.json" \
  2>&1 | tee "$OUT/eval.log" | grep -v "^\[" | tail -15
grep "^\[" "$OUT/eval.log" | tail -4
grep '"eval_scored"' "$OUT/eval_metrics.jsonl" | cut -c1-600

t "evaluate without TTT (eager), the same documents: the TTT gain and the plain scoring rate"
timeout 90 python -m pgolf.evaluate --artifact .gpu/artifact.pgolf --pack-report .gpu/pack_report.json \
  --eval-json "$(cat "$W/evaluate_no_ttt.json")" --seed 42 --data-dir "$W/shards" --mode sweep \
  --out "$OUT/eval_no_ttt.json" 2>&1 | grep -v "^\[" | tail -3
cp "$W/evaluate.json" "$OUT/" 2>/dev/null
ls "$OUT"
t "done"
