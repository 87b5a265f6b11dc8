"""The record variant of LoRA TTT computes what the record's own ``eval_val_ttt_phased`` computes (PR #1855 script
as an oracle, CPU, float64, tiny model): documents, queue, windows, adapter draws, the TTT forward and its
gradients, AdamW, the phase SGD, phase points and phase sets, and end to end every target's NLL, the scoring order,
the score and the weights after the last phase, in one process and on two gloo processes (the record's dynamic
claiming recorded, then replayed as pgolf's lanes)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

import oracle_ttt as ot
import record_oracle
from pgolf.evaluate.ttt import run_ttt
from pgolf.evaluate.ttt_adapters import AdapterWorkspace, LoraLayout, adamw_step_
from pgolf.evaluate.ttt_forward import lora_nll, rope_for_rows
from pgolf.evaluate.ttt_phase import phase_sgd
from pgolf.evaluate.ttt_plan import (batch_steps, chunk_windows, phase_doc_sets, phase_prefixes, record_doc_lengths,
                                     record_queue, step_width)
from pgolf.evaluate.ttt_record import record_schedule

CPU = torch.device("cpu")
DT = torch.float64
SEED = 1234
NLL_TOL = 1e-6  # the record scores in float32 (logits.float()): float64 runs agree to float32 rounding of the NLL


@pytest.fixture(scope="module")
def mod():
    torch.set_num_threads(1)
    return record_oracle.load_or_skip()


@pytest.fixture(scope="module")
def stream():
    return ot.synthetic_stream(22, seed=0)


@pytest.fixture(scope="module")
def runs(mod, stream):
    """The record's run and pgolf's (record variant, one lane) on the same tiny model and stream."""
    tokens, nbytes = stream
    cfg = ot.ttt_config()
    pg = ot.pgolf_model(3, DT)
    rec = ot.record_model(mod, ot.record_hparams(mod, cfg), pg)
    record = ot.run_record(mod, ot.record_hparams(mod, cfg), rec, tokens, nbytes, rng_seed=SEED)
    ours = run_ttt(pg, ot.pgolf_val(tokens, nbytes), cfg, SEED, device=CPU, keep_tokens=True)
    return record, ours, pg


# --------------------------------------------------------------------------------------------------- components


def test_documents_and_targets_match_record(mod):
    tokens, nbytes = ot.synthetic_stream(9, seed=4, min_len=2, max_len=6)  # includes 2-token documents and ties
    val = ot.pgolf_val(tokens, nbytes)
    theirs = mod._find_docs(torch.from_numpy(tokens))
    assert [(int(s), int(n)) for s, n in zip(val.doc_starts, record_doc_lengths(val.doc_starts, val.score_ends))] == theirs
    covered = np.concatenate([np.arange(s + 1, s + n) for s, n in theirs])
    assert np.array_equal(np.sort(covered), np.arange(1, len(tokens)))  # every position but the first, once


@pytest.mark.parametrize("num_docs", [12, 14])
def test_queue_matches_record(mod, num_docs):
    g = np.random.default_rng(num_docs)
    doc_len = g.integers(2, 6, size=num_docs)  # many ties
    h = types.SimpleNamespace(ttt_batch_size=4)
    theirs = mod._build_ttt_global_batches([(d, (0, int(n))) for d, n in enumerate(doc_len)], h)
    ours = record_queue(doc_len, 4)
    assert [(e.orig, e.docs.tolist()) for e in ours] == [(j, [d for d, _ in entries]) for j, entries in theirs]


def test_windows_match_record(mod):
    C, ctx = 48, 2048
    for pred_len in (1, 47, 48, 49, 2047, 2048, 2049, 5000):
        nch = -(-pred_len // C)
        for c in range(nch):
            ws, wl, off, cl = (int(v[0]) for v in chunk_windows(c, np.array([pred_len]), C, ctx))
            assert (ws, wl, off, cl) == mod._compute_chunk_window(c, pred_len, nch, C, ctx)
            _, width, ref_off, _ = mod._compute_chunk_window(c, (c + 1) * C, c + 1, C, ctx)
            assert step_width(c, C, ctx) == width and width - C == ref_off
            assert wl <= width and off >= width - C  # the chunk lies in the row's last C positions
    steps = batch_steps(np.array([5, 47, 100]), 48, 2048)
    assert [(a, n, w, t) for a, n, w, t in steps] == [(0, 3, 48, True), (2, 1, 96, True), (2, 1, 144, False)]


def test_adapter_draws_match_record(mod):
    cfg = ot.ttt_config()
    pg = ot.pgolf_model(3, DT)
    rec = ot.record_model(mod, ot.record_hparams(mod, cfg), pg)
    layout = LoraLayout(pg.cfg, cfg.ttt.lora_targets, 4, 144.0, len(pg.virtual_layers(True)))
    A = layout.zeros(layout.a_names, 3, "cpu", DT)
    layout.draw_a_(A, torch.Generator().manual_seed(7))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    try:
        torch.manual_seed(7)
        lora = mod.BatchedTTTLoRA(3, rec, 4)
    finally:
        torch.set_default_dtype(previous)
    a = dict(zip(layout.a_names, A))
    assert torch.equal(lora.lm_head_lora.A, a["A_head"]) and not lora.lm_head_lora.B.any()
    for s in range(layout.slots):
        assert torch.equal(lora.mlp_loras[s].A, a["A_mlp"][:, s])
        for j, t in enumerate(layout.attn_targets):
            assert torch.equal(getattr(lora, f"{t}_loras")[s].A, a["A_attn"][:, s, j]), (t, s)


def _record_lora_from(mod, rec, layout, tensors):
    """The record's BatchedTTTLoRA holding our adapter tensors (A and B), for its forward_ttt."""
    n = tensors[0].shape[0]
    lora = mod.BatchedTTTLoRA(n, rec, layout.rank)
    t = dict(zip(layout.names, tensors))
    with torch.no_grad():
        lora.lm_head_lora.A.copy_(t["A_head"])
        lora.lm_head_lora.B.copy_(t["B_head"])
        for s in range(layout.slots):
            lora.mlp_loras[s].A.copy_(t["A_mlp"][:, s])
            lora.mlp_loras[s].B.copy_(t["B_mlp"][:, s])
            for j, target in enumerate(layout.attn_targets):
                getattr(lora, f"{target}_loras")[s].A.copy_(t["A_attn"][:, s, j])
                getattr(lora, f"{target}_loras")[s].B.copy_(t[f"B_{target}"][:, s])
    return lora


