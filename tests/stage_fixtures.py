"""Tiny real inputs for the post-training stage tests: synthetic shards and a checkpoint trained in-process."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pgolf.config import ModelConfig, OptimConfig, TrainConfig
from pgolf.data.shards import BOS_ID, write_shard
from pgolf.train.loop import train

VOCAB = 64
# every record feature at toy size: looping (layer 1 twice), two lanes from layer 2, gates, skips, tied embedding
TINY_MODEL = ModelConfig(
    vocab_size=VOCAB,
    num_layers=3,
    model_dim=32,
    num_heads=4,
    num_kv_heads=2,
    rope_dims=4,
    xsa_last_n=3,
    attn_gate_window=8,
    smear_gate_window=8,
    loop_start=1,
    loop_end=1,
    loop_count=2,
    parallel_residual_start=2,
)
TINY_TRAIN = TrainConfig(
    train_batch_tokens=256,
    micro_batch_tokens=128,
    train_seq_len=48,
    max_wallclock_seconds=0.0,
    reserve_seconds=0.0,
    iterations=2,
    warmup_steps=0,
    compile=False,
    ema_decay=0.5,
    loop_enable_fraction=0.5,
    log_every_steps=1,
)


def random_docs(n_docs: int, vocab: int, seed: int, top_id: int | None = None) -> list[np.ndarray]:
    """``[BOS] + ids`` documents with ids in 8..top_id-1 (top_id defaults to the vocabulary size)."""
    rng = np.random.default_rng(seed)
    top = vocab if top_id is None else top_id
    return [
        np.concatenate([[BOS_ID], rng.integers(8, top, size=int(rng.integers(4, 50)))]).astype(np.uint16)
        for _ in range(n_docs)
    ]


def write_shards(directory: Path, vocab: int = VOCAB, n_train_docs: int = 200, val_top_id: int | None = None) -> Path:
    """Two train shards and one val shard; ``val_top_id`` puts ids up to it into the val shard only."""
    directory.mkdir(parents=True, exist_ok=True)
    train_tokens = np.concatenate(random_docs(n_train_docs, vocab, seed=1))
    half = len(train_tokens) // 2
    write_shard(directory / "fineweb_train_000000.bin", train_tokens[:half])
    write_shard(directory / "fineweb_train_000001.bin", train_tokens[half:])
    val = np.concatenate(random_docs(20, vocab, seed=2))
    if val_top_id is not None:
        val[5] = val_top_id  # an id no model of this vocabulary could embed
    write_shard(directory / "fineweb_val_000000.bin", val)
    return directory


def train_checkpoint(
    data_dir: Path, out_dir: Path, model: ModelConfig = TINY_MODEL, train_cfg: TrainConfig = TINY_TRAIN, seed: int = 3
) -> Path:
    """Run the real training stage in this process; returns the checkpoint directory."""
    train(model, OptimConfig(), train_cfg, seed, data_dir, out_dir, "cpu")
    return out_dir / "checkpoint"
