"""Runs the Triton kernels of pgolf.model.kernels under Triton's CPU interpreter and checks them against the references.

Started by tests/test_kernels.py in a subprocess with ``TRITON_INTERPRET=1`` (it must be set before triton is
imported, hence the separate process). Prints one JSON line: ``{case: "ok" | error text}``; the test reports
each case separately. Shapes are small and deliberately not multiples of the interpreter tiles, so the masked
edges of every kernel are exercised.
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton

from pgolf.model import attn_kernels, kernels
from pgolf.model import triton_kernels as tk
from pgolf.config import ModelConfig
from pgolf.model.gpt import GPT

FP32 = dict(rtol=1e-5, atol=1e-5)  # interpreter fp32 vs torch fp32: only summation order differs


def _close(actual, expected, what: str, **tol) -> None:
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}", **(tol or FP32))


def _no_worse(actual, lowp_reference, truth, what: str, slack: float = 2.5) -> None:
    """Low precision: the kernel's max error vs the fp64 truth stays within ``slack`` x the torch reference's.

    The slack is 2.5, not ~1, because the interpreter rounds fp32 -> bf16 toward zero (one ulp of error where
    torch's round-to-nearest has half an ulp); compiled kernels on a GPU round to nearest.
    """
    err = (actual.double() - truth).abs().max().item()
    ref_err = (lowp_reference.double() - truth).abs().max().item()
    scale = truth.abs().max().item()
    if not err <= slack * ref_err + 1e-6 * scale:
        raise AssertionError(f"{what}: max error {err:.3g} vs the torch reference's {ref_err:.3g} (scale {scale:.3g})")


def _mlp_case(dtype: torch.dtype, slope: float, tol: dict | None) -> None:
    gen = torch.Generator().manual_seed(1)
    M, K, N = 70, 48, 96  # tiles are 64 x 64 x 32: partial tiles on every axis
    x = (torch.randn(M, K, generator=gen) / math.sqrt(K)).to(dtype).requires_grad_(True)
    w = torch.randn(N, K, generator=gen).to(dtype).requires_grad_(True)
    grad = torch.randn(M, N, generator=gen).to(dtype)

    y = kernels.fused_mlp_up_activation(x, w, slope)
    gx, gw = torch.autograd.grad(y, (x, w), grad)
    # ground truth in float64 from the same (rounded) inputs
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    y64 = kernels.mlp_up_activation_reference(x64, w64, slope)
    rx, rw = torch.autograd.grad(y64, (x64, w64), grad.double())
    if y.dtype != dtype or gx.dtype != dtype or gw.dtype != dtype:
        raise AssertionError(f"dtypes: y {y.dtype}, dx {gx.dtype}, dw {gw.dtype}; expected {dtype}")
    _, pre = torch.ops.pgolf.mlp_up_act(x.detach(), w.detach(), slope)  # the op's second output
    pre64 = x64.detach() @ w64.detach().t()
    if tol is not None:
        _close(y.double(), y64.detach(), "forward", **tol)
        _close(gx.double(), rx, "dx", **tol)
        _close(gw.double(), rw, "dw", **tol)
        _close(pre.double(), pre64, "pre-activation", **tol)
        return
    # low precision: compare errors with the pure-PyTorch path run in the same dtype
    xl, wl = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    yl = kernels.mlp_up_activation_reference(xl, wl, slope)
    lx, lw = torch.autograd.grad(yl, (xl, wl), grad)
    _no_worse(y, yl, y64.detach(), "forward")
    _no_worse(gx, lx, rx, "dx")
    _no_worse(gw, lw, rw, "dw")
    _no_worse(pre, xl.detach() @ wl.detach().t(), pre64, "pre-activation")


def case_mlp_fp32_leaky() -> None:
    _mlp_case(torch.float32, 0.5, FP32)


def case_mlp_fp32_relu() -> None:
    _mlp_case(torch.float32, 0.0, FP32)


def case_mlp_bf16() -> None:
    # bf16 storage and matmuls: judged against the fp64 truth relative to torch's own bf16 error
    _mlp_case(torch.bfloat16, 0.5, None)


def case_mlp_3d_input() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 16, generator=gen)
    w = torch.randn(40, 16, generator=gen)
    _close(
        kernels.fused_mlp_up_activation(x, w, 0.5),
        kernels.mlp_up_activation_reference(x, w, 0.5),
        "3-D input",
        rtol=1e-5,
        atol=1e-4,
    )


def _mlp_fused_case(dtype: torch.dtype, slope: float, tol: dict | None) -> None:
    """The whole MLP as one op: forward and the three gradients (d pre from the backward epilogue)."""
    gen = torch.Generator().manual_seed(7)
    M, d, hidden = 70, 48, 96  # interpreter tiles 64 x 64 x 32: partial tiles on every axis, both directions
    x = (torch.randn(M, d, generator=gen) / math.sqrt(d)).to(dtype).requires_grad_(True)
    w_up = torch.randn(hidden, d, generator=gen).to(dtype).requires_grad_(True)
    w_down = (torch.randn(d, hidden, generator=gen) / math.sqrt(hidden)).to(dtype).requires_grad_(True)
    grad = torch.randn(M, d, generator=gen).to(dtype)
    leaves = (x, w_up, w_down)
    y = kernels.fused_mlp(x, w_up, w_down, slope)
    got = torch.autograd.grad(y, leaves, grad)
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    y64 = kernels.mlp_reference(*leaves64, slope)
    truth = torch.autograd.grad(y64, leaves64, grad.double())
    if y.dtype != dtype or any(g.dtype != dtype for g in got):
        raise AssertionError(f"dtypes: y {y.dtype}, grads {[g.dtype for g in got]}; expected {dtype}")
    names = ("forward", "dx", "dw_up", "dw_down")
    if tol is not None:
        for name, a, b in zip(names, (y, *got), (y64.detach(), *truth)):
            _close(a.double(), b, name, **tol)
        return
    lowp = [t.detach().clone().requires_grad_(True) for t in leaves]
    yl = kernels.mlp_reference(*lowp, slope)
    ref = torch.autograd.grad(yl, lowp, grad)
    for name, a, b, t in zip(names, (y, *got), (yl, *ref), (y64.detach(), *truth)):
        _no_worse(a, b, t, name)


def case_mlp_fused_fp32_leaky() -> None:
    _mlp_fused_case(torch.float32, 0.5, FP32)


def case_mlp_fused_fp32_relu() -> None:
    _mlp_fused_case(torch.float32, 0.0, FP32)


def case_mlp_fused_bf16() -> None:
    _mlp_fused_case(torch.bfloat16, 0.5, None)


def case_mlp_act_grad_kernel() -> None:
    """The backward epilogue alone: (g @ w_down) * act'(pre), with pre = 0 and tiny values in the mix."""
    gen = torch.Generator().manual_seed(8)
    M, d, hidden = 67, 40, 72
    g = torch.randn(M, d, generator=gen)
    w_down = torch.randn(d, hidden, generator=gen)
    pre = torch.randn(M, hidden, generator=gen) * 3
    pre[0, :4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])
    for slope in (0.5, 0.0):
        got = torch.ops.pgolf.mlp_act_grad(g, w_down, pre, slope)
        want = kernels.mlp_activation_grad(pre.double(), g.double() @ w_down.double(), slope)
        _close(got.double(), want, f"d pre (slope {slope})")


