"""Legal test-time training: the ledger, LoRA adapters, causality under TTT, illegal orderings, determinism."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eval_fixtures import TINY, copy_model, eval_config, random_docs, replace_ttt, tiny_model, val_from_docs
from pgolf.config import ConfigError
from pgolf.evaluate.plan import lora_schedule
from pgolf.evaluate.stage import score_documents
from pgolf.evaluate.scoring import PackedRow, token_nll
from pgolf.evaluate.ledger import Ledger, LegalityError
from pgolf.evaluate.lora import BatchedLoRA, attach_lora
from pgolf.evaluate.ttt import cosine_lr, lora_doc_order, run_ttt
from pgolf.evaluate.valdata import from_tokens

CPU = torch.device("cpu")
# 8 documents: longer than a chunk, than the LoRA context (24) and than a window, plus a BOS-only document
DOC_LENGTHS = [5, 33, 18, 70, 0, 41, 9, 26]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def docs():
    return random_docs(DOC_LENGTHS, seed=5)


def run(model, val, cfg, seed=0):
    out = run_ttt(copy_model(model), val, cfg, seed, device=CPU, keep_tokens=True)
    out.ledger.check_complete(val.target_mask())
    return out


# --------------------------------------------------------------------------------------------------------------
# Ledger
# --------------------------------------------------------------------------------------------------------------


def test_ledger_accepts_score_then_update_and_summarizes():
    ledger = Ledger(10)
    ledger.record_scored([1, 2, 3])
    ledger.record_update([1, 2, 3])
    ledger.record_scored(np.array([4, 5]))
    ledger.record_update([2, 5])
    summary = ledger.summary()
    assert summary["updates"] == 2 and summary["update_positions_total"] == 5
    assert summary["positions_used_by_updates"] == 4 and summary["max_update_last_position"] == 5
    expected = np.zeros(10, dtype=bool)
    expected[1:6] = True
    ledger.check_complete(expected)
    assert ledger.summary()["complete_checked"]


def test_ledger_update_before_score_names_c3():
    ledger = Ledger(10)
    ledger.record_scored([1, 2])
    with pytest.raises(LegalityError, match=r"C3.*position 3 before it was scored"):
        ledger.record_update([1, 2, 3])


def test_ledger_scoring_a_used_position_names_c3():
    ledger = Ledger(10)
    ledger.record_scored([4])
    ledger.record_update([4])
    with pytest.raises(LegalityError, match=r"C3.*position 4 is scored after it fed an update"):
        ledger.record_scored([4])


@pytest.mark.parametrize("second", [[2, 7], [7, 7]])
def test_ledger_scoring_twice_raises(second):
    ledger = Ledger(10)
    ledger.record_scored([1, 2])
    with pytest.raises(LegalityError, match="scored twice"):
        ledger.record_scored(second)


def test_ledger_completeness_names_missing_and_extra_positions():
    expected = np.array([False, True, True, True])
    ledger = Ledger(4)
    ledger.record_scored([1, 2])
    with pytest.raises(LegalityError, match=r"1 positions never scored \(first 3\)"):
        ledger.check_complete(expected)
    ledger.record_scored([0, 3])
    with pytest.raises(LegalityError, match=r"scored but not a target \(first 0\)"):
        ledger.check_complete(expected)
    with pytest.raises(LegalityError, match="scored twice"):
        ledger.check_complete(expected, scored_counts=np.array([0, 1, 2, 1], dtype=np.uint8))
    with pytest.raises(ValueError, match="positions must lie in 0..3"):
        ledger.record_scored([4])


# --------------------------------------------------------------------------------------------------------------
# LoRA adapters
# --------------------------------------------------------------------------------------------------------------


def test_batched_lora_is_per_slot_and_scaled():
    base = torch.nn.Linear(3, 2, bias=False)
    lora = BatchedLoRA(base, 3, 2, slots=2, rank=1, alpha=4.0)
    lora.reset(torch.Generator().manual_seed(0), keep_a=False)
    x = torch.randn(2 * 5, 3)
    assert torch.equal(lora(x), base(x))  # B = 0: a fresh adapter changes nothing
    with torch.no_grad():
        lora.B[1].fill_(1.0)
    expected = base(x)
    expected[5:] += 4.0 * (x[5:] @ lora.A[1]) @ lora.B[1]
    torch.testing.assert_close(lora(x), expected)  # slot 0 untouched, slot 1 scaled by alpha / r
    a = lora.A.detach().clone()
    lora.reset(torch.Generator().manual_seed(1), keep_a=True)
    assert torch.equal(lora.A, a) and not lora.B.any()
    lora.reset(torch.Generator().manual_seed(1), keep_a=False)
    assert not torch.equal(lora.A, a)


def test_attach_lora_wraps_targets_and_restores_the_model(model):
    twin = copy_model(model)
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    modules = {name: type(m) for name, m in twin.named_modules()}
    cfg = eval_config("lora").ttt
    with attach_lora(twin, cfg, slots=2) as adapters:
        assert set(adapters.wrappers) == {f"blocks.{i}.{p}" for i in range(2) for p in
                                          ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down")} | {"lm_head"}
        assert not any(p.requires_grad for p in twin.tok_emb.parameters())
        assert all(p.requires_grad for p in adapters.parameters())
    assert {name: type(m) for name, m in twin.named_modules()} == modules
    assert all(torch.equal(before[k], v) for k, v in twin.state_dict().items())
    assert not any(p.requires_grad for p in twin.parameters())


def test_slots_do_not_see_each_other(model, docs):
    """Inside the LoRA row, slot 1's outputs do not depend on slot 0's tokens (attention, SmearGate, adapters)."""
    twin = copy_model(model)
    L = 16
    with attach_lora(twin, eval_config("lora").ttt, slots=2):
        def slot1_nll(first_slot_ids):
            ids = np.concatenate([first_slot_ids, docs[3][5:5 + L]]).astype(np.int64)  # slot 1 starts mid-document
            targets = np.concatenate([np.full(L, -100), docs[3][6:6 + L]]).astype(np.int64)
            cu = torch.tensor([0, L, 2 * L], dtype=torch.int32)
            return token_nll(twin, torch.from_numpy(ids), torch.from_numpy(targets), cu, L)[L:]
        a = slot1_nll(docs[1][:L].astype(np.int64))
        b = slot1_nll(docs[5][:L].astype(np.int64))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Legality of the TTT loops
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lora", "chunked"])
def test_update_before_score_is_caught_by_the_ledger(model, docs, mode):
    val = val_from_docs(docs)
    cfg = eval_config(mode, debug_update_before_score=True)
    with pytest.raises(LegalityError, match="C3"):
        run_ttt(copy_model(model), val, cfg, 0, device=CPU)


@pytest.mark.parametrize(
    "mode, changes, order",
    [
        ("lora", dict(warm_start_a=False), "stream"),  # documents independent: only later tokens of the same doc move
        ("lora", dict(warm_start_a=True, phase_boundaries_docs=(3, 6)), "processing"),
        ("chunked", dict(), "stream"),
    ],
    ids=["lora", "lora-phased-warmstart", "chunked"],
)
def test_changing_a_token_never_changes_earlier_scores(model, docs, mode, changes, order):
    """C1 with TTT on: perturb the token at stream position t; every score before t (in stream order, or in the
    order positions were scored when TTT carries state across documents) is bit-for-bit unchanged."""
    val = val_from_docs(docs)
    cfg = eval_config(mode, **changes)
    base = run(model, val, cfg)
    doc = int(np.argmax(val.doc_lengths()))  # the 70-token document: several chunks and windows
    t = int(val.doc_starts[doc]) + 37
    tokens = val.tokens.copy()
    tokens[t] = 2 + (int(tokens[t]) - 2 + 50) % 298  # another non-BOS id
    moved = run(model, from_tokens(tokens, val.target_bytes), cfg)
    a, b = base.accumulator, moved.accumulator
    if order == "stream":
        earlier = np.arange(val.num_positions) < t
    else:
        earlier = (a.score_order >= 0) & (a.score_order < a.score_order[t])
    earlier &= val.target_mask()
    assert earlier.sum() > 40
    np.testing.assert_array_equal(a.token_nll[earlier], b.token_nll[earlier])
    later = val.target_mask() & ~earlier
    assert not np.array_equal(a.token_nll[later], b.token_nll[later]), "the perturbation must change something"
    if mode == "lora" and order == "stream":  # per-document adapters: no other document moves at all
        others = later & ~((np.arange(val.num_positions) >= val.doc_starts[doc]) & (np.arange(val.num_positions) < val.doc_ends[doc]))
        np.testing.assert_array_equal(a.token_nll[others], b.token_nll[others])


@pytest.mark.parametrize("mode, changes", [("lora", dict(phase_boundaries_docs=(3,))), ("chunked", dict(chunk_epochs=2))])
def test_same_artifact_config_and_seed_give_the_same_score(model, docs, mode, changes):
    val = val_from_docs(docs)
    cfg = eval_config(mode, **changes)
    first, second = run(model, val, cfg, seed=11), run(model, val, cfg, seed=11)
    np.testing.assert_array_equal(first.accumulator.token_nll, second.accumulator.token_nll)
    assert first.accumulator.loss_sum == second.accumulator.loss_sum
    if mode == "lora":  # the seed drives the adapter init
        other = run(model, val, cfg, seed=12)
        assert other.accumulator.loss_sum != first.accumulator.loss_sum


def test_lora_scores_before_any_update_equal_plain_scoring(model, docs):
    """Chunk 0 of every document is scored by untouched adapters (B = 0) on a window starting at BOS: the same
    numbers as the no-TTT evaluation. Later chunks differ (the adapters learned)."""
    val = val_from_docs(docs)
    cfg = eval_config("lora", warm_start_a=False)
    plain = score_documents(copy_model(model), val, eval_config("none"), keep_tokens=True)[1]
    ttt = run(model, val, cfg)
    first_chunk = np.zeros(val.num_positions, dtype=bool)
    for s, e in zip(val.doc_starts, val.doc_ends):
        first_chunk[s + 1 : min(e, s + 1 + cfg.ttt.chunk_tokens)] = True
    np.testing.assert_allclose(ttt.accumulator.token_nll[first_chunk], plain.token_nll[first_chunk], rtol=0, atol=2e-5)
    later = val.target_mask() & ~first_chunk
    assert np.abs(ttt.accumulator.token_nll[later] - plain.token_nll[later]).max() > 1e-3
    summary = ttt.summary
    assert summary["steps"] > 0 and summary["batches"] == 3 and summary["adapter_parameters"] > 0
    assert ttt.ledger.summary()["updates"] == summary["steps"]


def test_lora_queue_is_longest_first_and_phases_train_scored_documents(model, docs):
    val = val_from_docs(docs)
    order = lora_doc_order(val)
    assert list(val.doc_lengths()[order]) == sorted(val.doc_lengths(), reverse=True)
    out = run(model, val, eval_config("lora", phase_boundaries_docs=(2, 3, 5)))
    # batches of 3 documents: boundaries 2 and 3 are crossed by batch 0 (one shared phase), 5 by batch 1
    assert [(p["after_docs"], p["docs"]) for p in out.summary["phases"]] == [(3, 3), (6, 6)]  # the scored prefix
    targets = [int((val.doc_lengths()[order[:n]] - 1).sum()) for n in (3, 6)]
    assert [p["tokens"] for p in out.summary["phases"]] == targets  # every target of the documents, once
    last = run(model, val, eval_config("lora", phase_boundaries_docs=(7,)))
    assert last.summary["phases"] == []  # crossed only by the last batch: nothing is left to score
    new_only = run(model, val, eval_config("lora", phase_boundaries_docs=(2, 6), phase_scope="new_docs"))
    assert [p["docs"] for p in new_only.summary["phases"]] == [3, 3]


def test_phase_passes_run_eagerly_unless_phase_compile(model, docs, monkeypatch):
    """A compiled evaluation compiles the LoRA steps; the phase passes get their own runner, compiled only on ask."""
    import dataclasses

    from pgolf.evaluate import ttt as ttt_module
    from pgolf.evaluate.scoring import NllRunner

    asked: list[bool] = []

    class Recording(NllRunner):  # records what was asked, runs eagerly (no inductor on this CPU test)
        def __init__(self, model, device, compile=False, dynamic=False, softcap_dtype="float32"):
            asked.append(compile)
            super().__init__(model, device, compile=False, softcap_dtype=softcap_dtype)
            self.compiled = compile

    monkeypatch.setattr(ttt_module, "NllRunner", Recording)
    val = val_from_docs(docs)
    for phase_compile in (False, True):
        asked.clear()
        cfg = eval_config("lora", phase_boundaries_docs=(2,), phase_compile=phase_compile)
        cfg = dataclasses.replace(cfg, compile=True, compile_warmup_steps=0)
        out = run(model, val, cfg)
        assert asked == [True, phase_compile] and out.summary["phase_compiled"] is phase_compile
        assert len(out.summary["phases"]) == 1 and out.summary["compile_failures"] == []


def test_chunked_first_chunk_equals_plain_scoring_and_last_chunk_is_not_trained(model, docs):
    val = val_from_docs(docs)
    cfg = eval_config("chunked")
    plain = score_documents(copy_model(model), val, eval_config("none"), keep_tokens=True)[1]
    out = run(model, val, cfg)
    first = np.arange(val.num_positions) < 1 + cfg.ttt.stream_chunk_tokens
    first &= val.target_mask()
    np.testing.assert_allclose(out.accumulator.token_nll[first], plain.token_nll[first], rtol=0, atol=2e-5)
    n_chunks = out.summary["chunks"]
    assert n_chunks == -(-(val.num_positions - 1) // cfg.ttt.stream_chunk_tokens)
    assert out.summary["steps"] == n_chunks - 1 == out.ledger.summary()["updates"]
    last_lo = 1 + (n_chunks - 1) * cfg.ttt.stream_chunk_tokens
    assert not out.ledger.used[last_lo:].any()


def test_cosine_lr():
    assert cosine_lr(0.1, 0, 10) == pytest.approx(0.1)
    assert cosine_lr(0.1, 5, 10) == pytest.approx(0.05)
    assert cosine_lr(0.1, 0, 1) == 0.1


# --------------------------------------------------------------------------------------------------------------
# Distributed: 2 gloo ranks == 1 process
# --------------------------------------------------------------------------------------------------------------

WORKER = Path(__file__).with_name("dist_eval_worker.py")


@pytest.mark.slow  # three Python processes import torch: ~10-20 s on a 2-core machine
def test_two_ranks_score_like_one_process(tmp_path):
    """Rows / LoRA batches / stream-chunk parts split over 2 ranks: every target scored exactly once overall, and
    the scores equal one process's (exactly for independent documents, to float tolerance where gradients are
    summed across ranks). Phased LoRA depends on the process count (rounds of 2 batches), so only completeness
    and a finite score are checked there."""
    spec = importlib.util.spec_from_file_location("dist_eval_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           str(WORKER), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    for r in range(2):
        np.testing.assert_array_equal(ranks[r]["max_floats"], [2.5, 2.0])
    for name, tolerance in (("plain", 1e-5), ("lora", 1e-5), ("chunked", 1e-4), ("chunked_pairs", 1e-3),
                            ("phased", None)):
        a, b = ranks[0][f"{name}_nll"], ranks[1][f"{name}_nll"]
        assert not (np.isfinite(a) & np.isfinite(b)).any(), f"{name}: a position scored on both ranks"
        assert np.isfinite(a).any() and np.isfinite(b).any(), f"{name}: one rank did no work"
        merged = np.where(np.isfinite(a), a, b)
        np.testing.assert_array_equal(ranks[0][f"{name}_sums"], ranks[1][f"{name}_sums"])
        assert ranks[0][f"{name}_sums"][0] == pytest.approx(np.nansum(merged), rel=1e-9)
        if tolerance is None:
            assert np.isfinite(ranks[0][f"{name}_sums"][0])
            # pgolf eval-plan's schedule predicts each rank's steps per slot length of the real 2-rank run
            mode, changes = worker.CASES[name]
            val = val_from_docs(random_docs(worker.DOC_LENGTHS, seed=5))
            planned = lora_schedule(val.doc_lengths(), eval_config(mode, **changes).ttt, 2).steps_per_rank()
            for r in range(2):
                assert {int(L): int(n) for L, n in ranks[r][f"{name}_slot_steps"]} == dict(planned[r]), f"rank {r}"
            continue
        single, sums, _, _ = worker.run_case(name)
        scored = np.isfinite(single)
        np.testing.assert_array_equal(np.isfinite(merged), scored)
        np.testing.assert_allclose(merged[scored], single[scored], rtol=0, atol=tolerance, err_msg=name)
        assert ranks[0][f"{name}_sums"][1:].tolist() == sums[1:].tolist()


@pytest.mark.parametrize("rope_positions,atol", [("segment", 2e-5), ("row", 1e-4)])
def test_lora_scores_do_not_depend_on_the_slot_length(docs, rope_positions, atol):
    """Slots of 8, 16 or 24 tokens (padding is its own segment, never scored): the same scores as 24 everywhere.
    Exact but for summation order with per-document RoPE positions; with row positions (the record's) a slot's
    angles shift with its offset in the row, so equal to the fp32 rounding of those angles."""
    model = tiny_model(seed=3, cfg=dataclasses.replace(TINY, rope_positions=rope_positions))
    val = val_from_docs(docs)
    fixed = run(model, val, eval_config("lora"))
    bucketed = run(model, val, eval_config("lora", slot_lengths=(8, 16, 24)))
    np.testing.assert_allclose(bucketed.accumulator.token_nll, fixed.accumulator.token_nll, rtol=0, atol=atol)
    with pytest.raises(ConfigError, match="slot_lengths"):
        eval_config("lora", slot_lengths=(8, 16))  # shorter than context_tokens (24)


@pytest.mark.parametrize("mode", ["lora", "chunked"])
def test_every_ttt_runner_scores_with_the_configured_softcap_dtype(monkeypatch, mode):
    """evaluate.softcap_dtype reaches every scorer a TTT mode builds (the legacy LoRA variant once built its two
    with the default)."""
    from pgolf.evaluate import scoring

    seen = []
    original = scoring.NllRunner.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("softcap_dtype", "float32 (default)"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(scoring.NllRunner, "__init__", spy)
    cfg = dataclasses.replace(eval_config(mode), softcap_dtype="model")
    val = val_from_docs(random_docs([30, 41, 25], seed=3))
    run_ttt(tiny_model(), val, cfg, 0, device=torch.device("cpu"))
    assert seen and set(seen) == {"model"}, seen
