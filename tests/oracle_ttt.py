"""Test helpers for the TTT oracle tests: a tiny model built twice (pgolf's GPT and the record's GPT with the same
weights, by an explicit name map), synthetic validation streams, and a driver that runs the record's own
``eval_val_ttt_phased`` on CPU and records what it did (per-target NLL, score order, phase points and streams,
adapter draws, final weights). Nothing of the record is copied: its module (``record_oracle.load_or_skip``) is
called, and a few of its module-level functions are wrapped while it runs to observe them.
"""

from __future__ import annotations

import dataclasses
import os
import types
import uuid
import warnings
from typing import Optional

import numpy as np
import torch

import record_oracle
from pgolf.config import EvaluateConfig, ModelConfig, TTTConfig
from pgolf.evaluate.valdata import from_tokens
from pgolf.model.gpt import GPT

# A record-shaped model, tiny: looping 2..3 (10 applications), lanes from layer 4, XSA everywhere, sparse gate,
# SmearGate, partial RoPE.
TINY = ModelConfig(vocab_size=96, num_layers=6, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0, rope_dims=4,
                   xsa_last_n=6, attn_gate="sparse", attn_gate_window=4, attn_gate_scale=0.5, smear_gate=True,
                   smear_gate_window=4, loop_start=2, loop_end=3, loop_count=3, parallel_residual_start=4,
                   q_gain_init=5.0)
RECORD_MODEL = dict(vocab_size=96, num_layers=6, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0, rope_dims=4,
                    loop_start=2, loop_end=3, num_loops=2, parallel_start_layer=4, xsa_last_n=6,
                    sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.5, gate_window=4, smear_gate_enabled=True,
                    qk_gain_init=5.0)
# TTT at tiny sizes with the record's optimizer values: chunks of 8 targets, windows of 32, 4 documents a batch,
# phases after 2 / 4 / 6 documents, phase chunks of 64 tokens over windows of 32.
TTT = dict(lora_rank=4, lora_alpha=144.0, chunk_tokens=8, context_tokens=32, docs_per_batch=4, lr=1e-4, beta1=0.0,
           beta2=0.99, weight_decay=0.5, adam_eps=1e-10, phase_boundaries_docs=(2, 4, 6), phase_lr=1e-3,
           phase_momentum=0.9, phase_chunk_tokens=64, phase_grad_clip=1.0)
EVAL_SEQ_LEN = 32


def ttt_config(**changes) -> EvaluateConfig:
    """The record variant at the tiny sizes; one lane, nothing in flight, no side batches, one phase row."""
    values = dict(mode="lora", variant="record", lanes=1, inflight=0, side_batches=False, phase_rows=1,
                  checkpoint_activations=False, **TTT)
    values.update(changes)
    return EvaluateConfig(eval_seq_len=EVAL_SEQ_LEN, eval_batch_tokens=4 * EVAL_SEQ_LEN, compile=False,
                          progress_every_seconds=1e9, score_next_bos=True, softcap_dtype="model",
                          ttt=TTTConfig(**values))


