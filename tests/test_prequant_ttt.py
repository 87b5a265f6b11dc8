"""The ILLEGAL pre-quant TTT option (pr1487): it really trains on validation tokens, the checkpoint says so, and
the evaluation (record mode) and `pgolf comply` refuse the result."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import TINY_MODEL, TINY_TRAIN, run_train, write_data

from pgolf.compliance import comply
from pgolf.train.checkpoint import read_checkpoint_meta
from pgolf.config import parse_run_config
from pgolf.data.shards import BOS_ID
from pgolf.model.gpt import GPT
from pgolf.train.prequant_ttt import (
    prequant_ttt,
    row_slices,
    validation_stream,
)
from pgolf.evaluate.stage import refuse_in_record_mode
from pgolf.evaluate.ledger import LegalityError


def test_row_slices_cover_every_target_once():
    for n, seq_len in ((10, 3), (11, 5), (2, 8), (100, 100)):
        targets = [t for start, end in row_slices(n, seq_len) for t in range(start + 1, end)]
        assert targets == list(range(1, n)), (n, seq_len)
    with pytest.raises(ValueError, match="seq_len"):
        row_slices(10, 0)


def _val_loss(model: GPT, stream: np.ndarray) -> float:
    ids = torch.from_numpy(stream.astype(np.int64))
    targets = ids[1:].clone()
    targets[targets == BOS_ID] = -100
    with torch.no_grad():
        return float(model(ids[:-1], targets))


def test_prequant_ttt_trains_on_the_validation_tokens(tmp_path):
    data = write_data(tmp_path / "data")
    stream = validation_stream(data)
    torch.manual_seed(0)
    model = GPT(TINY_MODEL)
    before = _val_loss(model, stream)
    info = prequant_ttt(model, data, epochs=3, seq_len=48, lr=1e-2, device=torch.device("cpu"))
    assert info["prequant_ttt_val_tokens"] == 3 * (len(stream) - 1)
    assert info["prequant_ttt_epochs"] == 3
    assert _val_loss(model, stream) < before - 0.5  # it learned the very tokens it will be scored on
    assert prequant_ttt(model, data, 0, 48, 1e-2, torch.device("cpu"))["prequant_ttt_val_tokens"] == 0


@pytest.fixture(scope="module")
def illegal_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prequant")
    data = write_data(root / "data")
    train = dataclasses.replace(TINY_TRAIN, prequant_ttt_epochs=1)
    proc = run_train(data, root / "out", 1, train=train)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "out"


def test_checkpoint_records_validation_tokens_and_evaluation_refuses_it(illegal_checkpoint):
    meta = read_checkpoint_meta(illegal_checkpoint / "checkpoint")
    stream = validation_stream(illegal_checkpoint.parent / "data")
    assert meta["prequant_ttt_val_tokens"] == len(stream) - 1
    assert meta["train_config"]["prequant_ttt_epochs"] == 1
    summary = json.loads((illegal_checkpoint / "train_summary.json").read_text())
    assert summary["prequant_ttt_val_tokens"] == len(stream) - 1
    with pytest.raises(LegalityError, match="pre-quant TTT, rules C3/C4"):
        refuse_in_record_mode(illegal_checkpoint / "checkpoint")


def test_comply_rejects_the_checkpoint_of_a_prequant_run(illegal_checkpoint, tmp_path):
    run_dir = tmp_path / "results" / "pr1487"
    seed_dir = run_dir / "seed7" / "train"
    seed_dir.mkdir(parents=True)
    (seed_dir / "checkpoint").mkdir()
    (seed_dir / "checkpoint" / "checkpoint.json").write_bytes(
        (illegal_checkpoint / "checkpoint" / "checkpoint.json").read_bytes())
    cfg = parse_run_config({"run": "pr1487", "mode": "sweep", "seeds": [7], "data": {"val_docs": 40},
                            "train": {"prequant_ttt_epochs": 1}}, "test")
    verdicts = {v.rule: v for v in comply.check_run(run_dir, cfg)}
    assert verdicts["no_prequant_ttt"].status == comply.FAIL
    assert "prequant_ttt_val_tokens" in verdicts["no_prequant_ttt"].evidence
    assert "recipe: train.prequant_ttt_epochs = 1" in verdicts["no_prequant_ttt"].evidence
    assert verdicts["mode"].status == comply.FAIL