def case_mlp_tma_tiles() -> None:
    """The Hopper TMA kernel's tiles (one program per tile: the interpreter cannot run its persistent loop), both
    epilogues, partial tiles on M and a B read as [N, K] (forward) and [K, N] (backward); fp16, as the
    interpreter's dot mishandles bf16. The epilogue acts on the product rounded to fp16, like an unfused F.linear."""
    gen = torch.Generator().manual_seed(10)
    M, K, N = 200, 64, 96
    bm, bn, bk = 64, 32, 32
    half = torch.float16
    x, w_up = torch.randn(M, K, generator=gen).to(half), (torch.randn(N, K, generator=gen) / 8).to(half)
    g, w_down = torch.randn(M, K, generator=gen).to(half), (torch.randn(K, N, generator=gen) / 8).to(half)
    pre, post, dpre = (torch.full((M, N), float("nan"), dtype=half) for _ in range(3))  # every element written
    for b, b_kn, a, out, backward in ((w_up, False, x, post, False), (w_down, True, g, dpre, True)):
        tk._launch_mlp_tma(a, b, b_kn, pre, out, 0.5, backward, bitwise_round=True, tile=(bm, bn, bk, 4, 2, 0))
    tol = dict(rtol=2e-3, atol=1e-3)  # one fp16 rounding apart at most (summation order of the fp32 products)
    want_pre = (x.double() @ w_up.double().T).to(half)
    _close(pre.double(), want_pre.double(), "tma pre", **tol)
    _close(post.double(), (F.leaky_relu(pre.double(), 0.5) ** 2).to(half).double(), "tma post", **tol)
    c = (g.double() @ w_down.double()).to(half).double()
    _close(dpre.double(), kernels.mlp_activation_grad(pre.double(), c, 0.5).to(half).double(), "tma d pre", **tol)


def case_mlp_fused_every_output() -> None:
    """Gradients reaching the whole-MLP op's kept outputs (pre and post) as well as out: its backward against fp64
    autograd of the unfused MLP (callers use out alone; the rest is for completeness)."""
    gen = torch.Generator().manual_seed(14)
    M, d, hidden = 37, 24, 64
    x = torch.randn(M, d, generator=gen) / math.sqrt(d)
    w_up, w_down = torch.randn(hidden, d, generator=gen), torch.randn(d, hidden, generator=gen) / math.sqrt(hidden)
    g_out, g_pre, g_post = torch.randn(M, d, generator=gen), torch.randn(M, hidden, generator=gen), torch.randn(
        M, hidden, generator=gen)
    leaves64 = [t.double().requires_grad_(True) for t in (x, w_up, w_down)]
    pre64 = leaves64[0] @ leaves64[1].T
    post64 = F.leaky_relu(pre64, 0.5).square()
    leaves = [t.clone().requires_grad_(True) for t in (x, w_up, w_down)]
    out, pre, post = torch.ops.pgolf.mlp_fused(*leaves, 0.5)
    loss = (out * g_out).sum() + (post * g_post).sum() + (pre * g_pre).sum()
    got = torch.autograd.grad(loss, leaves)
    loss64 = ((post64 @ leaves64[2].T) * g_out.double()).sum() + (post64 * g_post.double()).sum()
    want = torch.autograd.grad(loss64 + (pre64 * g_pre.double()).sum(), leaves64)
    for name, g, t in zip(("dx", "dw_up", "dw_down"), got, want):
        _close(g.double(), t, f"mlp_fused: {name}", **FP32)


