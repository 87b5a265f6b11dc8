"""Test helpers for comparing pgolf's model and metric with PR #1855's own script (tests/test_record_oracle.py).

The record script is imported only through :mod:`record_oracle` (once per process). Here: the record models built
the way the record builds every model it runs, random weights everywhere, the test-side name map and config map
(record -> pgolf; independent of ``pgolf.train.record_import``, which the import tests check against them), packed
rows with the record's own ``cu_seqlens``, the record's ``eval_val`` run rank by rank, and a record-format log.
"""

from __future__ import annotations

import math
import types
import warnings
from pathlib import Path

import numpy as np
import torch

from pgolf.config import ModelConfig

BOS = 1

# A small record configuration, set on instances (record_oracle.record_hparams), whatever the environment held
# when the script was imported: 6 layers, loop 1-2 x3, two lanes from layer 4, XSA on the last 4, partial RoPE.
TINY = dict(
    vocab_size=96, num_layers=6, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=4.0, rope_dims=8,
    rope_base=10000.0, rope_yarn=False, ln_scale=True, qk_gain_init=5.0, xsa_last_n=4, num_loops=2, loop_start=1,
    loop_end=2, parallel_start_layer=4, parallel_final_lane="mean", skip_gates_enabled=True, tie_embeddings=True,
    logit_softcap=30.0, smear_gate_enabled=True, gate_window=12, sparse_attn_gate_enabled=True,
    gated_attn_enabled=False, attn_out_gate_enabled=False, sparse_attn_gate_scale=0.5, tied_embed_init_std=0.005,
    train_seq_len=32, eval_seq_len=32, rope_train_seq_len=32, fused_ce_enabled=False, ttt_enabled=False,
    caseops_enabled=True,
)
# The record run's layer layout (11 layers, loop 3-5 x3, lanes from 8, XSA on all), narrow.
RECORD_LAYOUT = dict(vocab_size=128, num_layers=11, model_dim=48, num_heads=4, num_kv_heads=2, rope_dims=8,
                     xsa_last_n=11, num_loops=2, loop_start=3, loop_end=5, parallel_start_layer=8)
# Every optional tensor present and absent at least once; lanes whose first layer sits in the encoder.
VARIANTS = {
    "untied_dense_gate_no_smear_full_rope_no_xsa_no_lanes_no_loops": dict(
        tie_embeddings=False, gated_attn_enabled=True, sparse_attn_gate_enabled=False, smear_gate_enabled=False,
        skip_gates_enabled=False, rope_dims=0, xsa_last_n=0, parallel_start_layer=0, num_loops=0),
    "lanes_from_2": dict(parallel_start_layer=2),  # the encoder [0, 1, 2] holds layer 2: lanes start in the decoder
}
CONFIGS = {"tiny": {}, "record_layout": RECORD_LAYOUT, **VARIANTS}
# The one record configuration pgolf refuses (ModelConfig): decoder order 3, 1, 2, 3, 4, 5 with lanes from 3 runs
# layers 1 and 2 single-lane after the split, on a state the record then discards.
REFUSED_CORNER = dict(loop_start=1, loop_end=3, parallel_start_layer=3)


def hparams(rec, **overrides):
    from record_oracle import record_hparams

    return record_hparams(rec, **{**TINY, **overrides})


# ---------------------------------------------------------------------------------------------- record models


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random and of O(1) effect (the record zero-inits o/down/gates/smear, which would hide
    differences): matrices N(0, 1/fan_in), embedding N(0, 0.25), q gains 2 +- 0.5, resid_mix [1, 0] + 0.4 N,
    lambdas/scales/skip weights 1 + 0.3 N, gates and the smear lambda 0.7 N. Copies into a bf16 tensor round."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim >= 2 and ("bank" in name or name == "lm_head.weight"):
                p.copy_(r / math.sqrt(p.shape[-1]))
            elif name == "tok_emb.weight":
                p.copy_(r * 0.5)
            elif "q_gain" in name:
                p.copy_(2.0 + 0.5 * r)
            elif "resid_mix" in name:
                p.copy_(torch.tensor([1.0, 0.0]).view(2, *([1] * (p.ndim - 1))) + 0.4 * r)
            elif "lambdas" in name or name.endswith("_scale") or "skip_weights" in name:
                p.copy_(1.0 + 0.3 * r)
            else:
                p.copy_(0.7 * r)


def record_model(rec, h, seed: int = 0, fp32: bool = True):
    """The record's GPT built as the record builds every model it runs (``GPT(h).bfloat16()`` then
    ``restore_fp32_params``: only the embedding stays bf16, and the RoPE ``inv_freq`` buffer is bf16-rounded),
    random weights, fused MLP off, eval mode; ``fp32`` then casts to float32 (exact) for the comparisons."""
    torch.manual_seed(seed)
    model = rec.GPT(h).bfloat16()
    rec.restore_fp32_params(model)
    for block in model.blocks:
        block.mlp.use_fused = False
    randomize(model, seed + 1)
    if fp32:
        model = model.float()
    return model.eval()


