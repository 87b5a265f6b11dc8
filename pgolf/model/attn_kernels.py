"""Two elementwise stretches of every attention as Triton kernels, forward and backward, beside their references.

1. ``qk_norm_rope(x, cos, sin, gain)`` = ``apply_partial_rope(rms_norm(x), cos, sin) * gain`` over the q or k
   heads x [T, H, D] (``gain`` [H]: the q gain; None for k). Compiled, inductor makes three strided passes of it
   (the norm's reduction, the 2 x 8 rotated dims, the 48 others) and as many backward; the kernel reads each row
   once and writes it once, and its backward reads the gradient and the input once (the gain's gradient as
   per-program partial sums, summed by torch: deterministic). ``train.fused_qk_norm_rope``.
2. ``xsa_gate(y, v, z, scale)`` = XSA (``exclusive_self_attention(y, v)``; skipped when v is None) then the output
   gate ``* sigmoid(scale * z)`` (skipped when z is None) over the attention's output y [T, H, D]. Under
   autocast the model's XSA runs in fp32 (its unit vectors are fp32) and writes an fp32 [T, H, D] tensor that the
   output projection casts back to bf16; the kernel keeps fp32 inside and writes y's dtype once, the value the
   projection would have cast. Inductor spends four kernels on it, forward and backward (about 40 ms a step on an
   H100); the backward here reads the gradient, y, v and z once. ``train.fused_xsa_gate``.

What the model computes does not change: the kernels take the unfused path's inputs, compute in fp32 and round
once. (Third, on Hopper: the q, k, v matmul with the first stretch as its epilogue, ``qkv_linear_norm_rope``
below; it rounds the product first as the matmul does, but sums the products in Triton's order, not cuBLAS's.)
:func:`use_in_model` makes every attention of a GPT use them; only callers that turn them on import this
module, so a bundle whose recipe leaves both off ships none of it. As in ``pgolf.model.kernels``: the Triton
paths are opaque ``torch.library.custom_op`` ops with fake (shape) functions and registered autograd, taken only
for CUDA tensors (or under Triton's interpreter, which is how the tests check them on CPU); anywhere else each
function is its reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pgolf.model.layers import exclusive_self_attention
from pgolf.model.kernels import check_triton_device, use_triton
from pgolf.model.rope import apply_partial_rope

try:
    from pgolf.model import attn_triton as _qt
except Exception:  # ImportError without triton; a broken triton install raises other errors at import
    _qt = None

TRITON_AVAILABLE = _qt is not None


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


MAX_KERNEL_ELEMENTS = 2**31  # the kernels index their contiguous tensors with 32-bit offsets


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
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        return dx, _qk_backward(g, x.contiguous(), rstd, cos.contiguous(), sin.contiguous(), gain, dx)

    @_qk_norm_rope_backward_op.register_fake
    def _qk_norm_rope_backward_fake(g: Tensor, x: Tensor, rstd: Tensor, cos: Tensor, sin: Tensor,
                                    gain: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        dgain = x.new_empty((0,)) if gain is None else gain.new_empty(gain.shape)
        return torch.empty_like(x, memory_format=torch.contiguous_format), dgain

    def _qk_backward(g: Tensor, x: Tensor, rstd: Tensor, cos: Tensor, sin: Tensor, gain: Optional[Tensor],
                     dx: Tensor, gv: Optional[Tensor] = None, gv_copies: Optional[Tensor] = None,
                     dv: Optional[Tensor] = None) -> Tensor:
        """Launch the q/k backward kernel (x, dx, dv may be column slices; with gv it also writes dv, see
        :func:`pgolf.model.attn_triton.launch_qk_norm_rope_bwd`); returns d gain ([0] without a gain), summed from
        the programs' partial sums."""
        T, H, _ = x.shape
        partial = None
        if gain is not None:
            partial = torch.empty((H, _qt.qk_norm_rope_programs(T * H, H, x.device)), dtype=torch.float32,
                                  device=x.device)
        as_x = lambda t: None if t is None else t.to(x.dtype).contiguous()  # noqa: E731
        _qt.launch_qk_norm_rope_bwd(as_x(g), x, rstd, cos, sin, gain, dx, partial, as_x(gv), as_x(gv_copies), dv)
        return x.new_empty((0,)) if partial is None else partial.sum(1).to(gain.dtype)

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


