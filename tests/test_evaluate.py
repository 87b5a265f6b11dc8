"""Exact bpb: hand-checked scoring, no cross-document leakage, byte accounting, artifact loading and the stage."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from eval_fixtures import (
    TINY,
    VOCAB,
    copy_model,
    eval_config,
    random_docs,
    replace_ttt,
    tiny_model,
    toy_bytes,
    val_from_docs,
    write_artifact,
    write_val_dir,
)
from pgolf.cli import main as cli_main
from pgolf.evaluate import stage as evaluate
from pgolf.model.attention import build_cu_seqlens
from pgolf.config import ConfigError, to_dict
from pgolf.evaluate.stage import bits_per_byte, budget_report, load_model_from_artifact, score_documents, score_model
from pgolf.evaluate.valdata import ValidationDataError, from_tokens, load_validation

DOC_LENGTHS = [12, 0, 57, 30, 5, 1, 40, 23]  # one longer than a window (24), a BOS-only and a one-target document


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def docs():
    return random_docs(DOC_LENGTHS, seed=2)


def test_bits_per_byte_formula():
    assert bits_per_byte(math.log(2) * 10.0, 10) == pytest.approx(1.0)
    assert bits_per_byte(3.0, 4) == pytest.approx(3.0 / (math.log(2) * 4))
    with pytest.raises(ValueError, match="byte_sum must be > 0"):
        bits_per_byte(1.0, 0)


def test_bpb_equals_a_hand_computation(model, docs):
    """Each document alone through the model (windows of eval_seq_len from its BOS), a log-softmax written out
    as a loop, bytes added up by hand: the packed evaluation must give the same sums."""
    cfg = eval_config("none")
    L = cfg.eval_seq_len
    loss_sum, byte_sum, targets = 0.0, 0, 0
    with torch.no_grad():
        for doc in docs:
            if len(doc) < 2:
                continue
            inputs = torch.tensor(doc[:-1], dtype=torch.long)
            cu, _ = build_cu_seqlens(inputs, 1, L)
            logits = model.forward_logits(inputs, cu, L).double().tolist()
            for row, target in zip(logits, doc[1:].tolist()):
                top = max(row)
                log_z = top + math.log(sum(math.exp(z - top) for z in row))
                loss_sum += log_z - row[target]
                byte_sum += 1 + target % 4  # toy_bytes, by hand
                targets += 1
    result = score_model(model, val_from_docs(docs), cfg)
    assert result.token_count == targets == sum(DOC_LENGTHS)
    assert result.byte_sum == byte_sum and result.doc_count == len(docs)
    assert result.loss_sum == pytest.approx(loss_sum, rel=1e-6)
    assert result.val_loss == pytest.approx(loss_sum / targets, rel=1e-6)
    assert result.val_bpb == pytest.approx(loss_sum / (math.log(2) * byte_sum), rel=1e-6)


@pytest.mark.parametrize("bos_mask", [True, False])
def test_packed_documents_score_as_if_alone(docs, bos_mask):
    """Looping on, TTT off: a document's scores do not depend on its neighbours in the row. With the SmearGate BOS
    mask switched off (the pre-#1851 bug) they do - the check can fail."""
    model = tiny_model(seed=1, cfg=TINY if bos_mask else TINY.__class__(**{**to_dict(TINY), "smear_bos_mask": False}))
    assert model.looping
    cfg = eval_config("none")
    val = val_from_docs(docs)
    packed = score_documents(model, val, cfg, keep_tokens=True)[1].token_nll
    alone = np.full(val.num_positions, np.nan)
    for doc, start in zip(docs, val.doc_starts):
        if len(doc) > 1:
            single = val_from_docs([doc])
            alone[start : start + len(doc)] = score_documents(model, single, cfg, keep_tokens=True)[1].token_nll
    mask = val.target_mask()
    assert np.isfinite(packed[mask]).all()
    if bos_mask:
        np.testing.assert_allclose(packed[mask], alone[mask], rtol=0, atol=1e-5)
    else:
        assert np.abs(packed[mask] - alone[mask]).max() > 1e-3


def test_a_document_longer_than_a_row_is_split_and_scores_as_in_one_row(model):
    """Rows of 96 inputs, windows of 24: the 250-token document spans 3 rows. Each continuation starts behind its
    predecessor token, so its scores equal those of one row holding the whole document."""
    docs = random_docs([250, 7, 130], seed=4)
    val = val_from_docs(docs)
    cfg = eval_config("none")
    result, acc, ledger = score_documents(model, val, cfg, keep_tokens=True)
    assert result.token_count == 250 + 7 + 130 and ledger.summary()["complete_checked"]
    wide = cfg.__class__(**{**to_dict(cfg), "eval_batch_tokens": 512, "ttt": cfg.ttt})
    whole = score_documents(model, val, wide, keep_tokens=True)[1]
    mask = val.target_mask()
    np.testing.assert_allclose(acc.token_nll[mask], whole.token_nll[mask], rtol=0, atol=1e-5)
    # the narrowest row allowed: one window and the predecessor token
    narrow = cfg.__class__(**{**to_dict(cfg), "eval_batch_tokens": cfg.eval_seq_len + 1, "ttt": cfg.ttt})
    np.testing.assert_allclose(score_documents(model, val, narrow, keep_tokens=True)[1].token_nll[mask],
                               whole.token_nll[mask], rtol=0, atol=1e-5)
    # rows of exactly one window have no room for it: a split document would lose its predecessor, so refused
    with pytest.raises(ConfigError, match=r"eval_batch_tokens: expected > eval_seq_len \(24\): a row needs room"):
        cfg.__class__(**{**to_dict(cfg), "eval_batch_tokens": cfg.eval_seq_len, "ttt": cfg.ttt})


# --------------------------------------------------------------------------------------------------------------
# Validation data and byte accounting
# --------------------------------------------------------------------------------------------------------------


def test_load_validation_reads_the_stream_across_shards(tmp_path, docs):
    write_val_dir(tmp_path, docs, shard_tokens=37)
    val = load_validation(tmp_path)
    tokens = np.concatenate(docs)
    np.testing.assert_array_equal(val.tokens, tokens)
    assert val.byte_accounting == "sidecar" and val.byte_sum == int(toy_bytes(tokens).sum())
    assert val.num_docs == len(docs) and val.target_count == sum(DOC_LENGTHS)
    assert load_validation(tmp_path, max_docs=3).num_docs == 3


def test_a_gap_a_lone_shard_or_other_totals_than_the_manifest_are_refused(tmp_path, docs):
    """The stream is the shards in index order: a missing shard would splice the documents either side of it."""
    import shutil

    from pgolf.data.shards import list_shards

    tokens = np.concatenate(docs)
    manifest = {"caseops": False, "docs": {"val": len(docs)}, "tokens": {"val": len(tokens)}}
    good = write_val_dir(tmp_path / "good", docs, shard_tokens=37, manifest=manifest)
    assert load_validation(good).num_docs == len(docs)

    gap = tmp_path / "gap"
    shutil.copytree(good, gap)
    list_shards(gap, "val")[2].unlink()
    list_shards(gap, "val_bytes")[2].unlink()
    with pytest.raises(ValidationDataError, match=rf"{gap}: fineweb_val_000002.bin is missing"):
        load_validation(gap)

    lone = tmp_path / "lone"
    shutil.copytree(good, lone)
    list_shards(lone, "val_bytes")[1].unlink()
    with pytest.raises(ValidationDataError, match="fineweb_val_000001.bin has no fineweb_val_bytes_000001.bin"):
        load_validation(lone)

    counted = tmp_path / "counted"
    shutil.copytree(good, counted)
    (counted / "manifest.json").write_text(json.dumps({**manifest, "docs": {"val": len(docs) + 1}}))
    with pytest.raises(ValidationDataError, match=rf"hold {len(docs):,} docs, manifest.json says docs.val = "):
        load_validation(counted)


def test_caseops_data_without_a_sidecar_is_refused(tmp_path, docs):
    write_val_dir(tmp_path, docs, sidecar=False, manifest={"caseops": True})
    with pytest.raises(ValidationDataError, match="CaseOps.*sidecar"):
        load_validation(tmp_path, tokenizer_path=tmp_path / "any.model")


def test_lut_accounting_needs_a_tokenizer_and_misaligned_bytes_are_refused(tmp_path, docs):
    write_val_dir(tmp_path, docs, sidecar=False)
    with pytest.raises(ValidationDataError, match="needs the tokenizer"):
        load_validation(tmp_path)
    tokens = np.concatenate(docs)
    bad = toy_bytes(tokens)
    bad[len(docs[0])] = 3  # the second document's BOS
    with pytest.raises(ValidationDataError, match="misaligned"):
        from_tokens(tokens, bad)


TEXTS = [
    "the cat sat on the mat and the dog sat on the log",
    "a quick brown fox jumps over the lazy dog 12345",
    "caf\u00e9 na\u00efve over the top of the hill we go",
    "numbers 2024 and 1999 were good years for the cat",
] * 6


def test_lut_accounting_of_a_plain_tokenizer_counts_utf8_bytes(tmp_path):
    tokenizer_mod = pytest.importorskip("pgolf.data.tokenizer")
    if not hasattr(tokenizer_mod, "train_tokenizer") or not hasattr(tokenizer_mod, "build_byte_lut"):
        pytest.skip("pgolf.data.tokenizer does not provide train_tokenizer/build_byte_lut yet")
    path = tokenizer_mod.train_tokenizer(TEXTS, tmp_path / "plain.model", vocab_size=300, caseops=False, num_threads=1)
    tok = tokenizer_mod.load_tokenizer(path, caseops=False)
    encoded = [tok.encode_document(text) for text in TEXTS[:4]]
    docs = [np.concatenate([[1], ids]).astype(np.uint16) for ids, _ in encoded]
    data = write_val_dir(tmp_path / "shards", docs, sidecar=False)
    val = load_validation(data, tokenizer_path=path)
    assert val.byte_accounting == "lut"
    assert val.byte_sum == sum(len(t.encode("utf-8")) for t in TEXTS[:4])
    expected = np.concatenate([np.concatenate([[0], counts]) for _, counts in encoded])  # the tokenizer's own counts
    np.testing.assert_array_equal(val.target_bytes, expected)
    # the manifest names the tokenizer the shards were made with: another one's pieces would give other bytes
    from pgolf.io import sha256_file

    (data / "manifest.json").write_text(json.dumps({"caseops": False, "tokenizer": {"sha256": sha256_file(path)}}))
    assert load_validation(data, tokenizer_path=path).byte_sum == val.byte_sum
    (data / "manifest.json").write_text(json.dumps({"caseops": False, "tokenizer": {"sha256": "ab" * 32}}))
    with pytest.raises(ValidationDataError, match=r"plain.model: sha256 .* says the shards were made with tokenizer abab"):
        load_validation(data, tokenizer_path=path)


def test_lut_refuses_a_caseops_tokenizer(tmp_path, docs, published_tokenizer):
    write_val_dir(tmp_path, docs, sidecar=False)
    with pytest.raises(ValidationDataError, match="CaseOps tokenizer"):
        load_validation(tmp_path, tokenizer_path=published_tokenizer)


# --------------------------------------------------------------------------------------------------------------
# Artifact loading and the stage entry
# --------------------------------------------------------------------------------------------------------------


def test_model_is_built_from_the_artifact_header(tmp_path, model, docs):
    path = write_artifact(tmp_path, model)
    loaded, header, timings = load_model_from_artifact(path)
    assert header["model_config"] == to_dict(TINY) and loaded.cfg == TINY and loaded.looping
    assert set(timings) >= {"read_s", "unpack_s", "dequantize_s", "build_s", "load_s"}
    val = val_from_docs(docs)
    quantized = score_model(loaded, val, eval_config("none"))
    original = score_model(model, val, eval_config("none"))
    assert quantized.token_count == original.token_count
    assert quantized.loss_sum != original.loss_sum  # the weights really are the quantized ones
    assert abs(quantized.val_bpb - original.val_bpb) < 0.05 * original.val_bpb


def _stage_args(tmp_path: Path, artifact: Path, data: Path, cfg, *extra: str) -> list[str]:
    return ["--artifact", str(artifact), "--eval-json", json.dumps(to_dict(cfg)), "--seed", "7", "--data-dir",
            str(data), "--out", str(tmp_path / "eval.json"), "--mode", "sweep", "--device", "cpu", *extra]


def test_every_scored_model_gets_the_evaluation_embedding_dtype(tmp_path, model, docs, monkeypatch):
    """``evaluate.embed_dtype`` reaches the pre-quant model too (the record's live model holds its embedding in bf16;
    on the H200 its absence left pgolf's pre-quant diagnostic 1.7e-4 bpb off the record's, post-quant equal)."""
    from pgolf.evaluate import stage
    from pgolf.train.checkpoint import save_checkpoint

    seen = []
    monkeypatch.setattr(stage, "apply_embed_dtype", lambda m, cfg: seen.append(m.tok_emb.weight.data_ptr()))
    artifact = write_artifact(tmp_path / "pack", model)
    data = write_val_dir(tmp_path / "shards", docs)
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), {"model_config": to_dict(TINY)})
    cfg = eval_config("none")
    assert cli_main(["evaluate"] + _stage_args(tmp_path, artifact, data, cfg, "--checkpoint", str(tmp_path / "ckpt"))) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["diagnostics"]["pre_quant"] is not None
    assert len(seen) == 2 and seen[0] != seen[1], "the artifact's model and the checkpoint's model, each once"


