"""Helpers shared by the evaluation and TTT tests: a tiny GPT with random weights, hand-made validation data and
a real packed artifact (quantize_state + pack), all built in the test process."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from pgolf.config import EvaluateConfig, ModelConfig, PackConfig, QuantizeConfig, TTTConfig, to_dict
from pgolf.data.shards import BOS_ID, ShardStreamWriter
from pgolf.io import atomic_write_json, sha256_file
from pgolf.model.gpt import GPT
from pgolf.evaluate.valdata import ValidationSet, from_tokens

torch.set_num_threads(1)  # tiny matmuls: thread hand-off costs more than it saves on a shared 2-core machine

VOCAB = 300

# Every record feature on, small: looping (loop_count 2), two lanes, SmearGate with the BOS mask, XSA, sparse gate.
TINY = ModelConfig(
    vocab_size=VOCAB, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, rope_dims=4, xsa_last_n=2,
    attn_gate_window=8, smear_gate_window=8, loop_start=0, loop_end=0, loop_count=2, parallel_residual_start=1,
)


def tiny_model(seed: int = 0, cfg: ModelConfig = TINY) -> GPT:
    """Random weights everywhere (the record init zeroes o/down/gates, which would hide cross-token effects)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        if model.smear is not None:
            model.smear.lam.fill_(0.8)  # a visible look-back, so leaks would show
    model.looping = cfg.loop_count > 1
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def copy_model(model: GPT) -> GPT:
    twin = GPT(model.cfg)
    twin.load_state_dict(model.state_dict())
    twin.looping = model.looping
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def random_docs(lengths, seed: int) -> list[np.ndarray]:
    """Documents ``[BOS] + ids`` with ids in 2..VOCAB-1 (never BOS)."""
    rng = np.random.default_rng(seed)
    return [np.concatenate([[BOS_ID], rng.integers(2, VOCAB, size=int(n))]).astype(np.uint16) for n in lengths]


def toy_bytes(tokens: np.ndarray) -> np.ndarray:
    """A made-up but token-dependent byte count: 0 for BOS, 1..4 otherwise."""
    tokens = np.asarray(tokens, dtype=np.int64)
    return np.where(tokens == BOS_ID, 0, 1 + tokens % 4).astype(np.int32)


def val_from_docs(docs: list[np.ndarray]) -> ValidationSet:
    tokens = np.concatenate(docs)
    return from_tokens(tokens, toy_bytes(tokens))


def eval_config(mode: str = "none", **ttt) -> EvaluateConfig:
    """Tiny sizes: windows of 24 tokens, rows of 96, LoRA chunks of 8 targets with 24 tokens of context."""
    ttt_defaults = dict(mode=mode, lora_rank=4, lora_alpha=8.0, chunk_tokens=8, docs_per_batch=3, context_tokens=24,
                        lr=0.05, phase_boundaries_docs=(), phase_chunk_tokens=48, phase_lr=0.05,
                        stream_chunk_tokens=40, chunk_lr=0.05)
    ttt_defaults.update(ttt)
    return EvaluateConfig(eval_seq_len=24, eval_batch_tokens=96, compile=False, progress_every_seconds=1e9,
                          ttt=TTTConfig(**ttt_defaults))


def write_val_dir(directory: Path, docs: list[np.ndarray], shard_tokens: int = 97, sidecar: bool = True,
                  manifest: dict | None = None) -> Path:
    """Val shards (cut mid-document on purpose), optional byte sidecar and manifest, and one train shard."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens = np.concatenate(docs)
    with ShardStreamWriter(directory, "val", shard_tokens) as w:
        w.append(tokens)
    if sidecar:
        with ShardStreamWriter(directory, "val_bytes", shard_tokens) as w:
            w.append(toy_bytes(tokens).astype(np.uint16))
    with ShardStreamWriter(directory, "train", shard_tokens) as w:
        w.append(np.concatenate(random_docs([20, 30], seed=99)))
    if manifest is not None:
        (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def write_artifact(directory: Path, model: GPT, report_sha: str | None = "auto") -> Path:
    """Quantize (identity Hessians), pack with brotli, and write ``pack_report.json`` beside the artifact."""
    from pgolf.quantize.weights import quantize_state
    from pgolf.artifact.format import pack

    directory.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    roles = model.param_roles()
    hessians = {n: torch.eye(state[n].shape[1]) for n, r in roles.items() if r in ("attn", "mlp", "embedding", "head")}
    qcfg = QuantizeConfig(lqer_mode="off", passthrough_max_elements=4096)
    qm = quantize_state(state, roles, hessians, qcfg)
    data = pack(qm, to_dict(model.cfg), {"test": "tiny"}, PackConfig(brotli_quality=5))
    path = directory / "artifact.bin"
    path.write_bytes(data)
    sha = sha256_file(path) if report_sha == "auto" else report_sha
    if sha is not None:
        atomic_write_json(directory / "pack_report.json", {"artifact_sha256": sha})
    return path


def replace_ttt(cfg: EvaluateConfig, **changes) -> EvaluateConfig:
    return dataclasses.replace(cfg, ttt=dataclasses.replace(cfg.ttt, **changes))