def case_mlp_fused_opcheck() -> None:
    """Schema, fake (shape) functions and autograd registration of the whole-MLP op and its backward kernel."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(40, 16, generator=gen, requires_grad=True)
    w_up = torch.randn(64, 16, generator=gen, requires_grad=True)
    w_down = torch.randn(16, 64, generator=gen, requires_grad=True)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.pgolf.mlp_fused.default, (x, w_up, w_down, 0.5), test_utils=utils)
    pre = torch.randn(40, 64, generator=gen)
    torch.library.opcheck(torch.ops.pgolf.mlp_act_grad.default, (x.detach(), w_down.detach(), pre, 0.5), test_utils=utils)


def _qk_inputs(T: int, H: int, D: int, half: int, dtype: torch.dtype, seed: int):
    """x [T, H, D] (rows of different scales: the norm matters), cos/sin [T, 1, half] of row positions
    (the model's tables), gain [H] (fp32, like the q_gain parameter), a gradient [T, H, D]."""
    from pgolf.model.rope import rope_buffers

    gen = torch.Generator().manual_seed(seed)
    # (not near 0: the fp64 truth's norm takes float64's eps, the kernel and the model's path float32's)
    x = (torch.randn(T, H, D, generator=gen) * (0.25 + 4 * torch.rand(T, H, 1, generator=gen))).to(dtype)
    _, cos, sin = rope_buffers(2 * half, 10000.0, T)
    gain = torch.rand(H, generator=gen) + 0.5
    grad = torch.randn(T, H, D, generator=gen).to(dtype)
    return x, cos[:, None, :], sin[:, None, :], gain, grad


def _qk_case(dtype: torch.dtype, T: int, H: int, D: int, half: int, with_gain: bool) -> None:
    x, cos, sin, gain, grad = _qk_inputs(T, H, D, half, dtype, seed=T + H)
    xk = x.clone().requires_grad_(True)
    gk = gain.clone().requires_grad_(True) if with_gain else None
    out = attn_kernels.qk_norm_rope(xk, cos, sin, gk)
    grads = torch.autograd.grad(out, [xk] + ([gk] if with_gain else []), grad)
    x64 = x.double().requires_grad_(True)
    g64 = gain.double().requires_grad_(True) if with_gain else None
    truth = attn_kernels.qk_norm_rope_reference(x64, cos.double(), sin.double(), g64)
    truths = torch.autograd.grad(truth, [x64] + ([g64] if with_gain else []), grad.double())
    what = f"qk_norm_rope {dtype} T={T} H={H} D={D} half={half} gain={with_gain}"
    if out.dtype != dtype or grads[0].dtype != dtype:
        raise AssertionError(f"{what}: dtypes out {out.dtype}, dx {grads[0].dtype}; expected {dtype}")
    if dtype == torch.float32:
        _close(out.double(), truth, f"{what}: out")
        for name, g, t in zip(("dx", "dgain"), grads, truths):
            _close(g.double(), t, f"{what}: {name}", rtol=1e-5, atol=1e-5 * t.abs().max().item())
        return
    xr = x.clone().requires_grad_(True)  # the low-precision torch reference, the model's unfused path
    gr = gain.clone().requires_grad_(True) if with_gain else None
    ref = attn_kernels.qk_norm_rope_reference(xr, cos, sin, gr)
    refs = torch.autograd.grad(ref, [xr] + ([gr] if with_gain else []), grad)
    _no_worse(out, ref, truth, f"{what}: out")
    for name, g, r, t in zip(("dx", "dgain"), grads, refs, truths):
        _no_worse(g, r, t, f"{what}: {name}")


def case_qk_norm_rope_fp32() -> None:
    """The record's shapes (8 q heads, 4 kv heads of 64 dims, 2 x 8 rotated) and a small odd token count: the
    masked last program; with and without the gain (q and k)."""
    for T, H, with_gain in ((37, 8, True), (37, 4, False), (5, 8, True)):
        _qk_case(torch.float32, T, H, 64, 8, with_gain)
    _qk_case(torch.float32, 19, 2, 16, 4, True)  # another head size and rotated width
    _qk_case(torch.float32, 19, 1, 16, 8, True)  # every dim rotated, one head


def case_qk_norm_rope_bf16() -> None:
    for H, with_gain in ((8, True), (4, False)):
        _qk_case(torch.bfloat16, 29, H, 64, 8, with_gain)


def case_qk_norm_rope_opcheck() -> None:
    """Schema, fake (shape) functions and autograd registration of the q/k op and its backward."""
    x, cos, sin, gain, grad = _qk_inputs(21, 4, 16, 4, torch.float32, seed=4)
    cos2, sin2 = cos.reshape(21, 4), sin.reshape(21, 4)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    eps = float(torch.finfo(torch.float32).eps)
    for g in (gain.requires_grad_(True), None):
        torch.library.opcheck(torch.ops.pgolf.qk_norm_rope.default, (x.requires_grad_(True), cos2, sin2, g, eps),
                              test_utils=utils)
        _, rstd = torch.ops.pgolf.qk_norm_rope(x.detach(), cos2, sin2, None if g is None else g.detach(), eps)
        args = (grad, x.detach(), rstd, cos2, sin2, None if g is None else g.detach())
        torch.library.opcheck(torch.ops.pgolf.qk_norm_rope_backward.default, args, test_utils=utils)


def _qkv_case(dtype: torch.dtype, T: int, H: int, Hkv: int, D: int, half: int, used: str = "qkva",
              rep: int = 1) -> None:
    """The fused-projection op against the fp64 reference: q, k, v, the attention's v and the gradients of qkv and
    the gain. ``used``: which outputs the loss reads (q, k, v, a: the attention's v; the others get no gradient:
    the op's backward stands in zeros); ``rep``: copies of each k / v head (``train.repeat_kv_heads``)."""
    gen = torch.Generator().manual_seed(T * H + D + len(used) + rep)
    width = (H + 2 * Hkv) * D
    qkv = (torch.randn(T, width, generator=gen) * (0.25 + 4 * torch.rand(T, 1, generator=gen))).to(dtype)
    _, cos, sin, gain, _ = _qk_inputs(T, H, D, half, dtype, seed=T)
    shapes = [(T, H, D), (T, Hkv * rep, D), (T, Hkv, D), (T, Hkv * rep, D)]
    grads_out = [torch.randn(*shape, generator=gen).to(dtype) for shape in shapes]

    def run(fn, cast):
        x, g = cast(qkv).clone().requires_grad_(True), cast(gain).clone().requires_grad_(True)
        outs = fn(x, H, Hkv, cast(cos), cast(sin), g, rep)
        loss = sum((o * cast(w)).sum() for o, w, name in zip(outs, grads_out, "qkva") if name in used)
        return outs, torch.autograd.grad(loss, [x, g], allow_unused=True)

    what = f"qkv_norm_rope {dtype} T={T} H={H} Hkv={Hkv} D={D} half={half} used={used} rep={rep}"
    outs, grads = run(attn_kernels.qkv_norm_rope, lambda t: t)
    truths, truth_grads = run(attn_kernels.qkv_norm_rope_reference, lambda t: t.double())
    if "q" not in used:  # no gradient reaches the gain: the reference gives None, the op zeros or None
        grads, truth_grads = grads[:1], truth_grads[:1]
    if [tuple(o.shape) for o in outs] != shapes or outs[0].dtype != dtype:
        raise AssertionError(f"{what}: outputs {[(o.shape, o.dtype) for o in outs]}")
    if dtype == torch.float32:
        for name, o, t in zip("qkva", outs, truths):
            _close(o.double(), t.detach(), f"{what}: {name}")
        for name, g, t in zip(("dqkv", "dgain"), grads, truth_grads):
            _close(g.double(), t, f"{what}: {name}", rtol=1e-5, atol=1e-5 * t.abs().max().item())
        return
    refs, ref_grads = run(attn_kernels.qkv_norm_rope_reference, lambda t: t)
    for name, o, r, t in zip("qkva", outs, refs, truths):
        _no_worse(o, r, t.detach(), f"{what}: {name}")
    for name, g, r, t in zip(("dqkv", "dgain"), grads, ref_grads, truth_grads):
        _no_worse(g, r, t, f"{what}: {name}")


def case_qkv_norm_rope_fp32() -> None:
    """The record's shapes (8 q heads, 4 kv heads of 64 dims, 2 x 8 rotated) with a masked last program, smaller
    heads, and losses that read only some of the outputs."""
    _qkv_case(torch.float32, 37, 8, 4, 64, 8)
    _qkv_case(torch.float32, 5, 2, 1, 16, 4)
    _qkv_case(torch.float32, 1, 2, 1, 16, 4)  # one token: its v slice is contiguous, the output still a copy
    _qkv_case(torch.float32, 9, 2, 1, 16, 4, used="qv")
    _qkv_case(torch.float32, 9, 2, 1, 16, 4, used="k")


def case_qkv_norm_rope_repeat_fp32() -> None:
    """k and v heads repeated for their query heads (``train.repeat_kv_heads``): the record's 8 / 4 heads, a group
    of 4, one token, and losses that read only some outputs (k's copies alone; v alone; v's copies alone)."""
    _qkv_case(torch.float32, 37, 8, 4, 64, 8, rep=2)
    _qkv_case(torch.float32, 11, 4, 1, 16, 4, rep=4)
    _qkv_case(torch.float32, 1, 2, 1, 16, 4, rep=2)
    _qkv_case(torch.float32, 9, 2, 1, 16, 4, used="k", rep=2)
    _qkv_case(torch.float32, 9, 2, 1, 16, 4, used="qv", rep=2)
    _qkv_case(torch.float32, 9, 2, 1, 16, 4, used="a", rep=2)


def case_qkv_norm_rope_bf16() -> None:
    _qkv_case(torch.bfloat16, 29, 8, 4, 64, 8)
    _qkv_case(torch.bfloat16, 29, 8, 4, 64, 8, rep=2)


def case_qkv_norm_rope_opcheck() -> None:
    """Schema, fake (shape) functions and autograd registration of the fused-projection op and its backward, with
    one copy and two of each k / v head."""
    T, H, Hkv, D, half = 13, 2, 1, 16, 4
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=gen)
    _, cos, sin, gain, _ = _qk_inputs(T, H, D, half, torch.float32, seed=6)
    cos2, sin2 = cos.reshape(T, half), sin.reshape(T, half)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    eps = float(torch.finfo(torch.float32).eps)
    for rep in (1, 2):
        for g in (gain.clone().requires_grad_(True), None):
            torch.library.opcheck(torch.ops.pgolf.qkv_norm_rope.default,
                                  (qkv.clone().requires_grad_(True), H, Hkv, cos2, sin2, g, eps, rep),
                                  test_utils=utils)
            q, k, v, vc, rq, rk = torch.ops.pgolf.qkv_norm_rope(qkv, H, Hkv, cos2, sin2,
                                                                None if g is None else g.detach(), eps, rep)
            args = (torch.randn_like(q), torch.randn_like(k), torch.randn_like(v), torch.randn_like(vc), qkv, rq, rk,
                    cos2, sin2, None if g is None else g.detach())
            torch.library.opcheck(torch.ops.pgolf.qkv_norm_rope_backward.default, args, test_utils=utils)


