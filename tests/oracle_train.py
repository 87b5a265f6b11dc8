"""Helpers for the training-loop oracle tests (tests/test_record_train_oracle.py, its torchrun worker and
tests/record_train_support.py): tiny record hyperparameters, the record's model on CPU, its nested loop functions,
a fake clock, positional shards, and the record -> pgolf weight name map. The record script itself is imported by
tests/record_oracle.py (once per process)."""

from __future__ import annotations

import contextlib
import os
import types
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from pgolf.data.shards import write_shard
from record_oracle import cpu_patches  # noqa: F401  (re-exported: the training helpers patch CUDA calls)


# ------------------------------------------------------------------------------------------------ the record's objects


# Tiny record settings (4 layers, loops over 1..2 three times, lanes from layer 3) with the record run's own
# optimizer and schedule values (train_seed42.log: BETA2 0.99, GPTQ_RESERVE_SECONDS 0.5, WARMDOWN_FRAC 0.85, ...).
TINY = dict(
    vocab_size=64, num_layers=4, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
    loop_start=1, loop_end=2, num_loops=2, parallel_start_layer=3, xsa_last_n=4, rope_dims=8,
    train_seq_len=16, rope_train_seq_len=16, eval_seq_len=16,
    smear_gate_enabled=True, sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.5, gate_window=4,
    min_lr=0.1, warmdown_frac=0.85, beta2=0.99, grad_clip_norm=0.3, matrix_lr=0.026, muon_backend_steps=5,
    gptq_reserve_seconds=0.5, max_wallclock_seconds=600.0, fused_ce_enabled=False, val_loss_every=0,
    train_log_every=1, ema_decay=0.9965, enable_looping_at=0.35, warmup_steps=20,
)


def make_h(module, data_dir: str | Path | None = None, world_size: int = 1, rank: int = 0, **overrides):
    """A ``Hyperparameters`` with instance attributes over the class ones (the class reads env at import)."""
    h = module.Hyperparameters()
    for key, value in {**TINY, **overrides}.items():
        setattr(h, key, value)
    h.world_size, h.rank, h.is_main_process = world_size, rank, rank == 0
    h.grad_accum_steps = overrides.get("grad_accum_steps", 8 // world_size)
    if data_dir is not None:
        h.train_files = os.path.join(str(data_dir), "fineweb_train_*.bin")
        h.val_files = os.path.join(str(data_dir), "fineweb_val_*.bin")
    h.logfile = None
    return h


def cpu_model(module, h, state: Optional[dict] = None, keep_fp32: bool = True):
    """The record's GPT on the CPU: fused MLP off, optionally loaded with ``state``. ``keep_fp32`` makes
    ``.bfloat16()`` a no-op on this instance (the float32 oracle setting); False keeps the record's storage."""
    model = module.GPT(h)
    for block in model.blocks:
        block.mlp.use_fused = False
    if state is not None:
        model.load_state_dict(state, strict=True)
    if keep_fp32:
        model.bfloat16 = lambda: model  # an instance attribute shadows nn.Module.bfloat16
    return model


@contextlib.contextmanager
def patched_gpt(module, state: Optional[dict] = None, keep_fp32: bool = True, on_build: Optional[Callable] = None):
    """Inside: ``module.GPT(h)`` (as train_model calls it) builds :func:`cpu_model` with ``state``."""
    real = module.GPT

    def factory(h):
        module.GPT = real
        try:
            model = cpu_model(module, h, state, keep_fp32)
        finally:
            module.GPT = factory
        if on_build is not None:
            on_build(model)
        return model

    module.GPT = factory
    try:
        yield
    finally:
        module.GPT = real


def inner_function(module, outer: str, name: str, **cells: Any) -> types.FunctionType:
    """A function nested in ``module.<outer>`` (e.g. train_model's ``lr_mul``), rebuilt with the given values for
    its free variables: the record's own code, callable outside its enclosing function."""
    code = next(c for c in getattr(module, outer).__code__.co_consts
                if isinstance(c, types.CodeType) and c.co_name == name)
    missing = [v for v in code.co_freevars if v not in cells]
    if missing:
        raise TypeError(f"{outer}.{name} needs values for {missing}")
    closure = tuple(types.CellType(cells[v]) for v in code.co_freevars)
    return types.FunctionType(code, module.__dict__, name, None, closure)


class FakeClock:
    """``perf_counter`` advancing ``step_s`` per read (the first read gives 0): a fake wallclock for both loops."""

    def __init__(self, step_s: float):
        self.step_s, self.reads = step_s, 0

    def __call__(self) -> float:
        self.reads += 1
        return (self.reads - 1) * self.step_s


# ------------------------------------------------------------------------------------------------ synthetic shards


def positional_stream(total: int, rng: np.random.Generator, min_doc: int = 2, max_doc: int = 60,
                      vocab: Optional[int] = None) -> np.ndarray:
    """Token at stream position p is ``2 + p`` (``2 + p % (vocab - 2)`` with ``vocab``), BOS (1) at document starts:
    a window's tokens tell where it came from."""
    pos = np.arange(total, dtype=np.int64)
    tokens = 2 + (pos % (vocab - 2) if vocab else pos)
    assert tokens.max() < 65536, "positional stream too long for uint16 tokens"
    p = 0
    while p < total:
        tokens[p] = 1
        p += int(rng.integers(min_doc, max_doc + 1))
    return tokens


def write_positional_shards(out: Path, sizes: list[int], seed: int = 0, vocab: Optional[int] = None,
                            **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Train shards cut at fixed sizes from one positional stream (shards 1.. start mid-document, as the export's);
    returns (stream, shard start offsets [len(sizes) + 1])."""
    out.mkdir(parents=True, exist_ok=True)
    stream = positional_stream(sum(sizes), np.random.default_rng(seed), vocab=vocab, **kwargs)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for i, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        write_shard(out / f"fineweb_train_{i:06d}.bin", stream[a:b].astype(np.uint16))
    return stream, starts


# ------------------------------------------------------------------------------------------------ names


def record_to_pgolf_state(record_state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The record's state_dict under pgolf's GPT names (banks split into per-layer matrices): layer i's q and o are
    ``qo_bank[i]`` and ``qo_bank[L + i]``, its k and v ``kv_bank[i]`` and ``kv_bank[L + i]``, its MLP
    ``mlp_up_bank[i]`` / ``mlp_down_bank[i]``. Values are not changed (what each scalar MEANS is the forward's
    business, issue 15)."""
    renamed = {"parallel_post_lambdas": "lane_post_lambdas", "parallel_resid_lambdas": "lane_resid_lambdas",
               "smear_lambda": "smear.lam", "smear_gate.weight": "smear.gate.weight"}
    out: dict[str, torch.Tensor] = {}
    for name, t in record_state.items():
        if name in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"):
            continue
        name = renamed.get(name, name).replace(".attn.attn_gate_w", ".attn.gate.weight")
        out[name] = t.clone()
    L = num_layers
    for i in range(L):
        out[f"blocks.{i}.attn.q.weight"] = record_state["qo_bank"][i].clone()
        out[f"blocks.{i}.attn.o.weight"] = record_state["qo_bank"][L + i].clone()
        out[f"blocks.{i}.attn.k.weight"] = record_state["kv_bank"][i].clone()
        out[f"blocks.{i}.attn.v.weight"] = record_state["kv_bank"][L + i].clone()
        out[f"blocks.{i}.mlp.up.weight"] = record_state["mlp_up_bank"][i].clone()
        out[f"blocks.{i}.mlp.down.weight"] = record_state["mlp_down_bank"][i].clone()
    return out
