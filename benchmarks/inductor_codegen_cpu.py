"""The Triton kernels inductor would generate for pgolf's training step on a CUDA GPU, written on a CPU-only machine.

Why: issue 16's remaining gap is in inductor-generated kernels, and a GPU is not always at hand. Inductor decides
fusions before any kernel runs, so its GPU scheduling can be driven on CPU tensors: ``cpu_backend = "triton"``,
the GPU-only gates (mix-order reduction) opened, Triton's target set to sm90. Each graph module's source is captured
when inductor writes it, and the graph then runs eagerly, so that ``loss.backward()`` compiles (and captures) the
backward graph too. The opaque ops run cheap CPU stand-ins of the GPU ops' shapes (FlashAttention 4: an elementwise
product; the fused MLP and cross-entropy: torch references), so the graph around them is the GPU graph.

What it reports (static, nothing is timed): per graph, kernels and launches, and per kernel its full-size
(``[tokens, d_model]``) loads and stores, the column-sum accumulators of a mix-order reduction, and the sum over
launches of full-size passes (a bandwidth proxy). A kernel with tens of loads and accumulators spills registers
on the GPU: that is the looping-on backward's 45.6 + 41.9 ms/step pair on the H200 (docs/benchmarks.md).

    python benchmarks/inductor_codegen_cpu.py --config config.yaml --tokens 16384 --looping on --out /tmp/gen_on
    python benchmarks/inductor_codegen_cpu.py --config config.yaml --tokens 16384 --looping on \\
        --max-fusion-io-buffers 16 --out /tmp/gen_on_cap16
    # the record script's own model (PGOLF_RECORD_SCRIPT), its attention, MLP and CE kernels as the same stand-ins
    python benchmarks/inductor_codegen_cpu.py --model record --tokens 16384 --looping on --out /tmp/record_on

It patches torch internals (tested with torch 2.13 CPU and 2.11, Triton 3.6) for the life of its own process only;
the fusion decisions follow the torch it runs with: run it with the GPU machine's torch version to see that
machine's kernels (torch 2.11 here: `pip download torch==2.11.0` into a virtual environment).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from inductor_kernels import KERNEL_RE  # one generated kernel in a graph module (this folder's kernel reader)

LAUNCH_RE = re.compile(r"^\s+(triton_\w+)\.run\(", re.M)
_REGISTRATIONS: list = []  # torch.library registrations last as long as their Library object


def kernel_stats(module_source: str, model_dim: int, tokens: Optional[int] = None) -> list[dict[str, Any]]:
    """Per generated kernel of one graph module: launches, distinct full-size loads and stores (an index with a
    ``model_dim`` stride: a [tokens, model_dim] tensor), accumulators of a mix-order reduction, pointer arguments.
    With ``tokens``: a kernel whose literal extent (xnumel x r0_numel) is below tokens x model_dim works on weights
    (a [512, 512] weight gradient has the same stride) and has no full-size loads or stores."""
    launches = Counter(LAUNCH_RE.findall(module_source))
    full = re.compile(r"tl\.(load|store)\((\w+) \+ \(([^)]*\b" + str(model_dim) + r"\*[^)]*)\)")
    rows = []
    for m in KERNEL_RE.finditer(module_source):
        source = m.group("source")
        loads = {ptr for op, ptr, _ in full.findall(source) if op == "load"}
        stores = {ptr for op, ptr, _ in full.findall(source) if op == "store"}
        extents = [int(n) for n in re.findall(r"^\s+(?:xnumel|r0_numel) = (\d+)$", source, re.M)]
        if tokens is not None and extents and math.prod(extents) < tokens * model_dim:
            loads, stores = set(), set()
        header = re.search(r"^def \w+\((.*?)\):", source, re.M)
        pointers = [a for a in header.group(1).split(", ") if "ptr" in a] if header else []
        rows.append({
            "name": m.group("name"),
            "launches": launches.get(m.group("name"), 0),
            "full_loads": len(loads),
            "full_stores": len(stores),
            "accumulators": len(re.findall(r"^\s+accum\d+ = tl\.full", source, re.M)),
            "mix_order": "MixOrderReductionGrid" in source,
            "pointer_args": len(pointers),
        })
    return rows


def graph_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "kernels": len(rows),
        "launches": sum(r["launches"] for r in rows),
        "full_size_passes": sum(r["launches"] * (r["full_loads"] + r["full_stores"]) for r in rows),
        "mix_order_kernels": sum(r["mix_order"] for r in rows),
        "max_accumulators": max((r["accumulators"] for r in rows), default=0),
        "max_full_loads": max((r["full_loads"] for r in rows), default=0),
        "max_pointer_args": max((r["pointer_args"] for r in rows), default=0),
    }


# ------------------------------------------------------------------------------------------ inductor on CPU


def drive_gpu_scheduling_on_cpu(max_fusion_io_buffers: int, mix_order_reduction: bool = True,
                                mix_order_any_size: bool = False) -> list[str]:
    """Patch inductor (this process) so that CPU tensors get its CUDA/Triton scheduling and every generated graph
    module is captured instead of loaded; returns the list the captured sources are appended to. The two fusion
    options are ``train.compile_max_fusion_io_buffers`` and ``train.compile_mix_order_reduction``.
    ``mix_order_any_size``: inductor's non-strict mode, which fuses mix-order reductions below the sizes it wants on
    a GPU (>= 5 Mi elements and >= 4,096 rows), so that a small test batch shows the fusion the GPU's batch gets."""
    import torch
    import torch._inductor.config as inductor_config
    import torch._inductor.scheduler as scheduler
    import torch.utils._triton as torch_triton
    from torch._inductor import codecache
    from triton.backends.compiler import GPUTarget

    inductor_config.cpu_backend = "triton"
    inductor_config.compile_threads = 1
    if max_fusion_io_buffers:
        inductor_config.max_fusion_unique_io_buffers = max_fusion_io_buffers
    inductor_config.triton.mix_order_reduction = mix_order_reduction
    if mix_order_any_size:
        if not hasattr(inductor_config.triton, "mix_order_reduction_non_strict_mode"):
            raise SystemExit(f"--mix-order-any-size: torch {torch.__version__} has no "
                             "inductor config triton.mix_order_reduction_non_strict_mode")
        inductor_config.triton.mix_order_reduction_non_strict_mode = True
    open_mix_order_gate(scheduler)
    torch_triton.triton_backend = lambda: GPUTarget("cuda", 90, 32)
    torch_triton.triton_hash_with_backend = lambda: "sm90-on-cpu"
    captured: list[str] = []
    load = codecache.PyCodeCache.load_by_key_path

    def capture(key, path, *args, **kwargs):
        source = Path(path).read_text()
        if "def call(" in source:  # a graph module; kernel modules are loaded from inside it
            captured.append(source)
            raise _Captured(path)
        return load(key, path, *args, **kwargs)

    codecache.PyCodeCache.load_by_key_path = staticmethod(capture)
    return captured


