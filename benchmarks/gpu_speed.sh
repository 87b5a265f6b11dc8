#!/usr/bin/env bash
# Issue 16 on ONE GPU (H100/H200): are the attention backends right, and how fast is the record recipe's training
# step with FlashAttention 4 and with torch's varlen kernels, looping off and on?
#
#   OUT=dir bash benchmarks/gpu_speed.sh          (repository root; one device call, ~8-9 min with cold caches)
#
# FlashAttention 4: install it first in the same lease (shared/tools/fa4/README.md: `source .fa4b/install_on_device.sh`
# after .fa4a/part_aa was copied to /tmp/fa4stash). This script finds it under /tmp/site, or installs it itself when
# .fa4b/ and the first part (/tmp/fa4stash/part_aa or .fa4a/part_aa) are both present; without it the fa4 stages
# are skipped and the tests say why.
#
# Stages, each capped so the whole run stays inside BUDGET_S seconds (default 540); one process per compiled graph,
# so a slow compile costs one stage, never the JSON of another:
#   1. gpu_tests    pytest -m gpu: each installed backend against torch's varlen kernels and an fp32 reference
#                   (outputs, gradients; eager and compiled), every backend of the model, the fused MLP kernels
#   2. fa4_off      python -m pgolf.bench train --config config.yaml --attention-backend fa4 --looping off (profiled)
#   3. fa4_on       the same, looping on (17 block applications)
#   4. torch_off    --attention-backend torch, looping off
#   5. torch_on     --attention-backend torch, looping on
#   6. <backend>-cap<N>_<loop>  for each N in FUSION_CAPS: the same with --max-fusion-io-buffers N (inductor's cap on
#                   the buffers one fused kernel reads and writes; train.compile_max_fusion_io_buffers), loops FUSION_LOOPS
#   7. <backend>-nomix_<loop>   for each loop in NOMIX_LOOPS: the same with --mix-order-reduction off (inductor fuses
#                   no per-channel sums into row reductions; train.compile_mix_order_reduction)
# Knobs: BACKENDS ("fa4 torch"), STEPS (6 timed steps), WARMUP (2: the first compiles, the second must not),
# RECORD_PROFILE (the record's anchor_profile.json from the same machine, written by `.ref/side_by_side.sh record`:
# the "x rec+FA4" column divides by its figures instead of shared/perf's), DATA (a shard folder: every bench takes
# its rows from it, `--data`; give the one the record script reads, /tmp/syn in .ref/side_by_side.sh, so that both
# sides attend over the same documents; written as side_by_side.sh writes it when it has none; "": pgolf's
# synthetic stream, documents of 1,000-3,000 tokens),
# PROFILE (2 profiled steps), FUSION_CAPS ("": none), FUSION_LOOPS ("on off"), NOMIX_LOOPS ("": none),
# GPU_TESTS (1; 0 skips stage 1), TRACE (non-empty: each bench writes its profiled steps' Chrome trace, gzipped, to
# $OUT/trace_<run>/ and its JSON gains idle_gaps: where the GPU waited for the host),
# BUDGET_S. Outputs in $OUT:
# gpu_tests.log, bench_<run>_<loop>.json (ms/step,
# peak memory, warm-up and first-step seconds, graphs compiled, GPU time by kernel category, top kernels) and
# speed_summary.json (the table printed at the end, with the record's figures from shared/perf for the ratio) and
# inductor_kernels.md (benchmarks/inductor_kernels.py: the source of each run's costliest generated kernels).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_speed_out}
BUDGET_S=${BUDGET_S:-540}
BACKENDS=${BACKENDS:-fa4 torch}
STEPS=${STEPS:-6}
WARMUP=${WARMUP:-2}
PROFILE=${PROFILE:-2}
FUSION_CAPS=${FUSION_CAPS:-}
FUSION_LOOPS=${FUSION_LOOPS:-on off}
NOMIX_LOOPS=${NOMIX_LOOPS:-}
GPU_TESTS=${GPU_TESTS:-1}
DATA=${DATA:-}
mkdir -p "$OUT"
START=$(date +%s)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# compile caches on this machine: a second run (or the second backend) reuses generated kernels and FA4's JIT
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/pgolf_inductor}
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=${FLASH_ATTENTION_CUTE_DSL_CACHE_DIR:-/tmp/fa4_cache}

# shellcheck source=benchmarks/stage.sh
source benchmarks/stage.sh  # stage NAME CAP COMMAND...

