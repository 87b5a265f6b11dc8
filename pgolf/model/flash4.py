"""FlashAttention 4 (``flash-attn-4``, the CuTe-DSL kernels; Hopper and Blackwell forward and backward) as two
opaque torch custom ops, so that a model compiled with ``torch.compile(fullgraph=True)`` calls it without a graph
break (FA4's own autograd Function does not trace under dynamo: it calls functions dynamo skips).

    pgolf_fa4::fwd(q, k, v, cu_seqlens, max_seqlen, causal, k_fwd=None, v_fwd=None)
        -> (out [T, H, D] q's dtype, lse [H, T] fp32)
    pgolf_fa4::bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal) -> (dq, dk, dv) shaped like q, k, v

Autograd is registered on ``fwd``: it saves q, k, v, out, lse and cu_seqlens; its backward calls ``bwd``; lse
gets no gradient. ``k_fwd``, ``v_fwd`` [T, Hkv, D] (``train.repeat_kv_heads``: k and v are then their heads
repeated, each ``H / Hkv`` times in a row, and these the heads once; strided views are fine): the forward kernel
reads them instead, as native GQA, and the backward k and v. Why: on one H100 FA4's GQA forward (query heads
packed per kv head) took 53.3 ms a step where the same attention over repeated heads took 57.4 (an A/B of pgolf's
step), while the repeated heads' backward is the faster one (docs/benchmarks.md). Same attention: they get no
gradient. The fake (shape) functions return what FA4 allocates (contiguous out like q, lse [H, T], dq/dk/dv
like q/k/v); no shape depends on the length of cu_seqlens, so a dynamic cu_seqlens length keeps one graph.
The real kernels are registered for CUDA only (tests register a CPU kernel computing the same function, to check
the plumbing without a GPU). Importing this module registers the ops; FA4 itself is imported by :func:`load`.
Inputs: q [T, H, D], k/v [T, Hkv, D] (native GQA), bf16 or fp16; cu_seqlens int32, trailing repeats allowed;
max_seqlen a Python int bounding every segment. Softmax scale 1/sqrt(D).
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from torch import Tensor

TESTED_VERSION = "4.0.0b40"  # pyproject's optional extra `fa4` pins it (the entry points below are private API)
_FWD_KEYWORDS = {"cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "causal", "return_lse"}
_BWD_KEYWORDS = {"cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "causal"}
_KERNELS: Optional[tuple[Callable, Callable]] = None
_WHY = "not probed"


def load() -> tuple[bool, str]:
    """Import FA4's forward and backward entry points and check the keywords used here: (usable, reason)."""
    global _KERNELS, _WHY
    if _KERNELS is not None or _WHY != "not probed":
        return _KERNELS is not None, _WHY
    try:
        from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd  # type: ignore[import-not-found]
    except Exception as exc:  # ImportError, or a CUDA / DSL library that fails at import
        _WHY = f"flash_attn.cute does not import ({type(exc).__name__}: {exc})"[:300]
        return False, _WHY
    missing = sorted((_FWD_KEYWORDS - set(inspect.signature(_flash_attn_fwd).parameters))
                     | (_BWD_KEYWORDS - set(inspect.signature(_flash_attn_bwd).parameters)))
    if missing:
        _WHY = f"flash_attn.cute lacks the keywords {missing} (tested with flash-attn-4 {TESTED_VERSION})"
        return False, _WHY
    _KERNELS, _WHY = (_flash_attn_fwd, _flash_attn_bwd), "ok"
    return True, _WHY


def _kernels() -> tuple[Callable, Callable]:
    ok, why = load()
    if not ok:
        raise RuntimeError(f"attention backend 'fa4' unavailable: {why}")
    return _KERNELS


@torch.library.custom_op("pgolf_fa4::fwd", mutates_args=(), device_types="cuda")
def fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool,
        k_fwd: Optional[Tensor] = None, v_fwd: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    if q.dtype not in (torch.bfloat16, torch.float16) or not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention backend 'fa4': q, k, v must share bf16 or fp16, got {q.dtype} {k.dtype} {v.dtype}")
    if k_fwd is None:
        k_fwd, v_fwd = k.contiguous(), v.contiguous()
    res = _kernels()[0](q.contiguous(), k_fwd, v_fwd, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                        max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, causal=causal, return_lse=True)
    return res[0], res[1]  # 4.0.0b40 returns (out, lse, p, row_max, o_lo); older betas (out, lse)


@fwd.register_fake
def _fwd_fake(q, k, v, cu_seqlens, max_seqlen, causal, k_fwd=None, v_fwd=None):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("pgolf_fa4::bwd", mutates_args=(), device_types="cuda")
def bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor, max_seqlen: int,
        causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    res = _kernels()[1](q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), dout.contiguous(),
                        lse.contiguous(), None, causal, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                        max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)
    return res[0], res[1], res[2]


@bwd.register_fake
def _bwd_fake(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen, causal = inputs[:6]
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
    ctx.max_seqlen, ctx.causal = max_seqlen, causal
    ctx.set_materialize_grads(False)


def _backward(ctx, dout: Optional[Tensor], dlse: Optional[Tensor]):
    if dout is None:  # only lse was used (never in pgolf): nothing reaches q, k, v
        return None, None, None, None, None, None, None, None
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = torch.ops.pgolf_fa4.bwd(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.causal)
    return dq, dk, dv, None, None, None, None, None


fwd.register_autograd(_backward, setup_context=_setup)


def attend(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool,
           forward_kv: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """Within-segment attention through the ops: [T, H, D] in q's dtype. ``forward_kv``: the op's k_fwd, v_fwd."""
    k_fwd, v_fwd = (None, None) if forward_kv is None else forward_kv
    return torch.ops.pgolf_fa4.fwd(q, k, v, cu_seqlens, max_seqlen, causal, k_fwd, v_fwd)[0]
