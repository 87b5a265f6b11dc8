"""The record variant of LoRA TTT without the record script: the device ledger's refusals (C3), the schedule on the
record's rebuilt document lengths, and the speed paths (padded CUDA-graph steps, lanes, side batches) computing
exactly what the plain path computes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import oracle_ttt as ot
from pgolf.evaluate.ledger import DeviceLedger, LegalityError
from pgolf.evaluate.ttt import run_ttt
from pgolf.evaluate.ttt_plan import (PlanError, phase_chunks, phase_stream_tokens, record_doc_lengths, schedule_of)
from pgolf.evaluate.ttt_record import record_schedule

CPU = torch.device("cpu")
DT = torch.float64
SEED = 1234
ROOT = Path(__file__).resolve().parents[1]
LENGTHS = ROOT / "benchmarks" / "record_doc_lengths.txt"


@pytest.fixture(scope="module")
def stream():
    torch.set_num_threads(1)
    return ot.synthetic_stream(22, seed=0)


@pytest.fixture(scope="module")
def base():
    return ot.pgolf_model(3, DT)


@pytest.fixture(scope="module")
def exact(base, stream):
    return run(base, stream)


def run(base, stream, **changes):
    tokens, nbytes = stream
    model = ot.copy_model(base)
    out = run_ttt(model, ot.pgolf_val(tokens, nbytes), ot.ttt_config(**changes), SEED, device=CPU, keep_tokens=True)
    out.ledger.check_complete(out.expected_targets)
    return out, model


# ------------------------------------------------------------------------------------------------- the ledger


def _ledger():
    return DeviceLedger(10, CPU)


def _t(values):
    return torch.tensor(values, dtype=torch.int64)


def test_device_ledger_accepts_score_then_update():
    ledger = _ledger()
    ledger.record_scored(_t([1, 2, 3]), torch.ones(3, dtype=torch.bool))
    ledger.record_update(_t([1, 2, 3, 9]), torch.tensor([True, True, True, False]))  # masked entry: ignored
    ledger.record_scored(_t([[4, 5]]), torch.ones(1, 2, dtype=torch.bool))
    ledger.check("test")
    expected = np.zeros(10, dtype=bool)
    expected[1:6] = True
    ledger.check_complete(expected)
    summary = ledger.summary()
    assert summary["updates"] == 1 and summary["update_positions_total"] == 3 and summary["complete_checked"]


@pytest.mark.parametrize("case, message", [
    ("update_first", r"C3 .*\(here\): position 3 feeds an update before it was scored \(1 such"),
    ("score_after_use", r"C3 .*\(here\): position 2 is scored after it fed an update"),
    ("twice", r"C3 .*\(here\): position 1 is scored twice"),
])
def test_device_ledger_refuses_illegal_orderings_at_the_next_check(case, message):
    ledger = _ledger()
    ones = torch.ones(3, dtype=torch.bool)
    ledger.record_scored(_t([1, 2, 5]), ones)
    if case == "update_first":
        ledger.record_update(_t([1, 2, 3]), ones)
    elif case == "score_after_use":
        ledger.record_update(_t([2]), ones[:1])
        ledger.record_scored(_t([2]), ones[:1])
    else:
        ledger.record_scored(_t([1]), ones[:1])
    with pytest.raises(LegalityError, match=message):
        ledger.check("here")


def test_record_variant_update_before_score_fails_naming_c3(base, stream):
    with pytest.raises(LegalityError, match=r"C3.*\(before phase 1\): position \d+ feeds an update before"):
        run(base, stream, debug_update_before_score=True)


def test_a_phase_on_later_documents_is_refused_at_plan_time(base, stream):
    tokens, nbytes = stream
    val = ot.pgolf_val(tokens, nbytes)
    cfg = ot.ttt_config()
    schedule = record_schedule(record_doc_lengths(val.doc_starts, val.score_ends), cfg.ttt)
    late = schedule.batches[-1].docs[:1]  # a document scored in the last segment
    bad = dataclasses.replace(schedule, phase_docs=(np.concatenate([schedule.phase_docs[0], late]),
                                                    *schedule.phase_docs[1:]))
    with pytest.raises(LegalityError, match="C3.*plan time: phase 1 trains on document"):
        run_ttt(ot.copy_model(base), val, cfg, SEED, device=CPU, schedule=bad)


# ----------------------------------------------------------------------------------------------- speed paths


@pytest.mark.parametrize("changes", [dict(cuda_graphs=True, cuda_graph_max_width=16),
                                     dict(checkpoint_activations=True)], ids=["padded-graph-steps", "recompute"])
def test_speed_paths_compute_what_exact_rows_compute(base, stream, exact, changes):
    """The CUDA-graph path's steps (all rows of the batch, finished documents included; eager on CPU) and the
    activation recompute give the same scores and weights as the exact active rows (with the deferred decay of
    finished documents' A)."""
    exact, exact_model = exact
    padded, padded_model = run(base, stream, **changes)
    if changes.get("cuda_graphs"):
        assert padded.summary["padded_steps"] > 0 and padded.summary["cuda_graph_replays"] == 0
    np.testing.assert_allclose(padded.accumulator.token_nll, exact.accumulator.token_nll, rtol=0, atol=1e-12)
    for a, b in zip(exact_model.parameters(), padded_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_side_batches_use_the_pre_phase_weights_wherever_they_run(base, stream):
    """Side batches (first-segment batches that feed no phase) are scored with the pre-phase weights on adapters
    of their own: the phases cannot change their scores, while the later segments' scores move with the phases."""
    tokens, nbytes = stream
    val = ot.pgolf_val(tokens, nbytes)
    side = dict(lanes=2, inflight=1, side_batches=True)
    a, _ = run(base, stream, **side)
    b, _ = run(base, stream, **side, phase_lr=0.1)
    schedule = record_schedule(record_doc_lengths(val.doc_starts, val.score_ends), ot.ttt_config(**side).ttt)
    side_docs = np.concatenate([x.docs for x in schedule.batches if x.side])
    assert len(side_docs) > 0 and a.summary["side_batches"] == [x.queue_index for x in schedule.batches if x.side]
    doc_len = record_doc_lengths(val.doc_starts, val.score_ends)
    in_side = np.zeros(val.num_positions, dtype=bool)
    for d in side_docs:
        in_side[val.doc_starts[d] + 1 : val.doc_starts[d] + doc_len[d]] = True
    assert np.array_equal(a.accumulator.token_nll[in_side], b.accumulator.token_nll[in_side])
    last = np.zeros(val.num_positions, dtype=bool)  # scored after a phase
    for x in schedule.batches:
        if x.segment > 0 and not x.side:
            for d in x.docs:
                last[val.doc_starts[d] + 1 : val.doc_starts[d] + doc_len[d]] = True
    assert np.abs(a.accumulator.token_nll[last] - b.accumulator.token_nll[last]).max() > 1e-3


def test_lanes_change_chains_not_legality(base, stream, exact):
    one, _ = exact
    two, _ = run(base, stream, lanes=2, inflight=0)
    assert one.summary["phase_prefixes"] == two.summary["phase_prefixes"]
    assert not np.array_equal(one.accumulator.token_nll, two.accumulator.token_nll)  # other warm-start chains
    assert np.isfinite(two.accumulator.token_nll[1:]).all()


# ------------------------------------------------------------------------------------- the record's schedule


@pytest.mark.skipif(not LENGTHS.exists(), reason="benchmarks/record_doc_lengths.txt not shipped")
def test_schedule_on_the_records_lengths_reproduces_its_logged_phases():
    """8 lanes with 7 batches in flight: the phases fire after 21 / 34 / 47 queue entries (1296 / 2128 / 2960
    scored documents, the logged ``pd``) and train 131 / 219 / 289 chunks (the logged ``tttg`` counts)."""
    doc_len = np.loadtxt(LENGTHS, dtype=np.int64)
    s = schedule_of(doc_len, per_batch=64, chunk=48, ctx=2048, bounds=(833, 1666, 2500), lanes=8, inflight=7,
                    side_batches=True)
    assert s.prefixes == (21, 34, 47)
    assert [sum(len(b.docs) for b in s.batches[:p]) for p in s.prefixes] == [1296, 2128, 2960]
    assert [phase_chunks(phase_stream_tokens(doc_len, d), 32768) for d in s.phase_docs] == [131, 219, 289]
    assert [b.queue_index for b in s.batches if b.side] == list(range(7))
    assert len(s.batches[0].docs) == 16 and s.batches[0].fresh and int(doc_len[s.batches[0].docs].max()) == 97_114
    one = schedule_of(doc_len, per_batch=64, chunk=48, ctx=2048, bounds=(833, 1666, 2500))
    assert one.prefixes == (14, 27, 40) and {b.lane for b in one.batches} == {0}


def test_a_document_without_a_target_is_left_out_of_the_plan_and_the_run(base, stream):
    """A lone BOS (the stream cut right after one; an empty document when the next BOS is not a target) has nothing
    to score: the others are scheduled as if it were not there, and the run scores every target exactly once."""
    doc_len = np.array([5, 1, 9, 7, 1, 12, 3, 30, 1])
    keep = np.flatnonzero(doc_len >= 2)
    kw = dict(per_batch=2, chunk=4, ctx=8, bounds=(2, 4), lanes=2)
    full, inner = schedule_of(doc_len, **kw), schedule_of(doc_len[keep], **kw)
    assert [b.docs.tolist() for b in full.batches] == [keep[b.docs].tolist() for b in inner.batches]
    assert [d.tolist() for d in full.phase_docs] == [keep[d].tolist() for d in inner.phase_docs]
    assert full.prefixes == inner.prefixes and [b.segment for b in full.batches] == [b.segment for b in inner.batches]
    with pytest.raises(PlanError, match="at least one document with >= 2 tokens"):
        schedule_of(np.array([1, 1]), **kw)
    tokens, nbytes = stream
    run(base, (np.append(tokens, 1), np.append(nbytes, 0)))  # a trailing lone BOS; run() checks the ledger


def test_compile_without_warm_up_still_compiles(base, stream, monkeypatch):
    """evaluate.compile_warmup_steps 0 skips the random-token warm-up, not the compile (the first scored steps
    compile instead). torch.compile is stubbed: what is checked is that the compiled path is taken."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn: compiled.append(fn) or fn)
    tokens, nbytes = stream
    cfg = dataclasses.replace(ot.ttt_config(), compile=True, compile_warmup_steps=0)
    out = run_ttt(ot.copy_model(base), ot.pgolf_val(tokens, nbytes), cfg, SEED, device=CPU)
    assert len(compiled) == 1 and out.summary["compiled"] and out.warmup_s == 0.0


def test_the_warm_up_makes_compile_warmup_steps_calls_per_shape(base, stream, monkeypatch):
    """evaluate.compile_warmup_steps is a count ("random-token calls per compiled shape"), not an on/off switch."""
    from pgolf.evaluate import ttt_record

    calls = {"n": 0}

    def counting_compile(fn):
        def counted(*args, **kwargs):
            calls["n"] += 1
            return fn(*args, **kwargs)
        return counted

    monkeypatch.setattr(torch, "compile", counting_compile)
    tokens, nbytes = stream
    warm_up_calls = {}
    for steps in (1, 3):
        cfg = dataclasses.replace(ot.ttt_config(), compile=True, compile_warmup_steps=steps)
        calls["n"] = 0
        runner = ttt_record.RecordTTT(ot.copy_model(base), ot.pgolf_val(tokens, nbytes), cfg, SEED, device=CPU)
        runner.compile(cfg.compile_warmup_steps)
        warm_up_calls[steps] = calls["n"]
    assert warm_up_calls[1] > 0 and warm_up_calls[3] == 3 * warm_up_calls[1]


def test_the_run_executes_the_plan(exact, stream):
    """What ``pgolf eval-plan --schedule pgolf`` prices is what the evaluation runs: its steps, optimizer steps and
    phase streams."""
    from pgolf.evaluate.ttt_plan import batch_steps

    out, _ = exact
    tokens, nbytes = stream
    val = ot.pgolf_val(tokens, nbytes)
    doc_len = record_doc_lengths(val.doc_starts, val.score_ends)
    cfg = ot.ttt_config().ttt
    schedule = record_schedule(doc_len, cfg)
    steps = [batch_steps(doc_len[b.docs] - 1, cfg.chunk_tokens, cfg.context_tokens) for b in schedule.batches]
    assert out.summary["batch_steps_here"] == sum(len(s) for s in steps)
    assert out.summary["steps"] == sum(1 for s in steps for *_, trains in s if trains)
    runnable = schedule.runnable_phases()
    assert [p["stream_tokens"] for p in out.summary["phases"]] == [
        phase_stream_tokens(doc_len, d) for d in schedule.phase_docs[:runnable]]
    assert out.ledger.summary()["updates"] == out.summary["steps"] + runnable


def test_the_record_recipe_sets_the_records_ttt_values():
    """config.yaml's evaluate.ttt is the record run's (its logs' header), with 8 lanes for its 8 ranks."""
    from pgolf.config import load_run_config

    cfg = load_run_config(ROOT / "config.yaml").evaluate
    t = cfg.ttt
    assert (t.mode, t.variant, t.optimizer) == ("lora", "record", "adamw")
    assert (t.lora_rank, t.lora_alpha, t.chunk_tokens, t.context_tokens, t.docs_per_batch) == (80, 144.0, 48, 2048, 64)
    assert (t.lr, t.beta1, t.beta2, t.weight_decay, t.adam_eps, t.warm_start_a) == (1e-4, 0.0, 0.99, 0.5, 1e-10, True)
    assert t.phase_boundaries_docs == (833, 1666, 2500) and t.phase_chunk_tokens == 32768
    assert (t.phase_lr, t.phase_momentum, t.phase_grad_clip) == (1e-3, 0.9, 1.0)
    assert (t.lanes, t.inflight_batches, t.phase_rows) == (8, 7, 8)
    assert set(t.lora_targets) == {"q", "k", "v", "o", "mlp", "head"}
    assert cfg.score_next_bos and cfg.softcap_dtype == "model"


def test_the_adapters_step_with_the_configured_adamw(base, stream, monkeypatch):
    from pgolf.evaluate import ttt_adapters

    seen = []
    real = ttt_adapters.adamw_step_

    def spy(*args, **kwargs):
        seen.append((kwargs["lr"], kwargs["betas"], kwargs["weight_decay"], kwargs["eps"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(ttt_adapters, "adamw_step_", spy)
    tokens, nbytes = stream
    cfg = ot.ttt_config(adam_eps=3e-9, phase_boundaries_docs=())
    run_ttt(ot.copy_model(base), ot.pgolf_val(tokens[:200], nbytes[:200]), cfg, SEED, device=CPU)
    assert seen and set(seen) == {(1e-4, (0.0, 0.99), 0.5, 3e-9)}


def test_the_evaluation_stage_runs_the_record_variant(tmp_path):
    """``pgolf evaluate`` on a packed artifact with the record variant (2 lanes, side batches, phases): every
    position but the first scored once (the next BOS included), the device ledger's summary in the report."""
    import json

    from eval_fixtures import eval_config, random_docs, tiny_model, write_artifact, write_val_dir
    from pgolf.cli import main as cli_main
    from pgolf.config import to_dict

    docs = random_docs([5, 33, 18, 70, 1, 41, 9, 26, 12, 3, 50], seed=5)
    artifact = write_artifact(tmp_path / "pack", tiny_model(seed=3))
    data = write_val_dir(tmp_path / "shards", docs)
    cfg = eval_config("lora", variant="record", lanes=2, side_batches=True, phase_boundaries_docs=(2, 4, 6),
                      lr=1e-3, checkpoint_activations=False)
    cfg = dataclasses.replace(cfg, score_next_bos=True)
    args = ["evaluate", "--artifact", str(artifact), "--eval-json", json.dumps(to_dict(cfg)), "--seed", "7",
            "--data-dir", str(data), "--out", str(tmp_path / "eval.json"), "--mode", "sweep", "--device", "cpu"]
    assert cli_main(args) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    N = sum(len(d) for d in docs)
    assert report["token_count"] == N - 1 and report["ledger"]["complete"]
    ttt = report["ttt"]
    assert ttt["variant"] == "record" and ttt["lanes"] == 2 and len(ttt["phases"]) >= 1
    assert report["ledger"]["device_checks"] == 2 * len(ttt["phases"]) + 1