def test_lora_forward_and_gradients_match_record(mod):
    cfg = ot.ttt_config()
    pg = ot.pgolf_model(3, DT)
    rec = ot.record_model(mod, ot.record_hparams(mod, cfg), pg)
    layout = LoraLayout(pg.cfg, cfg.ttt.lora_targets, 4, 144.0, len(pg.virtual_layers(True)))
    n, w, C = 3, 24, 8
    g = torch.Generator().manual_seed(5)
    A = layout.zeros(layout.a_names, n, "cpu", DT)
    layout.draw_a_(A, g)
    B = [torch.randn(layout.shape(name, n), generator=g, dtype=DT) * 0.05 for name in layout.b_names]
    ids = torch.randint(2, 96, (n, w), generator=g)
    ids[1, 5] = 1  # a BOS inside a row: SmearGate must not look across it
    y = torch.randint(2, 96, (n, w), generator=g)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    try:
        lora = _record_lora_from(mod, rec, layout, A + B)
    finally:
        torch.set_default_dtype(previous)
    for p in lora.parameters():
        p.requires_grad_(True)
    theirs = rec.forward_ttt(ids, y, lora)[:, w - C :]
    theirs.sum().backward()
    views = [t.clone().requires_grad_(True) for t in A + B]
    ours = lora_nll(pg, layout, ids, y[:, w - C :], views, rope_for_rows(pg, 32, "cpu"))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
    ours.sum().backward()
    t = dict(zip(layout.names, views))
    pairs = [(t["A_head"].grad, lora.lm_head_lora.A.grad), (t["B_head"].grad, lora.lm_head_lora.B.grad)]
    for s in range(layout.slots):
        pairs.append((t["B_mlp"].grad[:, s], lora.mlp_loras[s].B.grad))
        for j, target in enumerate(layout.attn_targets):
            pairs.append((t["A_attn"].grad[:, s, j], getattr(lora, f"{target}_loras")[s].A.grad))
            pairs.append((t[f"B_{target}"].grad[:, s], getattr(lora, f"{target}_loras")[s].B.grad))
    for a, b in pairs:  # the cross-entropy's backward runs in float32 (logits.float()): float32 noise
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))


