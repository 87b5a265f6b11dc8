"""Fused kernels for the two memory-bound tails of a training step, each beside the PyTorch reference it must match.

1. ``mlp_up_activation(x, w, slope)`` = ``leaky_relu(x @ w^T, slope)^2`` (``slope`` 0 gives ``relu^2``).
   Unfused, the [T, 4d] pre-activation is written by the matmul, read back by the activation, and the result
   written again. The fused kernel applies the activation in the matmul's epilogue and writes the
   pre-activation once more only because backward needs it:
   ``d pre = grad * 2 * leaky_relu(pre) * (1 if pre > 0 else slope)``, then ``dx = d pre @ w`` and
   ``dw = d pre^T @ x`` with ordinary matmuls (cuBLAS is as good as it gets there).
   ``mlp(x, w_up, w_down, slope)`` = ``mlp_up_activation(x, w_up, slope) @ w_down^T`` is the whole MLP as one
   op, so that its backward can fuse too: ``d pre = (g @ w_down) * act'(pre)`` is ONE kernel (the same matmul
   kernel with a backward epilogue), where the unfused backward writes ``g @ w_down`` ([T, 4d]) from cuBLAS and
   reads it back in an elementwise pass. The product is rounded once (from the fp32 accumulator) instead of
   twice. The other three matmuls of its backward are cuBLAS.
2. ``softcapped_cross_entropy(z, targets, cap)`` = ``CE(cap * tanh(z / cap), targets)`` over z [T, V] (bf16 or
   fp32), ignore_index -100, mean over valid targets (``softcapped_token_nll`` gives the per-token losses that
   evaluation needs). Unfused, torch materializes the fp32 copy, the capped logits and the softmax ([T, V] fp32
   each: 3.2 GB per 98,304-token micro-batch at V = 8192). The fused forward streams each row once with an online
   log-sum-exp and keeps only ``lse`` [T]; backward recomputes the softmax from z:
   ``dz = g * (softmax(c) - onehot) * (1 - tanh^2(z / cap))``.

Targets: ids in [0, V) or -100 (ignored, NLL 0). The fused CE cannot raise on a bad id without a host sync, so
any other id gets NaN NLL (the training loop then stops on a non-finite loss); the reference raises instead.

Dispatch: the public functions take the Triton path only for CUDA tensors when triton imports
(``TRITON_AVAILABLE``); anywhere else they ARE the reference (the CPU fallback), so a model can keep
``use_fused_kernels`` on in every environment. The Triton paths are opaque ``torch.library.custom_op`` ops with
fake (shape) functions and registered autograd (and, for the matmul, autocast to bf16 on CUDA like ``F.linear``),
so ``torch.compile(fullgraph=True)`` keeps them in its graph without a break and calls them as they are; the
backward's elementwise part (``mlp_activation_grad``) is ordinary torch code that inductor fuses.
Under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported) the same ops run on CPU
tensors: that is how the tests check the kernels on a machine without a GPU.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100

try:
    from pgolf.model import triton_kernels as _tk
except Exception:  # ImportError without triton; a broken triton install raises other errors at import
    _tk = None

TRITON_AVAILABLE = _tk is not None


def fused_kernels_default() -> bool:
    """Default of ``GPT.use_fused_kernels``: off. The training stage turns the kernels on with
    ``train.fused_kernels``; they pass their references under Triton's CPU interpreter but have not yet been run
    on a GPU here, so the verified pure-PyTorch path stays the default until ``pytest -m gpu`` has passed."""
    return False


def interpreter_active() -> bool:
    """True when triton runs in interpreter mode, so the custom ops accept CPU tensors."""
    return TRITON_AVAILABLE and _tk.is_interpreted()


# --------------------------------------------------------------------------------------------------------------
# References (pure PyTorch; the CPU fallback and the tests' ground truth)
# --------------------------------------------------------------------------------------------------------------


def _at_least_fp32(z: Tensor) -> Tensor:
    return z.to(torch.promote_types(z.dtype, torch.float32))  # bf16 -> fp32; fp64 (test ground truth) stays


def mlp_up_activation_reference(x: Tensor, w: Tensor, slope: float) -> Tensor:
    """``leaky_relu(x @ w^T, slope)^2``: x [..., K], w [N, K] -> [..., N]."""
    return F.leaky_relu(F.linear(x, w), slope).square()


def softcap_reference(z: Tensor, cap: float) -> Tensor:
    return cap * torch.tanh(z / cap) if cap > 0 else z


def softcapped_token_nll_reference(z: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Per-token NLL in fp32 [T] (0 where the target is -100). z [T, V], targets [T]."""
    return F.cross_entropy(
        softcap_reference(_at_least_fp32(z), cap), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )


