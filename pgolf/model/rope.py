"""Rotary position embedding (RoPE) of the record: partial rotation of the first ``rope_dims`` of each head.

Frequencies are the record's (rounded to bf16, see :func:`rope_inv_freq`); the rotation turns each pair by MINUS
the angle, as the record does. The model keeps the cos/sin of positions 0..train_seq_len-1 as buffers
(:func:`rope_cache`) and looks them up per token; :func:`rope_tables` computes the same values on the spot for
segments longer than that cache. With ``model.rope_positions: row`` (the record's) a token's position is its index
in the packed row instead: a slice of the tables, grown to the caller's rows (:func:`extend_rope_cache`), or
computed on the spot beyond them (:func:`row_rope`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pgolf.model.attention import segment_positions

ROPE_BUFFERS = ("rope_inv_freq", "rope_cos", "rope_sin")  # the model's non-persistent buffers, in this order


def rope_tables(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [T, 1, rope_dims // 2] (fp32) for per-token positions [T], computed on the spot.

    The model looks its tables up in ``rope_cache`` instead (same fp32 products and functions, so the same
    values); this is the path for segments longer than the cache."""
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, r/2]
    return angles.cos()[:, None, :], angles.sin()[:, None, :]


def rope_cache(length: int, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin [length, rope_dims // 2] fp32 for positions 0..length-1, on inv_freq's device.

    Evaluated on the CPU (the values do not depend on where the model runs) with the fp32 products of
    :func:`rope_tables`; on the meta device only the shapes are made."""
    device = inv_freq.device
    src = inv_freq if device.type == "meta" else inv_freq.detach().to("cpu", torch.float32)
    angles = torch.arange(length, dtype=torch.float32, device=src.device)[:, None] * src[None, :]  # [L, r/2]
    return angles.cos().to(device), angles.sin().to(device)


def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of each head (half-split pairing) by MINUS the angle, as the
    record does (``x1 cos + x2 sin, x2 cos - x1 sin``); the rest pass through.

    x [T, h, D]; cos/sin [T, 1, r/2] (fp32 tables). The tables are cast to x's dtype first, as the record does, so
    the result has x's dtype: under bf16 autocast nothing here is widened to fp32 (nor saved so for backward);
    for fp32 x the cast is the identity.
    """
    half = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest], -1)


def rope_inv_freq(rope_dims: int, base: float) -> Tensor:
    """RoPE frequencies [rope_dims / 2] fp32, rounded to bf16 as the record's are (its ``.bfloat16()`` model cast
    reaches the non-persistent ``inv_freq`` buffer, and only parameters are restored to fp32). Computed in Python
    doubles (keeps meta-device builds free of torch's slow decompositions); the result equals the record's
    float32-then-bf16 values."""
    exact = [base ** (-i / rope_dims) for i in range(0, rope_dims, 2)]
    return torch.tensor(exact, dtype=torch.float32).to(torch.bfloat16).to(torch.float32)


def rope_buffers(rope_dims: int, base: float, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """The model's RoPE buffers (:data:`ROPE_BUFFERS`): frequencies [r/2] and cos/sin [length, r/2], fp32."""
    inv_freq = rope_inv_freq(rope_dims, base)
    return (inv_freq, *rope_cache(length, inv_freq))


def row_rope(num_tokens: int, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin [T, 1, r/2] fp32 of positions 0..T-1 in the packed row (``model.rope_positions: row``, the
    record's), computed on the spot: the path for rows longer than the cached tables. Slow inside a compiled
    kernel (the compiler evaluates cos/sin of large angles per element), hence :func:`extend_rope_cache`."""
    return rope_tables(torch.arange(num_tokens, device=inv_freq.device), inv_freq)


def segment_rope(
    cu_seqlens: Tensor, num_tokens: int, max_seqlen: int, inv_freq: Tensor, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor]:
    """cos, sin [T, 1, r/2] fp32 of every token's position in its segment: looked up in the cached tables
    ``cos``/``sin`` [L, r/2] when every segment fits them (``max_seqlen`` bounds the segments), else computed."""
    positions = segment_positions(cu_seqlens, num_tokens)  # int64 [T]
    if max_seqlen > cos.shape[0]:
        return rope_tables(positions, inv_freq)
    return cos[positions][:, None, :], sin[positions][:, None, :]


def token_rope(
    positions: str, cu_seqlens: Tensor, num_tokens: int, max_seqlen: int, inv_freq: Tensor, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor]:
    """cos, sin [T, 1, r/2] fp32 of every token of a packed row, by ``model.rope_positions`` (``positions``):
    :func:`row_rope` or :func:`segment_rope`."""
    if positions == "row":
        if num_tokens <= cos.shape[0]:  # a slice of the cached tables (see extend_rope_cache)
            return cos[:num_tokens, None, :], sin[:num_tokens, None, :]
        return row_rope(num_tokens, inv_freq)
    return segment_rope(cu_seqlens, num_tokens, max_seqlen, inv_freq, cos, sin)


def extend_rope_cache(model, num_tokens: int) -> None:
    """Grow ``model``'s cached cos/sin tables (non-persistent buffers [L, r/2]) to positions 0..num_tokens-1, so
    that ``rope_positions: row`` slices them for rows of up to ``num_tokens`` (a training micro-batch: 98,304)
    instead of computing them. Same values as computed on the spot; call it before compiling the model."""
    if getattr(model, "rope_inv_freq", None) is None or model.rope_cos.shape[0] >= num_tokens:
        return  # no RoPE (or not a pgolf GPT: a test's stand-in), or long enough
    model.rope_cos, model.rope_sin = rope_cache(num_tokens, model.rope_inv_freq)  # stay (non-persistent) buffers