def test_adamw_over_active_documents_equals_the_records_optimizer():
    """The fused AdamW of the record (eps 1e-10, betas (0, 0.99), wd 0.5) over all documents, their state zeroed
    in place between batches, equals ours over the active suffix plus the deferred decay of finished documents."""
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(5, 3, 2, generator=g, dtype=DT)
    lr, wd = 1e-3, 0.5
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([ref], lr=lr, betas=(0.0, 0.99), eps=1e-10, weight_decay=wd, fused=True)
    ours = p0.clone()
    ea, es, step = torch.zeros_like(ours), torch.zeros_like(ours), torch.zeros((), dtype=torch.float32)
    active_from = [0, 0, 2, 4]  # documents finish one after another
    for batch in range(2):
        for state in opt.state.values():  # the record's reuse: zero every state tensor in place
            for v in state.values():
                v.zero_()
        ea.zero_(), es.zero_(), step.zero_()
        for a in active_from:
            grad = torch.randn(5, 3, 2, generator=g, dtype=DT)
            grad[:a] = 0  # a finished document's row is zeros in the record: no gradient
            ref.grad = grad.clone()
            opt.step()
            view = ours[a:]
            adamw_step_([view], [grad[a:]], [ea[a:]], [es[a:]], step, lr=lr, betas=(0.0, 0.99), weight_decay=wd,
                        eps=1e-10)
        missed = torch.tensor([sum(1 for a in active_from if i < a) for i in range(5)], dtype=DT)
        ours *= ((1 - lr * wd) ** missed).view(-1, 1, 1)
        torch.testing.assert_close(ours, ref.detach(), rtol=1e-13, atol=1e-15)


def test_phase_sgd_matches_record(mod, stream):
    tokens, nbytes = stream
    cfg = ot.ttt_config()
    h = ot.record_hparams(mod, cfg)
    pg = ot.pgolf_model(3, DT)
    rec = ot.record_model(mod, h, pg)
    phase_tokens = torch.from_numpy(tokens[:300].copy())
    val = types.SimpleNamespace(val_tokens=torch.from_numpy(tokens))
    mod.train_val_ttt_global_sgd_distributed(h, CPU, val, rec, phase_tokens)
    info = phase_sgd(pg, phase_tokens, chunk_tokens=64, seq_len=ot.EVAL_SEQ_LEN, lr=1e-3, momentum=0.9, clip=1.0,
                     rows=1)
    assert info["chunks"] == 5 and info["steps"] == 4
    assert ot.max_weight_diff(pg, rec) < 1e-9  # float64 (the cross-entropy of both runs in float32)


# ------------------------------------------------------------------------------------------------- end to end


def test_end_to_end_matches_record(runs, stream):
    record, ours, pg = runs
    acc = ours.accumulator
    assert np.array_equal(np.isfinite(record.token_nll), np.isfinite(acc.token_nll))
    assert np.isfinite(acc.token_nll[1:]).all() and np.isnan(acc.token_nll[0])  # positions 1..N-1, next BOS included
    np.testing.assert_allclose(acc.token_nll[1:], record.token_nll[1:], rtol=0, atol=NLL_TOL)
    assert np.array_equal(acc.score_order, record.score_step)  # the same documents in the same steps, in order
    result = acc.result()
    assert result.val_loss == pytest.approx(record.loss, rel=1e-9, abs=0)
    assert result.val_bpb == pytest.approx(record.bpb, rel=1e-9, abs=0)
    assert ot.max_weight_diff(pg, record.model) < 1e-9  # the same three phases, in the same order
    phases = ours.summary["phases"]
    assert [(p["scored_docs"], p["docs"]) for p in phases] == [(q["pd"], q["gd"]) for q in record.phase_points]
    assert [p["stream_tokens"] for p in phases] == [len(s) for s in record.phase_streams]
    assert [b for b, _ in record.draws] == [4, 2, 4, 4, 4]  # start, the 2-document batch, after each phase
    ours.ledger.check_complete(ours.expected_targets)


