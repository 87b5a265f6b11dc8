"""Muon's direction at PR #1855's precision (``optim.muon_precision: record_bf16``): the same formulas as
:func:`pgolf.train.optim.row_normalize` and :func:`pgolf.train.optim.newton_schulz`, rounded where the record rounds.

Why a second copy of the same math: in bf16 the order of roundings is part of the result. pgolf's own path
normalizes in fp32 and runs the iteration in bf16 only on CUDA; the record casts the momentum update to bf16 first
and does every operation, the Frobenius norm included, in bf16. Same grads, 3 steps: ~4 % relative difference in
the update, so the record recipe reproduces the record's order exactly:

    U <- U / clamp(||U_row||_2 computed in fp32, 1e-7) rounded to bf16         (MuonEq-R, each row)
    X <- bf16(U); X <- X^T if rows > cols
    X <- X / (||X||_F + eps)                            norm of the bf16 tensor, a bf16 result
    repeat: A = X X^T; B = b A + c (A A); X = a X + B X     every product and sum rounded to bf16
    X <- X^T if it was transposed

Leading dimensions are a batch (several matrices, or the record's banks [B, rows, cols]).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

ROW_NORM_FLOOR = 1e-7  # the record clamps each row norm from below (pgolf's fp32 path adds an epsilon instead)


def row_normalize_bf16(U: Tensor) -> Tensor:
    """Each row of U [..., rows, cols] divided by its L2 norm: the norm taken in fp32, floored, then rounded to
    U's dtype before the division (the division itself in U's dtype)."""
    row_norm = U.float().norm(dim=-1, keepdim=True).clamp_min(ROW_NORM_FLOOR)  # [..., rows, 1] fp32
    return U / row_norm.to(U.dtype)


def newton_schulz_bf16(G: Tensor, schedule: Sequence[tuple[float, float, float]], eps: float) -> Tensor:
    """Polar factor of each matrix of G [..., rows, cols], every operation in bf16; returns bf16 [..., rows, cols].

    ``schedule``: the resolved (a, b, c) per step (``pgolf.train.optim.ns_coefficient_schedule``).
    """
    X = G.to(torch.bfloat16)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT  # [..., cols, rows]: the Gram matrix below is the small one
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # the norm of the bf16 matrix, in bf16
    X = polar_iterations(X, schedule)
    return X.mT if transposed else X


def polar_iterations(X: Tensor, schedule: Sequence[tuple[float, float, float]]) -> Tensor:
    """The Newton-Schulz quintic steps on a normalized X [..., small, large] (rows <= cols), in X's dtype; both
    Muon variants (this module's bf16 one and ``pgolf.train.optim.newton_schulz``) run them."""
    for a, b, c in schedule:
        A = X @ X.mT  # [..., small, small]
        B = b * A + c * (A @ A)  # [..., small, small]
        X = a * X + B @ X  # [..., small, large]
    return X
