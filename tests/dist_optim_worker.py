"""Worker for tests/test_optim.py: train a tiny model with pgolf.train.optim, alone or as one rank under torchrun.

Under ``python -m torch.distributed.run --nproc_per_node=N tests/dist_optim_worker.py --out DIR`` every rank
builds the same model (same seed), takes its contiguous 1/N of each batch, trains, and writes
``DIR/<mode>_rank<R>.npz``. Imported by the test, :func:`train` with no process group is the 1-process run on
the full batch that the ranks must reproduce.

Two modes, both world-size independent:
- ``internal``: Muon averages its own gradients (all_reduce inside ``step``); AdamW's grads via allreduce_grads;
- ``clip``: every gradient averaged first by allreduce_grads, then clipped by the global norm, then the step
  (Muon built with ``muon_average_grads=False``) -- the order the training loop needs for gradient clipping.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pgolf.config import OptimConfig
from pgolf.io import atomic_path
from pgolf.train.optim import allreduce_grads, build_optimizers, set_lr_multiplier

VOCAB = 16
DIM = 8
BATCH = 24  # rows per full batch; divisible by 2 ranks
STEPS = 6
MODES = ("internal", "clip")
CLIP_NORM = 2.0  # the first steps' global norm is ~2.5: clipping is active on some steps, not all


class TinyNet(nn.Module):
    """Embedding -> 3 square residual layers (one Muon shape bucket of 3, so 2 ranks own 2 and 1)
    -> a tall/wide MLP pair -> tied logits. Scalars: a per-channel gain and a scalar gate."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.randn(VOCAB, DIM) * 0.5)
        self.square = nn.ParameterList([nn.Parameter(torch.randn(DIM, DIM) / DIM**0.5) for _ in range(3)])
        self.up = nn.Parameter(torch.randn(4 * DIM, DIM) / DIM**0.5)  # tall [32, 8]
        self.down = nn.Parameter(torch.randn(DIM, 4 * DIM) / (4 * DIM) ** 0.5)  # wide [8, 32]
        self.gain = nn.Parameter(torch.ones(DIM))
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed[tokens]  # [B, DIM]
        for w in self.square:
            h = h + torch.tanh(h @ w.T) * self.gain  # [B, DIM]
        h = h + torch.sigmoid(self.gate) * (torch.relu(h @ self.up.T) @ self.down.T)  # [B, DIM]
        return h @ self.embed.T  # [B, VOCAB]

    def param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        named = dict(self.named_parameters())
        return {
            "matrix": [(n, p) for n, p in named.items() if n.startswith(("square", "up", "down"))],
            "embedding": [("embed", self.embed)],
            "scalar": [("gain", self.gain), ("gate", self.gate)],
        }


def optim_config() -> OptimConfig:
    """Large lrs and a short momentum warm-up, so a few steps exercise every term. Muon is blind to the
    gradient's scale (row norm, NS normalization); AdamW's large eps (grads are ~0.01-0.1 here) makes it see it,
    so a gradient summed instead of averaged over ranks changes the result."""
    return OptimConfig(
        matrix_lr=0.05,
        muon_momentum=0.9,
        muon_momentum_warmup_start=0.6,
        muon_momentum_warmup_steps=3,
        muon_weight_decay=0.1,
        embed_lr=0.02,
        embed_weight_decay=0.05,
        scalar_lr=0.03,
        scalar_weight_decay=0.01,
        adam_eps=0.03,
    )


def train(mode: str) -> dict[str, np.ndarray]:
    """Train for STEPS steps; this process's rank and world size come from torch.distributed (1, 0 without)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    torch.manual_seed(1234)
    model = TinyNet()
    tokens = torch.randint(0, VOCAB, (STEPS, BATCH))
    targets = torch.randint(0, VOCAB, (STEPS, BATCH))
    groups = model.param_groups()
    optimizers = build_optimizers(groups, optim_config(), muon_average_grads=(mode == "internal"))
    rows = BATCH // world
    mine = slice(rank * rows, (rank + 1) * rows)
    for step in range(STEPS):
        logits = model(tokens[step, mine])  # [rows, VOCAB]
        loss = nn.functional.cross_entropy(logits, targets[step, mine])  # mean over this rank's rows
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if mode == "internal":
            allreduce_grads([p for name in ("embedding", "scalar") for _, p in groups[name]])
        else:
            allreduce_grads(model.parameters())
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        set_lr_multiplier(optimizers, 1.0 - 0.1 * step)
        for opt in optimizers:
            opt.step()
    return {name: p.detach().numpy().copy() for name, p in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="folder for <mode>_rank<R>.npz")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        for mode in MODES:
            params = train(mode)
            with atomic_path(args.out / f"{mode}_rank{rank}.npz") as tmp:
                with open(tmp, "wb") as handle:
                    np.savez(handle, **params)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
