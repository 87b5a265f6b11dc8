"""Fused kernels (pgolf.model.kernels, pgolf.model.triton_kernels) and the speed benchmark (pgolf.train.bench).

Three tiers:
  * always (CPU): the references and CPU fallbacks, the model switch, the FLOPs arithmetic, ``pgolf bench``;
  * with triton installed: the Triton kernels run under Triton's CPU interpreter (subprocess, see
    kernels_interpret_worker.py) against fp64 ground truth, and compile for sm_90 (H100) without a GPU;
  * ``@pytest.mark.gpu``: the compiled kernels on CUDA in bf16 and inside torch.compile with inductor.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgolf.model import attn_kernels, kernels
from pgolf.model import device as bench_device
from pgolf.train import bench
from pgolf.config import ModelConfig, load_run_config
from pgolf.model.gpt import GPT, mlp_activation, softcapped_cross_entropy

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "smoke.yaml"
RECORD = REPO / "config.yaml"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Tiny CPU tensors: one intra-op thread is ~10x faster than two on a shared 2-core machine (no OpenMP spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_cfg(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=300,
        num_layers=3,
        model_dim=32,
        num_heads=2,
        num_kv_heads=1,
        rope_dims=8,
        xsa_last_n=3,
        loop_start=1,
        loop_end=1,
        loop_count=2,
        parallel_residual_start=2,
    )
    base.update(overrides)
    return ModelConfig(**base)


def _batch(vocab: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (tokens,), generator=gen)
    ids[0] = 1
    ids[tokens // 2] = 1
    targets = torch.randint(2, vocab, (tokens,), generator=gen)
    targets[3] = -100
    return ids, targets


# --------------------------------------------------------------------------------------------------------------
# References and CPU fallbacks
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slope", [0.5, 0.0, 0.1])
def test_activation_grad_matches_autograd(slope):
    pre = torch.randn(64, 40, dtype=torch.float64) * 3
    pre[0, :4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30], dtype=torch.float64)
    grad = torch.randn_like(pre)
    p = pre.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(F.leaky_relu(p, slope).square(), p, grad)
    torch.testing.assert_close(kernels.mlp_activation_grad(pre, grad, slope), expected, rtol=1e-12, atol=1e-300)


def test_references_agree_with_the_model_functions():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 16, generator=gen), torch.randn(24, 16, generator=gen)
    torch.testing.assert_close(
        kernels.mlp_up_activation_reference(x, w, 0.5), mlp_activation(x @ w.t(), "leaky_relu_sq", 0.5)
    )
    torch.testing.assert_close(
        kernels.mlp_up_activation_reference(x, w, 0.0), mlp_activation(x @ w.t(), "relu_sq", 0.5)
    )
    z = (torch.randn(12, 50, generator=gen) * 40).bfloat16()
    targets = torch.randint(0, 50, (12,), generator=gen)
    targets[2] = -100
    for cap in (30.0, 0.0):
        mean = kernels.softcapped_cross_entropy_reference(z, targets, cap)
        torch.testing.assert_close(mean, softcapped_cross_entropy(z, targets, cap))
        nll = kernels.softcapped_token_nll_reference(z, targets, cap)
        assert nll.dtype == torch.float32 and float(nll[2]) == 0.0
        torch.testing.assert_close(nll.sum() / (targets != -100).sum(), mean)


def test_cpu_tensors_take_the_reference_path():
    if kernels.interpreter_active():
        pytest.skip("this process runs triton's interpreter: CPU tensors go to the kernels")
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(7, 8, generator=gen), torch.randn(16, 8, generator=gen)
    assert torch.equal(kernels.mlp_up_activation(x, w, 0.5), kernels.mlp_up_activation_reference(x, w, 0.5))
    z, targets = torch.randn(5, 30, generator=gen), torch.randint(0, 30, (5,), generator=gen)
    assert torch.equal(
        kernels.softcapped_token_nll(z, targets, 30.0), kernels.softcapped_token_nll_reference(z, targets, 30.0)
    )
    assert torch.equal(
        kernels.softcapped_cross_entropy(z, targets, 30.0), kernels.softcapped_cross_entropy_reference(z, targets, 30.0)
    )


def test_mlp_reference_is_the_unfused_module_math():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 16, generator=gen)
    w_up, w_down = torch.randn(24, 16, generator=gen), torch.randn(16, 24, generator=gen)
    expected = mlp_activation(x @ w_up.t(), "leaky_relu_sq", 0.5) @ w_down.t()
    torch.testing.assert_close(kernels.mlp_reference(x, w_up, w_down, 0.5), expected)
    if not kernels.interpreter_active():
        assert torch.equal(kernels.mlp(x, w_up, w_down, 0.5), kernels.mlp_reference(x, w_up, w_down, 0.5))


def test_fused_entry_points_check_shapes():
    if not kernels.TRITON_AVAILABLE:
        pytest.skip("triton is not installed")
    with pytest.raises(ValueError, match="do not chain"):
        kernels.fused_mlp_up_activation(torch.randn(4, 8), torch.randn(16, 9), 0.5)
    with pytest.raises(ValueError, match="do not chain"):
        kernels.fused_mlp(torch.randn(4, 8), torch.randn(16, 8), torch.randn(8, 15), 0.5)
    with pytest.raises(ValueError, match=r"z \[T, V\]"):
        kernels.fused_softcapped_token_nll(torch.randn(4, 8), torch.zeros(5, dtype=torch.long), 30.0)


def test_custom_ops_refuse_cpu_tensors_without_the_interpreter():
    if not kernels.TRITON_AVAILABLE or kernels.interpreter_active():
        pytest.skip("needs triton without the interpreter")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        torch.ops.pgolf.mlp_up_act(torch.randn(4, 8), torch.randn(16, 8), 0.5)


# --------------------------------------------------------------------------------------------------------------
# The model switch
# --------------------------------------------------------------------------------------------------------------


def test_use_fused_kernels_default_and_propagation():
    model = GPT(_tiny_cfg())
    assert model.use_fused_kernels is False  # opt-in through train.fused_kernels
    model.use_fused_kernels = True
    assert all(block.mlp.use_fused_kernels for block in model.blocks)
    model.use_fused_kernels = False
    assert not any(block.mlp.use_fused_kernels for block in model.blocks)
    assert "use_fused_kernels" not in model.state_dict() and "_use_fused_kernels" not in model.state_dict()


def test_model_switch_on_cpu_changes_nothing():
    """On CPU tensors the fused switch takes the reference path: loss and gradients are bit-identical."""
    if kernels.interpreter_active():
        pytest.skip("this process runs triton's interpreter")
    torch.manual_seed(0)
    model = GPT(_tiny_cfg(), train_seq_len=16)
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.down.weight.normal_(0.0, 0.05)
    ids, targets = _batch(300, 48, seed=2)
    for dtype in (torch.float32, torch.float64):  # fp64: the tests' ground truth keeps its precision either way
        model = model.to(dtype)
        results = []
        for fused in (False, True):
            model.use_fused_kernels = fused
            model.zero_grad(set_to_none=True)
            loss = model(ids, targets)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        assert results[0][0].dtype == dtype and torch.equal(results[0][0], results[1][0])
        assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_hooks_and_wrappers_on_up_disable_fusion():
    """Hessian hooks and LoRA wrappers must see ``up``'s input: the fused path steps aside for them."""
    model = GPT(_tiny_cfg())
    model.use_fused_kernels = True
    mlp = model.blocks[0].mlp
    assert mlp._fusable()
    seen = []
    handle = mlp.up.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    assert not mlp._fusable()
    model(*_batch(300, 32, seed=3))
    assert seen and seen[0] == (32, 32)
    handle.remove()
    assert mlp._fusable()

    class Wrapped(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x)

    handle = mlp.down.register_forward_pre_hook(lambda module, args: seen.append(("down", args[0].shape)))
    assert not mlp._fusable()  # the whole-MLP op would skip down's call: a hook there disables fusion too
    model(*_batch(300, 32, seed=3))
    assert ("down", (32, 128)) in seen
    handle.remove()
    assert mlp._fusable()

    mlp.up = Wrapped(mlp.up)
    assert not mlp._fusable()
    model(*_batch(300, 32, seed=3))  # still runs, through the wrapper


# --------------------------------------------------------------------------------------------------------------
# Kernels compiled for sm_90 (H100) on this machine, without a GPU
# --------------------------------------------------------------------------------------------------------------