def open_mix_order_gate(scheduler) -> None:
    """Let inductor's mix-order reduction fuse CPU nodes as it fuses CUDA ones. torch >= 2.13 asks
    ``_is_gpu_triton_backend``; torch 2.11 asks each node for a CUDA device inside ``MixOrderReduction.can_fuse``,
    so the nodes answer ``cuda`` there (and only there)."""
    if hasattr(scheduler, "_is_gpu_triton_backend"):
        scheduler._is_gpu_triton_backend = lambda *args: True
        return
    import torch

    decide = scheduler.MixOrderReduction.can_fuse.__func__

    def can_fuse_as_on_cuda(cls, node1, node2):
        nodes = [n for n in (node1, node2) if n is not None]
        for n in nodes:
            n.get_device, n.is_gpu = (lambda: torch.device("cuda")), (lambda: True)
        try:
            return decide(cls, node1, node2)
        finally:
            for n in nodes:
                del n.get_device, n.is_gpu

    scheduler.MixOrderReduction.can_fuse = classmethod(can_fuse_as_on_cuda)


class _Captured(Exception):
    """Raised once a graph module's source is written: nothing generated is ever run."""


def capturing_backend():
    """A torch.compile backend: inductor up to the written module, then the FX graph eagerly."""
    from torch._inductor import compile_fx
    from torch._inductor.output_code import OutputCode

    class Eager(OutputCode):
        _boxed_call = True

        def __init__(self, gm):
            self.gm = gm

        def __call__(self, *args):
            if len(args) == 1 and isinstance(args[0], list):  # boxed arguments
                inputs = list(args[0])
                args[0].clear()
                args = inputs
            return self.gm(*args)

        def post_compile(self, *args, **kwargs):
            pass

        def set_triton_bundle(self, *args, **kwargs):
            pass

        def prepare_for_serialization(self):
            pass

    def inner(gm, example_inputs, **kwargs):
        eager = copy.deepcopy(gm)
        try:
            compile_fx.compile_fx_inner(gm, example_inputs, **kwargs)
        except Exception as exc:  # inductor wraps the capture in its own error types
            if "_Captured" not in repr(exc):
                raise
        return Eager(eager)

    return lambda gm, example_inputs: compile_fx.compile_fx(gm, example_inputs, inner_compile=inner)