# ---------------------------------------------------------------------------------------------- record -> pgolf


def pgolf_config(h) -> ModelConfig:
    """The pgolf ModelConfig computing what the record's GPT(h) computes (the test side's own config map)."""
    head_dim = h.model_dim // h.num_heads
    assert not h.attn_out_gate_enabled and h.ln_scale and not h.rope_yarn and h.parallel_final_lane == "mean"
    gate = "sparse" if h.sparse_attn_gate_enabled else ("dense" if h.gated_attn_enabled else "none")
    return ModelConfig(
        vocab_size=h.vocab_size, num_layers=h.num_layers, model_dim=h.model_dim, num_heads=h.num_heads,
        num_kv_heads=h.num_kv_heads, mlp_mult=float(h.mlp_mult), mlp_activation="leaky_relu_sq", leaky_relu_slope=0.5,
        tie_embeddings=bool(h.tie_embeddings), logit_softcap=float(h.logit_softcap), qk_norm=True,
        rope_dims=h.rope_dims if h.rope_dims > 0 else head_dim, rope_base=float(h.rope_base),
        rope_positions="row", q_gain_init=float(h.qk_gain_init), xsa_last_n=min(max(h.xsa_last_n, 0), h.num_layers),
        attn_gate=gate, attn_gate_window=h.gate_window,
        attn_gate_scale=float(h.sparse_attn_gate_scale) if gate == "sparse" else 1.0,
        smear_gate=bool(h.smear_gate_enabled), smear_gate_window=h.gate_window, smear_bos_mask=True,
        unet_skips=True, skip_gates=bool(h.skip_gates_enabled),
        loop_start=h.loop_start if h.num_loops > 0 else 0, loop_end=h.loop_end if h.num_loops > 0 else 0,
        loop_count=h.num_loops + 1 if h.num_loops > 0 else 1,
        parallel_residual_start=h.parallel_start_layer if h.parallel_start_layer > 0 else -1,
        embed_init_std=float(h.tied_embed_init_std),
    )


PER_LAYER = {("qo_bank", 0): "attn.q", ("qo_bank", 1): "attn.o", ("kv_bank", 0): "attn.k", ("kv_bank", 1): "attn.v",
             ("mlp_up_bank", 0): "mlp.up", ("mlp_down_bank", 0): "mlp.down"}
RENAMED = {"smear_gate.weight": "smear.gate.weight", "smear_lambda": "smear.lam",
           "parallel_post_lambdas": "lane_post_lambdas", "parallel_resid_lambdas": "lane_resid_lambdas"}


def to_pgolf_state(sd: dict, num_layers: int, lanes: bool) -> dict:
    """Record state dict -> pgolf names (see PLAN section 2: banks split by layer, [L + i] the second half)."""
    out = {}
    for key, t in sd.items():
        t = t.detach()
        if key.endswith("_bank"):
            halves = 2 if key in ("qo_bank", "kv_bank") else 1
            for half in range(halves):
                for i in range(num_layers):
                    out[f"blocks.{i}.{PER_LAYER[key, half]}.weight"] = t[half * num_layers + i]
        elif key.endswith(".attn.attn_gate_w"):
            out[key.replace(".attn.attn_gate_w", ".attn.gate.weight")] = t
        elif key.startswith("parallel_") and not lanes:
            continue  # allocated by the record without lanes, never used
        else:
            out[RENAMED.get(key, key)] = t
    return out


def to_record_state(sd: dict, num_layers: int) -> dict:
    """The inverse of :func:`to_pgolf_state` (for a model with lanes)."""
    out = {}
    for (bank, half), name in PER_LAYER.items():
        parts = [sd[f"blocks.{i}.{name}.weight"] for i in range(num_layers)]
        out[bank] = torch.cat([out[bank], torch.stack(parts)]) if half else torch.stack(parts)
    back = {v: k for k, v in RENAMED.items()}
    for key, t in sd.items():
        if any(key.endswith(f".{name}.weight") for name in PER_LAYER.values()):
            continue
        out[key.replace(".attn.gate.weight", ".attn.attn_gate_w") if key.endswith(".attn.gate.weight") else back.get(key, key)] = t
    return out


def pgolf_model(cfg: ModelConfig, state: dict, seq_len: int):
    from pgolf.model.gpt import GPT

    model = GPT(cfg, train_seq_len=seq_len, bos_id=BOS)
    model.use_fused_kernels = False
    model.attn_backend = "sdpa"
    model.load_state_dict(state, strict=True)
    return model.eval()


def pgolf_twin(rec_model, h, seq_len: int | None = None):
    cfg = pgolf_config(h)
    state = to_pgolf_state(rec_model.state_dict(), h.num_layers, cfg.parallel_residual_start >= 0)
    return pgolf_model(cfg, state, seq_len or h.eval_seq_len)


# ---------------------------------------------------------------------------------------------- rows