def _compile_sm90(fn, signature: dict, constexprs: dict, aligned: list[str], **options):
    """Compile a @triton.jit kernel for an H100 (sm_90) on this machine; pointer/stride args marked 16-aligned,
    as triton's launcher specializes them at run time (without that hint nothing is pipelined)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    constants = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


H100_MAX_SHARED_BYTES = 227 * 1024


def test_mlp_tma_kernel_compiles_for_h100():
    """The Hopper TMA MLP kernel at its training tiles (TMA_TILES), both directions: wgmma kept asynchronous by
    ptxas, no spills, and shared memory inside the H100's 227 KiB for as many programs as the tile puts on one SM."""
    if not kernels.TRITON_AVAILABLE or kernels.interpreter_active():
        pytest.skip("needs triton without the interpreter")
    pytest.importorskip("triton.backends.nvidia.compiler")
    from pgolf.model import triton_kernels as tk

    for backward in (False, True):
        bm, bn, bk, warps, stages, per_sm = tk.TMA_TILES[backward]
        half = f"tensordesc<bf16[{bm},{bn // 2}]>"
        sig = {"a_desc": f"tensordesc<bf16[{bm},{bk}]>",
               "b_desc": f"tensordesc<bf16[{bk},{bn}]>" if backward else f"tensordesc<bf16[{bn},{bk}]>",
               "pre_desc": half, "out_desc": half, "M": "i32", "N": "i32", "slope": "fp32"}
        constexprs = {"K": 512, "B_KN": backward, "BACKWARD": backward, "PERSISTENT": per_sm > 0,
                      "BITWISE_ROUND": False, "NUM_PROGRAMS": 132 * max(per_sm, 1), "BLOCK_M": bm, "BLOCK_N": bn,
                      "BLOCK_K": bk}
        sig.update({name: "constexpr" for name in constexprs})
        compiled = _compile_sm90(tk._mlp_tma_kernel, sig, constexprs, [], num_warps=warps, num_stages=stages)
        what = "backward" if backward else "forward"
        assert "warp_group_dot" in compiled.asm["ttgir"], f"{what}: no wgmma"
        _assert_ptxas_keeps_wgmma_async(compiled, what)
        resident = max(per_sm, 1)  # programs that must fit on one SM at once
        shared = compiled.metadata.shared
        assert shared * resident <= H100_MAX_SHARED_BYTES, f"{what}: {shared} B shared, {resident} programs an SM"