fa4_importable() { python -c "import flash_attn.cute.interface" > /dev/null 2>&1; }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader
if ! fa4_importable && [ -d /tmp/site/flash_attn ]; then
  export PYTHONPATH=/tmp/site/nvidia_cutlass_dsl/dsl_packages:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! fa4_importable && [ -f .fa4b/install_on_device.sh ]; then
  mkdir -p /tmp/fa4stash
  [ -f /tmp/fa4stash/part_aa ] || { [ -f .fa4a/part_aa ] && cp .fa4a/part_aa /tmp/fa4stash/; }
  if [ -f /tmp/fa4stash/part_aa ]; then
    # shellcheck disable=SC1091
    source .fa4b/install_on_device.sh || echo "FlashAttention 4: install failed"
  fi
fi
fa4_importable && echo "FlashAttention 4: importable" || echo "FlashAttention 4: NOT importable (fa4 stages skipped)"
DATA_ARGS=()
if [ -n "$DATA" ]; then
  python -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
from synthetic_shards import ensure_harness_shards; ensure_harness_shards(Path(sys.argv[1]))" "$DATA"
  DATA_ARGS=(--data "$DATA")
fi

bench_stage() {  # bench_stage NAME LOOP [more pgolf bench train arguments]: one bench, its JSON at $OUT/NAME.json
  local name=$1 loop=$2
  shift 2
  stage "$name" "$([ "$loop" = off ] && echo 115 || echo 125)" python -m pgolf.bench train --config config.yaml \
    --looping "$loop" --steps "$STEPS" --warmup "$WARMUP" --profile-steps "$PROFILE" "${DATA_ARGS[@]}" "$@" \
    ${TRACE:+--trace "$OUT/trace_$name"} --out "$OUT/$name.json"
  local rc=$?
  if [ -n "${TRACE:-}" ]; then gzip -f "$OUT/trace_$name"/*.json 2> /dev/null; fi
  return $rc
}
python -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
python - <<'PY'
from pgolf.model.attention import resolve_backend
for requested in ("auto", "fa3", "fa4", "torch"):
    try:
        print(f"model.attention_backend {requested}:", resolve_backend(requested, "cuda").as_record())
    except Exception as exc:  # an explicit backend that cannot run here
        print(f"model.attention_backend {requested}: unusable: {exc}")
PY

if [ "$GPU_TESTS" = 0 ]; then
  echo "== gpu_tests: SKIPPED (GPU_TESTS=0)"
else
  stage gpu_tests 100 python -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_attention_backends.py \
    tests/test_attention.py tests/test_model.py tests/test_kernels.py -k "not model_fused_compiled_matches_reference"
fi

for backend in $BACKENDS; do
  if [ "$backend" = fa4 ] && ! fa4_importable; then
    echo "== fa4 stages: SKIPPED (FlashAttention 4 does not import)"
    continue
  fi
  for loop in off on; do
    bench_stage "bench_${backend}_${loop}" "$loop" --attention-backend "$backend"
  done
  for cap in $FUSION_CAPS; do
    for loop in $FUSION_LOOPS; do
      bench_stage "bench_${backend}-cap${cap}_${loop}" "$loop" --attention-backend "$backend" --max-fusion-io-buffers "$cap"
    done
  done
  for loop in $NOMIX_LOOPS; do
    bench_stage "bench_${backend}-nomix_${loop}" "$loop" --attention-backend "$backend" --mix-order-reduction off
  done
done

# the generated source of each run's costliest inductor kernels, with the ATen ops each fuses (issue 16's comparison)
if compgen -G "$OUT/bench_*_*.json" > /dev/null; then
  python benchmarks/inductor_kernels.py --cache "$TORCHINDUCTOR_CACHE_DIR" --profile "$OUT"/bench_*_*.json \
    --out "$OUT/inductor_kernels.md" || echo "inductor_kernels: failed (the benches' figures stand)"
fi

python - "$OUT" "${RECORD_PROFILE:-}" <<'PY'
import json, sys
from pathlib import Path

out, record_profile = Path(sys.argv[1]), sys.argv[2]
# the record script on one H200, back to back with pgolf 1f1632b (shared/perf/README.md, 2026-12-04)
RECORD = {"fa4": {"off": 658.0, "on": 978.0, "source": "h200_2026-12-04_record_fa4_profile.json"},
          "dense_sdpa_stand_in": {"off": 781.0, "on": 1163.0, "source": "h200_2026-12-04_record_vs_pgolf.json"},
          "peak_memory_allocated_gib": 41.8}
if record_profile and not Path(record_profile).is_file():
    print(f"gpu_speed: RECORD_PROFILE {record_profile} not found (the record's run did not finish?): no ratios")
    record_profile = ""
if record_profile:  # the record's anchor_profile.json from this machine (.ref/side_by_side.sh record): same-lease ratios
    anchor = json.loads(Path(record_profile).read_text())
    RECORD["fa4"] = {"off": anchor["windows"]["pre_loop"]["ms_per_step"],
                     "on": anchor["windows"]["post_loop"]["ms_per_step"], "source": record_profile}
    RECORD["peak_memory_allocated_gib"] = round(anchor["peak_memory_allocated_gib"], 1)
    # the GPU's idle time per step in the record's profiled windows: profiled wall minus kernel time
    RECORD["gpu_idle_ms_per_step"] = {
        loop: anchor["windows"][w]["profiled_wall_ms_per_step"] - anchor["windows"][w]["gpu_busy_ms_per_step"]
        for loop, w in (("off", "pre_loop"), ("on", "post_loop"))
        if "profiled_wall_ms_per_step" in anchor["windows"][w] and "gpu_busy_ms_per_step" in anchor["windows"][w]}
rows, summary = [], {"record_reference": RECORD, "runs": {}}
for path in sorted(out.glob("bench_*_*.json")):
    r = json.loads(path.read_text())
    for p in r["phases"]:
        loop = "on" if p["looping"] else "off"
        prof = p.get("profile") or {}
        cats = prof.get("ms_per_step_by_category") or {}
        entry = {
            "attention_backend": r["attention_backend"], "compile_options": r.get("compile_options"), "looping": loop, "ms_per_step": p["ms_per_step"],
            "tokens_per_s": p["tokens_per_s"], "mfu": p["mfu"], "peak_memory_allocated_gib": p["peak_memory_allocated_gib"],
            "warmup_seconds": p["warmup_seconds"], "first_step_seconds": p["first_step_seconds"],
            "graphs_compiled_in_warmup": p["graphs_compiled_in_warmup"], "recompiles_in_timed_steps": p["recompiles_in_timed_steps"],
            "gpu_busy_ms_per_step": prof.get("gpu_busy_ms_per_step"), "ms_per_step_by_category": cats,
            "gpu_idle_ms_per_step": (prof["wall_ms_per_step"] - prof["gpu_busy_ms_per_step"]
                                     if prof.get("gpu_busy_ms_per_step") else None),
            "top_kernels": (prof.get("top_kernels") or [])[:8], "loss": p["loss"],
            "ratio_to_record_fa4": p["ms_per_step"] / RECORD["fa4"][loop],
        }
        summary["runs"][path.stem] = entry
        rows.append((path.stem, entry))
(out / "speed_summary.json").write_text(json.dumps(summary, indent=1))
print(f"\n{'run':<20} {'ms/step':>8} {'x rec+FA4':>9} {'peak GiB':>8} {'warm-up s':>9} {'1st step s':>10} {'graphs':>6} "
      f"{'recomp':>6} {'idle ms':>7}  kernels ms/step (attention / matmul / fused Triton / inductor / other)")
for name, e in rows:
    c = e["ms_per_step_by_category"]
    other = sum(v for k, v in c.items() if k not in ("attention", "matmul", "fused_triton_kernels", "inductor_triton"))
    cats = " / ".join(f"{c.get(k, 0):.0f}" for k in ("attention", "matmul", "fused_triton_kernels", "inductor_triton"))
    peak = e["peak_memory_allocated_gib"]
    idle = "" if e["gpu_idle_ms_per_step"] is None else f"{e['gpu_idle_ms_per_step']:.1f}"
    print(f"{name:<20} {e['ms_per_step']:8.1f} {e['ratio_to_record_fa4']:9.3f} {peak if peak is None else round(peak, 1)!s:>8} "
          f"{e['warmup_seconds']:9.1f} {e['first_step_seconds'] or 0:10.1f} {e['graphs_compiled_in_warmup']:6d} "
          f"{e['recompiles_in_timed_steps']:6d} {idle:>7}  {cats} / {other:.0f}  [{e['attention_backend']['resolved']}]")
print(f"record ({RECORD['fa4']['source']}): +FA4 {RECORD['fa4']['off']:.1f} / {RECORD['fa4']['on']:.1f} ms/step looping off / on, "
      f"peak {RECORD['peak_memory_allocated_gib']} GiB"
      + "".join(f", GPU idle {v:.1f} ms/step looping {k}" for k, v in RECORD.get("gpu_idle_ms_per_step", {}).items())
      + "; issue 16 target: pgolf <= 0.85 x the record, peak <= the record's")
PY
echo "== done after $(($(date +%s) - START))s"
