"""The record recipe's metric options (issue 15 M1-M3, precision at evaluation), checked within pgolf.

The comparisons with the record script itself are in tests/test_record_oracle.py; these tests need no oracle:
stream truncation, the next document's BOS as a target, the record's flat eval_val partition, the softcap dtype
and the evaluated embedding's storage.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval_fixtures import TINY, eval_config, random_docs, tiny_model, toy_bytes, write_artifact, write_val_dir
from pgolf.cli import main as cli_main
from pgolf.config import ConfigError, EvaluateConfig, to_dict
from pgolf.data.shards import BOS_ID
from pgolf.evaluate.scoring import (
    record_flat_mask,
    record_flat_rows,
    record_flat_spans,
    stream_window_row,
    token_nll,
)
from pgolf.evaluate.stage import (
    load_model_from_artifact,
    load_model_from_checkpoint,
    score_documents,
    score_record_flat,
)
from pgolf.evaluate.valdata import ValidationDataError, from_tokens, load_validation
from pgolf.model.attention import build_cu_seqlens

DOC_LENGTHS = [12, 0, 57, 30, 5, 1, 40, 23]  # as test_evaluate: a long document, a BOS-only and a one-target one


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def docs():
    return random_docs(DOC_LENGTHS, seed=2)


def record_metric(cfg: EvaluateConfig, **changes) -> EvaluateConfig:
    values = dict(stream_truncation="record", score_next_bos=True, diagnostic_scoring="record_flat",
                  record_flat_world_size=2, record_flat_batch_seqs=2, softcap_dtype="model", param_storage="fp32")
    values.update(changes)
    return dataclasses.replace(cfg, **values)


# ---------------------------------------------------------------------------------------------- M2: next BOS


def test_score_ends_put_the_next_bos_with_the_document_before_it(docs):
    tokens = np.concatenate(docs)
    plain, record = from_tokens(tokens, toy_bytes(tokens)), from_tokens(tokens, toy_bytes(tokens), score_next_bos=True)
    np.testing.assert_array_equal(plain.score_ends, plain.doc_ends)
    np.testing.assert_array_equal(record.score_ends[:-1], record.doc_starts[1:] + 1)
    assert record.score_ends[-1] == len(tokens)
    assert plain.target_count == len(tokens) - len(docs) and record.target_count == len(tokens) - 1
    assert record.target_mask().sum() == record.target_count and not record.target_mask()[0]
    assert (record.doc_target_counts() == plain.doc_target_counts() + np.r_[np.ones(len(docs) - 1), 0]).all()


def test_next_bos_targets_are_scored_once_as_if_each_document_were_alone(model, docs):
    """Every position but the first is scored exactly once (the ledger checks it); a document's scores, its
    next-BOS target included, equal those of the document alone followed by a BOS; BOS targets weigh 0 bytes."""
    cfg = eval_config("none")
    tokens = np.concatenate(docs)
    val = from_tokens(tokens, toy_bytes(tokens), score_next_bos=True)
    result, acc, _ = score_documents(model, val, cfg, keep_tokens=True)
    assert result.token_count == len(tokens) - 1 and result.byte_sum == int(toy_bytes(tokens).sum())
    assert np.isfinite(acc.token_nll[1:]).all() and np.isnan(acc.token_nll[0])
    for d, (doc, start) in enumerate(zip(docs, val.doc_starts)):
        if d + 1 == len(docs):
            continue
        alone_tokens = np.append(doc, BOS_ID).astype(np.uint16)
        alone = score_documents(model, from_tokens(alone_tokens, toy_bytes(alone_tokens), score_next_bos=True), cfg,
                                keep_tokens=True)[1].token_nll
        np.testing.assert_allclose(acc.token_nll[start + 1 : start + len(doc) + 1], alone[1:], rtol=0, atol=1e-5)
    plain = score_documents(model, from_tokens(tokens, toy_bytes(tokens)), cfg, keep_tokens=True)[1].token_nll
    mask = from_tokens(tokens, toy_bytes(tokens)).target_mask()
    np.testing.assert_allclose(acc.token_nll[mask], plain[mask], rtol=0, atol=1e-5)  # the other targets unchanged


def test_a_stream_window_starting_at_a_bos_scores_it_for_the_document_before_it(model, docs):
    cfg = eval_config("none")
    tokens = np.concatenate(docs)
    val = from_tokens(tokens, toy_bytes(tokens), score_next_bos=True)
    whole = score_documents(model, val, cfg, keep_tokens=True)[1].token_nll
    bos = int(val.doc_starts[3])
    row = stream_window_row(val, bos, bos + 9, cfg.eval_seq_len)
    assert list(row.target_positions[row.scored]) == list(range(bos, bos + 9))
    with torch.no_grad():
        nll = token_nll(model, torch.from_numpy(row.input_ids), torch.from_numpy(row.target_ids),
                        torch.from_numpy(row.cu_seqlens), row.max_seqlen).numpy()
    np.testing.assert_allclose(nll[row.scored], whole[bos : bos + 9], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- M1: truncation


def test_stream_truncated_the_records_way(tmp_path, docs):
    write_val_dir(tmp_path, docs, shard_tokens=37)
    n = len(np.concatenate(docs))
    val = load_validation(tmp_path, truncate_multiple=24, score_next_bos=True)
    assert val.num_positions == (n - 1) // 24 * 24 + 1 < n
    assert val.target_bytes.shape == val.tokens.shape and val.source["stream_tokens"] == n
    np.testing.assert_array_equal(val.tokens, np.concatenate(docs)[: val.num_positions])
    assert val.score_ends[-1] == val.num_positions  # the last (cut) document's targets end at the cut
    with pytest.raises(ValidationDataError, match="no whole window"):
        load_validation(tmp_path, truncate_multiple=n)


# ---------------------------------------------------------------------------------------------- M3: record_flat


def test_record_partition_of_the_real_validation_set():
    """47,851,521 tokens (the record's log: val_tokens 47851520), 2048-token rows, 32 rows per batch: what eval_val
    scores on 1 and on 8 GPUs (PR #1855's diagnostics are 8-GPU numbers)."""
    for world, batches, dropped in ((1, 730, 10_240), (8, 728, 141_312)):
        spans = record_flat_spans(47_851_521, 2048, 32, world)
        assert len(spans) == batches and all(hi - lo == 32 * 2048 + 1 for lo, hi in spans)
        assert 47_851_520 - sum(hi - 1 - lo for lo, hi in spans) == dropped


def test_record_flat_rows_score_every_target_of_their_spans(model, docs):
    tokens = np.concatenate(docs)
    val = from_tokens(tokens, toy_bytes(tokens), score_next_bos=True)
    rows = list(record_flat_rows(val, 24, 2, 2))
    spans = record_flat_spans(val.num_positions, 24, 2, 2)
    assert len(rows) == len(spans) >= 2
    for row, (lo, hi) in zip(rows, spans):
        np.testing.assert_array_equal(row.input_ids, tokens[lo : hi - 1])
        np.testing.assert_array_equal(row.target_positions, np.arange(lo + 1, hi))
        cu, _ = build_cu_seqlens(torch.from_numpy(row.input_ids), BOS_ID, 24)
        np.testing.assert_array_equal(row.cu_seqlens, cu.numpy())  # the record's segments (see the oracle tests)
    mask = record_flat_mask(val, 24, 2, 2)
    result, acc, _ = score_record_flat(model, val, record_metric(eval_config("none")),
                                       keep_tokens=True)
    assert result.token_count == mask.sum() and np.isfinite(acc.token_nll[mask]).all()
    assert result.byte_sum == int(val.target_bytes[mask].sum())
    with pytest.raises(ValueError, match="no whole batch"):
        score_record_flat(model, val, record_metric(eval_config("none"), record_flat_batch_seqs=64))


def test_record_flat_needs_the_next_bos_targets():
    with pytest.raises(ConfigError, match="score_next_bos"):
        EvaluateConfig(diagnostic_scoring="record_flat", score_next_bos=False)


def test_stage_with_the_record_metric(tmp_path, model, docs, capsys):
    from pgolf.train.checkpoint import save_checkpoint

    artifact = write_artifact(tmp_path / "pack", model)
    data = write_val_dir(tmp_path / "shards", docs)
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), {"model_config": to_dict(TINY)})
    cfg = record_metric(eval_config("none"))
    args = ["--artifact", str(artifact), "--eval-json", json.dumps(to_dict(cfg)), "--seed", "7", "--data-dir",
            str(data), "--out", str(tmp_path / "eval.json"), "--mode", "sweep", "--device", "cpu",
            "--checkpoint", str(tmp_path / "ckpt")]
    assert cli_main(["evaluate"] + args) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    n = (len(np.concatenate(docs)) - 1) // 24 * 24 + 1
    assert report["token_count"] == n - 1 and report["data"]["truncate_multiple"] == 24
    val = load_validation(data, truncate_multiple=24, score_next_bos=True)
    flat = int(record_flat_mask(val, 24, 2, 2).sum())
    diag = report["diagnostics"]
    assert diag["scoring"] == "record_flat"
    assert diag["post_quant"]["token_count"] == diag["pre_quant"]["token_count"] == flat < n - 1
    pre = score_record_flat(model, val, cfg)[0]
    assert diag["pre_quant"]["loss_sum"] == pytest.approx(pre.loss_sum, rel=1e-9)
    assert report["param_storage"] == {"evaluate": "fp32", "checkpoint": "fp32"}
    # the artifact under the record's storage, an fp32-trained checkpoint: said so, and the pre-quant model as trained
    other = args[:]
    other[other.index("--eval-json") + 1] = json.dumps(to_dict(dataclasses.replace(cfg, param_storage="record")))
    capsys.readouterr()
    assert cli_main(["evaluate"] + other) == 0
    assert "trained under param_storage 'fp32', but evaluate.param_storage is 'record'" in capsys.readouterr().err
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["diagnostics"]["pre_quant"]["loss_sum"] == pytest.approx(pre.loss_sum, rel=1e-9)
    assert report["diagnostics"]["post_quant"]["loss_sum"] != diag["post_quant"]["loss_sum"]


