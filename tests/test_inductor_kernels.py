"""benchmarks/inductor_kernels.py: top kernels of a profile found in a (synthetic) inductor cache."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import inductor_kernels  # noqa: E402

# the shape of a generated graph module on CUDA (torch 2.x): comments, then NAME = async_compile.triton(...)
GRAPH_MODULE = """# AOT ID: ['1_backward']
import torch
async_compile = AsyncCompile()


# kernel path: /tmp/cache/ab/cabc.py
# Topologically Sorted Source Nodes: [rms_norm, lerp], Original ATen: [aten._fused_rms_norm_backward, aten.lerp]
triton_per_fused_lerp_rms_norm_34 = async_compile.triton('triton_per_fused_lerp_rms_norm_34', '''
import triton

@triton.jit
def triton_per_fused_lerp_rms_norm_34(in_ptr0, out_ptr0, xnumel, r0_numel):
    pass
''', device_str='cuda')


# kernel path: /tmp/cache/cd/ccde.py
triton_poi_fused_add_7 = async_compile.triton('triton_poi_fused_add_7', '''
@triton.jit
def triton_poi_fused_add_7(in_ptr0):
    pass
''', device_str='cuda')
"""


def write_case(tmp_path: Path) -> tuple[Path, Path]:
    cache = tmp_path / "cache"
    (cache / "xy").mkdir(parents=True)
    (cache / "xy" / "cgraph.py").write_text(GRAPH_MODULE)
    (cache / "xy" / "other.py").write_text("print('not a graph module')\n")
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"phases": [{"looping": True, "profile": {"top_kernels": [
        {"name": "_mlp_tma_kernel", "ms_per_step": 168.5},
        {"name": "triton_per_fused_lerp_rms_norm_34", "ms_per_step": 45.6},
        {"name": "triton_red_fused_sum_99", "ms_per_step": 3.0}]}}]}))
    return cache, bench


def test_top_kernels_are_found_with_their_graph_and_source_nodes(tmp_path):
    cache, bench = write_case(tmp_path)
    text, missing = inductor_kernels.report([bench], cache, top=8)
    assert missing == 1  # triton_red_fused_sum_99 is not in the cache; _mlp_tma_kernel is no inductor kernel
    assert "## bench.json, looping on" in text
    assert "45.6 ms/step  `triton_per_fused_lerp_rms_norm_34` (1 match(es))" in text
    assert "graph ['1_backward']" in text
    assert "Original ATen: [aten._fused_rms_norm_backward, aten.lerp]" in text
    assert "def triton_per_fused_lerp_rms_norm_34(in_ptr0, out_ptr0, xnumel, r0_numel):" in text
    assert "_mlp_tma_kernel" not in text
    assert "triton_poi_fused_add_7" not in text  # in the cache but not a top kernel


def test_the_records_anchor_profile_is_read_too(tmp_path):
    cache, _ = write_case(tmp_path)
    anchor = tmp_path / "anchor_profile.json"
    anchor.write_text(json.dumps({"windows": {"post_loop": {"top_kernels": [
        {"name": "triton_poi_fused_add_7", "ms_per_step": 10.6}]}}}))
    out = tmp_path / "kernels.md"
    assert inductor_kernels.main(["--cache", str(cache), "--profile", str(anchor), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## anchor_profile.json, post_loop" in text and "def triton_poi_fused_add_7(in_ptr0):" in text


def test_a_name_the_profiler_cut_is_found_by_its_prefix(tmp_path):
    """The profilers keep 160 characters of a kernel's name; the cache has the whole name."""
    long_name = "triton_per_fused_" + "_".join(f"op{i}" for i in range(60))  # > 160 characters
    cache = tmp_path / "cache"
    (cache / "xy").mkdir(parents=True)
    (cache / "xy" / "cgraph.py").write_text(GRAPH_MODULE.replace("triton_poi_fused_add_7", long_name))
    anchor = tmp_path / "anchor_profile.json"
    anchor.write_text(json.dumps({"windows": {"post_loop": {"top_kernels": [
        {"name": long_name[:160], "ms_per_step": 14.9}]}}}))
    text, missing = inductor_kernels.report([anchor], cache, top=8)
    assert missing == 0 and "(1 match(es))" in text and f"def {long_name}(in_ptr0):" in text
