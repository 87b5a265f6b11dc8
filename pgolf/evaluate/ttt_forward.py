"""The TTT forward of the record variant: pgolf's GPT on dense rows ``[n, w]`` with the per-application adapters.

One row per document; attention is causal within the row (RoPE positions 0..w-1); the row's trailing padding can
never influence earlier positions. The model function is the record's (``pgolf.model.gpt``: SmearGate on the raw
embedding, then the norm; single-lane encoder, U-Net skips, two lanes in the decoder from
``parallel_residual_start``), with the adapters of :mod:`pgolf.evaluate.ttt_adapters` added where the record adds
them (``forward_ttt``, ``_block_with_lora``, ``_parallel_block_with_lora`` of PR #1855).

The LM head, its adapter, the softcap and the cross-entropy run only on the row's LAST ``chunk`` positions: they
hold every target a TTT step scores or trains on (:mod:`pgolf.evaluate.ttt_plan`), so the result is the same as
computing the head everywhere and slicing, at ~1/43 of the head's cost at w = 2048.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pgolf.model.gpt import apply_partial_rope, exclusive_self_attention, mlp_activation, rms_norm, rope_tables, softcap
from pgolf.model.walk import walk_blocks
from pgolf.evaluate.ttt_adapters import LoraLayout, attn_deltas, head_delta, mlp_delta


def _import_fa3_dense():
    try:
        from flash_attn_interface import flash_attn_func  # type: ignore[import-not-found]
    except Exception:
        return None
    return flash_attn_func


_FA3_DENSE = _import_fa3_dense()  # probed once at import, never inside a traced function


def row_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention within each row: q [n, w, H, D], k/v [n, w, Hkv, D] -> [n, w, H, D] (scale 1/sqrt(D))."""
    if q.is_cuda and _FA3_DENSE is not None:
        out = _FA3_DENSE(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return y.transpose(1, 2)


def rope_for_rows(model, width: int, device) -> Optional[tuple[Tensor, Tensor]]:
    """cos, sin [width, 1, r/2] float32 for positions 0..width-1 (from the model's float32 frequencies)."""
    if model.rope_inv_freq is None:
        return None
    positions = torch.arange(width, device=device)
    return rope_tables(positions, model.rope_inv_freq.to(device=device, dtype=torch.float32))


def _smear(model, x: Tensor, ids: Tensor) -> Tensor:
    """SmearGate on rows: x_t += lam * sigmoid(W x_t[:window]) * x_{t-1} * (ids_t != BOS); the row start has none."""
    smear = model.smear
    prev = F.pad(x[:, :-1], (0, 0, 1, 0))  # [n, w, d]
    g = torch.sigmoid(smear.gate(x[..., : smear.window]))  # [n, w, 1]
    if smear.bos_mask:
        g = g * (ids != model.bos_id).to(g.dtype)[..., None]
    return x + (smear.lam.to(x.dtype) * g.to(x.dtype)) * prev


def _attention(block, n_in: Tensor, rope, deltas: dict[str, Tensor]) -> Tensor:
    """Attention sublayer output BEFORE attn_scale, o-adapter included. n_in [n, w, d] is the normed input."""
    attn = block.attn
    nb, w, _ = n_in.shape
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k, v = attn.q(n_in), attn.k(n_in), attn.v(n_in)
    if "q" in deltas:
        q = q + deltas["q"]
    if "k" in deltas:
        k = k + deltas["k"]
    if "v" in deltas:
        v = v + deltas["v"]
    q, k, v = q.view(nb, w, H, D), k.view(nb, w, Hkv, D), v.view(nb, w, Hkv, D)
    if attn.qk_norm:
        q, k = rms_norm(q), rms_norm(k)
    if rope is not None:
        q, k = apply_partial_rope(q, *rope), apply_partial_rope(k, *rope)
    if attn.q_gain is not None:
        q = q * attn.q_gain.to(q.dtype)[:, None]
    q, k = q.to(v.dtype), k.to(v.dtype)
    y = row_attention(q, k, v)  # [n, w, H, D]
    if attn.use_xsa:
        y = exclusive_self_attention(y.reshape(nb * w, H, D), v.reshape(nb * w, Hkv, D)).view(nb, w, H, D)
    if attn.gate is not None:
        g = torch.sigmoid(attn.gate_scale * attn.gate(n_in[..., : attn.gate_window]))  # [n, w, H]
        y = y * g.to(y.dtype)[..., None]
    out = attn.o(y.reshape(nb, w, H * D))
    if "o" in deltas:
        out = out + deltas["o"]
    return out


def _mlp(block, m_in: Tensor, delta: Optional[Tensor]) -> Tensor:
    nb, w, d = m_in.shape
    mlp = block.mlp
    out = mlp.down(mlp_activation(mlp.up(m_in), mlp.activation, mlp.slope))
    return out if delta is None else out + delta


def _single_lane(block, x, x0, rope, layout, views, slot):
    x_in = block._mix(x, x0)
    n_in = rms_norm(x_in) * block.ln_scale
    a = _attention(block, n_in, rope, attn_deltas(layout, views, n_in, slot))
    x = x_in + block.attn_scale.to(a.dtype) * a
    m_in = rms_norm(x) * block.ln_scale
    m = _mlp(block, m_in, mlp_delta(layout, views, m_in, slot))
    return x + block.mlp_scale.to(m.dtype) * m


def _two_lanes(block, lane0, lane1, x0, rope, layout, views, slot, post, resid):
    n_in = rms_norm(block._mix(lane0, x0)) * block.ln_scale  # the residual keeps the unmixed lane 0
    a = _attention(block, n_in, rope, attn_deltas(layout, views, n_in, slot))
    a = block.attn_scale.to(a.dtype) * a
    m_in = rms_norm(lane1) * block.ln_scale  # lane 1 as it entered the block
    m = _mlp(block, m_in, mlp_delta(layout, views, m_in, slot))
    m = block.mlp_scale.to(m.dtype) * m
    post, resid = post.to(lane0.dtype), resid.to(lane0.dtype)
    return (resid[0] * lane0 + post[0, 0] * a + post[1, 0] * m,
            resid[1] * lane1 + post[0, 1] * a + post[1, 1] * m)


def _maybe_checkpoint(fn, checkpoint: bool, *args):
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def lora_nll(model, layout: LoraLayout, ids: Tensor, head_targets: Tensor, views: Sequence[Tensor],
             rope: Optional[tuple[Tensor, Tensor]], checkpoint: bool = False, softcap_model_dtype: bool = True) -> Tensor:
    """NLL (nats, float32) [n, C] of the targets at each row's last C positions (C = head_targets.shape[1]).

    ids [n, w] int64 rows; head_targets [n, C] int64; views: the adapter tensors of the n documents
    (``layout.names`` order); rope: :func:`rope_for_rows` of at least w positions (sliced here). Looping is on.
    ``checkpoint``: recompute each block application in backward instead of keeping its activations.
    ``softcap_model_dtype`` (``evaluate.softcap_dtype: model``, the record's TTT path): the softcap on the logits in
    their own dtype (bf16 under autocast), then float32 for the cross-entropy; False: the softcap in float32.
    """
    nb, w = ids.shape
    C = head_targets.shape[1]
    if rope is not None:
        rope = (rope[0].narrow(0, 0, w), rope[1].narrow(0, 0, w))
    x = model.tok_emb(ids)  # [n, w, d]
    if model.smear is not None:
        x = _smear(model, x, ids)
    x = rms_norm(x)
    x0 = x
    x = walk_blocks(
        model, x, model.virtual_layers(looping=True),
        lambda block, x, slot: _maybe_checkpoint(_single_lane, checkpoint, block, x, x0, rope, layout, views, slot),
        lambda block, lane0, lane1, slot, layer: _maybe_checkpoint(
            _two_lanes, checkpoint, block, lane0, lane1, x0, rope, layout, views, slot,
            model.lane_post_lambdas[layer], model.lane_resid_lambdas[layer]),
    )
    # [n, C, d]: the only positions a step scores or trains on (a gather: a contiguous copy, whatever w is)
    h = rms_norm(x.index_select(1, torch.arange(w - C, w, device=x.device)))
    logits = model.lm_head(h)
    delta = head_delta(layout, views, h)
    if delta is not None:
        logits = logits + delta
    if softcap_model_dtype:
        logits = softcap(logits, model.cfg.logit_softcap).float()
    else:
        logits = softcap(logits.float(), model.cfg.logit_softcap)
    return F.cross_entropy(logits.reshape(nb * C, -1), head_targets.reshape(-1), reduction="none").view(nb, C)