def use_gpu_ops_on_cpu() -> None:
    """CPU kernels for the ops whose GPU versions are opaque (shapes and dtypes as on the GPU; values irrelevant),
    and the CUDA autograd form of RMSNorm (``_fused_rms_norm``), so the traced graph is the GPU one."""
    import torch
    import torch.nn.functional as F
    from torch._decomp import decompositions

    from pgolf.model import attention, flash4, gpt, kernels
    from pgolf.model import triton_kernels as tk

    def fa4_fwd(q, k, v, cu, max_seqlen, causal, k_fwd=None, v_fwd=None):  # q [T, H, hd], k/v [T, Hkv, hd]
        groups = q.shape[1] // k.shape[1]
        return (q * v.repeat_interleave(groups, 1)).contiguous(), torch.zeros(q.shape[1], q.shape[0])

    def fa4_bwd(dout, q, k, v, out, lse, cu, max_seqlen, causal):
        groups = q.shape[1] // k.shape[1]
        dq = (dout * v.repeat_interleave(groups, 1)).contiguous()
        dv = (dout * q).view(q.shape[0], k.shape[1], groups, q.shape[2]).sum(2)
        return dq, torch.zeros_like(k), dv.to(v.dtype).contiguous()

    torch.library.register_kernel("pgolf_fa4::fwd", "cpu", fa4_fwd)
    torch.library.register_kernel("pgolf_fa4::bwd", "cpu", fa4_bwd)
    attention._FA4 = flash4.attend
    kernels.check_triton_device = lambda t, op: None
    kernels.use_triton = lambda t: True

    def mlp_up(x, w, pre, post, slope):
        p = x @ w.t().to(x.dtype)
        pre.copy_(p)
        post.copy_(F.leaky_relu(p.float(), slope).square())

    def mlp_grad(g, w_down, pre, dpre, slope):
        dpre.copy_(kernels.mlp_activation_grad(pre, (g @ w_down).to(pre.dtype), slope))

    def ce_fwd(z, targets, nll, lse, cap):
        capped = kernels.softcap_reference(z.float(), cap)
        lse.copy_(torch.logsumexp(capped, -1))
        nll.copy_(lse - capped.gather(1, targets[:, None].clamp(min=0))[:, 0])

    def ce_bwd(grad_nll, z, targets, lse, dz, cap):
        dz.zero_()

    tk.launch_mlp_up_act, tk.launch_mlp_act_grad = mlp_up, mlp_grad
    # the attention kernels (pgolf.model.attn_kernels), opaque like the others: stand-ins that fill their outputs
    from pgolf.model import attn_kernels, attn_triton

    attn_kernels.check_triton_device = lambda t, op: None
    attn_kernels.use_triton = lambda t: True
    attn_kernels.qkv_epilogue_available = lambda: True  # as on Hopper: the q, k, v matmul inside the opaque op
    def copies(t, rep):  # [T, H, D] -> [T, H * rep, D]
        return t.repeat_interleave(rep, 1)

    def summed(t, heads):  # [T, H * rep, D] -> [T, H, D]
        return t.view(t.shape[0], heads, -1, t.shape[2]).sum(2)

    def qk_fwd(x, cos, sin, gain, out, rstd, eps, v=None, v_out=None, v_copies=None):
        out.copy_(copies(x, out.shape[1] // x.shape[1]))
        rstd.fill_(1.0)
        if v is not None:
            v_out.copy_(v)
            if v_copies is not None:
                v_copies.copy_(copies(v, v_copies.shape[1] // v.shape[1]))

    def qk_bwd(g, x, rstd, cos, sin, gain, dx, partial, gv=None, gv_copies=None, dv=None):
        dx.copy_(summed(g, x.shape[1]))
        if partial is not None:
            partial.zero_()
        if gv is not None:
            dv.copy_(gv if gv_copies is None else gv + summed(gv_copies, gv.shape[1]))

    attn_triton.launch_qk_norm_rope_fwd, attn_triton.launch_qk_norm_rope_bwd = qk_fwd, qk_bwd
    attn_triton.launch_xsa_gate_fwd = lambda y, v, z, out, scale, eps: out.copy_(y)
    attn_triton.launch_xsa_gate_bwd = lambda go, y, v, z, dy, dv, dz, scale, eps: (
        dy.copy_(go), dv is not None and dv.zero_(), dz is not None and dz.zero_())
    attn_triton.launch_gate_linear_fwd = lambda x, w, z: z.copy_(x.float() @ w.float().t())
    attn_triton.launch_gate_linear_bwd = lambda g, x, w, dx, partial: (dx.copy_(g.float() @ w.float()),
                                                                       partial.zero_())
    tk.launch_softcap_ce_fwd, tk.launch_softcap_ce_bwd = ce_fwd, ce_bwd
    for op in ("pgolf::mlp_up_act", "pgolf::mlp_fused", "pgolf::gate_linear"):
        try:
            torch.library.register_autocast(op, "cpu", torch.bfloat16)
        except RuntimeError:  # an op this pgolf does not define
            pass
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_fused_rms_norm", lambda x, shape, w, eps: decompositions._fused_rms_norm(x, shape, w, eps), "CPU")
    lib.impl("_fused_rms_norm_backward", lambda g, x, shape, rstd, w, mask:
             decompositions._fused_rms_norm_backward(g, x, shape, rstd, w, mask), "CPU")
    _REGISTRATIONS.append(lib)
    gpt.rms_norm = lambda x: torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], None, None)[0].to(x.dtype)


def generate(config: str, tokens: int, looping: bool, max_fusion_io_buffers: int = 0,
             mix_order_reduction: bool = True, mix_order_any_size: bool = False,
             fold_scales: Optional[bool] = None) -> tuple[list[str], int]:
    """Forward and backward graph modules of one micro-batch of ``tokens`` tokens of ``config``'s training step,
    and the model width. ``fold_scales``: ``train.fold_output_scales`` unless given."""
    captured = drive_gpu_scheduling_on_cpu(max_fusion_io_buffers, mix_order_reduction, mix_order_any_size)
    use_gpu_ops_on_cpu()
    import torch

    from pgolf.config import load_run_config
    from pgolf.model.gpt import GPT, param_groups
    from pgolf.model.rope import extend_rope_cache
    from pgolf.train.bench import packed_rows
    from pgolf.train.storage import apply_param_storage

    run = load_run_config(config)
    model = GPT(run.model, train_seq_len=run.train.train_seq_len)
    model.use_fused_kernels = True
    if run.train.fused_qk_norm_rope or run.train.fused_xsa_gate:  # as the training stage attaches them on CUDA
        from pgolf.model import attn_kernels

        attn_kernels.use_in_model(model, run.train.fused_qk_norm_rope, run.train.fused_xsa_gate,
                                  run.train.fused_qkv_matmul, run.train.repeat_kv_heads, run.train.fused_gate_linear)
    model.fold_output_scales = run.train.fold_output_scales if fold_scales is None else fold_scales
    model.attn_backend = "fa4"
    model.looping = looping
    embedding = [name for name, _ in param_groups(model).get("embedding", ())]
    apply_param_storage(model, run.train.param_storage, embedding)
    extend_rope_cache(model, tokens)  # as the training stage does before compiling
    rows = packed_rows(tokens, run.model.vocab_size, run.train.train_seq_len, 0, rows=1, pad=run.train.cu_seqlens_pad)
    step_model = torch.compile(model, fullgraph=True, dynamic=False, backend=capturing_backend())
    cu = rows.cu_seqlens[0]
    torch._dynamo.mark_dynamic(cu, 0)  # as pgolf.train.step.forward_backward does
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = step_model(rows.inputs[0], rows.targets[0], cu_seqlens=cu, max_seqlen=rows.max_seqlen)
    loss.backward()
    return captured, run.model.model_dim


def generate_record(tokens: int, looping: bool, max_fusion_io_buffers: int = 0,
                    hparams: Optional[dict[str, Any]] = None, mix_order_reduction: bool = True,
                    mix_order_any_size: bool = False) -> tuple[list[str], int]:
    """The same for the record script's own GPT (``PGOLF_RECORD_SCRIPT``, imported by tests/record_oracle.py) at its
    default hyperparameters, built as it builds it (``.bfloat16()`` then ``restore_fp32_params``), training mode,
    with the ops it runs as kernels on the GPU routed to the same opaque stand-ins as pgolf's: its FlashAttention 3
    call to the FA4 op, its fused MLP to pgolf's fused MLP op, its fused softcapped CE to pgolf's CE op (the
    stand-ins' shapes are the record kernels' shapes). What remains is what inductor generates for the record.
    ``hparams`` overrides the script's Hyperparameters (a small model for tests)."""
    captured = drive_gpu_scheduling_on_cpu(max_fusion_io_buffers, mix_order_reduction, mix_order_any_size)
    use_gpu_ops_on_cpu()
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import record_oracle

    from pgolf.model import flash4, kernels
    from pgolf.train.bench import packed_rows

    rec = record_oracle.load_record()

    def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, **_):
        return flash4.attend(q, k, v, cu_seqlens_q, max_seqlen_q, causal)

    rec.flash_attn_varlen_func = attention
    rec.FusedLeakyReLUSquareMLP = lambda x, up_w, down_w: kernels.fused_mlp(x, up_w, down_w, 0.5)
    rec.softcapped_cross_entropy = lambda z, targets, cap, reduction="mean": kernels.softcapped_cross_entropy(
        z, targets, cap)
    h = record_oracle.record_hparams(rec, **(hparams or {}))
    model = rec.GPT(h).bfloat16()
    rec.restore_fp32_params(model)
    model.fused_ce_enabled = True
    model.looping_active = looping
    model.train()
    rows = packed_rows(tokens, h.vocab_size, h.train_seq_len, 0, rows=1, pad="multiple_of_64")
    step_model = torch.compile(model, fullgraph=True, dynamic=False, backend=capturing_backend())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = step_model(rows.inputs[0][None], rows.targets[0][None], cu_seqlens=rows.cu_seqlens[0],
                          max_seqlen=rows.max_seqlen)
    loss.backward()
    return captured, h.model_dim


def report_lines(graphs: dict[str, list[dict[str, Any]]], top: int) -> list[str]:
    lines = []
    for graph, rows in graphs.items():
        s = graph_summary(rows)
        lines.append(f"{graph}: {s['kernels']} kernels, {s['launches']} launches, {s['full_size_passes']} full-size "
                     f"passes; mix-order kernels {s['mix_order_kernels']}, max accumulators {s['max_accumulators']}, "
                     f"max full-size loads {s['max_full_loads']}, max pointer args {s['max_pointer_args']}")
        costly = sorted(rows, key=lambda r: -r["launches"] * (r["full_loads"] + r["full_stores"] + r["accumulators"]))
        for r in costly[:top]:
            lines.append(f"  {r['launches']:3d} x loads {r['full_loads']:2d} stores {r['full_stores']} "
                         f"acc {r['accumulators']:2d} {'mix' if r['mix_order'] else '   '} {r['name']}")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["pgolf", "record"], default="pgolf",
                   help="pgolf's model of --config, or the record script's own (PGOLF_RECORD_SCRIPT)")
    p.add_argument("--record-hparams", type=json.loads, default=None,
                   help='--model record: JSON object of Hyperparameters overrides, e.g. \'{"num_layers": 6}\'')
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--tokens", type=int, default=16384, help="tokens of the micro-batch (default 16384)")
    p.add_argument("--looping", choices=["on", "off"], default="on")
    p.add_argument("--max-fusion-io-buffers", type=int, default=0, help="inductor's fusion cap (0: none)")
    p.add_argument("--mix-order-reduction", choices=["on", "off"], default="on",
                   help="inductor's mix-order reduction fusion (default on, inductor's default)")
    p.add_argument("--mix-order-any-size", action="store_true",
                   help="fuse mix-order reductions at any size (inductor's non-strict mode): small batches for tests")
    p.add_argument("--fold-scales", choices=["on", "off"], default=None,
                   help="attn_scale / mlp_scale through the o / down weights (default: the recipe's "
                   "train.fold_output_scales)")
    p.add_argument("--top", type=int, default=8, help="kernels listed per graph")
    p.add_argument("--out", required=True, help="folder for forward.py, backward.py and summary.json")
    args = p.parse_args(argv)
    looping, mix_order = args.looping == "on", args.mix_order_reduction == "on"
    if args.model == "record":
        modules, model_dim = generate_record(args.tokens, looping, args.max_fusion_io_buffers, args.record_hparams,
                                             mix_order, args.mix_order_any_size)
    else:
        fold = None if args.fold_scales is None else args.fold_scales == "on"
        modules, model_dim = generate(args.config, args.tokens, looping, args.max_fusion_io_buffers, mix_order,
                                      args.mix_order_any_size, fold)
    if len(modules) != 2:
        print(f"expected a forward and a backward graph module, captured {len(modules)}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    graphs = {}
    for name, source in zip(("forward", "backward"), modules):
        (out / f"{name}.py").write_text(source)
        graphs[name] = kernel_stats(source, model_dim, args.tokens)
    summary = {"model": args.model, "config": args.config, "tokens": args.tokens, "looping": args.looping,
               "max_fusion_io_buffers": args.max_fusion_io_buffers, "mix_order_reduction": args.mix_order_reduction,
               "mix_order_any_size": args.mix_order_any_size, "fold_scales": args.fold_scales,
               "graphs": {g: {**graph_summary(rows), "kernels_detail": rows} for g, rows in graphs.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(report_lines(graphs, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
