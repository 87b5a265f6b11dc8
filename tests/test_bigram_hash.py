"""The eval-time bigram hash embedding (PR #1523): hashing, zero contribution at creation, no cross-document
leak, and training inside chunked score-first TTT under the ledger."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_fixtures import (
    VOCAB,
    copy_model,
    eval_config,
    random_docs,
    tiny_model,
    val_from_docs,
)

from pgolf.evaluate.bigram_hash import BigramHash, bigram_buckets
from pgolf.config import ConfigError, TTTConfig
from pgolf.evaluate.stage import score_documents
from pgolf.evaluate.ttt import run_ttt

CPU = torch.device("cpu")
BOS = 1


def test_buckets_use_the_predecessor_and_a_sentinel_at_bos_and_row_start():
    ids = torch.tensor([BOS, 5, 9, 5, 9, BOS, 9, 5])
    b = bigram_buckets(ids, buckets=97, vocab_size=VOCAB, bos_id=BOS)
    assert b.dtype == torch.int64 and b.shape == ids.shape and int(b.min()) >= 0 and int(b.max()) < 97
    assert b[2] == b[4]  # (5, 9) twice
    expected = [(VOCAB * 1_000_003 + BOS) % 97, (BOS * 1_000_003 + 5) % 97, (5 * 1_000_003 + 9) % 97]
    assert b[:3].tolist() == expected
    assert b[5] == b[0]  # a BOS never sees the previous document's last token
    assert b[6] == (BOS * 1_000_003 + 9) % 97


@pytest.mark.parametrize("dim", [16, 6])  # table as wide as the model (no projection), and a projected one
def test_zero_contribution_at_creation_but_trainable(dim):
    model_dim = 16
    module = BigramHash(64, dim, model_dim, VOCAB, BOS, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([BOS, 3, 4, 5, BOS, 4])
    out = module(ids)  # [T, model_dim]
    assert out.shape == (6, model_dim) and torch.count_nonzero(out) == 0
    (out * torch.randn_like(out)).sum().backward()
    trained = module.table if module.proj is None else module.proj
    assert trained.grad is not None and torch.count_nonzero(trained.grad) > 0


def test_config_refuses_it_outside_chunked_mode():
    TTTConfig(mode="chunked", bigram_hash_buckets=16384, bigram_hash_dim=512)
    with pytest.raises(ConfigError, match="bigram_hash_buckets: .*chunked TTT; mode is 'lora'"):
        TTTConfig(mode="lora", bigram_hash_buckets=16)
    with pytest.raises(ConfigError, match="bigram_hash_buckets: expected >= 0"):
        TTTConfig(mode="chunked", bigram_hash_buckets=-1)


def test_chunked_ttt_trains_the_table_after_scoring():
    model = tiny_model(seed=3)
    val = val_from_docs(random_docs([5, 33, 18, 70, 0, 41, 9, 26], seed=5))
    cfg = eval_config("chunked", bigram_hash_buckets=257)
    plain = score_documents(copy_model(model), val, eval_config("none"), keep_tokens=True)[1]
    without = run_ttt(copy_model(model), val, eval_config("chunked"), 0, device=CPU, keep_tokens=True)
    adapted = copy_model(model)
    out = run_ttt(adapted, val, cfg, 0, device=CPU, keep_tokens=True)
    out.ledger.check_complete(val.target_mask())

    # the first chunk is scored before any update: exactly plain scoring (the table adds zero)
    first = (np.arange(val.num_positions) < 1 + cfg.ttt.stream_chunk_tokens) & val.target_mask()
    np.testing.assert_allclose(out.accumulator.token_nll[first], plain.token_nll[first], rtol=0, atol=2e-5)
    # the table learned from scored chunks and changed what later chunks score
    assert adapted.bigram_hash is not None and torch.count_nonzero(adapted.bigram_hash.table) > 0
    later = ~first & val.target_mask()
    assert not np.allclose(out.accumulator.token_nll[later], without.accumulator.token_nll[later], atol=1e-6)
    assert out.summary["bigram_hash_buckets"] == 257