def record_hparams(mod, cfg: EvaluateConfig, run_id: Optional[str] = None, **extra):
    """The record's Hyperparameters for the tiny model and ``cfg``'s TTT (the record's phase boundaries are
    prefix * (k + 1) // phases: the tests use boundaries of that form)."""
    t = cfg.ttt
    bounds = t.phase_boundaries_docs
    values = dict(RECORD_MODEL, ttt_lora_rank=t.lora_rank, ttt_chunk_size=t.chunk_tokens,
                  ttt_eval_seq_len=t.context_tokens, eval_seq_len=cfg.eval_seq_len, ttt_batch_size=t.docs_per_batch,
                  ttt_lora_lr=t.lr, ttt_beta1=t.beta1, ttt_beta2=t.beta2, ttt_weight_decay=t.weight_decay,
                  ttt_grad_steps=1, ttt_optimizer="adam", ttt_k_lora="k" in t.lora_targets,
                  ttt_mlp_lora="mlp" in t.lora_targets, ttt_o_lora="o" in t.lora_targets, ttt_eval_batches="",
                  val_doc_fraction=1.0, phased_ttt_prefix_docs=bounds[-1] if bounds else 0,
                  phased_ttt_num_phases=max(1, len(bounds)), global_ttt_lr=t.phase_lr,
                  global_ttt_momentum=t.phase_momentum, global_ttt_chunk_tokens=t.phase_chunk_tokens,
                  global_ttt_batch_seqs=32, global_ttt_grad_clip=t.phase_grad_clip, global_ttt_epochs=1,
                  global_ttt_warmup_chunks=0, global_ttt_respect_doc_boundaries=True, caseops_enabled=True,
                  fused_ce_enabled=False, run_id=run_id or f"pgolf_ttt_oracle_{uuid.uuid4().hex[:10]}")
    values.update(extra)
    h = record_oracle.record_hparams(mod, **values)
    expected = [h.phased_ttt_prefix_docs * (k + 1) // h.phased_ttt_num_phases for k in range(len(bounds))]
    assert not bounds or tuple(expected) == tuple(bounds), f"boundaries {bounds} are not the record's form {expected}"
    return h


# --------------------------------------------------------------------------------------------------------- models


def pgolf_model(seed: int, dtype=torch.float64) -> GPT:
    """The tiny pgolf GPT with every parameter non-trivial (the record's init zeroes o, down and the gates)."""
    torch.manual_seed(seed)
    model = GPT(TINY)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight", "mlp.up.weight",
                              "mlp.down.weight")):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
            elif name == "tok_emb.weight":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model = model.to(dtype)
    model.rope_inv_freq = model.rope_inv_freq.float()  # the record computes its RoPE tables in float32
    model.looping = True
    model.use_fused_kernels = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def copy_model(model: GPT) -> GPT:
    twin = GPT(model.cfg).to(next(model.parameters()).dtype)
    twin.load_state_dict(model.state_dict())
    twin.rope_inv_freq = model.rope_inv_freq.clone()
    twin.looping = True
    twin.use_fused_kernels = False
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def tensor_pairs(pg: GPT, rec) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, pgolf tensor, record tensor) for every parameter: the explicit name map pgolf -> record."""
    L = pg.cfg.num_layers
    pairs = [("tok_emb.weight", pg.tok_emb.weight, rec.tok_emb.weight),
             ("skip_weights", pg.skip_weights, rec.skip_weights), ("skip_gates", pg.skip_gates, rec.skip_gates),
             ("lane_post_lambdas", pg.lane_post_lambdas, rec.parallel_post_lambdas),
             ("lane_resid_lambdas", pg.lane_resid_lambdas, rec.parallel_resid_lambdas),
             ("smear.gate.weight", pg.smear.gate.weight, rec.smear_gate.weight),
             ("smear.lam", pg.smear.lam, rec.smear_lambda)]
    for i, b in enumerate(pg.blocks):
        rb = rec.blocks[i]
        p = f"blocks.{i}."
        pairs += [(p + "attn.q.weight", b.attn.q.weight, rec.qo_bank[i]),
                  (p + "attn.o.weight", b.attn.o.weight, rec.qo_bank[L + i]),
                  (p + "attn.k.weight", b.attn.k.weight, rec.kv_bank[i]),
                  (p + "attn.v.weight", b.attn.v.weight, rec.kv_bank[L + i]),
                  (p + "mlp.up.weight", b.mlp.up.weight, rec.mlp_up_bank[i]),
                  (p + "mlp.down.weight", b.mlp.down.weight, rec.mlp_down_bank[i]),
                  (p + "attn.q_gain", b.attn.q_gain, rb.attn.q_gain),
                  (p + "attn.gate.weight", b.attn.gate.weight, rb.attn.attn_gate_w),
                  (p + "resid_mix", b.resid_mix, rb.resid_mix), (p + "attn_scale", b.attn_scale, rb.attn_scale),
                  (p + "mlp_scale", b.mlp_scale, rb.mlp_scale)]
    assert len(pairs) == sum(1 for _ in pg.parameters()) and sum(p.numel() for _, p, _ in pairs) == sum(
        p.numel() for p in rec.parameters()), "the name map must cover both models"
    return pairs


def record_model(mod, h, pg: GPT):
    """The record's GPT holding ``pg``'s weights (dtype of ``pg``), looping on, PyTorch MLP path, eval mode."""
    dtype = next(pg.parameters()).dtype
    rec = mod.GPT(h).to(dtype)
    with torch.no_grad():
        for _, ours, theirs in tensor_pairs(pg, rec):
            theirs.copy_(ours)
        for block in rec.blocks:
            block.attn.rotary.inv_freq = pg.rope_inv_freq.float().clone()  # bf16-rounded, as on the GPU
            block.mlp.use_fused = False
    rec.looping_active = True
    rec.eval()
    for p in rec.parameters():
        p.requires_grad_(False)
    return rec


def max_weight_diff(pg: GPT, rec) -> float:
    return max(float((ours - theirs).detach().abs().max()) for _, ours, theirs in tensor_pairs(pg, rec))


# ----------------------------------------------------------------------------------------------------------- data


def synthetic_stream(num_docs: int, seed: int, min_len: int = 3, max_len: int = 70, vocab: int = 96):
    """``[BOS doc BOS doc ...]`` (document lengths, BOS included, uniform in [min_len, max_len]) and byte counts
    0..4 per token, 0 at every BOS."""
    g = np.random.default_rng(seed)
    toks, nbytes = [], []
    for n in g.integers(min_len, max_len + 1, size=num_docs):
        toks.append(np.concatenate([[1], g.integers(2, vocab, size=int(n) - 1)]))
        nbytes.append(np.concatenate([[0], g.integers(0, 5, size=int(n) - 1)]))
    tokens = np.concatenate(toks).astype(np.int64)
    return tokens, np.concatenate(nbytes).astype(np.int64)


def pgolf_val(tokens: np.ndarray, nbytes: np.ndarray):
    """The validation set with the record's targets (each document's run through the next document's BOS)."""
    return from_tokens(tokens, nbytes, score_next_bos=True)


# ----------------------------------------------------------------------------------------------- the record's run


