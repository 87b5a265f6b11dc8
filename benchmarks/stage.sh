# Sourced by the GPU scripts (gpu_speed.sh, gpu_bench.sh): one stage of a device call under a shared time budget.
# Needs BUDGET_S, START (epoch seconds) and OUT; STAGE_TAIL_LINES (default 12) non-empty log lines are echoed.
#   stage NAME CAP_SECONDS COMMAND...   runs COMMAND under min(CAP, time left), its log in $OUT/NAME.log
stage() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  ((left < cap)) && cap=$left
  if ((cap < 30)); then
    echo "== $name: SKIPPED (budget spent)"
    return
  fi
  echo "== [$(($(date +%s) - START))s] $name (limit ${cap}s): $*"
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=15 "$cap" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -vE "^\s*$" "$OUT/$name.log" | tail -n "${STAGE_TAIL_LINES:-12}"
  echo "== $name: exit $rc after $(($(date +%s) - t0))s"
}
