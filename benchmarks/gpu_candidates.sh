#!/usr/bin/env bash
# Issue 16 on ONE GPU: the speed candidates that are off by default, checked and timed in one device call.
#
#   OUT=dir BUDGET_S=540 bash benchmarks/gpu_candidates.sh        (repository root)
#
# Candidates (each a switch that is off in config.yaml until a GPU has timed it):
#   resident  gluon_mlp.RESIDENT: the Gluon MLP kernel with each row block's operand panel resident in shared memory
#             (with_sweep_tiles.py MLP_RESIDENT=forward,backward)
#   head      train.fused_head_loss: the LM head's matmul and the loss as one op (pgolf bench train --head-loss on)
#   qkv       attn_triton.QKV_WARP_SPECIALIZED: the Gluon q, k, v kernel (with_sweep_tiles.py QKV_WS=1)
# Stages, most needed first, each capped so the call stays inside BUDGET_S (benchmarks/stage.sh):
#   1. bits      pytest -m gpu on the kernels' GPU tests with the candidates on (the resident kernel's bits against the
#                TMA kernel's, the q, k, v kernel against the Triton one, the head + loss op against fp64)
#   2. ab_base, ab_resident, ab_head, ab_qkv, ab_base2   the step (torch attention, looping off, pgolf's synthetic
#                rows), then benchmarks/candidates_summary.py: which candidates beat the base by more than the noise
#   3. mlp_bench, loss_bench, qk_bench   the kernels alone, with what the budget leaves (benchmarks/mlp_kernel_bench.py,
#                loss_kernel_bench.py --warps 4 8 16, qk_kernel_bench.py --sweep-blocks [--against $QK_AGAINST])
# Knobs: BUDGET_S (540), QK_AGAINST (another attn_triton.py for qk_bench, e.g. an older commit's), STEPS (5).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_candidates_out}
BUDGET_S=${BUDGET_S:-540}
STEPS=${STEPS:-5}
mkdir -p "$OUT"
START=$(date +%s)
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/pgolf_inductor}
# shellcheck source=benchmarks/stage.sh
source benchmarks/stage.sh  # stage NAME CAP COMMAND...

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
CANDIDATES_ON=(env MLP_RESIDENT=forward,backward QKV_WS=1)
STAGE_TAIL_LINES=6 stage bits 110 "${CANDIDATES_ON[@]}" python benchmarks/with_sweep_tiles.py pytest -q -rs \
  -p no:cacheprovider -m gpu tests/test_kernels.py -k "warp_specialized or qkv or qk_norm_rope or head_loss or fused_ce"

ab() {  # ab NAME [env assignments] [-- bench arguments]: one step A/B run, its JSON at $OUT/ab_NAME.json
  local name=$1
  shift
  local envs=() args=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do envs+=("$1"); shift; done
  [ "${1:-}" = -- ] && shift
  args=("$@")
  STAGE_TAIL_LINES=2 stage "ab_$name" 75 env "${envs[@]}" python benchmarks/with_sweep_tiles.py train --config config.yaml \
    --attention-backend torch --looping off --steps "$STEPS" --warmup 2 "${args[@]}" --out "$OUT/ab_$name.json"
}
ab base MLP_RESIDENT=none QKV_WS=0
ab resident MLP_RESIDENT=forward,backward QKV_WS=0
ab head MLP_RESIDENT=none QKV_WS=0 -- --head-loss on
ab qkv MLP_RESIDENT=none QKV_WS=1
ab base2 MLP_RESIDENT=none QKV_WS=0
python benchmarks/candidates_summary.py "$OUT" || echo "candidates_summary: no base run (budget spent?)"
stage mlp_bench 70 python benchmarks/mlp_kernel_bench.py --out "$OUT/mlp_bench.json"
stage loss_bench 40 python benchmarks/loss_kernel_bench.py --warps 4 8 16 --out "$OUT/loss_bench.json"
stage qk_bench 60 python benchmarks/qk_kernel_bench.py --sweep-blocks ${QK_AGAINST:+--against "$QK_AGAINST"} \
  --out "$OUT/qk_bench.json"
echo "== done after $(($(date +%s) - START))s"