def case_qkv_gemm_tiles() -> None:
    """The q, k, v matmul with the q/k kernels as its epilogue (attn_triton._qkv_gemm_kernel, one program per tile:
    the interpreter cannot run its persistent loop) against the fp64 product rounded to fp16 and then the fp64 q/k/v
    reference: one and two heads per tile, one and two copies of each k / v head, with the gain and without, a
    partial last row block; 2 x 4 of 16 dims rotated. fp16, as the interpreter's dot mishandles bf16."""
    from pgolf.model import attn_triton

    f16 = torch.float16
    T, K, H, Hkv, D, half = 70, 64, 4, 2, 16, 4
    gen = torch.Generator().manual_seed(12)
    x = (torch.randn(T, K, generator=gen) * (0.25 + 2 * torch.rand(T, 1, generator=gen))).to(f16)
    w = (torch.randn((H + 2 * Hkv) * D, K, generator=gen) / 8).to(f16)
    _, cos, sin, gain, _ = _qk_inputs(T, H, D, half, f16, seed=13)
    cos, sin, gain = cos.to(f16), sin.to(f16), gain.to(f16)  # the tables and the gain in the activations' dtype
    qkv = (x.double() @ w.double().T).to(f16)  # the product as an unfused matmul stores it
    tol = dict(rtol=2e-3, atol=2e-3)  # one fp16 rounding of the product apart at most (summation order)
    for per_tile, rep, g in ((1, 1, gain), (2, 2, None), (2, 1, gain), (1, 2, gain)):
        what = f"qkv gemm: {per_tile} heads per tile, rep {rep}, gain {g is not None}"
        q, k, v, v_copies, qk, rstd_q, rstd_k = attn_kernels._qkv_linear_outputs(x, w, H, Hkv, rep)
        for t in (q, k, v, v_copies, qk, rstd_q, rstd_k):
            t.fill_(float("nan"))  # every element must be written
        attn_triton.launch_qkv_gemm_norm_rope(x, w, cos.reshape(T, half), sin.reshape(T, half), g,
                                              attn_kernels.QK_EPS, qk, q, k, v, v_copies if rep > 1 else None,
                                              rstd_q, rstd_k, tile=(32, per_tile, 32, 4, 2, 0),
                                              bitwise_round=True)
        want = attn_kernels.qkv_norm_rope_reference(qkv.double(), H, Hkv, cos.double(), sin.double(),
                                                    None if g is None else g.double(), rep)
        for name, got, truth in zip(("q", "k", "v", "attention's v"), (q, k, v, v_copies if rep > 1 else v), want):
            _close(got.double(), truth, f"{what}: {name}", **tol)
        _close(qk.double(), qkv[:, : (H + Hkv) * D].double(), f"{what}: qk", **tol)
        # the copies are the same stored values: bit for bit, and v is the product's v columns as rounded there
        if rep > 1 and not (torch.equal(v_copies, v.repeat_interleave(rep, 1))
                            and torch.equal(k, k[:, ::rep].repeat_interleave(rep, 1))):
            raise AssertionError(f"{what}: the copies of k / v heads differ from each other")
        heads = qkv.double()[:, : (H + Hkv) * D].reshape(T, H + Hkv, D)
        rstd = 1 / torch.sqrt(heads.square().mean(-1) + attn_kernels.QK_EPS)  # [T, H + Hkv]
        _close(rstd_q.double(), rstd[:, :H].reshape(-1), f"{what}: rstd_q", **tol)
        _close(rstd_k.double(), rstd[:, H:].reshape(-1), f"{what}: rstd_k", **tol)


