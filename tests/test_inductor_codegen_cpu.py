"""benchmarks/inductor_codegen_cpu.py: inductor's GPU (Triton) kernels for the training step, generated on CPU.

The statistics are checked on a hand-written graph module; the whole tool runs on a 2-layer cut of the smoke
recipe in three subprocesses (it patches inductor for its own process): with and without
train.compile_max_fusion_io_buffers' cap, which must bound the kernels it generates, and with
train.compile_mix_order_reduction on and off, off leaving no mix-order kernel.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import inductor_codegen_cpu as codegen  # noqa: E402

MODULE = """
triton_per_fused_rms_norm_sum_3 = async_compile.triton('triton_per_fused_rms_norm_sum_3', '''
@triton.jit
def triton_per_fused_rms_norm_sum_3(in_out_ptr0, in_ptr0, in_ptr1, ws_ptr, xnumel, r0_numel, XBLOCK : tl.constexpr):
    inductor_meta={'grid_type': 'MixOrderReductionGrid'}
    accum0 = tl.full([R0_BLOCK], 0, tl.float32)[None, :]
    accum1 = tl.full([R0_BLOCK], 0, tl.float32)[None, :]
    tmp0 = tl.load(in_ptr0 + (r0_1 + 64*x0), None)
    tmp1 = tl.load(in_ptr1 + (r0_1), None)
    tmp2 = tl.load(in_out_ptr0 + (r0_1 + 64*x0), None)
    tl.store(in_out_ptr0 + (r0_1 + 64*x0), tmp2, None)
''', device_str='cpu')

triton_poi_fused_add_4 = async_compile.triton('triton_poi_fused_add_4', '''
@triton.jit
def triton_poi_fused_add_4(in_ptr0, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    tmp0 = tl.load(in_ptr0 + (x0), None)
''', device_str='cpu')

triton_per_fused_mul_sum_5 = async_compile.triton('triton_per_fused_mul_sum_5', '''
@triton.jit
def triton_per_fused_mul_sum_5(in_ptr0, in_ptr1, out_ptr0, xnumel, r0_numel, XBLOCK : tl.constexpr):
    xnumel = 64
    r0_numel = 64
    tmp0 = tl.load(in_ptr0 + (r0_1 + 64*x0), xmask)
    tl.store(out_ptr0 + (r0_1 + 64*x0), tmp0, xmask)
''', device_str='cpu')

def call(args):
        triton_per_fused_rms_norm_sum_3.run(buf1, buf2, buf3, ws, 1024, 64, stream=raw_streamNone)
        triton_per_fused_mul_sum_5.run(buf8, buf9, buf10, 64, 64, stream=raw_streamNone)
        triton_poi_fused_add_4.run(buf4, buf5, 64, stream=raw_streamNone)
        triton_poi_fused_add_4.run(buf6, buf7, 64, stream=raw_streamNone)