def test_phase_sets_and_streams_match_record(runs, stream):
    record, ours, _ = runs
    tokens, nbytes = stream
    val = ot.pgolf_val(tokens, nbytes)
    doc_len = record_doc_lengths(val.doc_starts, val.score_ends)
    cfg = ot.ttt_config().ttt
    schedule = record_schedule(doc_len, cfg)
    assert [(e.orig, e.docs.tolist()) for e in record_queue(doc_len, 4)] == record.queue
    from pgolf.evaluate.ttt_phase import phase_stream

    for docs, theirs in zip(schedule.phase_docs, record.phase_streams):
        assert np.array_equal(phase_stream(tokens, val.doc_starts, doc_len, docs), theirs)
    assert len(schedule.phase_docs) == len(record.phase_streams) == 3


# ------------------------------------------------------------------------------------------- two processes

WORKER = Path(__file__).with_name("ttt_oracle_worker.py")


@pytest.mark.slow  # two Python processes import torch and the record: ~20 s on a 2-core machine
def test_two_processes_match_record(tmp_path):
    """The record on 2 gloo ranks (dynamic claiming through its counter file); pgolf with lanes = the record's
    ranks (its recorded claims), inflight 1 and 2 phase rows, on 2 gloo processes AND in one process: the same
    per-target NLL, phase points and final weights."""
    if not record_oracle.record_script().is_file():
        pytest.skip(f"record script not found at {record_oracle.record_script()}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           str(WORKER), "--out", str(tmp_path), "--run-id", f"pgolf_ttt2_{uuid.uuid4().hex[:8]}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    owners = ranks[0]["owner"]
    assert set(owners.tolist()) == {0, 1}, "both ranks must have claimed batches"
    record = np.where(np.isfinite(ranks[0]["record_nll"]), ranks[0]["record_nll"], ranks[1]["record_nll"])
    ours = np.where(np.isfinite(ranks[0]["pgolf_nll"]), ranks[0]["pgolf_nll"], ranks[1]["pgolf_nll"])
    assert not (np.isfinite(ranks[0]["pgolf_nll"]) & np.isfinite(ranks[1]["pgolf_nll"])).any()
    assert np.isfinite(record[1:]).all() and np.isfinite(ours[1:]).all()
    np.testing.assert_allclose(ours[1:], record[1:], rtol=0, atol=NLL_TOL)
    np.testing.assert_allclose(ranks[0]["single_nll"][1:], ours[1:], rtol=0, atol=1e-12)  # 1 process == 2
    assert ranks[0]["prefixes"].tolist() == ranks[0]["record_prefixes"].tolist()
    for r in range(2):
        assert float(ranks[r]["weight_diff"]) < 1e-9 and float(ranks[r]["single_weight_diff"]) < 1e-9
    assert float(ranks[0]["loss"]) == pytest.approx(float(ranks[0]["record_loss"]), rel=1e-9)


# ------------------------------------------------------------------------------------------------- legality


def test_phase_points_follow_the_records_rule():
    """The counter is checked against the next boundary only, after each finished batch; in-flight batches finish."""
    assert phase_prefixes([16] + [64] * 50, [833, 1666, 2500], inflight=7) == [21, 34, 47]  # the record's logs
    assert phase_prefixes([16] + [64] * 50, [833, 1666, 2500], inflight=0) == [14, 27, 40]
    assert phase_prefixes([4, 4, 4], [2, 3, 12], inflight=0) == [1, 2, 3]  # two boundaries in one batch: next batch
    assert phase_prefixes([4, 4], [2, 4, 8], inflight=0) == [1, 2]  # the queue ends before the third check
    queue = record_queue(np.array([5, 3, 9, 4, 7, 2]), 2)
    assert [e.orig for e in queue] == [2, 1, 0]
    assert phase_doc_sets(queue, [2], [3])[0].tolist() == [3, 0, 4]  # the prefix's shortest 3, ascending batches