def case_qkv_linear_op_fp32() -> None:
    """pgolf::qkv_linear_norm_rope where the TMA kernel cannot run (the interpreter: the matmul, then the q/k
    kernels): q, k, v, the attention's v and the gradients of x, w and the gain against F.linear and the fp64
    reference, with one and two copies of each k / v head (its backward is the one the Hopper path uses); then
    opcheck of its schema, fake functions and autograd registration."""
    T, K, H, Hkv, D, half = 37, 24, 8, 4, 16, 4
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(T, K, generator=gen) * (0.25 + 2 * torch.rand(T, 1, generator=gen))
    w = torch.randn((H + 2 * Hkv) * D, K, generator=gen) / 4
    _, cos, sin, gain, _ = _qk_inputs(T, H, D, half, torch.float32, seed=15)
    cos2, sin2 = cos.reshape(T, half), sin.reshape(T, half)
    eps = attn_kernels.QK_EPS
    for rep in (1, 2):
        shapes = [(T, H, D), (T, Hkv * rep, D), (T, Hkv, D), (T, Hkv * rep, D)]
        weights = [torch.randn(*shape, generator=gen) for shape in shapes]

        def op(xx, ww, gg, *_):
            q, k, v, vc, _, _, _ = torch.ops.pgolf.qkv_linear_norm_rope(xx, ww, H, Hkv, cos2, sin2, gg, eps, rep)
            return q, k, v, (vc if rep > 1 else v)

        def reference(xx, ww, gg, cast):
            return attn_kernels.qkv_norm_rope_reference(xx @ ww.T, H, Hkv, cast(cos), cast(sin), gg, rep)

        def run(fn, cast):
            leaves = [cast(t).clone().requires_grad_(True) for t in (x, w, gain)]
            outs = fn(*leaves, cast)
            loss = sum((o * cast(g)).sum() for o, g in zip(outs, weights))
            return outs, torch.autograd.grad(loss, leaves)

        outs, grads = run(op, lambda t: t)
        truths, truth_grads = run(reference, lambda t: t.double())
        for name, o, t in zip("qkva", outs, truths):
            _close(o.double(), t.detach(), f"qkv linear op rep {rep}: {name}", rtol=1e-4, atol=1e-5)
        for name, g, t in zip(("dx", "dw", "dgain"), grads, truth_grads):
            _close(g.double(), t, f"qkv linear op rep {rep}: {name}", rtol=1e-4, atol=1e-4 * t.abs().max().item())
        utils = ("test_schema", "test_faketensor", "test_autograd_registration")
        for g in (gain.clone().requires_grad_(True), None):
            torch.library.opcheck(torch.ops.pgolf.qkv_linear_norm_rope.default,
                                  (x.clone().requires_grad_(True), w.clone().requires_grad_(True), H, Hkv, cos2,
                                   sin2, g, eps, rep), test_utils=utils)


def _xsa_case(dtype: torch.dtype, T: int, H: int, Hkv: int, D: int, with_xsa: bool, with_gate: bool) -> None:
    gen = torch.Generator().manual_seed(T * H + D)
    y = torch.randn(T, H, D, generator=gen).to(dtype)
    v = (torch.randn(T, Hkv, D, generator=gen) * (0.1 + 3 * torch.rand(T, Hkv, 1, generator=gen))).to(dtype)
    z = (2 * torch.randn(T, H, generator=gen)).to(dtype)
    grad = torch.randn(T, H, D, generator=gen).to(dtype)
    names = ["y"] + (["v"] if with_xsa else []) + (["z"] if with_gate else [])

    def run(fn, cast):
        leaves = {"y": cast(y), "v": cast(v), "z": cast(z)}
        leaves = {n: t.clone().requires_grad_(n in names) for n, t in leaves.items()}
        out = fn(leaves["y"], leaves["v"] if with_xsa else None, leaves["z"] if with_gate else None, 0.5)
        return out, torch.autograd.grad(out, [leaves[n] for n in names], cast(grad))

    what = f"xsa_gate {dtype} T={T} H={H} Hkv={Hkv} D={D} xsa={with_xsa} gate={with_gate}"
    out, grads = run(attn_kernels.xsa_gate, lambda t: t)
    truth, truths = run(attn_kernels.xsa_gate_reference, lambda t: t.double())
    if out.dtype != dtype or any(g.dtype != dtype for g in grads):
        raise AssertionError(f"{what}: dtypes out {out.dtype}, grads {[g.dtype for g in grads]}; expected {dtype}")
    if dtype == torch.float32:
        _close(out.double(), truth.detach(), f"{what}: out")
        for name, g, t in zip(names, grads, truths):
            _close(g.double(), t, f"{what}: d{name}", rtol=1e-5, atol=1e-5 * t.abs().max().item())
        return
    ref, refs = run(attn_kernels.xsa_gate_reference, lambda t: t)
    _no_worse(out, ref, truth.detach(), f"{what}: out")
    for name, g, r, t in zip(names, grads, refs, truths):
        _no_worse(g, r, t, f"{what}: d{name}")