@dataclasses.dataclass
class RecordRun:
    token_nll: np.ndarray  # [N] float64, NaN where not scored here
    score_step: np.ndarray  # [N] index of the scoring step (this process), -1 elsewhere
    queue: list  # [(orig batch index, [doc indices])] in queue order
    processed: list  # queue indices this process claimed, in order
    phase_points: list  # [{"pd", "gd"}] from the record's ttpp lines
    phase_streams: list  # the token stream of every phase SGD
    draws: list  # [(bsz, {adapter name: A})] every BatchedTTTLoRA built, in order
    loss: float
    bpb: float
    model: object  # the record model after the run (its weights after the last phase)


def run_record(mod, h, rec, tokens: np.ndarray, nbytes: np.ndarray, rng_seed: int) -> RecordRun:
    """The record's ``eval_val_ttt_phased`` on ``rec`` (CPU; distributed if the process group is up), observed."""
    dtype = next(rec.parameters()).dtype
    N = len(tokens)
    out = RecordRun(np.full(N, np.nan), np.full(N, -1, dtype=np.int64), [], [], [], [], [], float("nan"),
                    float("nan"), rec)
    state = {"queue": None, "qidx": None, "ci": 0, "step": 0}
    names = ("_build_ttt_global_batches", "_claim_next_batch", "_accumulate_bpb",
             "train_val_ttt_global_sgd_distributed", "log", "BatchedTTTLoRA")
    saved = {name: getattr(mod, name) for name in names}

    def build(doc_entries, hh, ascending=False):
        queue = saved["_build_ttt_global_batches"](doc_entries, hh, ascending)
        state["queue"] = queue
        out.queue = [(bi, [int(di) for di, _ in entries]) for bi, entries in queue]
        return queue

    def claim(path, queue_len):
        idx = saved["_claim_next_batch"](path, queue_len)
        state["qidx"], state["ci"] = idx, 0
        if idx < queue_len:
            out.processed.append(idx)
        return idx

    def accumulate(ptl, x, y, chunk_offsets, chunk_lens, pos_idx, *rest, **kw):
        _, entries = state["queue"][state["qidx"]]
        for b, (_, (start, _)) in enumerate(entries):
            n = int(chunk_lens[b])
            if n:
                off = int(chunk_offsets[b])
                pos = start + 1 + state["ci"] * h.ttt_chunk_size + np.arange(n)
                assert np.isnan(out.token_nll[pos]).all(), "the record scored a position twice"
                out.token_nll[pos] = ptl[b, off : off + n].detach().double().numpy()
                out.score_step[pos] = state["step"]
        state["ci"] += 1
        state["step"] += 1
        return saved["_accumulate_bpb"](ptl, x, y, chunk_offsets, chunk_lens, pos_idx, *rest, **kw)

    def sgd(hh, device, val_data, base_model, val_tokens, batch_seqs=None):
        out.phase_streams.append(val_tokens.numpy().copy())
        return saved["train_val_ttt_global_sgd_distributed"](hh, device, val_data, base_model, val_tokens, batch_seqs)

    def log(msg, console=True):
        if msg.startswith("ttpp:"):
            fields = dict(kv.split(":", 1) for kv in msg.split()[1:4])
            out.phase_points.append({"pd": int(fields["pd"]), "gd": int(fields["gd"])})

    class TracedLoRA(saved["BatchedTTTLoRA"]):
        def __init__(self, bsz, model, rank, **kw):
            super().__init__(bsz, model, rank, **kw)
            draws = {"head": self.lm_head_lora.A.detach().clone()}
            for name in ("q", "v", "k", "mlp", "o"):
                mods = getattr(self, f"{name}_loras")
                for i, m in enumerate(mods or []):
                    draws[f"{name}.{i}"] = m.A.detach().clone()
            out.draws.append((bsz, draws))

    val = types.SimpleNamespace(val_tokens=torch.from_numpy(tokens.astype(np.int64)),
                                val_bytes=torch.from_numpy(nbytes.astype(np.int32)), caseops_enabled=True,
                                base_bytes_lut=None, has_leading_space_lut=None, is_boundary_token_lut=None)
    previous = torch.get_default_dtype()
    mod._build_ttt_global_batches, mod._claim_next_batch, mod._accumulate_bpb = build, claim, accumulate
    mod.train_val_ttt_global_sgd_distributed, mod.log, mod.BatchedTTTLoRA = sgd, log, TracedLoRA
    torch.set_default_dtype(dtype)  # the record's adapters take the default dtype
    try:
        torch.manual_seed(rng_seed)  # the record draws adapter A from the global CPU generator
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.loss, out.bpb = mod.eval_val_ttt_phased(h, rec, torch.device("cpu"), val,
                                                        forward_ttt_train=rec.forward_ttt)
    finally:
        torch.set_default_dtype(previous)
        for name, value in saved.items():
            setattr(mod, name, value)
        for kind in ("counter", "prefix_counter", "pause_flag"):
            try:
                os.remove(f"/tmp/ttt_{kind}_{h.run_id}")
            except FileNotFoundError:
                pass
    rec.eval()
    for p in rec.parameters():
        p.requires_grad_(False)
    return out
