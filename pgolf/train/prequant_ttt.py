"""ILLEGAL pre-quant TTT (PRs #1376, #1485, #1487): AdamW epochs on the VALIDATION tokens before GPTQ.

Why it exists at all: to reproduce such a submission as a labelled experiment and to show that the pipeline catches
it. It breaks rules C3/C4 (a token feeds a gradient before it is scored; several passes over the data that is then
scored), so:
  - a record recipe with ``train.prequant_ttt_epochs > 0`` is refused by the config (pgolf/config.py);
  - the checkpoint metadata records ``prequant_ttt_val_tokens`` (tokens trained on x epochs), and
    ``pgolf comply`` fails the run on the rule "no training on validation tokens before scoring";
  - the evaluation refuses, in record mode, a checkpoint that records it.

The pass is deliberately plain: the validation stream cut into rows of ``seq_len`` tokens (documents kept apart
by BOS-delimited segments, as in training), one AdamW step per row, ``epochs`` passes, looping as at evaluation.
Every process runs the same pass on the full stream (only rank 0 saves the result).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pgolf.model.attention import build_cu_seqlens
from pgolf.data.shards import BOS_ID, list_shards, read_shard

PREQUANT_TTT_BETAS = (0.9, 0.999)


def validation_stream(data_dir: str | Path) -> np.ndarray:
    """Every validation token in order: uint16 [N] from ``fineweb_val_*.bin``."""
    paths = list_shards(data_dir, "val")
    if not paths:
        raise FileNotFoundError(f"{data_dir}: no fineweb_val_*.bin shards for prequant TTT")
    return np.concatenate([np.asarray(read_shard(p)) for p in paths])


def row_slices(num_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """[start, end) of each row of ``seq_len`` inputs (+1 target token overlap); the short tail row is kept."""
    if seq_len < 1:
        raise ValueError(f"seq_len: expected >= 1, got {seq_len}")
    return [(s, min(s + seq_len + 1, num_tokens)) for s in range(0, num_tokens - 1, seq_len)]


def prequant_ttt(
    model: torch.nn.Module, data_dir: str | Path, epochs: int, seq_len: int, lr: float, device: torch.device
) -> dict:
    """Train ``model`` in place on the validation tokens; returns what the checkpoint records about it."""
    if epochs <= 0:
        return {"prequant_ttt_epochs": 0, "prequant_ttt_val_tokens": 0}
    stream = validation_stream(data_dir)
    rows = row_slices(len(stream), seq_len)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=PREQUANT_TTT_BETAS, weight_decay=0.0)
    was_looping = getattr(model, "looping", False)
    model.looping = model.cfg.loop_count > 1  # as at evaluation
    model.train()
    t0 = time.perf_counter()
    tokens = 0
    last_loss = float("nan")
    for _ in range(epochs):
        for start, end in rows:
            chunk = torch.from_numpy(stream[start:end].astype(np.int64))  # [n + 1]
            inputs, targets = chunk[:-1], chunk[1:].clone()  # [n] each
            targets[targets == BOS_ID] = -100  # no prediction across a document boundary
            cu_seqlens, max_seqlen = build_cu_seqlens(inputs, bos_id=BOS_ID, max_seqlen=seq_len)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(inputs.to(device), targets.to(device), cu_seqlens=cu_seqlens.to(device),
                             max_seqlen=max_seqlen)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += int(inputs.numel())
            last_loss = float(loss.detach())
    model.looping = was_looping
    return {
        "prequant_ttt_epochs": epochs,
        "prequant_ttt_val_tokens": tokens,
        "prequant_ttt_seconds": time.perf_counter() - t0,
        "prequant_ttt_last_loss": last_loss,
    }
