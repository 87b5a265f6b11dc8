"""The LM head's matmul and the softcapped cross-entropy as one op (``train.fused_head_loss``), for training on CUDA.

Forward: z = h @ w^T [tokens, V]; one Triton pass over each row of z computes the loss term and writes dz = d loss /
d z, so the logits are read once (the separate kernels of :mod:`pgolf.model.triton_kernels` read them twice) and each
element's tanh and exp are computed once instead of twice. The op's backward is then the head's two matmuls, scaled by
the upstream gradient afterwards: exact when that is a power of two (1 / 8 micro-batches), since such a scale
commutes with every rounding. The same function as the separate path; the softmax's sum is taken over the whole row
in one block (p = e / sum e) instead of two online blocks, so the last float bits move.

Imported only where ``train.fused_head_loss`` is on (a bundle of a recipe with it off ships none of this) and where
triton imports.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import custom_op

from pgolf.model.kernels import IGNORE_INDEX, check_triton_device, softcapped_cross_entropy, use_triton
from pgolf.model.triton_kernels import _ce_grad, _ce_nll, _softcap


@triton.jit
def _softcap_ce_fused_kernel(
    z_ptr,  # [T, V] logits before the cap
    target_ptr,  # [T] int64
    scale_ptr,  # [] fp32: dLoss/dnll of every counted row (1 / the count of targets != -100 for a mean)
    nll_ptr,  # [T] fp32 out, as triton_kernels._softcap_ce_fwd_kernel's
    dz_ptr,  # [T, V] out, z's dtype: scale * (softmax(c) - onehot(target)) * dc/dz, 0 on ignored rows
    V: tl.constexpr,
    stride_zt,
    stride_dzt,
    cap,
    HAS_CAP: tl.constexpr,
    BLOCK_V: tl.constexpr,  # >= V: the whole row in registers
):
    # The forward and the backward of the loss in one pass: the row is read once, each element's tanh and exp are
    # computed once (triton_kernels' two loss kernels compute both twice), and p = e / sum(e) reuses the sum's
    # exponentials.
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_zt
    cols = tl.arange(0, BLOCK_V)
    ok = cols < V
    z = tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32)
    c, t = _softcap(z, cap, HAS_CAP)
    c = tl.where(ok, c, float("-inf"))
    row_max = tl.max(c, axis=0)
    e = tl.exp(c - row_max)  # 0 on the padding
    row_sum = tl.sum(e, axis=0)
    lse = row_max + tl.log(row_sum)

    target = tl.load(target_ptr + row)
    c_target = tl.sum(tl.where(cols == target, c, 0.0), axis=0)
    tl.store(nll_ptr + row, _ce_nll(lse, c_target, target, V))

    g = tl.where(target != -100, tl.load(scale_ptr), 0.0)
    d = _ce_grad(e * (1.0 / row_sum), t, cols, target, HAS_CAP)
    tl.store(dz_ptr + row * stride_dzt + cols, (g * d).to(dz_ptr.dtype.element_ty), mask=ok)


# The fused kernel's whole-row block: up to this many columns (V = 8,192 at the record's vocabulary: 32 fp32 values a
# thread with 8 warps); wider vocabularies take the separate kernels.
FUSED_CE_MAX_V = 16384
FUSED_CE_WARPS = 8


def launch_softcap_ce_fused(
    z: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, nll: torch.Tensor, dz: torch.Tensor, cap: float
) -> None:
    """nll [T] fp32 and dz [T, V] (z's dtype, row stride free) from z [T, V] contiguous, int64 targets [T] and the
    fp32 scalar ``scale`` (each counted row's dLoss/dnll)."""
    T, V = z.shape
    if V > FUSED_CE_MAX_V:
        raise ValueError(f"launch_softcap_ce_fused: V = {V} is over FUSED_CE_MAX_V = {FUSED_CE_MAX_V}")
    if T == 0:
        return
    _softcap_ce_fused_kernel[(T,)](
        z, targets, scale, nll, dz, V=V, stride_zt=z.stride(0), stride_dzt=dz.stride(0), cap=float(cap),
        HAS_CAP=cap > 0, BLOCK_V=triton.next_power_of_2(V), num_warps=FUSED_CE_WARPS if z.device.type == "cuda" else 1,
    )


@custom_op("pgolf::head_softcap_ce", mutates_args=())
def _head_ce_op(h: Tensor, w: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """(loss [] fp32, dz [T, V]) for h [T, d], w [V, d] of one dtype and int64 targets [T]: the logits z = h @ w^T,
    loss = the mean NLL of softmax(cap * tanh(z / cap)) over targets != -100, and dz = d loss / d z (an output only
    so that the backward can keep it: it is not differentiable)."""
    check_triton_device(h, "pgolf::head_softcap_ce")
    z = h @ w.t()  # [T, V]; freed when the op returns: the backward needs only dz
    count = (targets != IGNORE_INDEX).sum()
    nll = torch.empty((z.shape[0],), dtype=torch.float32, device=z.device)
    dz = torch.empty_like(z)
    launch_softcap_ce_fused(z, targets.contiguous(), 1.0 / count.float(), nll, dz, cap)
    return nll.sum() / count, dz


@_head_ce_op.register_fake
def _head_ce_fake(h: Tensor, w: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    return h.new_empty((), dtype=torch.float32), h.new_empty((h.shape[0], w.shape[0]))


def _head_ce_setup(ctx, inputs, output) -> None:
    h, w, _, _ = inputs
    ctx.save_for_backward(h, w, output[1])
    ctx.set_materialize_grads(False)


def _head_ce_backward(ctx, grad_loss: Optional[Tensor], grad_dz: Optional[Tensor]):
    """The upstream gradient multiplies the two products, not dz: [T, d] and [V, d] instead of [T, V]. Exact
    when it is a power of two (1 / accumulation steps for 8 micro-batches): then it commutes with every rounding."""
    if grad_dz is not None:
        raise NotImplementedError("pgolf::head_softcap_ce: its dz output is not differentiable")
    if grad_loss is None:
        return None, None, None, None
    h, w, dz = ctx.saved_tensors
    return (dz @ w) * grad_loss, (dz.t() @ h) * grad_loss, None, None  # dh [T, d], dw [V, d]


_head_ce_op.register_autograd(_head_ce_backward, setup_context=_head_ce_setup)
torch.library.register_autocast("pgolf::head_softcap_ce", "cuda", torch.bfloat16)


def head_softcapped_cross_entropy(h: Tensor, w: Tensor, targets: Tensor, cap: float) -> Tensor:
    """:func:`softcapped_cross_entropy` of the logits h @ w^T (h [T, d], w [V, d]), its backward's dz computed in the
    forward's pass over the logits (``pgolf::head_softcap_ce``) where Triton runs and V fits one block; elsewhere
    the separate matmul and loss kernels, and where no gradient is wanted (a validation loss under no_grad: dz would
    be written for nothing)."""
    wants_grad = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    if wants_grad and use_triton(h) and w.shape[0] <= FUSED_CE_MAX_V:
        if h.ndim != 2 or w.ndim != 2 or h.shape[1] != w.shape[1] or targets.shape != h.shape[:1]:
            raise ValueError(f"head cross-entropy: expected h [T, d], w [V, d] and targets [T], got {tuple(h.shape)}, "
                             f"{tuple(w.shape)} and {tuple(targets.shape)}")
        if not torch.is_autocast_enabled(h.device.type) and h.dtype != w.dtype:
            w = w.to(h.dtype)  # as TiedHead: a bf16-stored embedding on an fp32 stream
        loss, _ = torch.ops.pgolf.head_softcap_ce(h.contiguous(), w, targets.to(torch.int64), float(cap))
        return loss
    return softcapped_cross_entropy(F.linear(h, w), targets, cap)
