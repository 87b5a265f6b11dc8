"""The q/k RMSNorm + partial RoPE + q gain of an attention as one Triton kernel forward and one backward.

``qk_norm_rope(x, cos, sin, gain)`` = ``apply_partial_rope(rms_norm(x), cos, sin) * gain`` over the q or k heads
x [T, H, D] (``gain`` [H]: the q gain; None for k): what ``Attention.forward`` computes in its unfused path.
Compiled, inductor makes three strided passes of it (the norm's reduction, the 2 x 8 rotated dims, the 48 others)
and as many backward; the kernel (``pgolf.model.qk_triton``) reads each row once and writes it once, and its
backward reads the gradient and the input once (the gain's gradient as per-program partial sums, summed by
torch: deterministic). :func:`use_in_model` makes every attention of a GPT use it (``train.fused_qk_norm_rope``);
only callers that turn it on import this module, so a bundle whose recipe leaves it off ships none of it.

As in ``pgolf.model.kernels``: the Triton path is an opaque ``torch.library.custom_op`` with fake (shape)
functions and registered autograd, taken only for CUDA tensors (or under Triton's interpreter, which is how the
tests check it on CPU); anywhere else the function is the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pgolf.model.rope import apply_partial_rope

from pgolf.model.kernels import check_triton_device, use_triton

try:
    from pgolf.model import qk_triton as _qt
except Exception:  # ImportError without triton; a broken triton install raises other errors at import
    _qt = None

TRITON_AVAILABLE = _qt is not None


def qk_norm_rope_reference(x: Tensor, cos: Tensor, sin: Tensor, gain: Optional[Tensor]) -> Tensor:
    """``apply_partial_rope(rms_norm(x), cos, sin)``, times ``gain`` [H] per head when given: x [T, H, D], cos/sin
    [T, 1, r/2] -> [T, H, D] in x's dtype (the model's own path, as ``Attention.forward`` writes it)."""
    y = apply_partial_rope(F.rms_norm(x, (x.shape[-1],)).to(x.dtype), cos, sin)
    return y if gain is None else y * gain.to(y.dtype)[None, :, None]


if TRITON_AVAILABLE:
    from torch.library import custom_op

    @custom_op("pgolf::qk_norm_rope", mutates_args=())
    def _qk_norm_rope_op(x: Tensor, cos: Tensor, sin: Tensor, gain: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
        """(out [T, H, D] in x's dtype, rstd [T * H] fp32) for x [T, H, D], cos/sin [T, r/2], gain [H] or None."""
        check_triton_device(x, "pgolf::qk_norm_rope")
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        rstd = torch.empty((x.shape[0] * x.shape[1],), dtype=torch.float32, device=x.device)
        _qt.launch_qk_norm_rope_fwd(x.contiguous(), cos.contiguous(), sin.contiguous(), gain, out, rstd, eps)
        return out, rstd

    @_qk_norm_rope_op.register_fake
    def _qk_norm_rope_fake(x: Tensor, cos: Tensor, sin: Tensor, gain: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                x.new_empty((x.shape[0] * x.shape[1],), dtype=torch.float32))

    @custom_op("pgolf::qk_norm_rope_backward", mutates_args=())
    def _qk_norm_rope_backward_op(g: Tensor, x: Tensor, rstd: Tensor, cos: Tensor, sin: Tensor,
                                  gain: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """(dx [T, H, D] in x's dtype, d gain [H] in gain's dtype; [0] without a gain)."""
        check_triton_device(x, "pgolf::qk_norm_rope_backward")
        T, H, _ = x.shape
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        partial = None
        if gain is not None:
            partial = torch.empty((_qt.qk_norm_rope_programs(T * H, H, x.device), H), dtype=torch.float32,
                                  device=x.device)
        _qt.launch_qk_norm_rope_bwd(g.to(x.dtype).contiguous(), x.contiguous(), rstd, cos.contiguous(),
                                    sin.contiguous(), gain, dx, partial)
        dgain = x.new_empty((0,)) if partial is None else partial.sum(0).to(gain.dtype)
        return dx, dgain

    @_qk_norm_rope_backward_op.register_fake
    def _qk_norm_rope_backward_fake(g: Tensor, x: Tensor, rstd: Tensor, cos: Tensor, sin: Tensor,
                                    gain: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        dgain = x.new_empty((0,)) if gain is None else gain.new_empty(gain.shape)
        return torch.empty_like(x, memory_format=torch.contiguous_format), dgain

    def _qk_norm_rope_setup(ctx, inputs, output) -> None:
        x, cos, sin, gain, _ = inputs
        ctx.save_for_backward(x, output[1], cos, sin, gain)
        ctx.set_materialize_grads(False)

    def _qk_norm_rope_backward(ctx, grad_out: Optional[Tensor], grad_rstd: Optional[Tensor]):
        x, rstd, cos, sin, gain = ctx.saved_tensors
        if grad_rstd is not None:
            raise NotImplementedError("pgolf::qk_norm_rope: gradients through the rstd output are not supported")
        if grad_out is None:
            return None, None, None, None, None
        dx, dgain = torch.ops.pgolf.qk_norm_rope_backward(grad_out, x, rstd, cos, sin, gain)
        return dx, None, None, (dgain if gain is not None else None), None

    _qk_norm_rope_op.register_autograd(_qk_norm_rope_backward, setup_context=_qk_norm_rope_setup)


def qk_norm_rope_fusable(x: Tensor, cos: Tensor) -> bool:
    """The kernel's shape contract: power-of-two head dim and head count, rotated pairs inside the head, a
    half-width that is a power of two, floating activations of at most 4 bytes."""
    T, H, D = x.shape
    half = cos.shape[-1]
    def pow2(n: int) -> bool:
        return n >= 1 and n & (n - 1) == 0
    return (pow2(D) and pow2(H) and pow2(half) and 2 * half <= D and x.dtype in (torch.bfloat16, torch.float16,
            torch.float32) and cos.shape[0] == T)


def qk_norm_rope(x: Tensor, cos: Tensor, sin: Tensor, gain: Optional[Tensor]) -> Tensor:
    """:func:`qk_norm_rope_reference` (x [T, H, D], cos/sin [T, 1, r/2], gain [H] or None -> [T, H, D] in x's
    dtype), as one Triton kernel forward and backward where it can run, the reference elsewhere. The tables and
    the gain are cast to x's dtype first, as the reference does; the norm's eps is the reference's (float32's)."""
    if not (use_triton(x) and qk_norm_rope_fusable(x, cos)):
        return qk_norm_rope_reference(x, cos, sin, gain)
    T, half = x.shape[0], cos.shape[-1]
    cos2, sin2 = cos.to(x.dtype).reshape(T, half), sin.to(x.dtype).reshape(T, half)
    gain = None if gain is None else gain.to(x.dtype)
    out, _ = torch.ops.pgolf.qk_norm_rope(x, cos2, sin2, gain, float(torch.finfo(torch.float32).eps))
    return out


def use_in_model(model, on: bool = True) -> None:
    """Make every attention of ``model`` (a GPT) compute its q/k norm, RoPE and q gain with :func:`qk_norm_rope`
    (``on``), or with its own unfused code again; runtime state, like ``GPT.use_fused_kernels``."""
    for block in model.blocks:
        block.attn.qk_kernel = qk_norm_rope if on else None


def used_in_model(model) -> bool:
    return any(block.attn.qk_kernel is not None for block in model.blocks)