def synthetic_stream(num_docs: int, vocab: int, seed: int, min_len: int = 2, max_len: int = 90) -> np.ndarray:
    """BOS-started documents of ``min_len..max_len`` tokens (BOS included), other ids in 2..vocab-1."""
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([[BOS], rng.integers(2, vocab, size=int(rng.integers(min_len, max_len + 1)) - 1)])
            for _ in range(num_docs)]
    return np.concatenate(docs).astype(np.int64)


def record_row(rec, stream: np.ndarray, start: int, length: int, seq_len: int):
    """A packed row of the stream (may start mid-document) with the record's own ``_build_cu_seqlens``."""
    ids = torch.from_numpy(stream[start : start + length].copy())
    bos = (ids == BOS).nonzero(as_tuple=True)[0].tolist()
    cu, max_seqlen = rec._build_cu_seqlens(bos, ids.numel(), ids.device, seq_len, 64)
    return ids, cu, int(max_seqlen)


def compare_logits(rec, rec_model, pg_model, stream, rows, seq_len: int, looping: bool):
    """(max |record - pgolf|, that over max |record|, documents per row) of ``forward_logits`` on the rows."""
    rec_model.looping_active = looping
    pg_model.looping = looping
    worst_abs, worst_rel, docs = 0.0, 0.0, []
    with torch.no_grad():
        for start, length in rows:
            ids, cu, max_seqlen = record_row(rec, stream, start, length, seq_len)
            a = rec_model.forward_logits(ids[None], cu_seqlens=cu, max_seqlen=max_seqlen)[0].float()
            b = pg_model.forward_logits(ids, cu, max_seqlen).float()
            diff = (a - b).abs().max().item()
            worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / a.abs().max().item())
            docs.append(int((ids == BOS).sum()))
    return worst_abs, worst_rel, docs


# ---------------------------------------------------------------------------------------------- the metric


def record_val_data(tokens: np.ndarray, byte_counts: np.ndarray, seq_len: int):
    """What the record's ValidationData holds with CaseOps on: the stream and sidecar cut to (N - 1) // L * L + 1."""
    usable = (len(tokens) - 1) // seq_len * seq_len
    vd = types.SimpleNamespace(caseops_enabled=True, base_bytes_lut=None, has_leading_space_lut=None,
                               is_boundary_token_lut=None)
    vd.val_tokens = torch.from_numpy(tokens[: usable + 1].astype(np.int64)).to(torch.int32)
    vd.val_bytes = torch.from_numpy(byte_counts[: usable + 1].astype(np.int64)).to(torch.int32)
    return vd


def record_eval_val(rec, h, vd, model, world_size: int, batch_seqs: int) -> tuple[float, int, int]:
    """(loss_sum, token_count, byte_count) of the record's own ``eval_val``, every rank run in this process (its
    sums are what the ranks all-reduce), read from the call it makes to ``_loss_bpb``."""
    h.world_size, h.grad_accum_steps = world_size, 1
    h.val_batch_tokens = batch_seqs * h.eval_seq_len * world_size
    sums = np.zeros(3)
    original = rec._loss_bpb
    for rank in range(world_size):
        h.rank = rank
        seen = {}

        def capture(loss_sum, token_count, byte_count):
            seen["sums"] = (float(loss_sum), float(token_count), float(byte_count))
            return original(loss_sum, token_count, byte_count)

        rec._loss_bpb = capture
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "CUDA is not available. Disabling autocast"
                rec.eval_val(h, torch.device("cpu"), vd, model)
        finally:
            rec._loss_bpb = original
        sums += np.array(seen["sums"])
    return float(sums[0]), int(sums[1]), int(sums[2])


# ---------------------------------------------------------------------------------------------- saved files


def write_hparams_log(h, path: Path, extra: str = "") -> None:
    """A log in the record's format: its main() prints ``Hyperparameters:`` and ``  name: value`` for every
    class attribute, sorted (values here are the instance's, i.e. the overrides)."""
    names = sorted(k for k in vars(type(h)) if not k.startswith("_"))
    path.write_text("Hyperparameters:\n" + "".join(f"  {k}: {getattr(h, k)}\n" for k in names) + "train_shards: 1\n" + extra)


def save_final_model_the_records_way(rec, h, model, path: Path) -> None:
    """``final_model.pt`` written by the record's own ``serialize`` (its first act is
    ``torch.save(base_model.state_dict(), h.model_path)``); stopped before its GPTQ, which needs CUDA and data."""

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    h.model_path, h.is_main_process, h.logfile = str(path), True, None
    loader, logging_hparams = rec.ShuffledSequenceLoader, rec._logger_hparams
    rec.ShuffledSequenceLoader, rec._logger_hparams = stop, None  # its log lines go to stdout only
    try:
        rec.serialize(h, model, "")
    except Stop:
        pass
    finally:
        rec.ShuffledSequenceLoader, rec._logger_hparams = loader, logging_hparams
    assert path.is_file()