def case_xsa_gate_fp32() -> None:
    """The record's shapes (8 query heads on 4 kv heads of 64 dims), a row count that leaves the last program
    partly masked (the interpreter's programs take 4 rows), XSA and the gate each on its own, and a 4-heads-per-kv-
    head group."""
    for xsa, gate in ((True, True), (True, False), (False, True)):
        _xsa_case(torch.float32, 13, 8, 4, 64, xsa, gate)  # 52 (token, kv head) rows: whole programs of 4
        _xsa_case(torch.float32, 7, 8, 2, 16, xsa, gate)  # 14 rows: a masked last program
    _xsa_case(torch.float32, 6, 8, 2, 16, True, True)


def case_xsa_gate_bf16() -> None:
    _xsa_case(torch.bfloat16, 11, 8, 4, 64, True, True)
    _xsa_case(torch.bfloat16, 11, 8, 1, 64, True, True)  # 11 rows: a masked last program


def case_xsa_gate_tiny_value_vectors() -> None:
    """Value vectors of norm below F.normalize's eps (1e-12): its clamp divides by eps instead, and the gradient
    has no radial part; a zero vector gives a zero unit vector."""
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(5, 2, 8, generator=gen)  # 5 rows: a masked last program
    v = torch.randn(5, 1, 8, generator=gen)
    v[1] = 0.0
    v[2] *= 1e-14
    leaves = [y.clone().requires_grad_(True), v.clone().requires_grad_(True)]
    ref_leaves = [t.double().requires_grad_(True) for t in (y, v)]
    out = attn_kernels.xsa_gate(*leaves, None, 1.0)
    ref = attn_kernels.xsa_gate_reference(*ref_leaves, None, 1.0)
    grad = torch.randn(5, 2, 8, generator=gen)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, ref_leaves, grad.double())
    _close(out.double(), ref.detach(), "tiny v: out")
    for name, g, t in zip(("dy", "dv"), got, want):
        _close(g.double(), t, f"tiny v: {name}", rtol=1e-5, atol=1e-5 * t.abs().max().item())


def case_attention_kernels_edges() -> None:
    """Tables that need a gradient take the reference (the kernel gives them none), and a layer with neither XSA
    nor a gate never calls the XSA + gate kernel."""
    x, cos, sin, gain, grad = _qk_inputs(9, 4, 16, 4, torch.float32, seed=3)
    cos = cos.clone().requires_grad_(True)
    attn_kernels.qk_norm_rope(x, cos, sin, gain).backward(grad)
    if cos.grad is None:
        raise AssertionError("rope tables that require grad got none")
    cfg = ModelConfig(vocab_size=300, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1, rope_dims=8,
                      xsa_last_n=1, attn_gate="none", loop_start=1, loop_end=1, loop_count=2,
                      parallel_residual_start=2)
    model = GPT(cfg, train_seq_len=16)
    attn_kernels.use_in_model(model, True, True)
    calls = []
    for block in model.blocks:
        block.attn.xsa_gate_kernel = lambda *a, _f=block.attn.xsa_gate_kernel: calls.append(1) or _f(*a)
    model(torch.randint(2, 300, (12,)), torch.randint(2, 300, (12,)))
    if len(calls) != 1:
        raise AssertionError(f"the XSA + gate kernel ran {len(calls)} times; one layer has XSA, none a gate")


def case_gate_linear() -> None:
    """The output gate's projection against F.linear in fp64, values and both gradients: x a column slice of a
    wider tensor (as the model passes it), token counts that fill the interpreter's programs of 8 and that leave
    the last one partly masked, a head count that is not a power of two; and its op registration."""
    gen = torch.Generator().manual_seed(13)
    for T, N, K in ((16, 8, 12), (13, 6, 12), (5, 8, 3)):
        wide = torch.randn(T, 32, generator=gen)
        w = torch.randn(N, K, generator=gen)
        grad = torch.randn(T, N, generator=gen)
        x = wide[:, :K].clone().requires_grad_(True)
        leaves = [wide.clone().requires_grad_(True), w.clone().requires_grad_(True)]
        out = attn_kernels.gate_linear(leaves[0][:, :K], leaves[1])
        got = torch.autograd.grad(out, leaves, grad)
        ref_leaves = [wide.double().requires_grad_(True), w.double().requires_grad_(True)]
        ref = F.linear(ref_leaves[0][:, :K], ref_leaves[1])
        want = torch.autograd.grad(ref, ref_leaves, grad.double())
        what = f"gate_linear T={T} N={N} K={K}"
        _close(out.double(), ref.detach(), f"{what}: z")
        for name, g, t in zip(("dx", "dw"), got, want):
            _close(g.double(), t, f"{what}: {name}", rtol=1e-5, atol=1e-5 * t.abs().max().item())
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.pgolf.gate_linear.default, (x, w.requires_grad_(True)), test_utils=utils)
    torch.library.opcheck(torch.ops.pgolf.gate_linear_backward.default, (grad, x.detach(), w.detach()),
                          test_utils=utils)


def case_xsa_gate_opcheck() -> None:
    gen = torch.Generator().manual_seed(8)
    y, grad = torch.randn(5, 4, 16, generator=gen), torch.randn(5, 4, 16, generator=gen)
    v, z = torch.randn(5, 2, 16, generator=gen), torch.randn(5, 4, generator=gen)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    for vv, zz in ((v, z), (None, z), (v, None)):
        args = (y.requires_grad_(True), vv if vv is None else vv.requires_grad_(True),
                zz if zz is None else zz.requires_grad_(True), 0.5)
        torch.library.opcheck(torch.ops.pgolf.xsa_gate.default, args, test_utils=utils)
        bargs = (grad, y.detach(), None if vv is None else vv.detach(), None if zz is None else zz.detach(), 0.5)
        torch.library.opcheck(torch.ops.pgolf.xsa_gate_backward.default, bargs, test_utils=utils)