def test_a_checkpoint_other_than_the_artifacts_is_refused(tmp_path, model):
    """The pre-quant score and the record-mode legality check read --checkpoint: it must be the one the artifact
    was quantized from (the header's input hashes)."""
    from pgolf.evaluate.stage import check_checkpoint_is_the_artifacts
    from pgolf.train.checkpoint import read_checkpoint_meta, save_checkpoint

    save_checkpoint(tmp_path / "ckpt", model.state_dict(), {"model_config": to_dict(TINY)})
    own = read_checkpoint_meta(tmp_path / "ckpt")["weights_sha256"]
    check_checkpoint_is_the_artifacts(tmp_path / "ckpt", {"input_hashes": {"checkpoint_weights_sha256": own}}, "a")
    check_checkpoint_is_the_artifacts(tmp_path / "ckpt", {"input_hashes": {}}, "a")  # an artifact that names none
    with pytest.raises(ValueError, match="are not those seed1/artifact.pgolf was quantized from"):
        check_checkpoint_is_the_artifacts(tmp_path / "ckpt", {"input_hashes": {"checkpoint_weights_sha256": "ab" * 32}},
                                          "seed1/artifact.pgolf")


def test_stage_writes_a_complete_report(tmp_path, model, docs):
    from pgolf.train.checkpoint import save_checkpoint

    artifact = write_artifact(tmp_path / "pack", model)
    data = write_val_dir(tmp_path / "shards", docs)
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), {"model_config": to_dict(TINY)})
    cfg = eval_config("lora")
    assert cli_main(["evaluate"] + _stage_args(tmp_path, artifact, data, cfg, "--checkpoint", str(tmp_path / "ckpt"))) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    for key in ("val_loss", "val_bpb", "loss_sum", "token_count", "byte_sum", "doc_count", "ttt", "ledger",
                "diagnostics", "artifact_sha256", "seed", "environment", "budget_applies"):
        assert key in report, key
    assert set(report["timings"]) >= {"load_s", "warmup_s", "score_s", "total_s"}
    t = report["timings"]
    assert t["total_s"] == pytest.approx(t["load_s"] + t["warmup_s"] + t["score_s"])
    assert report["budget_applies"] is False and report["seed"] == 7
    assert report["val_bpb"] == pytest.approx(bits_per_byte(report["loss_sum"], report["byte_sum"]))
    assert report["token_count"] == sum(DOC_LENGTHS) and report["ledger"]["complete"]
    val = val_from_docs(docs)
    pre = score_model(model, val, eval_config("none"))
    post = score_model(load_model_from_artifact(artifact)[0], val, eval_config("none"))
    assert report["diagnostics"]["pre_quant"]["loss_sum"] == pytest.approx(pre.loss_sum, rel=1e-9)
    assert report["diagnostics"]["post_quant"]["loss_sum"] == pytest.approx(post.loss_sum, rel=1e-9)
    assert report["ttt"]["steps"] > 0 and report["val_bpb"] != report["diagnostics"]["post_quant"]["val_bpb"]
    lines = [json.loads(line) for line in (tmp_path / "eval_metrics.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "eval_start" and lines[-1]["event"] == "eval_done"
    scored = [line for line in lines if line["event"] == "eval_scored"]  # on record before the diagnostics
    assert len(scored) == 1 and scored[0]["loss_sum"] == report["loss_sum"] and scored[0]["timings"] == t
    slots = report["ttt"]["slot_timing"]  # every LoRA step is timed under its slot length
    assert sum(e["steps"] for e in slots.values()) == report["ttt"]["steps"] + report["ttt"]["batches"]
    assert sum(e["scored_tokens"] for e in slots.values()) == report["token_count"]


def test_stage_refuses_a_hash_mismatched_artifact_unless_allowed(tmp_path, model, docs, capsys):
    artifact = write_artifact(tmp_path / "pack", model, report_sha="0" * 64)
    data = write_val_dir(tmp_path / "shards", docs)
    cfg = eval_config("none")
    assert cli_main(["evaluate"] + _stage_args(tmp_path, artifact, data, cfg)) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and "--allow-hash-mismatch" in err and not (tmp_path / "eval.json").exists()
    assert cli_main(["evaluate"] + _stage_args(tmp_path, artifact, data, cfg, "--allow-hash-mismatch")) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["artifact"]["hash_check"]["hash_ok"] is False


def test_a_diverged_adaptation_is_an_error_not_a_score(tmp_path, model, docs, capsys):
    """Chunked TTT with a learning rate far too large: the loss goes to NaN; the stage fails naming the TTT mode
    and writes no eval.json (a NaN val_bpb with exit 0 would reach the report as a finished seed)."""
    artifact = write_artifact(tmp_path / "pack", model)
    data = write_val_dir(tmp_path / "shards", docs)
    cfg = replace_ttt(eval_config("chunked"), chunk_lr=1e8)
    assert cli_main(["evaluate"] + _stage_args(tmp_path, artifact, data, cfg)) == 2
    err = capsys.readouterr().err
    assert "the evaluation's loss is nan (evaluate.ttt.mode 'chunked')" in err and "Traceback" not in err
    assert not (tmp_path / "eval.json").exists()


def test_pgolf_eval_command_uses_the_recipe_and_checks_the_hash(tmp_path, model, docs, capsys):
    from pgolf.cli import main as pgolf_main

    artifact = write_artifact(tmp_path / "pack", model, report_sha="f" * 64)
    data = write_val_dir(tmp_path / "shards", docs)
    recipe = {"run": "t", "mode": "sweep", "seeds": [5], "model": to_dict(TINY), "tokenizer": {"vocab_size": VOCAB},
              "evaluate": to_dict(eval_config("chunked"))}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    args = ["eval", "--artifact", str(artifact), "--config", str(tmp_path / "r.yaml"), "--data-dir", str(data),
            "--device", "cpu"]
    assert pgolf_main(args) == 2
    assert "differs from the one the pack stage recorded" in capsys.readouterr().err
    assert pgolf_main([*args, "--allow-hash-mismatch"]) == 0
    report = json.loads((artifact.parent / "eval.json").read_text())
    assert report["seed"] == 5 and report["ttt"]["mode"] == "chunked"


def test_time_budget_verdicts():
    cfg = eval_config("none")
    ok = budget_report(500.0, cfg, "record", record_hardware=True)
    assert ok["budget_applies"] and not ok["exceeded"] and ok["warning"] is None and ok["margin_s"] == 100.0
    tight = budget_report(596.0, cfg, "record", record_hardware=True)
    assert "only 4.0 s under" in tight["warning"] and not tight["exceeded"]
    over = budget_report(601.0, cfg, "record", record_hardware=True)
    assert over["exceeded"] and "over the 600 s budget" in over["warning"]
    assert not budget_report(601.0, cfg, "record", record_hardware=False)["budget_applies"]
    assert not budget_report(601.0, cfg, "sweep", record_hardware=True)["budget_applies"]


def test_over_budget_on_record_hardware_exits_non_zero(tmp_path, model, docs, monkeypatch):
    artifact = write_artifact(tmp_path / "pack", model)
    data = write_val_dir(tmp_path / "shards", docs)
    cfg = eval_config("none").__class__(**{**to_dict(eval_config("none")), "max_eval_seconds": 1e-6, "ttt": eval_config("none").ttt})
    monkeypatch.setattr(evaluate, "on_record_hardware", lambda world_size: True)
    args = _stage_args(tmp_path, artifact, data, cfg)
    args[args.index("--mode") + 1] = "record"
    assert cli_main(["evaluate"] + args) == evaluate.EXIT_OVER_BUDGET
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["budget"]["exceeded"] and report["budget_applies"]


def test_record_mode_refuses_the_illegal_debug_ordering(tmp_path, model, docs, capsys):
    artifact = write_artifact(tmp_path / "pack", model)
    data = write_val_dir(tmp_path / "shards", docs)
    args = _stage_args(tmp_path, artifact, data, eval_config("lora", debug_update_before_score=True))
    args[args.index("--mode") + 1] = "record"
    assert cli_main(["evaluate"] + args) == 2
    assert "C3" in capsys.readouterr().err


def test_a_shape_the_compiler_fails_on_runs_eagerly(capsys):
    """Warm-up catches a backend failure (as inductor's on the phase rows, torch 2.11 / H100) for that shape only."""
    import torch._inductor.exc as inductor_exc

    from pgolf.evaluate.scoring import COMPILER_ERRORS, NllRunner, PackedRow, disable_mix_order_reduction

    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(True)  # the warm-up runs backward

    assert inductor_exc.InductorError in COMPILER_ERRORS
    runner = NllRunner(model, torch.device("cpu"), compile=False)
    runner.compiled = True  # as if compiled: the failing "compiled" function stands in for inductor
    failing_tokens = 64

    def compiled(ids, targets, cu, max_seqlen):
        if len(ids) == failing_tokens:
            raise inductor_exc.InductorError(AssertionError("FusedMixOrderReductions"), None)
        return runner._eager_fn(ids, targets, cu, max_seqlen)

    runner._fn = compiled
    ids = np.arange(2, 2 + failing_tokens, dtype=np.int64) % model.cfg.vocab_size
    row = PackedRow(ids, np.roll(ids, -1), np.zeros(failing_tokens, dtype=np.int64), [0, failing_tokens], failing_tokens)
    failing_shape = runner.shape_of(row)  # (tokens, bucketed cu entries, max_seqlen), as the TTT loop warms up
    runner.warmup([(32, failing_shape[1], 32), failing_shape], steps=2, backward=True, seed=0)
    assert runner.eager_shapes == {failing_shape} and len(runner.compile_failures) == 1
    assert "InductorError" in runner.compile_failures[0] and "runs eagerly" in capsys.readouterr().err
    assert all(p.grad is None for p in model.parameters())  # warm-up leaves no trace, also after a failure
    with torch.no_grad():
        assert torch.equal(runner(row), runner._eager_fn(*runner.tensors(row)))
    # a runner that does not compile re-raises: the error is the model's, not the compiler's
    plain = NllRunner(model, torch.device("cpu"), compile=False)
    plain._fn = compiled
    with pytest.raises(inductor_exc.InductorError):
        plain.warmup([(failing_tokens, 2, failing_tokens)], steps=1, backward=False, seed=0)
    disable_mix_order_reduction()
    import torch._inductor.config as inductor_config

    assert inductor_config.triton.mix_order_reduction is False


def test_eval_json_counts_every_ranks_ledger(tmp_path):
    """Each rank keeps its own ledger and adapter steps: eval.json gives the run's totals (ledger.all_ranks,
    ttt.steps_all_ranks), the same on 1 and 2 processes, as the score is (record TTT variant, CPU, gloo)."""
    docs = random_docs([5, 33, 18, 70, 0, 41, 9, 26, 12, 3, 50, 7, 22, 15, 60, 4], seed=5)
    data = write_val_dir(tmp_path / "data", docs, manifest={"caseops": False})
    artifact = write_artifact(tmp_path / "pack", tiny_model(seed=3))
    cfg = eval_config("lora", variant="record", lanes=2, inflight=1, phase_rows=2, phase_boundaries_docs=(4, 8))
    cfg = dataclasses.replace(cfg, score_next_bos=True, diagnostics=False, cpu_threads=1)
    procs = {}
    for nproc in (1, 2):  # both at once: three one-thread processes on CI's two cores (~10 s -> ~7 s)
        out = tmp_path / f"eval{nproc}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "pgolf.evaluate", "--artifact", str(artifact), "--eval-json", json.dumps(to_dict(cfg)),
               "--seed", "1", "--data-dir", str(data), "--out", str(out), "--mode", "sweep", "--device", "cpu"]
        procs[nproc] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    reports = {}
    for nproc, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        reports[nproc] = json.loads((tmp_path / f"eval{nproc}.json").read_text())
    one, two = reports[1], reports[2]
    assert one["val_bpb"] == pytest.approx(two["val_bpb"], rel=1e-9)
    # every target scored once over the ranks; each document's adapter steps taken once, on whichever rank
    for report in (one, two):
        assert report["ledger"]["all_ranks"]["scored_here"] == report["token_count"]
    assert one["ledger"]["all_ranks"]["updates"] == one["ledger"]["updates"] > 0
    assert one["ttt"]["steps_all_ranks"] == two["ttt"]["steps_all_ranks"] == one["ttt"]["steps"] > 0
    assert two["ledger"]["scored_here"] < two["token_count"]  # rank 0's share, beside the run's
    assert two["ledger"]["updates"] < two["ledger"]["all_ranks"]["updates"]