def qk_norm_rope_fusable(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """The kernel's shape contract: power-of-two head dim and head count, rotated pairs inside the head, a
    half-width that is a power of two, floating activations of at most 4 bytes, fewer than 2^31 elements; and
    tables that need no gradient (the kernel gives them none: the model's are buffers)."""
    return _qk_fusable(*x.shape, x.dtype, cos, sin)


def _qk_fusable(T: int, H: int, D: int, dtype: torch.dtype, cos: Tensor, sin: Tensor) -> bool:
    half = cos.shape[-1]
    return (_pow2(D) and _pow2(H) and _pow2(half) and 2 * half <= D and dtype in (torch.bfloat16, torch.float16,
            torch.float32) and cos.shape[0] == T and not (cos.requires_grad or sin.requires_grad)
            and T * H * D < MAX_KERNEL_ELEMENTS)


def _qkv_fusable(T: int, H: int, Hkv: int, D: int, dtype: torch.dtype, cos: Tensor, sin: Tensor,
                 kv_repeat: int) -> bool:
    """The q/k/v ops' shape contract: the q/k kernel's, a power-of-two kv head count, and k's copies under 2^31
    elements."""
    return _qk_fusable(T, H, D, dtype, cos, sin) and _pow2(Hkv) and T * Hkv * kv_repeat * D < MAX_KERNEL_ELEMENTS


QK_EPS = float(torch.finfo(torch.float32).eps)  # the reference norm's (float32's)


def _kernel_tables(cos: Tensor, sin: Tensor, gain: Optional[Tensor],
                   dtype: torch.dtype) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """cos / sin [T, 1, r/2] -> [T, r/2] and the gain, in the activations' dtype, as the reference casts them."""
    T, half = cos.shape[0], cos.shape[-1]
    return (cos.to(dtype).reshape(T, half), sin.to(dtype).reshape(T, half),
            None if gain is None else gain.to(dtype))


def qk_norm_rope(x: Tensor, cos: Tensor, sin: Tensor, gain: Optional[Tensor]) -> Tensor:
    """:func:`qk_norm_rope_reference` (x [T, H, D], cos/sin [T, 1, r/2], gain [H] or None -> [T, H, D] in x's
    dtype), as one Triton kernel forward and backward where it can run, the reference elsewhere. The tables and
    the gain are cast to x's dtype first, as the reference does; the norm's eps is the reference's (float32's)."""
    if not (use_triton(x) and qk_norm_rope_fusable(x, cos, sin)):
        return qk_norm_rope_reference(x, cos, sin, gain)
    out, _ = torch.ops.pgolf.qk_norm_rope(x, *_kernel_tables(cos, sin, gain, x.dtype), QK_EPS)
    return out


# ------------------------------------------------------------------- the q, k, v projections as one matmul
#
# ``qkv_norm_rope(qkv, H, Hkv, cos, sin, gain)`` takes the output of ONE matmul of the attention's input with the
# stacked q, k, v weights, qkv [T, (H + 2 Hkv) D], and returns (qk_norm_rope of its q heads with the gain, of its
# k heads, its v heads, the v heads the attention reads) as [T, H, D], [T, Hkv, D], [T, Hkv, D], and the v heads
# again. Why one op: the q and k kernels read their heads straight out of qkv (a column slice each), and the
# backward writes the gradients of q, k and v into one [T, (H + 2 Hkv) D] tensor, the input of ONE backward
# matmul; split into three ops, autograd would concatenate them in an extra pass, and the forward would copy q and
# k out of qkv before the kernels.
#
# ``kv_repeat`` r > 1 (``train.repeat_kv_heads``): the k heads come out repeated for their query heads, [T, Hkv r,
# D] (head h of the attention reads kv head h // r, the GQA convention), and the attention's v as a repeated copy
# [T, Hkv r, D] beside the plain v heads (XSA reads those). The attention kernel then runs without GQA. Why:
# FlashAttention 4's GQA backward on Hopper accumulates dK and dV in fp32 scratch (zero-filled, atomically added
# to, converted by a postprocess pass), which costs more than the copies; the k kernel writes its copies in the
# same pass, and the backward sums the copies' gradients in the passes that read them anyway.


def qkv_norm_rope_reference(qkv: Tensor, num_heads: int, num_kv_heads: int, cos: Tensor, sin: Tensor,
                            gain: Optional[Tensor], kv_repeat: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """qkv [T, (H + 2 Hkv) D] -> (q [T, H, D], k [T, Hkv r, D], v [T, Hkv, D], v for the attention [T, Hkv r,
    D]): q and k through :func:`qk_norm_rope_reference` (the gain on q only), v as it is; r = ``kv_repeat`` copies
    of each k and v head, next to each other."""
    q, k, v = _heads(qkv, num_heads, num_kv_heads)
    q, k = qk_norm_rope_reference(q, cos, sin, gain), qk_norm_rope_reference(k, cos, sin, None)
    if kv_repeat == 1:
        return q, k, v, v
    return q, k.repeat_interleave(kv_repeat, dim=1), v, v.repeat_interleave(kv_repeat, dim=1)


def _heads(qkv: Tensor, num_heads: int, num_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[T, H, D], [T, Hkv, D], [T, Hkv, D] of the columns of qkv [T, (H + 2 Hkv) D] (or of its gradient): views
    when qkv is contiguous, as the op makes it."""
    T = qkv.shape[0]
    D = qkv.shape[1] // (num_heads + 2 * num_kv_heads)
    q, k, v = qkv.split([num_heads * D, num_kv_heads * D, num_kv_heads * D], dim=1)
    return q.reshape(T, num_heads, D), k.reshape(T, num_kv_heads, D), v.reshape(T, num_kv_heads, D)


def _qk_heads(qk: Tensor, num_heads: int, num_kv_heads: int, D: int) -> tuple[Tensor, Tensor]:
    """[T, H, D], [T, Hkv, D] views of the first (H + Hkv) D columns of qk (a q, k, v product, or its q and k)."""
    return (qk[:, : num_heads * D].unflatten(1, (num_heads, D)),
            qk[:, num_heads * D : (num_heads + num_kv_heads) * D].unflatten(1, (num_kv_heads, D)))


def _qkv_outputs(like: Tensor, num_heads: int, num_kv_heads: int, D: int,
                 kv_repeat: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Empty q [T, H, D], k [T, Hkv r, D], v [T, Hkv, D], v's copies [T, Hkv r, D] ([0] when r = 1), rstd_q [T H]
    and rstd_k [T Hkv] (fp32): the outputs of both q/k/v ops (T = like's rows, like's dtype and device)."""
    T = like.shape[0]
    copies = (T, num_kv_heads * kv_repeat, D)
    rstd = lambda heads: like.new_empty((T * heads,), dtype=torch.float32)  # noqa: E731
    return (like.new_empty((T, num_heads, D)), like.new_empty(copies), like.new_empty((T, num_kv_heads, D)),
            like.new_empty(copies if kv_repeat > 1 else (0,)), rstd(num_heads), rstd(num_kv_heads))


def _launch_qkv_kernels(qkv: Tensor, num_heads: int, num_kv_heads: int, cos: Tensor, sin: Tensor,
                        gain: Optional[Tensor], eps: float, q: Tensor, k: Tensor, v: Tensor, v_copies: Tensor,
                        rstd_q: Tensor, rstd_k: Tensor) -> None:
    """The q kernel and the k kernel (which also copies v's rows, and their repeats, in the same pass) over the heads
    of a contiguous product qkv [T, (H + 2 Hkv) D], into the outputs of pgolf::qkv_norm_rope."""
    xq, xk, xv = _heads(qkv, num_heads, num_kv_heads)
    _qt.launch_qk_norm_rope_fwd(xq, cos, sin, gain, q, rstd_q, eps)
    _qt.launch_qk_norm_rope_fwd(xk, cos, sin, None, k, rstd_k, eps, xv, v, v_copies if v_copies.numel() else None)


def _qkv_backward(heads: tuple[int, int, int], D: int, grads: tuple, saved: Tensor, rstd_q: Tensor, rstd_k: Tensor,
                  cos: Tensor, sin: Tensor, gain: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """pgolf::qkv_norm_rope_backward for the autograd of both q/k/v ops, with zeros for the outputs that got no
    gradient. heads: (H, Hkv, r); grads: those of (q, k's copies, v, v's copies); saved: the forward's product (or
    its q and k columns)."""
    num_heads, num_kv_heads, kv_repeat = heads
    gq, gk, gv, gv_copies = grads
    T = saved.shape[0]
    zeros = lambda *shape: saved.new_zeros(shape)  # noqa: E731
    gq = zeros(T, num_heads, D) if gq is None else gq
    gk = zeros(T, num_kv_heads * kv_repeat, D) if gk is None else gk
    gv = zeros(T, num_kv_heads, D) if gv is None else gv
    if kv_repeat == 1:
        gv_copies = saved.new_empty((0,))
    elif gv_copies is None:
        gv_copies = zeros(T, num_kv_heads * kv_repeat, D)
    return torch.ops.pgolf.qkv_norm_rope_backward(gq, gk, gv, gv_copies, saved, rstd_q, rstd_k, cos, sin, gain)


if TRITON_AVAILABLE:

    @custom_op("pgolf::qkv_norm_rope", mutates_args=())
    def _qkv_norm_rope_op(qkv: Tensor, num_heads: int, num_kv_heads: int, cos: Tensor, sin: Tensor,
                          gain: Optional[Tensor], eps: float,
                          kv_repeat: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(q [T, H, D], k [T, Hkv r, D], v [T, Hkv, D], v's copies [T, Hkv r, D] ([0] when r = 1), rstd_q
        [T * H] fp32, rstd_k [T * Hkv] fp32); qkv contiguous [T, (H + 2 Hkv) D], r = kv_repeat."""
        check_triton_device(qkv, "pgolf::qkv_norm_rope")
        qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
        # v among them: a copy even where the slice is already contiguous (one token): an op's output may not alias
        # its input
        outs = _qkv_outputs(qkv, num_heads, num_kv_heads, qkv.shape[1] // (num_heads + 2 * num_kv_heads), kv_repeat)
        _launch_qkv_kernels(qkv, num_heads, num_kv_heads, cos, sin, gain, eps, *outs)
        return outs

    @_qkv_norm_rope_op.register_fake
    def _qkv_norm_rope_fake(qkv: Tensor, num_heads: int, num_kv_heads: int, cos: Tensor, sin: Tensor,
                            gain: Optional[Tensor], eps: float,
                            kv_repeat: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return _qkv_outputs(qkv, num_heads, num_kv_heads, qkv.shape[1] // (num_heads + 2 * num_kv_heads), kv_repeat)

    @custom_op("pgolf::qkv_norm_rope_backward", mutates_args=())
    def _qkv_norm_rope_backward_op(gq: Tensor, gk: Tensor, gv: Tensor, gv_copies: Tensor, qkv: Tensor,
                                   rstd_q: Tensor, rstd_k: Tensor, cos: Tensor, sin: Tensor,
                                   gain: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """(d qkv [T, (H + 2 Hkv) D] in qkv's dtype, d gain [H] in gain's dtype; [0] without a gain). gk [T, Hkv r,
        D]: the gradient of k's copies; gv_copies [T, Hkv r, D] that of v's copies ([0] when r = 1). qkv: the
        forward's product, [T, (H + 2 Hkv) D] or its q and k columns alone, [T, (H + Hkv) D] (v's are not read)."""
        check_triton_device(qkv, "pgolf::qkv_norm_rope_backward")
        (T, num_heads, D), num_kv_heads = gq.shape, gv.shape[1]
        qkv = qkv.contiguous()
        dqkv = qkv.new_empty((T, (num_heads + 2 * num_kv_heads) * D))
        xq, xk = _qk_heads(qkv, num_heads, num_kv_heads, D)
        dq, dk, dv = _heads(dqkv, num_heads, num_kv_heads)
        cos, sin = cos.contiguous(), sin.contiguous()
        dgain = _qk_backward(gq, xq, rstd_q, cos, sin, gain, dq)
        # the k kernel writes dv (gv plus the sum of its copies' gradients) in the same pass
        _qk_backward(gk, xk, rstd_k, cos, sin, None, dk, gv, gv_copies if gv_copies.numel() else None, dv)
        return dqkv, dgain

    @_qkv_norm_rope_backward_op.register_fake
    def _qkv_norm_rope_backward_fake(gq: Tensor, gk: Tensor, gv: Tensor, gv_copies: Tensor, qkv: Tensor,
                                     rstd_q: Tensor, rstd_k: Tensor, cos: Tensor, sin: Tensor,
                                     gain: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        dgain = qkv.new_empty((0,)) if gain is None else gain.new_empty(gain.shape)
        (T, num_heads, D), num_kv_heads = gq.shape, gv.shape[1]
        return qkv.new_empty((T, (num_heads + 2 * num_kv_heads) * D)), dgain

    def _qkv_norm_rope_setup(ctx, inputs, output) -> None:
        qkv, heads, kv_heads, cos, sin, gain, _, kv_repeat = inputs
        ctx.save_for_backward(qkv, output[4], output[5], cos, sin, gain)
        ctx.heads = (heads, kv_heads, kv_repeat)
        ctx.set_materialize_grads(False)

    def _qkv_norm_rope_backward(ctx, gq, gk, gv, gv_copies, grad_rstd_q, grad_rstd_k):
        qkv, rstd_q, rstd_k, cos, sin, gain = ctx.saved_tensors
        if grad_rstd_q is not None or grad_rstd_k is not None:
            raise NotImplementedError("pgolf::qkv_norm_rope: gradients through the rstd outputs are not supported")
        nothing = (None,) * 8
        if gq is None and gk is None and gv is None and gv_copies is None:
            return nothing
        heads, kv_heads, _ = ctx.heads
        D = qkv.shape[1] // (heads + 2 * kv_heads)
        dqkv, dgain = _qkv_backward(ctx.heads, D, (gq, gk, gv, gv_copies), qkv, rstd_q, rstd_k, cos, sin, gain)
        return dqkv, None, None, None, None, (dgain if gain is not None else None), None, None

    _qkv_norm_rope_op.register_autograd(_qkv_norm_rope_backward, setup_context=_qkv_norm_rope_setup)


def qkv_norm_rope(qkv: Tensor, num_heads: int, num_kv_heads: int, cos: Tensor, sin: Tensor,
                  gain: Optional[Tensor], kv_repeat: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`qkv_norm_rope_reference` with the q and k stretches as the Triton kernels of :func:`qk_norm_rope`
    reading their heads out of qkv, and one backward writing d qkv, where they can run; the reference elsewhere.
    Returns (q, k, v, the attention's v): the last is v itself when ``kv_repeat`` is 1."""
    T = qkv.shape[0]
    D = qkv.shape[1] // (num_heads + 2 * num_kv_heads)
    if kv_repeat < 1:
        raise ValueError(f"qkv_norm_rope: kv_repeat must be >= 1, got {kv_repeat}")
    if not (use_triton(qkv) and _qkv_fusable(T, num_heads, num_kv_heads, D, qkv.dtype, cos, sin, kv_repeat)):
        return qkv_norm_rope_reference(qkv, num_heads, num_kv_heads, cos, sin, gain, kv_repeat)
    cos2, sin2, gain = _kernel_tables(cos, sin, gain, qkv.dtype)
    q, k, v, v_copies, _, _ = torch.ops.pgolf.qkv_norm_rope(qkv, num_heads, num_kv_heads, cos2, sin2, gain, QK_EPS,
                                                            kv_repeat)
    return q, k, v, (v if kv_repeat == 1 else v_copies)


# ------------------------------------------- the q, k, v matmul itself with the q/k kernels as its epilogue
#
# ``qkv_linear_norm_rope(x, w, ...)`` = ``qkv_norm_rope(F.linear(x, w), ...)``. On Hopper it is one Triton kernel
# (attn_triton._qkv_gemm_kernel): the matmul whose epilogue norms, rotates and copies the heads, so the [T, (H + 2
# Hkv) D] product is not written and read back whole; only its q and k columns are written, for the backward, which
# is pgolf::qkv_norm_rope_backward and the two matmuls of a linear layer. :func:`use_in_model` attaches it where
# that kernel runs (:func:`qkv_epilogue_available`), and :func:`qkv_linear_then_norm_rope` (F.linear, then
# :func:`qkv_norm_rope`) elsewhere; fp32 activations and shapes the kernels do not take go that way too. The same
# function: the kernel rounds the product to the activations' dtype before the norm, as the matmul's output is;
# what differs is the order in which the products are summed (Triton's tiles, not cuBLAS's).

if TRITON_AVAILABLE:

    @custom_op("pgolf::qkv_linear_norm_rope", mutates_args=())
    def _qkv_linear_op(x: Tensor, w: Tensor, num_heads: int, num_kv_heads: int, cos: Tensor, sin: Tensor,
                       gain: Optional[Tensor], eps: float,
                       kv_repeat: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(q, k, v, v's copies, rstd_q, rstd_k as pgolf::qkv_norm_rope returns them, and qk [T, (H + Hkv) D]: the
        product's q and k columns) for x [T, K] and w [(H + 2 Hkv) D, K] of one 16-bit dtype."""
        check_triton_device(x, "pgolf::qkv_linear_norm_rope")
        q, k, v, v_copies, qk, rstd_q, rstd_k = _qkv_linear_outputs(x, w, num_heads, num_kv_heads, kv_repeat)
        x, w, cos, sin = x.contiguous(), w.contiguous(), cos.contiguous(), sin.contiguous()
        if _qt.qkv_gemm_usable(x, w, num_heads, num_kv_heads):
            _qt.launch_qkv_gemm_norm_rope(x, w, cos, sin, gain, eps, qk, q, k, v,
                                          v_copies if kv_repeat > 1 else None, rstd_q, rstd_k)
        else:  # no TMA (unaligned rows, the interpreter): the matmul, then the q/k kernels and a copy of the q and k
            # columns (a strided copy: ~17 ms a step on an H100; use_in_model attaches this op only where the TMA
            # kernel runs, and qkv_linear_then_norm_rope elsewhere)
            qkv = x @ w.t()  # [T, (H + 2 Hkv) D]
            _launch_qkv_kernels(qkv, num_heads, num_kv_heads, cos, sin, gain, eps, q, k, v, v_copies, rstd_q, rstd_k)
            qk.copy_(qkv[:, : qk.shape[1]])
        return q, k, v, v_copies, rstd_q, rstd_k, qk

    @_qkv_linear_op.register_fake
    def _qkv_linear_fake(x: Tensor, w: Tensor, num_heads: int, num_kv_heads: int, cos: Tensor, sin: Tensor,
                         gain: Optional[Tensor], eps: float,
                         kv_repeat: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        q, k, v, v_copies, qk, rstd_q, rstd_k = _qkv_linear_outputs(x, w, num_heads, num_kv_heads, kv_repeat)
        return q, k, v, v_copies, rstd_q, rstd_k, qk

    def _qkv_linear_setup(ctx, inputs, output) -> None:
        x, w, heads, kv_heads, cos, sin, gain, _, kv_repeat = inputs
        ctx.save_for_backward(x, w, output[6], output[4], output[5], cos, sin, gain)
        ctx.heads = (heads, kv_heads, kv_repeat)
        ctx.set_materialize_grads(False)

    def _qkv_linear_backward(ctx, gq, gk, gv, gv_copies, grad_rstd_q, grad_rstd_k, grad_qk):
        x, w, qk, rstd_q, rstd_k, cos, sin, gain = ctx.saved_tensors
        if grad_rstd_q is not None or grad_rstd_k is not None or grad_qk is not None:
            raise NotImplementedError("pgolf::qkv_linear_norm_rope: gradients through rstd or qk are not supported")
        if gq is None and gk is None and gv is None and gv_copies is None:
            return (None,) * 9
        heads, kv_heads, _ = ctx.heads
        D = w.shape[0] // (heads + 2 * kv_heads)
        dqkv, dgain = _qkv_backward(ctx.heads, D, (gq, gk, gv, gv_copies), qk, rstd_q, rstd_k, cos, sin, gain)
        # the linear layer's two matmuls: dx [T, K], dw [(H + 2 Hkv) D, K]
        return (dqkv @ w, dqkv.t() @ x, None, None, None, None, (dgain if gain is not None else None), None,
                None)

    _qkv_linear_op.register_autograd(_qkv_linear_backward, setup_context=_qkv_linear_setup)


def _qkv_linear_outputs(x: Tensor, w: Tensor, num_heads: int, num_kv_heads: int,
                        kv_repeat: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`_qkv_outputs` and qk [T, (H + Hkv) D] for x [T, K], w [(H + 2 Hkv) D, K], in the kernel's order."""
    D = w.shape[0] // (num_heads + 2 * num_kv_heads)
    q, k, v, v_copies, rstd_q, rstd_k = _qkv_outputs(x, num_heads, num_kv_heads, D, kv_repeat)
    return q, k, v, v_copies, x.new_empty((x.shape[0], (num_heads + num_kv_heads) * D)), rstd_q, rstd_k


def qkv_linear_norm_rope(x: Tensor, w: Tensor, num_heads: int, num_kv_heads: int, cos: Tensor, sin: Tensor,
                         gain: Optional[Tensor], kv_repeat: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`qkv_norm_rope` of ``F.linear(x, w)`` (x [T, K], w [(H + 2 Hkv) D, K]; under autocast both in its
    dtype, as F.linear takes them): pgolf::qkv_linear_norm_rope for 16-bit activations where the Triton kernels
    run (one kernel forward on Hopper, see above), else the matmul and then :func:`qkv_norm_rope`. Returns (q, k,
    v, the attention's v)."""
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    T, D = x.shape[0], w.shape[0] // (num_heads + 2 * num_kv_heads)
    if (kv_repeat >= 1 and use_triton(x) and dtype in (torch.bfloat16, torch.float16) and x.dim() == 2
            and (autocast or w.dtype == x.dtype)  # without autocast, mixed dtypes are F.linear's error
            and w.shape == ((num_heads + 2 * num_kv_heads) * D, x.shape[1])
            and _qkv_fusable(T, num_heads, num_kv_heads, D, dtype, cos, sin, kv_repeat)):
        cos2, sin2, gain = _kernel_tables(cos, sin, gain, dtype)
        q, k, v, v_copies, _, _, _ = torch.ops.pgolf.qkv_linear_norm_rope(x.to(dtype), w.to(dtype), num_heads,
                                                                         num_kv_heads, cos2, sin2, gain, QK_EPS,
                                                                         kv_repeat)
        return q, k, v, (v if kv_repeat == 1 else v_copies)
    return qkv_linear_then_norm_rope(x, w, num_heads, num_kv_heads, cos, sin, gain, kv_repeat)


def qkv_linear_then_norm_rope(x: Tensor, w: Tensor, num_heads: int, num_kv_heads: int, cos: Tensor, sin: Tensor,
                              gain: Optional[Tensor], kv_repeat: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`qkv_linear_norm_rope` as the matmul (F.linear, in the graph) and then :func:`qkv_norm_rope`: what an
    attention runs where the TMA kernel cannot (no Hopper GPU, CPU)."""
    return qkv_norm_rope(F.linear(x, w), num_heads, num_kv_heads, cos, sin, gain, kv_repeat)


def qkv_epilogue_available() -> bool:
    """Whether :func:`qkv_linear_norm_rope`'s Hopper kernel can run in this process (decided once, when kernels are
    attached, outside any compiled graph)."""
    return TRITON_AVAILABLE and _qt.hopper_tma_available()


# ------------------------------------------------------------------------------------------------- XSA + gate


def xsa_gate_reference(y: Tensor, v: Optional[Tensor], z: Optional[Tensor], scale: float) -> Tensor:
    """The model's unfused path (``Attention.forward``): y [T, H, D], v [T, Hkv, D] or None, z [T, H] or None."""
    if v is not None:
        y = exclusive_self_attention(y, v)
    if z is not None:
        y = y * torch.sigmoid(scale * z).to(y.dtype)[:, :, None]
    return y


XSA_EPS = 1e-12  # F.normalize's


if TRITON_AVAILABLE:

    @custom_op("pgolf::xsa_gate", mutates_args=())
    def _xsa_gate_op(y: Tensor, v: Optional[Tensor], z: Optional[Tensor], scale: float) -> Tensor:
        """out [T, H, D] in y's dtype."""
        check_triton_device(y, "pgolf::xsa_gate")
        out = torch.empty_like(y, memory_format=torch.contiguous_format)
        _qt.launch_xsa_gate_fwd(y.contiguous(), None if v is None else v.contiguous(),
                                None if z is None else z.contiguous(), out, scale, XSA_EPS)
        return out

    @_xsa_gate_op.register_fake
    def _xsa_gate_fake(y: Tensor, v: Optional[Tensor], z: Optional[Tensor], scale: float) -> Tensor:
        return torch.empty_like(y, memory_format=torch.contiguous_format)

    @custom_op("pgolf::xsa_gate_backward", mutates_args=())
    def _xsa_gate_backward_op(go: Tensor, y: Tensor, v: Optional[Tensor], z: Optional[Tensor],
                              scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """(dy, dv, dz) in the dtypes of y, v, z ([0] for an input that is None)."""
        check_triton_device(y, "pgolf::xsa_gate_backward")
        dy = torch.empty_like(y, memory_format=torch.contiguous_format)
        dv = y.new_empty((0,)) if v is None else torch.empty_like(v, memory_format=torch.contiguous_format)
        dz = y.new_empty((0,)) if z is None else torch.empty_like(z, memory_format=torch.contiguous_format)
        _qt.launch_xsa_gate_bwd(go.to(y.dtype).contiguous(), y.contiguous(), None if v is None else v.contiguous(),
                                None if z is None else z.contiguous(), dy, None if v is None else dv,
                                None if z is None else dz, scale, XSA_EPS)
        return dy, dv, dz

    @_xsa_gate_backward_op.register_fake
    def _xsa_gate_backward_fake(go: Tensor, y: Tensor, v: Optional[Tensor], z: Optional[Tensor],
                                scale: float) -> tuple[Tensor, Tensor, Tensor]:
        def like(t: Optional[Tensor]) -> Tensor:
            return y.new_empty((0,)) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)

        return like(y), like(v), like(z)

    def _xsa_gate_setup(ctx, inputs, output) -> None:
        y, v, z, scale = inputs
        ctx.save_for_backward(y, v, z)
        ctx.scale = scale

    def _xsa_gate_backward(ctx, grad_out: Tensor):
        y, v, z = ctx.saved_tensors
        dy, dv, dz = torch.ops.pgolf.xsa_gate_backward(grad_out, y, v, z, ctx.scale)
        return dy, (None if v is None else dv), (None if z is None else dz), None

    _xsa_gate_op.register_autograd(_xsa_gate_backward, setup_context=_xsa_gate_setup)


def xsa_gate_fusable(y: Tensor, v: Optional[Tensor]) -> bool:
    """The kernel's shape contract: power-of-two head dim and query heads per kv head, floating activations of
    at most 4 bytes, y and v of one dtype, fewer than 2^31 elements."""
    T, H, D = y.shape
    group = H // v.shape[1] if v is not None else 1
    return (_pow2(D) and _pow2(group) and (v is None or (H % v.shape[1] == 0 and v.dtype == y.dtype))
            and y.dtype in (torch.bfloat16, torch.float16, torch.float32) and T * H * D < MAX_KERNEL_ELEMENTS)


def xsa_gate(y: Tensor, v: Optional[Tensor], z: Optional[Tensor], scale: float) -> Tensor:
    """:func:`xsa_gate_reference` as one Triton kernel forward and backward where it can run (the result in y's
    dtype), the reference elsewhere."""
    if not (use_triton(y) and xsa_gate_fusable(y, v)):
        return xsa_gate_reference(y, v, z, scale)
    return torch.ops.pgolf.xsa_gate(y, v, None if z is None else z.to(y.dtype), float(scale))


# ----------------------------------------------------------------------------------- the output gate's projection


if TRITON_AVAILABLE:

    @custom_op("pgolf::gate_linear", mutates_args=())
    def _gate_linear_op(x: Tensor, w: Tensor) -> Tensor:
        """z [T, N] in x's dtype = x [T, K] (columns contiguous) @ w [N, K]^T, both of one dtype."""
        check_triton_device(x, "pgolf::gate_linear")
        if x.dtype != w.dtype:
            raise ValueError(f"pgolf::gate_linear: x is {x.dtype}, w {w.dtype} (use autocast or cast them to one dtype)")
        z = x.new_empty((x.shape[0], w.shape[0]))
        _qt.launch_gate_linear_fwd(x, w.contiguous(), z)
        return z

    @_gate_linear_op.register_fake
    def _gate_linear_fake(x: Tensor, w: Tensor) -> Tensor:
        return x.new_empty((x.shape[0], w.shape[0]))

    @custom_op("pgolf::gate_linear_backward", mutates_args=())
    def _gate_linear_backward_op(g: Tensor, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """(dx [T, K] in x's dtype, dw [N, K] in w's dtype); dw summed from the programs' partial sums."""
        check_triton_device(x, "pgolf::gate_linear_backward")
        w = w.contiguous()
        dx = x.new_empty(x.shape)
        partial = torch.empty((w.numel(), _qt.gate_linear_programs(x, w)), dtype=torch.float32, device=x.device)
        _qt.launch_gate_linear_bwd(g.to(x.dtype).contiguous(), x, w, dx, partial)
        return dx, partial.sum(1).view(w.shape).to(w.dtype)

    @_gate_linear_backward_op.register_fake
    def _gate_linear_backward_fake(g: Tensor, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        return x.new_empty(x.shape), w.new_empty(w.shape)

    def _gate_linear_setup(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    def _gate_linear_backward(ctx, grad_z: Tensor):
        return torch.ops.pgolf.gate_linear_backward(grad_z, *ctx.saved_tensors)

    _gate_linear_op.register_autograd(_gate_linear_backward, setup_context=_gate_linear_setup)
    # like F.linear under autocast: both operands in bf16 (the fp32 gate weight included)
    torch.library.register_autocast("pgolf::gate_linear", "cuda", torch.bfloat16)


def gate_linear(x: Tensor, w: Tensor) -> Tensor:
    """``F.linear(x, w)`` for the output gate's few inputs (x [T, K], a column slice of the attention's input; w
    [N, K]) as Triton kernels where they run, F.linear elsewhere. Why: with K = 12, cuBLAS runs the product and its
    two gradients as small wmma GEMMs (4.1 ms a step looping off on one H100); the kernels read x's 12 columns and
    the [T, N] gradient once. The same function: fp32 products of the same operands, rounded once; dw in program
    order."""
    if not (use_triton(x) and x.ndim == 2 and w.ndim == 2 and x.stride(1) == 1 and x.shape[1] == w.shape[1]):
        return F.linear(x, w)
    return torch.ops.pgolf.gate_linear(x, w)


# ------------------------------------------------------------------------------------------------- the model


def use_in_model(model, qk_norm_rope_on: bool = True, xsa_gate_on: bool = False, qkv_matmul_on: bool = False,
                 repeat_kv_on: bool = False, gate_linear_on: bool = False) -> None:
    """Make every attention of ``model`` (a GPT) compute its q/k norm, RoPE and q gain with :func:`qk_norm_rope`
    and its XSA and output gate with :func:`xsa_gate` (with ``gate_linear_on`` the gate's projection with
    :func:`gate_linear` too) (each when on), or with its own unfused code again;
    ``qkv_matmul_on`` (with ``qk_norm_rope_on`` only): q, k and v from one matmul through :func:`qkv_linear_norm_rope`
    where its Hopper kernel runs, else :func:`qkv_linear_then_norm_rope`
    (the attention falls back to three when a projection is hooked or wrapped), and with ``repeat_kv_on`` its k
    and v heads repeated for their query heads, so the attention kernel runs without GQA; runtime state, like
    ``GPT.use_fused_kernels``."""
    qkv_on = qk_norm_rope_on and qkv_matmul_on
    epilogue = qkv_epilogue_available()  # on Hopper the matmul with the q/k kernels as its epilogue
    for block in model.blocks:
        attn = block.attn
        attn.qk_kernel = qk_norm_rope if qk_norm_rope_on else None
        attn.xsa_gate_kernel = xsa_gate if xsa_gate_on else None
        attn.gate_kernel = gate_linear if xsa_gate_on and gate_linear_on and attn.gate is not None else None
        attn.qkv_kernel = (qkv_linear_norm_rope if epilogue else qkv_linear_then_norm_rope) if qkv_on else None
        attn.kv_repeat = attn.num_heads // attn.num_kv_heads if qkv_on and repeat_kv_on else 1


def used_in_model(model) -> dict[str, bool]:
    """Which kernels ``model``'s attentions use: {"qk_norm_rope": .., "xsa_gate": .., "gate_linear": .. (the output
    gate's projection, with the XSA + gate kernel), "qkv_matmul": ..,
    "qkv_epilogue": .. (the q, k, v matmul kernel with the q/k kernels as its epilogue), "repeat_kv": ..}."""
    attns = [block.attn for block in model.blocks]
    return {"qk_norm_rope": any(a.qk_kernel is not None for a in attns),
            "xsa_gate": any(a.xsa_gate_kernel is not None for a in attns),
            "gate_linear": any(a.gate_kernel is not None for a in attns),
            "qkv_matmul": any(a.qkv_kernel is not None for a in attns),
            "qkv_epilogue": any(a.qkv_kernel is qkv_linear_norm_rope for a in attns),
            "repeat_kv": any(a.qkv_kernel is not None and a.kv_repeat > 1 for a in attns)}