def _compile_gluon_sm90(fn, blocks: dict, scalars: dict, constexprs: dict, what: str):
    """Compile a warp-specialized Gluon kernel for an H100 (sm_90) on this machine (bf16 tensor descriptors of the
    given ``blocks``) and check it: registers handed to the consumer warpgroups, wgmma kept asynchronous by ptxas,
    no spills, shared memory inside the H100's."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from pgolf.model import gluon_mlp

    def desc(block):
        return f"tensordesc<bf16[{block[0]},{block[1]}],{gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)!r}>"

    constexprs = {**constexprs, "CONSUMER_REGS": gluon_mlp._CONSUMER_REGS, "PRODUCER_REGS": gluon_mlp._PRODUCER_REGS}
    sig = {**{name: desc(block) for name, block in blocks.items()}, **scalars,
           **{name: "constexpr" for name in constexprs}}
    src = GluonASTSource(fn=fn, signature=sig,
                         constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = compiled.asm["ptx"]
    assert f"setmaxnreg.inc.sync.aligned.u32 \t{gluon_mlp._CONSUMER_REGS}" in ptx, f"{what}: not warp-specialized"
    assert "wgmma.mma_async" in ptx, f"{what}: no wgmma"
    _assert_ptxas_keeps_wgmma_async(compiled, what)
    assert compiled.metadata.shared <= H100_MAX_SHARED_BYTES, f"{what}: {compiled.metadata.shared} B shared"


def _needs_gluon_compiler():
    if not kernels.TRITON_AVAILABLE or kernels.interpreter_active():
        pytest.skip("needs triton without the interpreter")
    pytest.importorskip("triton.backends.nvidia.compiler")
    from pgolf.model import gluon_mlp

    if gluon_mlp.gluon is None:
        pytest.skip("this triton has no Gluon")


def test_warp_specialized_mlp_kernel_compiles_for_h100():
    """The Gluon MLP kernel (pgolf.model.gluon_mlp) at its tiles, both directions: warp-specialized (registers
    handed from the producer warp to the two consumer warpgroups), wgmma kept asynchronous, no spills, and its ring,
    store buffers and pre tiles inside the H100's shared memory."""
    _needs_gluon_compiler()
    from pgolf.model import gluon_mlp

    for backward in (False, True):
        bm, bn, bk, stages, epi_bufs = gluon_mlp.WS_TILES[backward]
        blocks = {"a_desc": [bm, bk], "b_desc": [bk, bn] if backward else [bn, bk], "pre_desc": [bm, bn // 2],
                  "out_desc": [bm, bn // 2]}
        constexprs = {"K": 512, "B_KN": backward, "BACKWARD": backward, "NUM_PROGRAMS": 132, "BLOCK_M": bm,
                      "BLOCK_N": bn, "BLOCK_K": bk, "STAGES": stages, "EPI_BUFS": epi_bufs}
        _compile_gluon_sm90(gluon_mlp._mlp_ws_kernel, blocks, {"M": "i32", "N": "i32", "slope": "fp32"}, constexprs,
                            "backward" if backward else "forward")


@pytest.mark.parametrize("rep", [1, 2])
def test_warp_specialized_qkv_kernel_compiles_for_h100(rep):
    """The Gluon q, k, v kernel (pgolf.model.gluon_qkv) at its tile and the record's shapes (8 q and 4 kv heads of
    64 dims, 16 rotated, the gain; k / v copied ``rep`` times): warp-specialized, wgmma asynchronous, no spills."""
    _needs_gluon_compiler()
    from pgolf.model import gluon_qkv

    bm, bk, stages, epi_bufs = gluon_qkv.WS_QKV_TILE
    blocks = {"x_desc": [bm, bk], "w_desc": [128, bk],
              **{name: [bm, 64] for name in ("qk_desc", "q_desc", "k_desc", "v_desc", "vrep_desc")}}
    scalars = {"cos_ptr": "*bf16", "sin_ptr": "*bf16", "gain_ptr": "*bf16", "rstd_q_ptr": "*fp32",
               "rstd_k_ptr": "*fp32", "T": "i32", "eps": "fp32"}
    constexprs = {"K": 512, "H": 8, "HKV": 4, "D": 64, "HALF": 8, "HAS_GAIN": True, "REP": rep, "NUM_PROGRAMS": 132,
                  "BLOCK_M": bm, "BLOCK_K": bk, "STAGES": stages, "EPI_BUFS": epi_bufs}
    _compile_gluon_sm90(gluon_qkv._qkv_ws_kernel, blocks, scalars, constexprs, f"q, k, v, rep {rep}")


def test_warp_specialized_kernel_declines_once_when_gluon_cannot_build_it(monkeypatch):
    """A triton whose Gluon cannot compile the kernel (its API moves between releases): one warning naming the
    version and the error, False for the caller (which then runs the TMA kernel), and no further tries."""
    from pgolf.model import gluon_mlp

    if not kernels.TRITON_AVAILABLE:
        pytest.skip("needs triton")
    import triton

    calls = []

    def fails(*args, **kwargs):
        calls.append(args)
        raise triton.CompilationError("gluon_mlp.py", None, "warp_specialize() got an unexpected keyword")

    monkeypatch.setattr(gluon_mlp, "launch_mlp_ws", fails)
    monkeypatch.setattr(gluon_mlp, "unsupported", None)
    expected = f"MLP kernel does not build with triton {triton.__version__}.*Triton kernel runs"
    with pytest.warns(UserWarning, match=expected):
        assert gluon_mlp.launch_or_decline("x", backward=False) is False
    assert calls and "CompilationError" in gluon_mlp.unsupported
    x = torch.zeros(4, 512)
    assert not gluon_mlp.ws_usable(x, torch.zeros(4, 2048), backward=False)  # never tried again


def _assert_ptxas_keeps_wgmma_async(compiled, what: str) -> None:
    """ptxas (the one triton ships) on the kernel's PTX: no spills, and no C7514, its warning that it serializes
    the wgmma instructions (it does when other instructions read a product's registers while it may run)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        info = subprocess.run([get_ptxas(90).path, "-v", "-arch=sm_90a", str(ptx), "-o", str(ptx) + ".cubin"],
                              capture_output=True, text=True, check=True).stderr
    assert "C7514" not in info, f"{what}: ptxas serializes the wgmma instructions"
    assert " 0 bytes spill stores" in info, f"{what}: spills ({info})"


def test_gate_linear_kernels_compile_for_h100():
    """The output gate's projection kernels (train.fused_gate_linear) at the record's shapes (8 heads, a 12-channel
    window, 64 tokens a program) compile for sm_90."""
    if not kernels.TRITON_AVAILABLE or kernels.interpreter_active():
        pytest.skip("needs triton without the interpreter")
    pytest.importorskip("triton.backends.nvidia.compiler")
    from pgolf.model import attn_triton

    constexprs = {"N": 8, "K": 12, "NP": 8, "KP": 16, "BLOCK_T": 64}
    for fn, pointers in ((attn_triton._gate_linear_fwd_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "z_ptr": "*bf16"}),
                         (attn_triton._gate_linear_bwd_kernel, {"g_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*bf16",
                                                                "dx_ptr": "*bf16", "dw_partial_ptr": "*fp32"})):
        sig = {**pointers, "T": "i32", "XS": "i32", **{name: "constexpr" for name in constexprs}}
        compiled = _compile_sm90(fn, sig, constexprs, [], num_warps=4)
        assert compiled.metadata.shared <= H100_MAX_SHARED_BYTES


def test_kernels_compile_for_h100():
    """Every autotune config of the matmul compiles for sm_90 with wgmma, a pipelined K loop and shared memory
    inside the H100's 227 KiB; both CE kernels compile with and without the cap."""
    if not kernels.TRITON_AVAILABLE or kernels.interpreter_active():
        pytest.skip("needs triton without the interpreter")
    pytest.importorskip("triton.backends.nvidia.compiler")
    from pgolf.model import triton_kernels as tk

    mlp_sig = {
        "x_ptr": "*bf16",
        "w_ptr": "*bf16",
        "pre_ptr": "*bf16",
        "post_ptr": "*bf16",
        "M": "i32",
        "N": "i32",
        "K": "constexpr",
        "stride_xm": "i32",
        "stride_xk": "constexpr",
        "stride_wn": "i32",
        "stride_wk": "constexpr",
        "stride_om": "i32",
        "stride_on": "constexpr",
        "slope": "fp32",
        "IEEE_FP32": "constexpr",
        "BACKWARD": "constexpr",
        "UPCAST": "constexpr",
        "BLOCK_M": "constexpr",
        "BLOCK_N": "constexpr",
        "BLOCK_K": "constexpr",
        "GROUP_M": "constexpr",
    }
    for config, backward in [(c, b) for c in tk._mlp_configs() for b in (False, True)]:
        # forward: w_up [N, K] row-major (k contiguous); backward: w_down^T through swapped strides (n contiguous)
        w_unit, w_other = ("stride_wn", "stride_wk") if backward else ("stride_wk", "stride_wn")
        sig = {**mlp_sig, w_unit: "constexpr", w_other: "i32"}
        aligned = ["x_ptr", "w_ptr", "pre_ptr", "post_ptr", "M", "N", "stride_xm", w_other, "stride_om"]
        constexprs = {
            "K": 512,
            "stride_xk": 1,
            w_unit: 1,
            "stride_on": 1,
            "IEEE_FP32": False,
            "BACKWARD": backward,
            "UPCAST": False,
            **config.kwargs,
        }
        compiled = _compile_sm90(
            tk._mlp_up_act_kernel,
            sig,
            constexprs,
            aligned,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        what = f"{config} {'backward' if backward else 'forward'}"
        ttgir = compiled.asm["ttgir"]
        assert "warp_group_dot" in ttgir, f"{what}: no wgmma"
        assert "async_copy_global_to_local" in ttgir, f"{what}: K loop not software-pipelined"
        shared = compiled.metadata.shared
        assert shared <= H100_MAX_SHARED_BYTES, f"{what}: {shared} bytes of shared memory"

    fwd_sig = {
        "z_ptr": "*bf16",
        "target_ptr": "*i64",
        "nll_ptr": "*fp32",
        "lse_ptr": "*fp32",
        "V": "constexpr",
        "stride_zt": "i32",
        "cap": "fp32",
        "HAS_CAP": "constexpr",
        "BLOCK_V": "constexpr",
    }
    bwd_sig = {
        "grad_nll_ptr": "*fp32",
        "z_ptr": "*bf16",
        "target_ptr": "*i64",
        "lse_ptr": "*fp32",
        "dz_ptr": "*bf16",
        "V": "constexpr",
        "stride_zt": "i32",
        "stride_dzt": "i32",
        "cap": "fp32",
        "HAS_CAP": "constexpr",
        "BLOCK_V": "constexpr",
    }
    block_v, warps = tk._ce_launch_params(8192, torch.device("cuda"))
    per_thread = block_v // (32 * warps)  # logits a thread holds per block
    for fn, sig in ((tk._softcap_ce_fwd_kernel, fwd_sig), (tk._softcap_ce_bwd_kernel, bwd_sig)):
        aligned = [n for n, t in sig.items() if t.startswith("*") or n.startswith("stride")]
        for has_cap in (True, False):
            compiled = _compile_sm90(
                fn, sig, {"V": 8192, "HAS_CAP": has_cap, "BLOCK_V": block_v}, aligned, num_warps=warps
            )
            ptx = compiled.asm["ptx"]
            assert "ld.global" in ptx and compiled.metadata.shared <= H100_MAX_SHARED_BYTES
            # special-function instructions set these kernels' time: one division a logit (the sigmoid's), not two
            assert ptx.count("div.full.f32") <= per_thread + 2, f"{fn.__name__}: {ptx.count('div.full.f32')} divisions"


# --------------------------------------------------------------------------------------------------------------
# FLOPs arithmetic and synthetic data of the benchmark
# --------------------------------------------------------------------------------------------------------------


def test_flops_follow_gpu_md_for_the_record():
    cfg = load_run_config(RECORD).model
    assert bench.block_matrix_params(cfg) == 2_883_584  # gpu.md: q 512x512, k/v 512x256, o 512x512, MLP 2 x 512x2048
    head = 2 * 512 * 8192
    for applications in (11, 17):
        context = 700.0
        attention = applications * 4 * 8 * 64 * context
        expected = 2 * applications * 2_883_584 + head + attention
        assert bench.forward_flops_per_token(cfg, applications, context) == pytest.approx(expected, rel=1e-12)
    # the application counts gpu.md names are the model's own
    from pgolf.model.gpt import build_meta

    model = build_meta(cfg)
    assert (len(model.virtual_layers(False)), len(model.virtual_layers(True))) == (11, 17)


def test_mean_causal_context_and_mfu():
    # segments of 3 and 2 tokens (plus a zero-length pad): (1+2+3 + 1+2) / 5
    assert bench.mean_causal_context([0, 3, 5, 5]) == pytest.approx(9 / 5)
    assert bench.mean_causal_context([0]) == 0.0
    assert bench.mfu(1e9, 1e5, 1000.0) == pytest.approx(1e14 / 1e15)
    assert bench.mfu(1e9, 1e5, None) is None


@pytest.mark.parametrize(
    "name, peak",
    [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0), ("cpu (x86_64)", None)],
)
def test_peak_table(name, peak):
    assert bench_device.peak_tflops_for(name) == peak


def test_synthetic_stream_has_realistic_documents():
    stream = bench.synthetic_stream(50_000, 8192, seed=3)
    bos = (stream == bench.BOS_ID).nonzero()[0]
    gaps = bos[1:] - bos[:-1]
    assert bos[0] == 0 and len(bos) >= 50_000 // bench.MAX_DOC_TOKENS
    assert gaps.min() >= bench.MIN_DOC_TOKENS and gaps.max() <= bench.MAX_DOC_TOKENS
    assert stream.min() >= 1 and stream.max() < 8192
    assert (bench.synthetic_stream(50_000, 8192, seed=3) == stream).all()
    assert not (bench.synthetic_stream(50_000, 8192, seed=4) == stream).all()


def test_packed_rows_are_bucketed_like_training():
    rows = bench.packed_rows(4096, 1024, 256, seed=0, rows=2)
    for inputs, targets, cu in zip(rows.inputs, rows.targets, rows.cu_seqlens):
        assert inputs.shape == targets.shape == (4096,)
        assert torch.equal(inputs[1:], targets[:-1])  # targets are the next tokens
        assert cu.numel() & (cu.numel() - 1) == 0 and cu[-1] == 4096  # a power-of-two bucket ending at T
        assert int((cu[1:] - cu[:-1]).max()) <= 256
    assert 0 < rows.mean_context <= (256 + 1) / 2


# --------------------------------------------------------------------------------------------------------------
# pgolf bench (CPU, smoke recipe)
# --------------------------------------------------------------------------------------------------------------

TRAIN_FIELDS = {
    "bench",
    "run",
    "device",
    "device_type",
    "torch",
    "triton",
    "cuda",
    "fused_kernels",
    "fused_kernels_active",
    "attention_kernels",
    "attention_kernels_active",
    "fold_output_scales",
    "attention_backend",
    "param_storage",
    "compile",
    "compile_options",
    "compile_backend",
    "cuda_graphs",
    "fused_grad_accumulation",
    "params",
    "micro_batch_tokens",
    "grad_accum_steps",
    "tokens_per_step",
    "train_seq_len",
    "cu_seqlens_shapes",
    "data_dir",
    "distinct_rows",
    "peak_tflops",
    "seed",
    "phases",
}
PHASE_FIELDS = {
    "profile",
    "looping",
    "block_applications",
    "warmup_steps",
    "warmup_seconds",
    "first_step_seconds",
    "steps",
    "ms_per_step",
    "tokens_per_s",
    "forward_flops_per_token",
    "train_flops_per_token",
    "mean_attention_context",
    "achieved_tflops",
    "mfu",
    "peak_memory_allocated_gib",
    "peak_memory_reserved_gib",
    "graphs_compiled_in_warmup",
    "graph_breaks_in_warmup",
    "recompiles_in_timed_steps",
    "loss",
    "loss_finite",
    "graph_pool_gib",
}


def _run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    from pgolf.cli import main

    try:
        rc = main(argv)
    except SystemExit as stop:  # argparse refuses out-of-range values itself (exit 2, message on stderr)
        rc = stop.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_bench_train_cli_on_cpu(capsys, tmp_path):
    out = tmp_path / "bench.json"
    rc, stdout, stderr = _run_cli(
        capsys,
        # 2 timed steps per phase as the recipe runs them, on 512-token rows (this CPU is slow)
        [
            "bench",
            "train",
            "--config",
            str(SMOKE),
            "--steps",
            "2",
            "--warmup",
            "1",
            "--grad-accum",
            "1",
            "--micro-batch-tokens",
            "512",
            "--device",
            "cpu",
            "--fold-scales",
            "off",
            "--repeat-kv",
            "off",
            "--cuda-graphs",
            "on",
            "--out",
            str(out),
        ],
    )
    assert rc == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert set(result) == TRAIN_FIELDS
    assert result["fold_output_scales"] is False  # the flag overrides the recipe's train.fold_output_scales (true)
    assert result["cuda_graphs"] is None  # asked for, but CPU: micro-batches run eagerly
    assert result["fused_grad_accumulation"] is True  # the recipe's train.fused_grad_accumulation
    # attached (on CUDA they run); --repeat-kv overrides the recipe's train.repeat_kv_heads (true)
    assert result["attention_kernels"] == {"qk_norm_rope": True, "xsa_gate": True, "gate_linear": True,
                                           "qkv_matmul": True, "qkv_epilogue": False,
                                           "repeat_kv": False}  # (no Hopper GPU: CPU)
    assert json.loads(out.read_text()) == result
    cfg = load_run_config(SMOKE)
    assert result["device_type"] == "cpu" and result["fused_kernels_active"] is False
    assert result["attention_backend"]["resolved"] == "sdpa" and result["attention_backend"]["requested"] == "auto"
    assert result["compile"] is False  # the smoke recipe does not compile
    assert result["compile_options"] is None
    assert result["tokens_per_step"] == result["micro_batch_tokens"] == 512 and result["grad_accum_steps"] == 1
    assert [p["looping"] for p in result["phases"]] == [False, True]
    applications = [len(GPT(cfg.model).virtual_layers(looping)) for looping in (False, True)]
    assert [p["block_applications"] for p in result["phases"]] == applications
    for phase in result["phases"]:
        assert set(phase) == PHASE_FIELDS
        assert phase["steps"] == 2 and phase["ms_per_step"] > 0 and phase["loss_finite"]
        assert phase["tokens_per_s"] == pytest.approx(2 * result["tokens_per_step"] / (2 * phase["ms_per_step"] / 1000))
        assert phase["train_flops_per_token"] == pytest.approx(3 * phase["forward_flops_per_token"])
        assert phase["mfu"] is None and phase["peak_memory_allocated_gib"] is None  # CPU: no peak, no CUDA memory
        assert phase["graph_pool_gib"] is None  # CPU: no CUDA graphs, whatever the recipe says
        assert phase["recompiles_in_timed_steps"] == 0
        assert phase["profile"] is None  # only with --profile-steps
    # looping adds block applications, hence FLOPs per token
    assert result["phases"][1]["forward_flops_per_token"] > result["phases"][0]["forward_flops_per_token"]
    assert "bench train smoke" in stderr and "loop off" in stderr and "loop on" in stderr


def test_bench_train_stores_parameters_and_pads_like_the_training_stage():
    """The record's bf16 embedding (hence bf16 stream under autocast) and its cu_seqlens padding reach the bench."""
    import dataclasses

    cfg = load_run_config(SMOKE)
    train = dataclasses.replace(cfg.train, param_storage="record", cu_seqlens_pad="multiple_of_64")
    evaluate = dataclasses.replace(cfg.evaluate, param_storage="record")  # a recipe keeps the two equal
    result = bench.bench_train(dataclasses.replace(cfg, train=train, evaluate=evaluate), steps=1, warmup=0,
                               grad_accum=1, micro_batch_tokens=512, looping="off", device_kind="cpu")
    assert result["param_storage"] == "record" and result["phases"][0]["loss_finite"]
    assert all(n % 64 == 0 for n in result["cu_seqlens_shapes"])


def test_kernel_categories_of_profile_names():
    assert bench_device.kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert bench_device.kernel_category("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert bench_device.kernel_category("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>") == "attention"
    assert bench_device.kernel_category("_mlp_up_act_kernel") == "fused_triton_kernels"
    assert bench_device.kernel_category("_mlp_tma_kernel") == "fused_triton_kernels"
    assert bench_device.kernel_category("_mlp_ws_kernel") == "fused_triton_kernels"
    assert bench_device.kernel_category("_softcap_ce_bwd_kernel") == "fused_triton_kernels"
    assert bench_device.kernel_category("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "inductor_triton"
    assert bench_device.kernel_category("ncclDevKernel_AllReduce_Sum_f32_RING_LL") == "communication"
    assert bench_device.kernel_category("Memcpy DtoD (Device -> Device)") == "memory_copy"
    assert bench_device.kernel_category("void at::native::vectorized_elementwise_kernel<4>") == "other"


def test_bench_train_rows_from_shards(tmp_path, capsys):
    """--data: the micro-batch rows are the start of the folder's training shards (across a shard boundary), one
    distinct row per micro-batch; the attention context is theirs. Missing shards, too few tokens, a stream that
    does not open a document and ids beyond the vocabulary are refused, naming the folder or file."""
    from pgolf.data.shards import shard_name, write_shard

    rng = np.random.default_rng(0)
    stream = rng.integers(2, 1024, size=3000, dtype=np.int64)
    stream[[0, 100, 164, 900, 1500, 1530, 2100]] = bench.BOS_ID  # short documents: a context unlike the synthetic
    write_shard(tmp_path / shard_name("train", 0), stream[:1200], kind="train")
    write_shard(tmp_path / shard_name("train", 1), stream[1200:], kind="train")
    rc, stdout, stderr = _run_cli(capsys, ["bench", "train", "--config", str(SMOKE), "--steps", "1", "--warmup", "0",
                                           "--grad-accum", "2", "--micro-batch-tokens", "512", "--looping", "off",
                                           "--device", "cpu", "--data", str(tmp_path)])
    assert rc == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["data_dir"] == str(tmp_path) and result["distinct_rows"] == 2
    max_seqlen = load_run_config(SMOKE).train.train_seq_len
    rows = bench.packed_rows(512, 1024, max_seqlen, 0, rows=2, stream=bench.shard_stream(tmp_path, 1025, 1024))
    assert torch.equal(rows.inputs[1], torch.from_numpy(stream[512:1024]))  # the stream as stored, shard after shard
    assert result["phases"][0]["mean_attention_context"] == pytest.approx(rows.mean_context)
    assert rows.mean_context < bench.packed_rows(512, 1024, max_seqlen, 0, rows=2).mean_context  # not synthetic
    synthetic = bench.bench_train(load_run_config(SMOKE), steps=1, warmup=0, grad_accum=2, micro_batch_tokens=512,
                                  looping="off", device_kind="cpu")
    assert synthetic["data_dir"] is None and synthetic["distinct_rows"] == bench.DISTINCT_ROWS

    with pytest.raises(ValueError, match=r"the training shards hold 3,000 tokens; the bench needs 4,097"):
        bench.shard_stream(tmp_path, 4097, 1024)
    with pytest.raises(ValueError, match=r"token id \d+ >= model.vocab_size 512"):
        bench.shard_stream(tmp_path, 2000, 512)
    with pytest.raises(FileNotFoundError, match="none: no such folder"):
        bench.shard_stream(tmp_path / "none", 10, 1024)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no fineweb_train_\*.bin shards"):
        bench.shard_stream(tmp_path / "empty", 10, 1024)
    write_shard(tmp_path / "late" / shard_name("train", 0), stream[1:], kind="train")
    with pytest.raises(ValueError, match="expected a document start"):
        bench.shard_stream(tmp_path / "late", 10, 1024)


def test_bench_train_fusion_cap_override():
    """--max-fusion-io-buffers overrides the recipe's cap; a compile backend other than inductor takes no options
    (the result says none were used), and a cap of 1 is refused."""
    result = bench.bench_train(load_run_config(SMOKE), steps=1, warmup=0, grad_accum=1, micro_batch_tokens=512,
                               looping="off", device_kind="cpu", compile=True, compile_backend="aot_eager",
                               max_fusion_io_buffers=16)
    assert result["compile"] is True and result["compile_options"] is None
    with pytest.raises(ValueError, match="--max-fusion-io-buffers expects 0 .no cap. or >= 2, got 1"):
        bench.bench_train(load_run_config(SMOKE), steps=1, device_kind="cpu", max_fusion_io_buffers=1)


def test_bench_train_mix_order_override_reaches_torch_compile(monkeypatch):
    """--mix-order-reduction off overrides the recipe's train.compile_mix_order_reduction: inductor is asked for
    it (with the cap when both are set) and the result records the options it compiled with, pgolf's graph pass
    (train.compile_add_into_matmul false, the smoke recipe's default) by its name."""
    from pgolf.model.device import recorded_options

    calls = []

    def spy(model, **kwargs):
        calls.append(kwargs)
        return model  # eager: the spy only records how the bench compiles

    monkeypatch.setattr(torch, "compile", spy)
    split = {"post_grad_custom_post_pass": "pgolf.SplitResidualAddmm"}
    for cap, expected in ((0, {"triton.mix_order_reduction": False, **split}),
                          (12, {"max_fusion_unique_io_buffers": 12, "triton.mix_order_reduction": False, **split})):
        result = bench.bench_train(load_run_config(SMOKE), steps=1, warmup=0, grad_accum=1, micro_batch_tokens=512,
                                   looping="off", device_kind="cpu", compile=True, compile_backend="inductor",
                                   max_fusion_io_buffers=cap, mix_order_reduction=False)
        assert result["compile_options"] == expected and recorded_options(calls[-1].pop("options")) == expected
        assert calls[-1] == {"fullgraph": True, "dynamic": False, "backend": "inductor"}
    result = bench.bench_train(load_run_config(SMOKE), steps=1, warmup=0, grad_accum=1, micro_batch_tokens=512,
                               looping="off", device_kind="cpu", compile=True, compile_backend="inductor")
    off = {"triton.mix_order_reduction": False, **split}  # the recipe's values (pgolf's defaults)
    assert result["compile_options"] == off and recorded_options(calls[-1]["options"]) == off
    result = bench.bench_train(load_run_config(SMOKE), steps=1, warmup=0, grad_accum=1, micro_batch_tokens=512,
                               looping="off", device_kind="cpu", compile=True, compile_backend="inductor",
                               mix_order_reduction=True)
    assert result["compile_options"] == split and recorded_options(calls[-1]["options"]) == split


def test_bench_train_profile_on_cpu():
    """The profile pass runs the real step under torch.profiler (CPU: no kernels, so no GPU time to split)."""
    result = bench.bench_train(
        load_run_config(SMOKE), steps=1, warmup=0, grad_accum=1, micro_batch_tokens=512, looping="off",
        device_kind="cpu", profile_steps=1,
    )
    profile = result["phases"][0]["profile"]
    assert profile["profiled_steps"] == 1 and profile["wall_ms_per_step"] > 0
    assert profile["gpu_busy_ms_per_step"] == 0 and profile["gpu_idle_fraction"] is None
    assert profile["ms_per_step_by_category"] == {} and profile["top_kernels"] == []
    with pytest.raises(ValueError, match="--profile-steps"):
        bench.bench_train(load_run_config(SMOKE), steps=1, profile_steps=-1, device_kind="cpu")


def test_kernel_times_leave_out_gpu_annotations():
    """An annotation on the GPU timeline (Optimizer.step#Muon.step) spans kernels counted on their own."""
    from types import SimpleNamespace as Event

    gpu, cpu = "cuda", "cpu"
    events = [Event(name="nvjet_gemm", device_type=gpu, device_time=3000.0, is_user_annotation=False),
              Event(name="nvjet_gemm", device_type=gpu, device_time=1000.0, is_user_annotation=False),
              Event(name="Optimizer.step#Muon.step", device_type=gpu, device_time=4700.0, is_user_annotation=True),
              Event(name="ProfilerStep#1", device_type=gpu, device_time=9000.0, is_user_annotation=False,
                    activity_type="gpu_user_annotation"),
              Event(name="aten::mm", device_type=cpu, device_time=0.0, is_user_annotation=False)]
    assert bench_device.kernel_times(events, gpu) == {"nvjet_gemm": 4.0}


def test_bench_eval_cli_on_cpu(capsys):
    rc, stdout, stderr = _run_cli(
        capsys,
        [
            "bench",
            "eval",
            "--config",
            str(SMOKE),
            "--steps",
            "1",
            "--warmup",
            "0",
            "--batch-tokens",
            "512",
            "--device",
            "cpu",
            "--no-compile",
            "--attention-backend",
            "torch",
        ],
    )
    assert rc == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["bench"] == "eval" and result["looping"] is True and result["row_tokens"] == 512
    assert result["attention_backend"]["requested"] == "torch" and result["attention_backend"]["resolved"] == "sdpa"
    for part in ("score", "ttt_step"):
        assert result[part]["tokens_per_s"] > 0 and result[part]["ms_per_row"] > 0
    expected = result["val_tokens"] / result["score"]["tokens_per_s"]
    assert result["projected_scoring_seconds"] == pytest.approx(expected)
    assert result["projected_ttt_seconds"] > result["projected_scoring_seconds"]
    assert "bench eval smoke" in stderr


def test_bench_rejects_bad_arguments(capsys):
    rc, _, stderr = _run_cli(capsys, ["bench", "train", "--config", str(SMOKE), "--steps", "0", "--device", "cpu"])
    assert rc == 2 and "steps" in stderr
    rc, _, stderr = _run_cli(capsys, ["bench", "train", "--config", str(REPO / "no_such.yaml"), "--steps", "1"])
    assert rc == 2 and "no_such.yaml" in stderr
    proc = subprocess.run([sys.executable, "-m", "pgolf.bench", "eval", "--config", str(REPO / "no_such.yaml")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "no_such.yaml" in proc.stderr  # python -m pgolf.bench (side_by_side.sh)
    rc, _, stderr = _run_cli(
        capsys,
        ["bench", "train", "--config", str(SMOKE), "--steps", "1", "--micro-batch-tokens", "100", "--device", "cpu"],
    )
    assert rc == 2 and "train_seq_len" in stderr


# --------------------------------------------------------------------------------------------------------------
# Kernels under Triton's CPU interpreter (a subprocess started with the module, so it overlaps the tests above)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def interpreter_worker(request):
    """Start kernels_interpret_worker.py (TRITON_INTERPRET=1 must precede the triton import: own process)."""
    wanted = any("interpreter" in item.name for item in request.session.items)
    if not kernels.TRITON_AVAILABLE or not wanted:
        yield None
        return
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("kernels_interpret_worker.py"))],
        cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def interpreted_results(interpreter_worker) -> dict[str, str]:
    if interpreter_worker is None:
        pytest.skip("triton is not installed")  # (the worker also stays off when no interpreter test is selected)
    stdout, stderr = interpreter_worker.communicate(timeout=600)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert (
        interpreter_worker.returncode == 0 and lines
    ), f"interpreter worker failed (rc {interpreter_worker.returncode}):\n{stdout}\n{stderr}"
    return json.loads(lines[-1])


INTERPRET_CASES = [
    "mlp_fp32_leaky",
    "mlp_fp32_relu",
    "mlp_bf16",
    "mlp_3d_input",
    "mlp_fused_fp32_leaky",
    "mlp_fused_fp32_relu",
    "mlp_fused_bf16",
    "mlp_act_grad_kernel",
    "mlp_tma_tiles",
    "mlp_fused_every_output",
    "mlp_fused_opcheck",
    "ce_fp32_capped",
    "ce_fp32_uncapped",
    "ce_bf16",
    "ce_online_max_across_blocks",
    "ce_all_ignored",
    "ce_invalid_target_is_nan",
    "qk_norm_rope_fp32",
    "qk_norm_rope_bf16",
    "qk_norm_rope_opcheck",
    "qkv_norm_rope_fp32",
    "qkv_norm_rope_repeat_fp32",
    "qkv_norm_rope_bf16",
    "qkv_norm_rope_opcheck",
    "qkv_gemm_tiles",
    "qkv_linear_op_fp32",
    "xsa_gate_fp32",
    "xsa_gate_bf16",
    "xsa_gate_tiny_value_vectors",
    "xsa_gate_opcheck",
    "gate_linear",
    "attention_kernels_edges",
    "model_fused_matches_reference",
    "model_attention_kernels_compile",
    "compile_fullgraph",
]


def test_interpreter_worker_runs_every_case(interpreted_results):
    assert sorted(interpreted_results) == sorted(INTERPRET_CASES)


@pytest.mark.parametrize("case", INTERPRET_CASES)
def test_kernel_under_interpreter(interpreted_results, case):
    assert interpreted_results.get(case) == "ok", interpreted_results.get(case, "case did not run")


# --------------------------------------------------------------------------------------------------------------
# GPU: the compiled kernels in bf16, inside torch.compile with inductor
# --------------------------------------------------------------------------------------------------------------


def _no_worse(actual, lowp_reference, truth, what: str, slack: float = 1.5) -> None:
    """The kernel's max error vs the fp64 truth is at most ``slack`` x the pure-PyTorch path's (same dtype)."""
    err = (actual.double() - truth).abs().max().item()
    ref_err = (lowp_reference.double() - truth).abs().max().item()
    scale = truth.abs().max().item()
    assert (
        err <= slack * ref_err + 1e-6 * scale
    ), f"{what}: max error {err:.3g} vs torch's {ref_err:.3g} (scale {scale:.3g})"


@pytest.mark.gpu
@needs_cuda
def test_gpu_fused_mlp_bf16_autocast():
    gen = torch.Generator(device="cuda").manual_seed(0)
    M, K, N = 4099, 512, 2048  # M not a multiple of any tile
    x = (torch.randn(M, K, device="cuda", generator=gen)).bfloat16().requires_grad_(True)
    w = (torch.randn(N, K, device="cuda", generator=gen) / math.sqrt(K)).requires_grad_(True)  # fp32 master weight
    grad = torch.randn(M, N, device="cuda", generator=gen).bfloat16()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = kernels.mlp_up_activation(x, w, 0.5)
        y_ref = kernels.mlp_up_activation_reference(x, w, 0.5)
    assert y.dtype == torch.bfloat16
    gx, gw = torch.autograd.grad(y, (x, w), grad)
    rx, rw = torch.autograd.grad(y_ref, (x, w), grad)
    assert gw.dtype == torch.float32 and gx.dtype == torch.bfloat16
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().bfloat16().double().requires_grad_(True)
    y64 = kernels.mlp_up_activation_reference(x64, w64, 0.5)
    tx, tw = torch.autograd.grad(y64, (x64, w64), grad.double())
    _no_worse(y, y_ref, y64.detach(), "forward")
    _no_worse(gx, rx, tx, "dx", slack=2.0)
    _no_worse(gw, rw, tw, "dw", slack=2.0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tile", ["default", (128, 256, 64, 8, 3, 1)])
def test_gpu_tma_kernel_agrees_with_the_pointer_kernel(tile):
    """Hopper runs the TMA kernel (the training tiles, and a persistent tile that fits both directions); it
    computes the pointer kernel's tiles (product rounded to bf16, then the activation or its gradient): equal but
    for the fp32 summation order, i.e. rare one-ulp differences. M = 4,099 leaves a partial row block."""
    from pgolf.model import triton_kernels as tk

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA kernel needs Hopper (sm90) or newer")
    tile = None if tile == "default" else tile  # None: each direction's training tile
    gen = torch.Generator(device="cuda").manual_seed(4)
    M, K, N = 4099, 512, 2048
    x, g = (torch.randn(M, K, device="cuda", generator=gen).bfloat16() for _ in range(2))
    w_up = (torch.randn(N, K, device="cuda", generator=gen) / math.sqrt(K)).bfloat16()
    w_down = (torch.randn(K, N, device="cuda", generator=gen) / math.sqrt(N)).bfloat16()
    names = ("pre", "post", "pre_p", "post_p", "d", "d_p")
    # every output starts as NaN: an element a kernel does not write fails the comparison
    out = {name: torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16) for name in names}
    assert tk._tma_usable(x, w_up, out["pre"]) and tk._tma_usable(g, w_down, out["d"])
    tk._launch_mlp_tma(x, w_up, False, out["pre"], out["post"], 0.5, backward=False, tile=tile)
    tk._launch_mlp(x, w_up, (w_up.stride(0), w_up.stride(1)), out["pre_p"], out["post_p"], 0.5, backward=False)
    tk._launch_mlp_tma(g, w_down, True, out["pre"], out["d"], 0.5, backward=True, tile=tile)
    tk._launch_mlp(g, w_down, (w_down.stride(1), w_down.stride(0)), out["pre"], out["d_p"], 0.5, backward=True)
    for a, b in (("pre", "pre_p"), ("post", "post_p"), ("d", "d_p")):
        ta, tb = out[a].float(), out[b].float()
        rel = ((ta - tb).abs() / tb.abs().clamp_min(1e-30)).max().item()
        unequal = (ta != tb).float().mean().item()
        assert rel <= 2.0**-7 and unequal < 0.01, (a, rel, unequal)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tile", ["default", (128, 128, 64, 3, 2)])
def test_gpu_warp_specialized_kernel_writes_the_tma_kernels_bits(tile):
    """The Gluon kernel (two consumer warpgroups taking turns) sums the same products in the same order as the TMA
    kernel and rounds the same way: its outputs are the TMA kernel's bit for bit, both directions, with a partial
    row block (M = 4,099), every tile of an odd-sized grid, and every output written (they start as NaN)."""
    from pgolf.model import gluon_mlp
    from pgolf.model import triton_kernels as tk

    gen = torch.Generator(device="cuda").manual_seed(5)
    M, K, N = 4099, 512, 2048
    x, g = (torch.randn(M, K, device="cuda", generator=gen).bfloat16() for _ in range(2))
    w_up = (torch.randn(N, K, device="cuda", generator=gen) / math.sqrt(K)).bfloat16()
    w_down = (torch.randn(K, N, device="cuda", generator=gen) / math.sqrt(N)).bfloat16()
    out = {name: torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
           for name in ("pre", "post", "pre_t", "post_t", "d", "d_t")}
    if not gluon_mlp.ws_usable(x, out["pre"], backward=False):
        pytest.skip("the warp-specialized kernel needs Gluon and an sm_90 GPU")
    tile = None if tile == "default" else tile
    gluon_mlp.launch_mlp_ws(x, w_up, False, out["pre"], out["post"], 0.5, backward=False, tile=tile)
    tk._launch_mlp_tma(x, w_up, False, out["pre_t"], out["post_t"], 0.5, backward=False)
    gluon_mlp.launch_mlp_ws(g, w_down, True, out["pre_t"], out["d"], 0.5, backward=True, tile=tile)
    tk._launch_mlp_tma(g, w_down, True, out["pre_t"], out["d_t"], 0.5, backward=True)
    for a, b in (("pre", "pre_t"), ("post", "post_t"), ("d", "d_t")):
        ta, tb = out[a].float(), out[b].float()
        unequal = (ta != tb).float().mean().item()  # NaN != anything: an unwritten element counts
        assert unequal == 0, (a, unequal, (ta - tb).abs().nan_to_num(float("inf")).max().item())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rep", [1, 2])
def test_gpu_warp_specialized_qkv_kernel_matches_the_triton_kernel(rep):
    """The Gluon q, k, v kernel against the Triton TMA kernel (QKV_GEMM_TILE) at the record's head shapes with the
    gain, T = 4,099 (a partial row block), outputs NaN-filled first: the products (qk, v and its copies) are the
    same bits; the normed, rotated q, k and the rstd rows the same function (a one-ulp difference in rare elements
    at most, from the row sums' order)."""
    from pgolf.model import attn_triton, gluon_qkv
    from pgolf.model.rope import rope_buffers

    gen = torch.Generator(device="cuda").manual_seed(6)
    T, K, H, Hkv, D, half = 4099, 512, 8, 4, 64, 8
    scale = 0.5 + torch.rand(T, 1, device="cuda", generator=gen)
    x = (torch.randn(T, K, device="cuda", generator=gen) * scale).bfloat16()
    w = (torch.randn((H + 2 * Hkv) * D, K, device="cuda", generator=gen) / K**0.5).bfloat16()
    _, cos, sin = (t.cuda().bfloat16() for t in rope_buffers(2 * half, 10000.0, T))
    gain = (torch.rand(H, device="cuda", generator=gen) + 0.5).bfloat16()
    if not gluon_qkv.ws_usable(x, H, Hkv, D):
        pytest.skip("the warp-specialized kernel needs Gluon and an sm_90 GPU")

    def outputs():  # (qk, q, k, v, v_copies, rstd_q, rstd_k), NaN
        nan = float("nan")
        return (torch.full((T, (H + Hkv) * D), nan, device="cuda", dtype=torch.bfloat16),
                torch.full((T, H, D), nan, device="cuda", dtype=torch.bfloat16),
                torch.full((T, Hkv * rep, D), nan, device="cuda", dtype=torch.bfloat16),
                torch.full((T, Hkv, D), nan, device="cuda", dtype=torch.bfloat16),
                torch.full((T, Hkv * rep, D), nan, device="cuda", dtype=torch.bfloat16) if rep > 1 else None,
                torch.full((T * H,), nan, device="cuda"), torch.full((T * Hkv,), nan, device="cuda"))

    ws, ref = outputs(), outputs()
    gluon_qkv.launch_qkv_ws(x, w, cos, sin, gain, 1e-6, *ws, rep)
    attn_triton.launch_qkv_gemm_norm_rope(x, w, cos, sin, gain, 1e-6, *ref, tile=attn_triton.QKV_GEMM_TILE)
    for name, a, b in zip(("qk", "q", "k", "v", "v_copies", "rstd_q", "rstd_k"), ws, ref):
        if a is None:
            continue
        a, b = a.float(), b.float()
        unequal = (a != b).float().mean().item()  # NaN != anything: an unwritten element counts
        if name in ("qk", "v", "v_copies"):
            assert unequal == 0, (name, unequal)
        else:
            rel = ((a - b).abs() / b.abs().clamp_min(1e-30)).nan_to_num(float("inf")).max().item()
            assert rel <= 2.0**-7 and unequal < 0.01, (name, rel, unequal)


@pytest.mark.gpu
@needs_cuda
def test_gpu_fused_whole_mlp_bf16_autocast():
    """The whole-MLP op (d pre in the backward matmul's epilogue) against the unfused PyTorch MLP, bf16 autocast."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    M, d, hidden = 4099, 512, 2048
    x = torch.randn(M, d, device="cuda", generator=gen).bfloat16().requires_grad_(True)
    w_up = (torch.randn(hidden, d, device="cuda", generator=gen) / math.sqrt(d)).requires_grad_(True)
    w_down = (torch.randn(d, hidden, device="cuda", generator=gen) / math.sqrt(hidden)).requires_grad_(True)
    grad = torch.randn(M, d, device="cuda", generator=gen).bfloat16()
    leaves = (x, w_up, w_down)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = kernels.mlp(x, w_up, w_down, 0.5)
        y_ref = kernels.mlp_reference(x, w_up, w_down, 0.5)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    got = torch.autograd.grad(y, leaves, grad)
    ref = torch.autograd.grad(y_ref, leaves, grad)
    assert [g.dtype for g in got] == [torch.bfloat16, torch.float32, torch.float32]
    leaves64 = [t.detach().bfloat16().double().requires_grad_(True) for t in leaves]
    y64 = kernels.mlp_reference(*leaves64, 0.5)
    truth = torch.autograd.grad(y64, leaves64, grad.double())
    _no_worse(y, y_ref, y64.detach(), "forward")
    for name, a, b, t in zip(("dx", "dw_up", "dw_down"), got, ref, truth):
        _no_worse(a, b, t, name, slack=2.0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cap", [30.0, 0.0])
def test_gpu_fused_ce_bf16(cap):
    gen = torch.Generator(device="cuda").manual_seed(1)
    T, V = 4099, 8192
    z = (torch.randn(T, V, device="cuda", generator=gen) * 8).bfloat16()
    targets = torch.randint(0, V, (T,), device="cuda", generator=gen)
    targets[::97] = -100
    za, zr = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    z64 = z.double().requires_grad_(True)
    loss = kernels.softcapped_cross_entropy(za, targets, cap)
    loss_ref = kernels.softcapped_cross_entropy_reference(zr, targets, cap)
    loss64 = kernels.softcapped_cross_entropy_reference(z64, targets, cap)
    (g,) = torch.autograd.grad(loss, za)
    (g_ref,) = torch.autograd.grad(loss_ref, zr)
    (g64,) = torch.autograd.grad(loss64, z64)
    assert abs(loss.item() - loss64.item()) < 1e-5 * max(1.0, abs(loss64.item()))
    _no_worse(g, g_ref, g64, "dz")
    nll = kernels.softcapped_token_nll(z, targets, cap)
    torch.testing.assert_close(
        nll.double(), kernels.softcapped_token_nll_reference(z.double(), targets, cap), rtol=1e-5, atol=1e-5
    )


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("heads,with_gain", [(8, True), (4, False)])
def test_gpu_qk_norm_rope_bf16(heads, with_gain):
    """The record's q (8 heads, gain) and k (4 heads) shapes in bf16 on CUDA: the kernel's output and gradients
    are no further from the fp64 truth than the model's unfused bf16 path."""
    from pgolf.model.rope import rope_buffers

    gen = torch.Generator(device="cuda").manual_seed(heads)
    T, D, half = 4099, 64, 8
    x = (torch.randn(T, heads, D, device="cuda", generator=gen) * 3).bfloat16()
    grad = torch.randn(T, heads, D, device="cuda", generator=gen).bfloat16()
    _, cos, sin = (t.cuda() for t in rope_buffers(2 * half, 10000.0, T))
    cos, sin = cos[:, None, :], sin[:, None, :]
    gain = (torch.rand(heads, device="cuda", generator=gen) + 0.5) if with_gain else None

    def run(fn, dtype):
        leaves = [x.to(dtype).requires_grad_(True)] + ([gain.to(torch.float64 if dtype == torch.float64 else
                                                               torch.float32).requires_grad_(True)] if with_gain else [])
        tables = (cos.double(), sin.double()) if dtype == torch.float64 else (cos, sin)
        out = fn(leaves[0], *tables, leaves[1] if with_gain else None)
        return out, torch.autograd.grad(out, leaves, grad.to(dtype))

    out, grads = run(attn_kernels.qk_norm_rope, torch.bfloat16)
    ref, ref_grads = run(attn_kernels.qk_norm_rope_reference, torch.bfloat16)
    truth, truths = run(attn_kernels.qk_norm_rope_reference, torch.float64)
    assert out.dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16
    _no_worse(out, ref, truth.detach(), "out", slack=2.0)
    for name, a, b, t in zip(("dx", "dgain"), grads, ref_grads, truths):
        _no_worse(a, b, t, name, slack=2.0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("with_xsa,with_gate", [(True, True), (False, True), (True, False)])
def test_gpu_xsa_gate_bf16(with_xsa, with_gate):
    """XSA + the output gate on the record's shapes in bf16 on CUDA: no further from the fp64 truth than the
    model's unfused bf16 path, output and gradients."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    T, H, hkv, D = 4099, 8, 4, 64
    y = torch.randn(T, H, D, device="cuda", generator=gen).bfloat16()
    v = (torch.randn(T, hkv, D, device="cuda", generator=gen) * 2).bfloat16()
    z = torch.randn(T, H, device="cuda", generator=gen).bfloat16()
    grad = torch.randn(T, H, D, device="cuda", generator=gen).bfloat16()
    names = ["y"] + (["v"] if with_xsa else []) + (["z"] if with_gate else [])

    def run(fn, dtype):
        leaves = {n: t.to(dtype).requires_grad_(n in names) for n, t in (("y", y), ("v", v), ("z", z))}
        out = fn(leaves["y"], leaves["v"] if with_xsa else None, leaves["z"] if with_gate else None, 0.5)
        return out, torch.autograd.grad(out, [leaves[n] for n in names], grad.to(dtype))

    out, grads = run(attn_kernels.xsa_gate, torch.bfloat16)
    ref, refs = run(attn_kernels.xsa_gate_reference, torch.bfloat16)
    truth, truths = run(attn_kernels.xsa_gate_reference, torch.float64)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    _no_worse(out, ref, truth.detach(), "out", slack=2.0)
    for name, a, b, t in zip(names, grads, refs, truths):
        _no_worse(a, b, t, f"d{name}", slack=2.0)


@pytest.mark.gpu
@needs_cuda
def test_gpu_gate_linear_bf16():
    """The output gate's projection as the model calls it on CUDA (bf16 autocast, a 12-column slice of the
    attention's input, the fp32 gate weight): no further from the fp64 truth than F.linear's bf16 path, the
    product and both gradients, in F.linear's dtypes."""
    gen = torch.Generator(device="cuda").manual_seed(8)
    wide = torch.randn(4099, 512, device="cuda", generator=gen).bfloat16()
    w = torch.randn(8, 12, device="cuda", generator=gen) / 4
    grad = torch.randn(4099, 8, device="cuda", generator=gen).bfloat16()

    def run(fn, dtype, autocast):
        leaves = [wide.to(dtype).requires_grad_(True), w.to(torch.float64 if dtype == torch.float64 else
                                                           torch.float32).requires_grad_(True)]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = fn(leaves[0][:, :12], leaves[1])
        return out, torch.autograd.grad(out, leaves, grad.to(out.dtype))

    out, grads = run(attn_kernels.gate_linear, torch.bfloat16, True)
    ref, refs = run(F.linear, torch.bfloat16, True)
    truth, truths = run(F.linear, torch.float64, False)
    assert out.dtype == ref.dtype and [g.dtype for g in grads] == [g.dtype for g in refs]
    _no_worse(out, ref, truth.detach(), "z", slack=2.0)
    for name, a, b, t in zip(("dx", "dw"), grads, refs, truths):
        _no_worse(a, b, t, name, slack=2.0)


def test_attention_kernels_refuse_tensors_past_32_bit_offsets():
    """The kernels index with 32-bit offsets: a tensor of 2^31 elements or more takes the reference path (shapes
    checked on the meta device: nothing is allocated)."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    for tokens, fusable in ((2**21, True), (2**22, False)):  # x [tokens, 8, 64]: 2^30 and 2^31 elements
        cos = torch.empty(tokens, 1, 8, **meta)
        assert attn_kernels.qk_norm_rope_fusable(torch.empty(tokens, 8, 64, **meta), cos, cos) is fusable
    assert attn_kernels.xsa_gate_fusable(torch.empty(2**21, 8, 64, **meta), torch.empty(2**21, 4, 64, **meta))
    assert not attn_kernels.xsa_gate_fusable(torch.empty(2**22, 8, 64, **meta), torch.empty(2**22, 4, 64, **meta))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rep", [1, 2])
def test_gpu_qkv_norm_rope_bf16(rep):
    """The record's fused q, k, v projection output [T, (8 + 2 x 4) x 64] in bf16 on CUDA, with native GQA (rep 1)
    and k / v repeated per query head (rep 2, ``train.repeat_kv_heads``): q, k, v, the attention's v and the
    gradients of qkv and the gain no further from the fp64 truth than the model's unfused bf16 path."""
    from pgolf.model.rope import rope_buffers

    gen = torch.Generator(device="cuda").manual_seed(3)
    T, H, Hkv, D, half = 4099, 8, 4, 64, 8
    qkv = (torch.randn(T, (H + 2 * Hkv) * D, device="cuda", generator=gen) * 3).bfloat16()
    grads_out = [torch.randn(T, h, D, device="cuda", generator=gen).bfloat16() for h in (H, Hkv * rep, Hkv, Hkv * rep)]
    _, cos, sin = (t.cuda() for t in rope_buffers(2 * half, 10000.0, T))
    cos, sin = cos[:, None, :], sin[:, None, :]
    gain = torch.rand(H, device="cuda", generator=gen) + 0.5

    def run(fn, dtype):
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        leaves = [qkv.to(dtype).requires_grad_(True), gain.to(wide).requires_grad_(True)]
        tables = (cos.double(), sin.double()) if dtype == torch.float64 else (cos, sin)
        outs = fn(leaves[0], H, Hkv, *tables, leaves[1], rep)
        loss = sum((o * g.to(dtype)).sum() for o, g in zip(outs, grads_out))
        return outs, torch.autograd.grad(loss, leaves)

    outs, grads = run(attn_kernels.qkv_norm_rope, torch.bfloat16)
    refs, ref_grads = run(attn_kernels.qkv_norm_rope_reference, torch.bfloat16)
    truths, truth_grads = run(attn_kernels.qkv_norm_rope_reference, torch.float64)
    assert [o.dtype for o in outs] == [torch.bfloat16] * 4 and grads[0].dtype == torch.bfloat16
    for name, a, b, t in zip("qkva", outs, refs, truths):
        _no_worse(a, b, t.detach(), name, slack=2.0)
    for name, a, b, t in zip(("dqkv", "dgain"), grads, ref_grads, truth_grads):
        _no_worse(a, b, t, name, slack=2.0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rep", [1, 2])
def test_gpu_qkv_linear_norm_rope_bf16(rep):
    """The q, k, v matmul with the q/k kernels as its epilogue (one Triton kernel on Hopper) at the record's shapes
    in bf16: q, k, v, the attention's v and the gradients of x, w and the gain no further from the fp64 truth than
    F.linear followed by the unfused path; on sm90 the TMA kernel is the path taken, and it writes every output."""
    from pgolf.model import attn_triton
    from pgolf.model.rope import rope_buffers

    gen = torch.Generator(device="cuda").manual_seed(5)
    T, K, H, Hkv, D, half = 4099, 512, 8, 4, 64, 8
    x = torch.randn(T, K, device="cuda", generator=gen) * (0.5 + torch.rand(T, 1, device="cuda", generator=gen))
    w = torch.randn((H + 2 * Hkv) * D, K, device="cuda", generator=gen) / K**0.5
    grads_out = [torch.randn(T, h, D, device="cuda", generator=gen).bfloat16() for h in (H, Hkv * rep, Hkv, Hkv * rep)]
    _, cos, sin = (t.cuda() for t in rope_buffers(2 * half, 10000.0, T))
    cos, sin = cos[:, None, :], sin[:, None, :]
    gain = torch.rand(H, device="cuda", generator=gen) + 0.5
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert attn_triton.qkv_gemm_usable(x.bfloat16(), w.bfloat16(), H, Hkv) == hopper

    def unfused(xx, ww, *rest):
        return attn_kernels.qkv_norm_rope_reference(F.linear(xx, ww), *rest)

    def run(fn, dtype):
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        leaves = [x.to(dtype).requires_grad_(True), w.to(dtype).requires_grad_(True),
                  gain.to(wide).requires_grad_(True)]
        tables = (cos.double(), sin.double()) if dtype == torch.float64 else (cos, sin)
        outs = fn(leaves[0], leaves[1], H, Hkv, *tables, leaves[2], rep)
        loss = sum((o * g.to(dtype)).sum() for o, g in zip(outs, grads_out))
        return outs, torch.autograd.grad(loss, leaves)

    outs, grads = run(attn_kernels.qkv_linear_norm_rope, torch.bfloat16)
    refs, ref_grads = run(unfused, torch.bfloat16)
    truths, truth_grads = run(unfused, torch.float64)
    assert [o.dtype for o in outs] == [torch.bfloat16] * 4 and grads[0].dtype == torch.bfloat16
    for name, a, b, t in zip("qkva", outs, refs, truths):
        assert torch.isfinite(a).all(), name
        _no_worse(a, b, t.detach(), name, slack=2.0)
    for name, a, b, t in zip(("dx", "dw"), grads, ref_grads, truth_grads):
        _no_worse(a, b, t, name, slack=2.0)
    # d gain [8]: sums over 262,336 products, returned in bf16 (the gain's dtype inside the op, as on the unfused
    # path): one rounding of a value near 1,000 is up to 2, so the margin adds one bf16 half-ulp of the largest
    half_ulp = 2.0**-8 * truth_grads[2].abs().max().item()
    assert (grads[2].double() - truth_grads[2]).abs().max().item() <= (
        2.0 * (ref_grads[2].double() - truth_grads[2]).abs().max().item() + half_ulp)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("repeat_kv", [False, True])
def test_gpu_model_fused_compiled_matches_reference(repeat_kv):
    """A record-width model: fused kernels + folded output scales + torch.compile(fullgraph, inductor) vs the
    pure-PyTorch eager path; with native GQA and with k / v repeated per query head (``train.repeat_kv_heads``),
    the latter also with the gate's projection kernels (``train.fused_gate_linear``)."""
    from torch._dynamo.utils import counters

    from pgolf.model.attention import build_cu_seqlens, pad_cu_seqlens
    from pgolf.train.loop import cu_seqlens_bucket

    cfg = _tiny_cfg(vocab_size=8192, num_layers=3, model_dim=512, num_heads=8, num_kv_heads=4, rope_dims=16)
    torch.manual_seed(0)
    model = GPT(cfg, train_seq_len=2048).cuda()
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.down.weight.normal_(0.0, 0.02)
            block.attn.o.weight.normal_(0.0, 0.02)
            block.attn_scale.normal_(1.0, 0.3)  # (folded into o / down on the fused path)
            block.mlp_scale.normal_(1.0, 0.3)
    model.looping = True
    ids, targets = _batch(8192, 8192, seed=4)
    cu, max_seqlen = build_cu_seqlens(ids, 1, 2048)
    cu = pad_cu_seqlens(cu, cu_seqlens_bucket(cu.numel())).cuda()
    ids, targets = ids.cuda(), targets.cuda()

    def run(fused: bool, compiled: bool):
        model.use_fused_kernels = fused
        attn_kernels.use_in_model(model, fused, fused, fused, fused and repeat_kv, fused and repeat_kv)
        model.fold_output_scales = fused  # the training stage's configuration (train.fold_output_scales)
        model.zero_grad(set_to_none=True)
        fn = torch.compile(model, fullgraph=True, dynamic=False) if compiled else model
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(ids, targets, cu_seqlens=cu, max_seqlen=max_seqlen)
        loss.backward()
        return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    breaks = sum(counters["graph_break"].values())
    ref_loss, ref_grads = run(fused=False, compiled=False)
    loss, grads = run(fused=True, compiled=True)
    assert sum(counters["graph_break"].values()) == breaks
    # on Hopper the q, k, v matmul is the kernel with the q/k kernels as its epilogue
    assert attn_kernels.used_in_model(model)["qkv_epilogue"] == (torch.cuda.get_device_capability()[0] >= 9)
    assert abs(loss - ref_loss) < 2e-3 * abs(ref_loss)
    assert grads.keys() == ref_grads.keys()
    flat = torch.cat([grads[n].flatten() for n in ref_grads])
    flat_ref = torch.cat([g.flatten() for g in ref_grads.values()])
    assert (flat - flat_ref).norm() <= 3e-2 * flat_ref.norm()  # bf16 rounding differs between the paths
    for name, g in ref_grads.items():  # no parameter may be grossly off
        rel = (grads[name] - g).norm().item() / max(g.norm().item(), 1e-12)
        assert rel < 0.2, f"{name}: relative grad difference {rel:.3g}"