def _ce_inputs(T: int, V: int, scale: float, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    z = (scale * torch.randn(T, V, generator=gen)).to(dtype)
    targets = torch.randint(0, V, (T,), generator=gen)
    targets[1] = -100
    targets[T - 2] = -100
    targets[0] = V - 1  # last column (in the partial block)
    return z, targets


def _ce_case(cap: float, dtype: torch.dtype, scale: float, tol: dict, seed: int = 3) -> None:
    T, V = 12, 300  # BLOCK_V is 256 in the interpreter: one full and one partial block per row
    z, targets = _ce_inputs(T, V, scale, dtype, seed)
    za = z.clone().requires_grad_(True)
    zr = z.double().requires_grad_(True)  # float64 truth from the same inputs
    nll = kernels.fused_softcapped_token_nll(za, targets, cap)
    ref = kernels.softcapped_token_nll_reference(zr, targets, cap)
    if nll.dtype != torch.float32:
        raise AssertionError(f"per-token NLL dtype {nll.dtype}, expected float32")
    _close(nll.double(), ref.detach(), "per-token NLL", **tol)
    if float(nll[1].detach()) != 0.0 or float(nll[T - 2].detach()) != 0.0:
        raise AssertionError("ignored targets must have NLL exactly 0")
    # a non-uniform upstream gradient checks the per-row scaling in the backward kernel
    weights = torch.linspace(0.5, 2.0, T)
    (gz,) = torch.autograd.grad((nll * weights).sum(), za)
    (rz,) = torch.autograd.grad((ref * weights.double()).sum(), zr)
    if gz.dtype != dtype:
        raise AssertionError(f"dz dtype {gz.dtype}, expected {dtype}")
    _close(gz.double(), rz, "dz", **tol)
    if bool(gz[1].abs().sum() != 0):
        raise AssertionError("ignored rows must get zero gradient")
    # mean reduction through the public entry point
    za.grad = None
    mean = kernels.softcapped_cross_entropy(za, targets, cap)
    _close(mean.double(), kernels.softcapped_cross_entropy_reference(zr, targets, cap).detach(), "mean CE", **tol)


def case_ce_fp32_capped() -> None:
    _ce_case(30.0, torch.float32, 20.0, FP32)


def case_ce_fp32_uncapped() -> None:
    _ce_case(0.0, torch.float32, 3.0, FP32)


def case_ce_bf16() -> None:
    _ce_case(30.0, torch.bfloat16, 20.0, dict(rtol=1e-2, atol=1e-2))


def case_ce_online_max_across_blocks() -> None:
    """Uncapped logits whose row maximum sits in the SECOND block: the running sum must be rescaled."""
    T, V = 6, 300
    z, targets = _ce_inputs(T, V, 1.0, torch.float32, 4)
    z[:, 280] = 80.0  # exp(80) overflows fp32 without the max subtraction
    z[:, 10] = 60.0
    za = z.clone().requires_grad_(True)
    nll = kernels.fused_softcapped_token_nll(za, targets, 0.0)
    ref = kernels.softcapped_token_nll_reference(z.double(), targets, 0.0)
    if not bool(torch.isfinite(nll).all()):
        raise AssertionError(f"non-finite NLL {nll}")
    _close(nll.double(), ref, "NLL with a late maximum")


def case_ce_all_ignored() -> None:
    z = torch.randn(5, 40, requires_grad=True)
    targets = torch.full((5,), -100)
    mean = kernels.softcapped_cross_entropy(z, targets, 30.0)
    ref = kernels.softcapped_cross_entropy_reference(z.detach(), targets, 30.0)
    if not (math.isnan(float(mean.detach())) and math.isnan(float(ref))):
        raise AssertionError(f"all-ignored mean: fused {float(mean)}, reference {float(ref)} (both should be NaN)")
    (g,) = torch.autograd.grad(kernels.fused_softcapped_token_nll(z, targets, 30.0).sum(), z)
    if bool(g.abs().sum() != 0):
        raise AssertionError("all-ignored rows must get zero gradient")


def case_ce_invalid_target_is_nan() -> None:
    z = torch.randn(4, 40)
    targets = torch.tensor([3, 40, -7, -100])  # valid, == V, negative (not -100), ignored
    nll = kernels.fused_softcapped_token_nll(z, targets, 30.0)
    if not (
        math.isfinite(float(nll[0]))
        and math.isnan(float(nll[1]))
        and math.isnan(float(nll[2]))
        and float(nll[3]) == 0.0
    ):
        raise AssertionError(f"expected [finite, nan, nan, 0], got {nll.tolist()}")


def _tiny_model(num_heads: int = 2, num_kv_heads: int = 1) -> GPT:
    cfg = ModelConfig(
        vocab_size=300,
        num_layers=3,
        model_dim=32,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        rope_dims=8,
        xsa_last_n=3,
        loop_start=1,
        loop_end=1,
        loop_count=2,
        parallel_residual_start=2,
    )
    torch.manual_seed(0)
    model = GPT(cfg, train_seq_len=16)
    with torch.no_grad():  # zero-initialized projections would hide the MLP from the loss
        for block in model.blocks:
            block.mlp.down.weight.normal_(0.0, 0.05)
            block.attn.o.weight.normal_(0.0, 0.05)
    return model


def _count_launches():
    """Count the launches of the gate's projection kernel and of the MLP up kernel (the launchers wrapped for the
    life of the worker process)."""
    import collections

    from pgolf.model import attn_triton

    counts = collections.Counter()
    gate_fwd, mlp_up = attn_triton.launch_gate_linear_fwd, tk.launch_mlp_up_act

    def gate(*args, **kwargs):
        counts["gate_linear"] += 1
        return gate_fwd(*args, **kwargs)

    def up(*args, **kwargs):
        counts["mlp_up"] += 1
        return mlp_up(*args, **kwargs)

    attn_triton.launch_gate_linear_fwd, tk.launch_mlp_up_act = gate, up
    return counts


def _fa4_reference_on_cpu() -> None:
    """pgolf's "fa4" backend on CPU: its ops with the attention tests' reference kernels, whose forward reads
    forward_kv (the heads once) as FA4's does."""
    import pgolf.model.attention as attn_mod
    from pgolf.model import flash4
    from test_attention_backends import _ref_bwd, _ref_fwd

    torch.library.register_kernel("pgolf_fa4::fwd", "cpu", _ref_fwd)
    torch.library.register_kernel("pgolf_fa4::bwd", "cpu", _ref_bwd)
    attn_mod._FA4 = flash4.attend


def case_model_fused_matches_reference() -> None:
    _fa4_reference_on_cpu()
    model = _tiny_model(num_heads=4, num_kv_heads=2)  # two kv heads: a view of the wrong copies would show
    model.looping = True
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 300, (24,), generator=gen)
    ids[0] = ids[13] = 1
    targets = torch.randint(2, 300, (24,), generator=gen)
    targets[7] = -100
    results = {}
    launches = _count_launches()
    # repeat: k / v heads per query head; gate: the gate's projection kernels (train.fused_gate_linear); the fa4
    # backend with repeated heads: its forward reads the heads once (a view of the copies: wrong heads would show)
    for fused, repeat_kv, gate, backend in ((False, False, False, "sdpa"), (True, False, False, "sdpa"),
                                           (True, True, True, "sdpa"), (True, True, True, "fa4")):
        model.use_fused_kernels = fused
        model.attn_backend = backend
        attn_kernels.use_in_model(model, fused, fused, fused, repeat_kv, gate)
        model.zero_grad(set_to_none=True)
        launches.clear()
        loss = model(ids, targets)
        loss.backward()
        if bool(launches["gate_linear"]) != gate or bool(launches["mlp_up"]) != fused:
            raise AssertionError(f"gate kernels {gate}, fused MLP {fused}, but the launches were {dict(launches)}")
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[fused, repeat_kv, backend] = (loss.detach(), grads)
    reference_loss, reference_grads = results.pop((False, False, "sdpa"))
    for (_, repeat_kv, _), (loss, grads) in results.items():
        _close(loss, reference_loss, f"loss (repeat_kv={repeat_kv})", rtol=1e-5, atol=1e-6)
        if grads.keys() != reference_grads.keys():
            raise AssertionError("fused and reference paths give gradients to different parameters")
        for name, g in reference_grads.items():
            _close(grads[name], g, f"grad {name} (repeat_kv={repeat_kv})", rtol=1e-4, atol=1e-6)