def softcapped_cross_entropy_reference(z: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Mean fp32 CE over targets != -100 (NaN when there are none, like F.cross_entropy)."""
    return F.cross_entropy(
        softcap_reference(_at_least_fp32(z), cap), targets, ignore_index=IGNORE_INDEX, reduction="mean"
    )


def mlp_reference(x: Tensor, w_up: Tensor, w_down: Tensor, slope: float) -> Tensor:
    """``leaky_relu(x @ w_up^T, slope)^2 @ w_down^T``: x [..., d], w_up [4d, d], w_down [d, 4d] -> [..., d]."""
    return F.linear(mlp_up_activation_reference(x, w_up, slope), w_down)


def mlp_activation_grad(pre: Tensor, grad_post: Tensor, slope: float) -> Tensor:
    """d/d pre of ``leaky_relu(pre, slope)^2`` times ``grad_post``, computed in (at least) fp32, returned in pre's dtype."""
    p = _at_least_fp32(pre)
    factor = torch.where(p > 0, 2.0 * p, (2.0 * slope * slope) * p)  # 2 * lrelu(p) * lrelu'(p)
    return (grad_post.to(p.dtype) * factor).to(pre.dtype)


# --------------------------------------------------------------------------------------------------------------
# Custom ops (only with triton)
# --------------------------------------------------------------------------------------------------------------


def check_triton_device(t: Tensor, op: str) -> None:
    if t.device.type != "cuda" and not _tk.is_interpreted():
        raise RuntimeError(
            f"{op}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before importing triton), got {t.device}"
        )


if TRITON_AVAILABLE:
    from torch.library import custom_op

    @custom_op("pgolf::mlp_up_act", mutates_args=())
    def _mlp_up_act_op(x: Tensor, w: Tensor, slope: float) -> tuple[Tensor, Tensor]:
        """(post, pre) for x [M, K], w [N, K] of one dtype: post = leaky_relu(pre, slope)^2, pre = x @ w^T."""
        check_triton_device(x, "pgolf::mlp_up_act")
        M, N = x.shape[0], w.shape[0]
        pre = x.new_empty((M, N))
        post = x.new_empty((M, N))
        _tk.launch_mlp_up_act(x.contiguous(), w.contiguous(), pre, post, slope)
        return post, pre

    @_mlp_up_act_op.register_fake
    def _mlp_up_act_fake(x: Tensor, w: Tensor, slope: float) -> tuple[Tensor, Tensor]:
        shape = (x.shape[0], w.shape[0])
        return x.new_empty(shape), x.new_empty(shape)

    def _mlp_up_act_setup(ctx, inputs, output) -> None:
        x, w, slope = inputs
        _, pre = output
        ctx.save_for_backward(x, w, pre)
        ctx.slope = slope
        ctx.set_materialize_grads(False)  # an unused output's grad arrives as None, not as a [M, N] zero tensor

    def _mlp_up_act_backward(ctx, grad_post: Optional[Tensor], grad_pre: Optional[Tensor]):
        x, w, pre = ctx.saved_tensors
        dpre = torch.zeros_like(pre) if grad_post is None else mlp_activation_grad(pre, grad_post, ctx.slope)
        if grad_pre is not None:
            dpre = dpre + grad_pre
        dx = dpre @ w  # [M, N] @ [N, K] -> [M, K]
        dw = dpre.t() @ x  # [N, M] @ [M, K] -> [N, K]
        return dx, dw, None

    _mlp_up_act_op.register_autograd(_mlp_up_act_backward, setup_context=_mlp_up_act_setup)
    # like F.linear under autocast: both operands in bf16 (fp32 master weights included)
    torch.library.register_autocast("pgolf::mlp_up_act", "cuda", torch.bfloat16)

    @custom_op("pgolf::mlp_fused", mutates_args=())
    def _mlp_fused_op(x: Tensor, w_up: Tensor, w_down: Tensor, slope: float) -> tuple[Tensor, Tensor, Tensor]:
        """(out, pre, post) for x [M, d], w_up [4d, d], w_down [d, 4d] of one dtype; pre and post are outputs only
        so that autograd can keep them for the backward (callers use ``out``)."""
        check_triton_device(x, "pgolf::mlp_fused")
        M, N = x.shape[0], w_up.shape[0]
        pre = x.new_empty((M, N))
        post = x.new_empty((M, N))
        _tk.launch_mlp_up_act(x.contiguous(), w_up.contiguous(), pre, post, slope)
        return post @ w_down.t(), pre, post

    @_mlp_fused_op.register_fake
    def _mlp_fused_fake(x: Tensor, w_up: Tensor, w_down: Tensor, slope: float) -> tuple[Tensor, Tensor, Tensor]:
        M, N = x.shape[0], w_up.shape[0]
        return x.new_empty((M, w_down.shape[0])), x.new_empty((M, N)), x.new_empty((M, N))

    @custom_op("pgolf::mlp_act_grad", mutates_args=())
    def _mlp_act_grad_op(g: Tensor, w_down: Tensor, pre: Tensor, slope: float) -> Tensor:
        """d pre = (g @ w_down) * act'(pre): g [M, d], w_down [d, 4d], pre [M, 4d] -> [M, 4d] in pre's dtype."""
        check_triton_device(g, "pgolf::mlp_act_grad")
        pre = pre.contiguous()
        dpre = torch.empty_like(pre)
        _tk.launch_mlp_act_grad(g.to(pre.dtype).contiguous(), w_down.to(pre.dtype).contiguous(), pre, dpre, slope)
        return dpre

    @_mlp_act_grad_op.register_fake
    def _mlp_act_grad_fake(g: Tensor, w_down: Tensor, pre: Tensor, slope: float) -> Tensor:
        return torch.empty_like(pre, memory_format=torch.contiguous_format)

    def _mlp_fused_setup(ctx, inputs, output) -> None:
        x, w_up, w_down, slope = inputs
        _, pre, post = output
        ctx.save_for_backward(x, w_up, w_down, pre, post)
        ctx.slope = slope
        ctx.set_materialize_grads(False)

    def _mlp_fused_backward(ctx, grad_out: Optional[Tensor], grad_pre: Optional[Tensor], grad_post: Optional[Tensor]):
        x, w_up, w_down, pre, post = ctx.saved_tensors
        dpre, dw_down = None, None
        if grad_out is not None:
            grad_out = grad_out.contiguous()
            dw_down = grad_out.t() @ post  # [d, M] @ [M, 4d]
            dpre = torch.ops.pgolf.mlp_act_grad(grad_out, w_down, pre, ctx.slope)  # one pass, see the module doc
        if grad_post is not None:  # callers never use post; handled for completeness
            extra = mlp_activation_grad(pre, grad_post, ctx.slope)
            dpre = extra if dpre is None else dpre + extra
        if grad_pre is not None:
            dpre = grad_pre if dpre is None else dpre + grad_pre
        if dpre is None:
            return None, None, None, None
        return dpre @ w_up, dpre.t() @ x, dw_down, None  # dx [M, d], dw_up [4d, d], dw_down [d, 4d]

    _mlp_fused_op.register_autograd(_mlp_fused_backward, setup_context=_mlp_fused_setup)
    torch.library.register_autocast("pgolf::mlp_fused", "cuda", torch.bfloat16)

    @custom_op("pgolf::softcap_ce", mutates_args=())
    def _softcap_ce_op(z: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
        """(nll [T] fp32, lse [T] fp32) for z [T, V] and int64 targets [T]."""
        check_triton_device(z, "pgolf::softcap_ce")
        T = z.shape[0]
        nll = torch.empty((T,), dtype=torch.float32, device=z.device)
        lse = torch.empty((T,), dtype=torch.float32, device=z.device)
        _tk.launch_softcap_ce_fwd(z.contiguous(), targets.contiguous(), nll, lse, cap)
        return nll, lse

    @_softcap_ce_op.register_fake
    def _softcap_ce_fake(z: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
        T = z.shape[0]
        return z.new_empty((T,), dtype=torch.float32), z.new_empty((T,), dtype=torch.float32)

    @custom_op("pgolf::softcap_ce_backward", mutates_args=())
    def _softcap_ce_backward_op(grad_nll: Tensor, z: Tensor, targets: Tensor, lse: Tensor, cap: float) -> Tensor:
        """dz [T, V] in z's dtype from dLoss/dnll [T] (fp32)."""
        check_triton_device(z, "pgolf::softcap_ce_backward")
        z = z.contiguous()
        dz = torch.empty_like(z)
        # the grad of a sum arrives as a stride-0 expand: the kernel reads one value per row
        _tk.launch_softcap_ce_bwd(grad_nll.float().contiguous(), z, targets.contiguous(), lse.contiguous(), dz, cap)
        return dz

    @_softcap_ce_backward_op.register_fake
    def _softcap_ce_backward_fake(grad_nll: Tensor, z: Tensor, targets: Tensor, lse: Tensor, cap: float) -> Tensor:
        return torch.empty_like(z, memory_format=torch.contiguous_format)

    def _softcap_ce_setup(ctx, inputs, output) -> None:
        z, targets, cap = inputs
        _, lse = output
        ctx.save_for_backward(z, targets, lse)
        ctx.cap = cap
        ctx.set_materialize_grads(False)

    def _softcap_ce_backward(ctx, grad_nll: Optional[Tensor], grad_lse: Optional[Tensor]):
        z, targets, lse = ctx.saved_tensors
        if grad_lse is not None:
            raise NotImplementedError("pgolf::softcap_ce: gradients through the lse output are not supported")
        if grad_nll is None:
            grad_nll = torch.zeros_like(lse)
        return torch.ops.pgolf.softcap_ce_backward(grad_nll, z, targets, lse, ctx.cap), None, None

    _softcap_ce_op.register_autograd(_softcap_ce_backward, setup_context=_softcap_ce_setup)


# --------------------------------------------------------------------------------------------------------------
# Public entry points (fused where possible, the reference elsewhere)
# --------------------------------------------------------------------------------------------------------------


def use_triton(t: Tensor) -> bool:
    return TRITON_AVAILABLE and (t.device.type == "cuda" or _tk.is_interpreted())


def fused_mlp_up_activation(x: Tensor, w: Tensor, slope: float) -> Tensor:
    """The Triton path of :func:`mlp_up_activation` (raises where it cannot run). x [..., K], w [N, K]."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("fused_mlp_up_activation: triton is not installed")
    if w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"mlp_up_activation: x {tuple(x.shape)} and w {tuple(w.shape)} do not chain as x @ w^T")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    if not torch.is_autocast_enabled(x.device.type) and x2.dtype != w.dtype:
        raise ValueError(f"mlp_up_activation: x is {x2.dtype} but w is {w.dtype} (use autocast or cast one of them)")
    post, _ = torch.ops.pgolf.mlp_up_act(x2, w, float(slope))
    return post.view(*lead, w.shape[0])


def mlp_up_activation(x: Tensor, w: Tensor, slope: float) -> Tensor:
    """``leaky_relu(x @ w^T, slope)^2``; x [..., K], w [N, K] -> [..., N]. Fused on CUDA, the reference elsewhere."""
    if use_triton(x):
        return fused_mlp_up_activation(x, w, slope)
    return mlp_up_activation_reference(x, w, slope)


def fused_mlp(x: Tensor, w_up: Tensor, w_down: Tensor, slope: float) -> Tensor:
    """The Triton path of :func:`mlp` (raises where it cannot run). x [..., d], w_up [4d, d], w_down [d, 4d]."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("fused_mlp: triton is not installed")
    if w_up.ndim != 2 or w_down.ndim != 2 or x.shape[-1] != w_up.shape[1] or w_down.shape[1] != w_up.shape[0]:
        raise ValueError(
            f"mlp: x {tuple(x.shape)}, w_up {tuple(w_up.shape)} and w_down {tuple(w_down.shape)} do not chain as "
            "act(x @ w_up^T) @ w_down^T"
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [M, d]
    if not torch.is_autocast_enabled(x.device.type) and not (x2.dtype == w_up.dtype == w_down.dtype):
        raise ValueError(
            f"mlp: x is {x2.dtype}, w_up {w_up.dtype}, w_down {w_down.dtype} (use autocast or cast them to one dtype)"
        )
    out, _, _ = torch.ops.pgolf.mlp_fused(x2, w_up, w_down, float(slope))
    return out.view(*lead, w_down.shape[0])


def mlp(x: Tensor, w_up: Tensor, w_down: Tensor, slope: float) -> Tensor:
    """``leaky_relu(x @ w_up^T, slope)^2 @ w_down^T`` -> [..., d]. Fused (forward and backward) on CUDA, the
    reference elsewhere."""
    if use_triton(x):
        return fused_mlp(x, w_up, w_down, slope)
    return mlp_reference(x, w_up, w_down, slope)


def fused_softcapped_token_nll(z: Tensor, targets: Tensor, cap: float) -> Tensor:
    """The Triton path of :func:`softcapped_token_nll` (raises where it cannot run)."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("fused_softcapped_token_nll: triton is not installed")
    if z.ndim != 2 or targets.shape != z.shape[:1]:
        raise ValueError(
            f"softcapped cross-entropy: expected z [T, V] and targets [T], got {tuple(z.shape)} and {tuple(targets.shape)}"
        )
    if not z.is_floating_point():
        raise ValueError(f"softcapped cross-entropy: z must be floating point, got {z.dtype}")
    nll, _ = torch.ops.pgolf.softcap_ce(z.contiguous(), targets.to(torch.int64).contiguous(), float(cap))
    return nll


def softcapped_token_nll(z: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Per-token NLL (nats, fp32 [T]; 0 where target is -100) of ``softmax(cap * tanh(z / cap))``. z [T, V]."""
    if use_triton(z):
        return fused_softcapped_token_nll(z, targets, cap)
    return softcapped_token_nll_reference(z, targets, cap)


def softcapped_cross_entropy(z: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Mean NLL over targets != -100 (NaN when every target is ignored, as in F.cross_entropy). z [T, V]."""
    if use_triton(z):
        nll = fused_softcapped_token_nll(z, targets, cap)
        return nll.sum() / (targets != IGNORE_INDEX).sum()
    return softcapped_cross_entropy_reference(z, targets, cap)