# ---------------------------------------------------------------------------------------------- precision


def test_softcap_dtype_under_autocast(model):
    """Under bf16 autocast ``model`` softcaps the head's bf16 logits and casts after (the record); ``float32``
    casts first (pgolf). Both exactly as written out here."""
    rng = np.random.default_rng(3)
    ids = torch.from_numpy(np.r_[BOS_ID, rng.integers(2, 300, 40)]).long()
    targets = torch.roll(ids, -1)
    cu, _ = build_cu_seqlens(ids, BOS_ID, 24)
    cap = model.cfg.logit_softcap
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.lm_head(model.forward_hidden(ids, cu, 24))
        assert z.dtype == torch.bfloat16
        record_way = F.cross_entropy((cap * torch.tanh(z / cap)).float(), targets, reduction="none")
        pgolf_way = F.cross_entropy(cap * torch.tanh(z.float() / cap), targets, reduction="none")
        as_model = token_nll(model, ids, targets, cu, 24, softcap_dtype="model")
        as_fp32 = token_nll(model, ids, targets, cu, 24, softcap_dtype="float32")
    assert torch.equal(as_model, record_way) and torch.equal(as_fp32, pgolf_way)
    assert not torch.equal(as_model, as_fp32)  # the option matters under autocast
    with torch.no_grad():  # without autocast the logits are float32: the two agree
        assert torch.equal(token_nll(model, ids, targets, cu, 24, softcap_dtype="model"),
                           token_nll(model, ids, targets, cu, 24, softcap_dtype="float32"))


def test_record_storage_rounds_the_evaluated_embedding_to_bf16(tmp_path, model):
    from pgolf.train.checkpoint import save_checkpoint

    artifact = write_artifact(tmp_path / "pack", model)
    plain = load_model_from_artifact(artifact)[0].state_dict()
    rounded = load_model_from_artifact(artifact, param_storage="record")[0].state_dict()
    emb = rounded["tok_emb.weight"]
    assert emb.dtype == torch.float32 and torch.equal(emb, emb.bfloat16().float())
    assert torch.equal(emb, plain["tok_emb.weight"].bfloat16().float())
    assert not torch.equal(emb, plain["tok_emb.weight"])  # the dequantized values were not bf16 already
    assert all(torch.equal(rounded[k], plain[k]) for k in plain if k != "tok_emb.weight")
    # a checkpoint carries its storage: it is built under it, and asking for another is refused
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), {"model_config": to_dict(TINY), "param_storage": "record"})
    loaded, _ = load_model_from_checkpoint(tmp_path / "ckpt")
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight.bfloat16().float())
    with pytest.raises(ValueError, match="param_storage 'record'.*evaluate.param_storage is 'fp32'"):
        load_model_from_checkpoint(tmp_path / "ckpt", param_storage="fp32")