def case_model_attention_kernels_compile() -> None:
    """The model with the attention kernels attached (q, k, v as one matmul too), under torch.compile(fullgraph=True):
    no graph break (the kernels are module attributes the compiled forward calls), the eager loss."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = _tiny_model()
    model.looping = True
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(2, 300, (24,), generator=gen)
    ids[0] = ids[13] = 1
    targets = torch.randint(2, 300, (24,), generator=gen)
    for repeat_kv in (False, True):
        torch._dynamo.reset()
        attn_kernels.use_in_model(model, True, True, True, repeat_kv, True)
        breaks_before = sum(counters["graph_break"].values())
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, targets)
        compiled.backward()
        if sum(counters["graph_break"].values()) != breaks_before:
            raise AssertionError(f"graph breaks: {dict(counters['graph_break'])}")
        expected = {"qk_norm_rope": True, "xsa_gate": True, "gate_linear": True, "qkv_matmul": True, "qkv_epilogue": False,
                    "repeat_kv": repeat_kv}  # (no Hopper GPU here: the matmul, then the q/k/v op)
        if attn_kernels.used_in_model(model) != expected:
            raise AssertionError(f"kernels in use: {attn_kernels.used_in_model(model)}")
        _close(compiled.detach(), model(ids, targets).detach(), f"compiled loss, kernels on, repeat_kv={repeat_kv}")


def case_compile_fullgraph() -> None:
    """The custom ops inside torch.compile(fullgraph=True): no graph break, same values and grads as eager."""
    import torch._dynamo

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(20, 16, generator=gen)
    w1 = torch.randn(40, 16, generator=gen) / 4
    head = torch.randn(50, 40, generator=gen) / 6
    targets = torch.randint(0, 50, (20,), generator=gen)
    targets[3] = -100

    w2 = torch.randn(16, 40, generator=gen) / 6
    gain = torch.rand(4, generator=gen) + 0.5
    _, cos, sin, _, _ = _qk_inputs(20, 4, 4, 1, torch.float32, seed=6)

    def loss_fn(x, w1, w2, head, gain, targets):
        x = x + attn_kernels.qk_norm_rope(x.view(20, 4, 4), cos, sin, gain).view(20, 16)  # [20, 4 heads, 4]
        x = x + kernels.mlp(x, w1, w2, 0.5)  # [20, 16]: the whole-MLP op
        h = kernels.mlp_up_activation(x, w1, 0.5)  # [20, 40]
        return kernels.softcapped_cross_entropy(h @ head.t(), targets, 30.0)

    def run(fn):
        params = [t.clone().requires_grad_(True) for t in (x, w1, w2, head, gain)]
        loss = fn(*params, targets)
        return loss.detach(), torch.autograd.grad(loss, params)

    from torch._dynamo.utils import counters

    breaks_before = sum(counters["graph_break"].values())
    eager_loss, eager_grads = run(loss_fn)
    compiled_loss, compiled_grads = run(torch.compile(loss_fn, fullgraph=True, backend="aot_eager"))
    if sum(counters["graph_break"].values()) != breaks_before:
        raise AssertionError(f"graph breaks: {dict(counters['graph_break'])}")
    _close(compiled_loss, eager_loss, "compiled loss")
    for name, c, e in zip(("x", "w1", "w2", "head", "gain"), compiled_grads, eager_grads):
        _close(c, e, f"compiled grad {name}")


CASES = {name[len("case_") :]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


def main() -> int:
    torch.set_num_threads(1)  # tiny tensors; the test process beside this one uses the other core
    if not tk.is_interpreted():
        print(json.dumps({"__setup__": "TRITON_INTERPRET=1 was not in effect when triton was imported"}))
        return 1
    results = {}
    for name, fn in CASES.items():
        start = time.perf_counter()
        try:
            fn()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc(limit=4)
        print(f"{name}: {time.perf_counter() - start:.1f}s", file=sys.stderr)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
