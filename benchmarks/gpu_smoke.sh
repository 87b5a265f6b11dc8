#!/usr/bin/env bash
# First look on the GPU machine: GPU tests, then a short record-size training run (compile on).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest -q -m gpu tests 2>&1 | tail -15
python3 benchmarks/synthetic_shards.py --out /tmp/synth --train-tokens 200000000 --val-tokens 1000000
python3 - <<'PY'
import json
from pgolf.config import ModelConfig, OptimConfig, TrainConfig, to_dict
t = to_dict(TrainConfig(max_wallclock_seconds=float(__import__("os").environ.get("CAP", "150")), reserve_seconds=0.0, loop_enable_fraction=0.5, log_every_steps=5))
open("/tmp/train.json", "w").write(json.dumps(t))
open("/tmp/model.json", "w").write(json.dumps(to_dict(ModelConfig())))
open("/tmp/optim.json", "w").write(json.dumps(to_dict(OptimConfig())))
PY
timeout ${TRAIN_TIMEOUT:-420} python3 -m pgolf.train --model-json "$(cat /tmp/model.json)" --optim-json "$(cat /tmp/optim.json)" \
  --train-json "$(cat /tmp/train.json)" --seed 42 --data-dir /tmp/synth --out-dir /tmp/run 2>&1 | tail -40
cp /tmp/run/train_summary.json /tmp/run/metrics.jsonl "$OUT/" 2>/dev/null
cat /tmp/run/train_summary.json