"""


def test_kernel_statistics_of_a_graph_module():
    weights = {r["name"]: r for r in codegen.kernel_stats(MODULE, model_dim=64)}["triton_per_fused_mul_sum_5"]
    assert (weights["full_loads"], weights["full_stores"]) == (1, 1)  # without the token count: the stride alone
    rows = {r["name"]: r for r in codegen.kernel_stats(MODULE, model_dim=64, tokens=1024)}
    weights = rows.pop("triton_per_fused_mul_sum_5")  # a [64, 64] weight-sized kernel: no full-size pass
    assert (weights["launches"], weights["full_loads"], weights["full_stores"]) == (1, 0, 0)
    mix = rows["triton_per_fused_rms_norm_sum_3"]
    assert (mix["launches"], mix["full_loads"], mix["full_stores"], mix["accumulators"]) == (1, 2, 1, 2)
    assert mix["mix_order"] and mix["pointer_args"] == 4
    add = rows["triton_poi_fused_add_4"]
    assert (add["launches"], add["full_loads"], add["full_stores"], add["mix_order"]) == (2, 0, 0, False)
    summary = codegen.graph_summary(list(rows.values()))
    assert summary == {"kernels": 2, "launches": 3, "full_size_passes": 3, "mix_order_kernels": 1,
                       "max_accumulators": 2, "max_full_loads": 2, "max_pointer_args": 4}


def test_fusion_options_shape_the_generated_kernels(tmp_path):
    pytest.importorskip("triton", reason="the tool generates Triton kernels: triton must be installed")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor_cache")}
    # 1,024 tokens each; with mix-order reduction on, at any size (inductor's non-strict mode: at its GPU sizes,
    # >= 5 Mi elements and >= 4,096 rows, the smoke model's 64 columns would need 81,920 tokens and ~4 GB here)
    # the smoke recipe's model cut to 2 layers (one looped, one two-lane): the same kinds of blocks, half the
    # compile time (the three compiles share the CI's two cores)
    recipe = yaml.safe_load((ROOT / "recipes" / "smoke.yaml").read_text())
    recipe["model"].update(num_layers=2, loop_start=0, loop_end=0, loop_count=2, parallel_residual_start=1,
                           xsa_last_n=2)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    variants = {0: (0, "on"), 10: (10, "on"), "nomix": (0, "off")}
    runs = {}
    for name, (cap, mix_order) in variants.items():
        cmd = [sys.executable, str(ROOT / "benchmarks" / "inductor_codegen_cpu.py"), "--config",
               str(tmp_path / "recipe.yaml"), "--tokens", "1024", "--looping", "on",
               "--max-fusion-io-buffers", str(cap), "--mix-order-reduction", mix_order,
               "--out", str(tmp_path / f"cap{name}")] + (["--mix-order-any-size"] if mix_order == "on" else [])
        runs[name] = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    summaries = {}
    for cap, proc in runs.items():
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-3000:]
        assert out.startswith("forward: ") and "\nbackward: " in out
        summaries[cap] = json.loads((tmp_path / f"cap{cap}" / "summary.json").read_text())
        assert (tmp_path / f"cap{cap}" / "backward.py").read_text().count("def call(") == 1
    for graph in ("forward", "backward"):
        uncapped, capped = summaries[0]["graphs"][graph], summaries[10]["graphs"][graph]
        # the looped and two-lane blocks: fused kernels wider than the cap lets through
        assert uncapped["max_pointer_args"] > 12
        assert capped["max_pointer_args"] <= 12  # 10 buffers (+ a kernel that is one node: it cannot be split)
        assert capped["kernels"] > uncapped["kernels"]
    # mix-order reduction off (train.compile_mix_order_reduction: false): no kernel fuses column sums into row
    # reductions, so none keeps accumulators; with it on the backward has such kernels, and fewer passes
    mix, nomix = summaries[0]["graphs"]["backward"], summaries["nomix"]["graphs"]["backward"]
    assert mix["mix_order_kernels"] > 0 and mix["max_accumulators"] > 0
    assert nomix["mix_order_kernels"] == 0 and nomix["max_accumulators"] == 0
    assert nomix["full_size_passes"] > mix["full_size_passes"]
    assert summaries["nomix"]["mix_order_reduction"] == "off" and summaries[0]["mix_order_any_size"]


def test_record_model_through_the_same_scheduling(tmp_path):
    """The record script's own GPT (small hyperparameters) goes through the same capture: two graph modules whose
    kernels the statistics read. Reads the record script: skips without it."""
    pytest.importorskip("triton", reason="the tool generates Triton kernels: triton must be installed")
    sys.path.insert(0, str(ROOT / "tests"))
    import record_oracle

    if not record_oracle.record_script().is_file():
        pytest.skip(f"record script not found at {record_oracle.record_script()} (set PGOLF_RECORD_SCRIPT)")
    # 2 layers: one looped, one two-lane (a third of the compile time of 6 on CI's two cores)
    small = {"vocab_size": 96, "num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2, "rope_dims": 8,
             "xsa_last_n": 2, "num_loops": 2, "loop_start": 0, "loop_end": 0, "parallel_start_layer": 1,
             "train_seq_len": 64, "rope_train_seq_len": 64}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor_cache")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "inductor_codegen_cpu.py"), "--model", "record", "--record-hparams",
         json.dumps(small), "--tokens", "512", "--looping", "on", "--out", str(tmp_path / "record")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "record" / "summary.json").read_text())
    assert summary["model"] == "record" and summary["looping"] == "on"
    for graph in ("forward", "backward"):
        stats = summary["graphs"][graph]
        assert stats["kernels"] > 10 and stats["full_size_passes"] > 0  # model_dim 64 read from the hyperparameters
    forward = (tmp_path / "record" / "forward.py").read_text()
    assert "pgolf_fa4.fwd" in forward and "pgolf.mlp_fused" in forward  # the stand-ins, not inductor-made kernels
