"""Eval-time bigram hash embedding (PR #1523): a table indexed by a hash of (previous token, token), added to the
token embedding, created at evaluation with zero output and trained only inside the score-first TTT loop.

Why it is legal: it starts as the identity (zero contribution), is not part of the artifact (so costs no bytes),
reads only tokens before the predicted one (the input token and its predecessor: C1), and learns only from chunks
that were already scored (the chunked TTT loop's ledger enforces C3). Document boundaries: the predecessor of a
BOS is replaced by a sentinel, so nothing crosses from one document into the next.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

HASH_MULTIPLIER = 1_000_003  # odd prime: (prev * M + cur) mod buckets spreads neighbouring pairs apart


def bigram_buckets(input_ids: Tensor, buckets: int, vocab_size: int, bos_id: int) -> Tensor:
    """Bucket of each (predecessor, token) pair: int64 [T]. A row's first token and every BOS get the sentinel
    predecessor ``vocab_size`` (no token has that id)."""
    ids = input_ids.long()  # [T]
    prev = torch.cat([ids.new_full((1,), vocab_size), ids[:-1]])  # [T]
    prev = torch.where(ids == bos_id, torch.full_like(prev, vocab_size), prev)
    return (prev * HASH_MULTIPLIER + ids) % buckets


class BigramHash(nn.Module):
    """``x += proj(table[bucket(prev, cur)])``; zero contribution at creation.

    With ``dim == model_dim`` there is no projection and the table starts at zero (a zero table still gets
    gradients). With a smaller ``dim`` the table starts small and random and the projection starts at zero
    (two zero factors would never receive a gradient).
    """

    def __init__(self, buckets: int, dim: int, model_dim: int, vocab_size: int, bos_id: int = 1,
                 generator: torch.Generator | None = None):
        super().__init__()
        if buckets < 1 or dim < 1:
            raise ValueError(f"BigramHash: buckets and dim must be >= 1, got {buckets} and {dim}")
        self.buckets, self.vocab_size, self.bos_id = buckets, vocab_size, bos_id
        self.table = nn.Parameter(torch.zeros(buckets, dim))  # [buckets, dim]
        self.proj = None
        if dim != model_dim:
            with torch.no_grad():
                self.table.normal_(0.0, 0.02, generator=generator)
            self.proj = nn.Parameter(torch.zeros(model_dim, dim))  # [model_dim, dim]

    def forward(self, input_ids: Tensor) -> Tensor:  # ids [T] -> [T, model_dim]
        e = self.table[bigram_buckets(input_ids, self.buckets, self.vocab_size, self.bos_id)]  # [T, dim]
        return e if self.proj is None else e @ self.proj.t().to(e.dtype)
