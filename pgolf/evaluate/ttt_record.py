"""The record's phased LoRA TTT (``evaluate.ttt.variant: record``; PR #1855 ``eval_val_ttt_phased``), executed
from the schedule of :mod:`pgolf.evaluate.ttt_plan` with the adapters of :mod:`pgolf.evaluate.ttt_adapters`, the
forward of :mod:`pgolf.evaluate.ttt_forward` and the phases of :mod:`pgolf.evaluate.ttt_phase`.

Targets: the validation set's (``evaluate.score_next_bos``; the record's: each document's targets run through the
next document's BOS, ``ValidationSet.score_ends``), so the record recipe scores positions 1..N-1.

Per batch (documents ascending): B = 0, a fresh AdamW state; A is the lane's (warm start: what the lane's previous
batch left; drawn again at the start of every segment) or, for a batch of another size or a side batch, a draw of
its own. Per step c: rows of width w = min(C (c + 1), ctx) for the ACTIVE documents only (a suffix of the batch);
the forward scores each document's chunk (the rows' last C positions), then, except on the batch's last step, one
AdamW step on the sum over training documents of their chunk's mean NLL. A document that has finished sits out the
remaining optimizer steps; the record keeps its all-zero row in every step, where AdamW only decays its A
(beta1 = 0 and g = 0 leave p * (1 - lr wd)), so that decay is applied at the end of the batch
(``A *= (1 - lr wd)^steps missed``): the next batch of the lane starts from the record's A.

No host sync per step: the rows are built on the device from the batch's (start, length) and the step index the
host knows; losses, bytes and target counts add up in float64 device scalars; the :class:`DeviceLedger` records
every score and every update on the device and is checked (one sync) before and after each phase and at the end.

Processes: lane l runs on process l % world; a phase is collective (rows round-robin, one all-reduce per step).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional

import numpy as np
import torch

from pgolf.config import EvaluateConfig
from pgolf.io import Progress
from pgolf.evaluate.ledger import DeviceLedger
from pgolf.evaluate.scoring import DeviceScores, disable_mix_order_reduction
from pgolf.evaluate.ttt import TTTOutcome, sync_device
from pgolf.evaluate.ttt_adapters import AdapterWorkspace, LaneAdapters, LoraLayout
from pgolf.evaluate.ttt_forward import lora_nll, rope_for_rows
from pgolf.evaluate.ttt_phase import phase_positions, phase_sgd, phase_stream
from pgolf.evaluate.ttt_plan import batch_steps, check_schedule, record_doc_lengths, schedule_of
from pgolf.evaluate.valdata import ValidationSet


def record_schedule(doc_len: np.ndarray, cfg):
    """:func:`schedule_of` with a TTT config's settings."""
    return schedule_of(doc_len, per_batch=cfg.docs_per_batch, chunk=cfg.chunk_tokens, ctx=cfg.context_tokens,
                       bounds=cfg.phase_boundaries_docs, lanes=cfg.lanes, inflight=cfg.inflight_batches,
                       side_batches=cfg.side_batches)


class _Rows:
    """Device tensors of one step (see :meth:`RecordTTT.rows`)."""

    __slots__ = ("ids", "targets", "score", "positions", "nbytes", "train", "used", "used_mask")


class RecordTTT:
    def __init__(self, model, val: ValidationSet, eval_cfg: EvaluateConfig, seed: int, *, device, dist_info=None,
                 keep_tokens: bool = False, write: Optional[Callable[[dict], None]] = None, schedule=None):
        self.model, self.val, self.eval_cfg, self.cfg, self.seed = model, val, eval_cfg, eval_cfg.ttt, int(seed)
        self.device = torch.device(device)
        self.dist_info = dist_info
        self.rank = dist_info.rank if dist_info is not None and dist_info.enabled else 0
        self.world = dist_info.world_size if dist_info is not None and dist_info.enabled else 1
        if getattr(model, "bigram_hash", None) is not None:
            raise ValueError("evaluate.ttt.variant record: the eval-time bigram hash is not part of the record's TTT")
        cfg = self.cfg
        self.C, self.ctx, self.P = cfg.chunk_tokens, cfg.context_tokens, cfg.docs_per_batch
        self.doc_starts = val.doc_starts.astype(np.int64)
        self.doc_len = record_doc_lengths(val.doc_starts, val.score_ends)
        self.schedule = schedule if schedule is not None else record_schedule(self.doc_len, cfg)
        check_schedule(self.schedule)
        self.layout = LoraLayout(model.cfg, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha,
                                 len(model.virtual_layers(looping=True)))
        dtype = next(model.parameters()).dtype
        self.adapter_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.tokens = torch.from_numpy(val.tokens.astype(np.int32)).to(self.device)
        self.target_bytes = torch.from_numpy(val.target_bytes.astype(np.int32)).to(self.device)
        self.scores = DeviceScores(val, self.device, keep_tokens)
        self.ledger = DeviceLedger(val.num_positions, self.device)
        self.rope = rope_for_rows(model, self.ctx, self.device)
        self.workspace = AdapterWorkspace(self.layout, self.P, self.device, self.adapter_dtype)
        self.my_lanes = [lane for lane in range(cfg.lanes) if lane % self.world == self.rank]
        self.lanes = {lane: LaneAdapters(self.layout, self.workspace, torch.Generator().manual_seed(self.seed),
                                         shared=len(self.my_lanes) == 1) for lane in self.my_lanes}
        self.progress = Progress("ttt-lora", int((self.doc_len - 1).sum()), val.num_docs,
                                 eval_cfg.progress_every_seconds, self.rank == 0, write, self.world)
        self.fwd = self._forward_eager
        self.compiled = False
        self.graphs = None
        self.summary: dict = {"mode": "lora", "variant": "record", "batches": len(self.schedule.batches),
                              "lanes": cfg.lanes, "lanes_here": self.my_lanes, "inflight": self.schedule.inflight,
                              "phase_prefixes": list(self.schedule.prefixes),
                              "side_batches": [b.queue_index for b in self.schedule.batches if b.side],
                              "adapter_parameters_per_doc": self.layout.parameters_per_doc(), "steps": 0,
                              "batch_steps_here": 0, "phases": [], "segments": []}

    # ------------------------------------------------------------------------------------------------ the forward

    def autocast(self, cache: bool = True):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
        return contextlib.nullcontext()

    def _forward_eager(self, ids, targets, *views):
        return lora_nll(self.model, self.layout, ids, targets, views, self.rope, self.cfg.checkpoint_activations,
                        self.eval_cfg.softcap_dtype == "model")

    def compile(self, warmup_steps: int = 1) -> float:
        """torch.compile the forward once with dynamic shapes and warm it up on RANDOM tokens, ``warmup_steps``
        (evaluate.compile_warmup_steps) calls per shape: rows of the batch sizes the schedule uses, at the shortest
        and longest widths, forward and backward; without a warm-up the first scored steps compile. Returns the
        warm-up seconds."""
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
        disable_mix_order_reduction()
        self.fwd = torch.compile(self._forward_eager)  # the row count and width are marked dynamic at each call
        self.compiled = True
        if warmup_steps <= 0:
            return 0.0
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed + 7_919)
        sizes = sorted({len(b.docs) for b in self.schedule.batches if len(b.docs) > 1} | {2})
        caches = (True, False) if self.cfg.cuda_graphs and self.device.type == "cuda" else (True,)  # graphs: no cast cache
        shapes = [(n, w, cache) for n in sizes for w in (self.C, self.ctx) for cache in caches]
        for n, w, cache in shapes * warmup_steps:
            ids = torch.randint(2, self.model.cfg.vocab_size, (n, w), generator=gen).to(self.device)
            targets = torch.randint(2, self.model.cfg.vocab_size, (n, self.C), generator=gen).to(self.device)
            views = [t[:n].detach().clone().requires_grad_(True) for t in self.workspace.tensors]
            with self.autocast(cache):
                nll = self.forward(ids, targets, views)
            nll.mean().backward()
        sync_device(self.device)
        return time.perf_counter() - start

    # --------------------------------------------------------------------------------------------------- one step

    def rows(self, meta: tuple, c: int, w: int) -> _Rows:
        """The step's rows on the device: meta = (starts, pred_len, n_chunks) [m] of the documents in the rows."""
        starts, pred, nch = meta
        C, ctx, N = self.C, self.ctx, self.val.num_positions
        active = nch > c
        end = torch.where(nch - 1 == c, pred, torch.full_like(pred, C * (c + 1)))
        end = torch.where(active, end, torch.zeros_like(end))  # finished documents (padded rows): empty windows
        win_start = (end - ctx).clamp(min=0)
        win_len = end - win_start
        base = (starts + win_start)[:, None]
        j = torch.arange(w, device=self.device)
        r = _Rows()
        r.ids = torch.where(j < win_len[:, None], self.tokens[(base + j).clamp(max=N - 1)].long(), 0)
        jh = j[w - C :]
        r.positions = base + jh + 1
        head_valid = jh < win_len[:, None]
        safe = r.positions.clamp(max=N - 1)
        r.targets = torch.where(head_valid, self.tokens[safe].long(), 0)
        r.score = head_valid & (jh >= (C * c - win_start)[:, None])
        r.nbytes = self.target_bytes[safe]
        r.train = nch - 1 > c
        ju = torch.arange(w + 1, device=self.device)
        r.used = base + ju
        r.used_mask = (ju <= win_len[:, None]) & (r.used > starts[:, None]) & r.train[:, None]
        return r

    def forward(self, ids, targets, views):
        """NLL [n, C]: the compiled graph (dims n and w dynamic), or eager for a single row (a size-1 dim would be
        specialised and recompile)."""
        if not self.compiled or ids.shape[0] < 2:
            return self._forward_eager(ids, targets, *views)
        import torch._dynamo as dynamo

        dynamo.mark_dynamic(ids, 0)
        dynamo.mark_dynamic(ids, 1)
        dynamo.mark_dynamic(targets, 0)
        for v in views:
            dynamo.mark_dynamic(v, 0)
        return self.fwd(ids, targets, *views)

    def step(self, meta, c: int, w: int, trains: bool, a: int, n: int, A=None, views=None, cache: bool = True) -> None:
        """Score chunk c of documents [a, n) of the workspace batch, then (``trains``) one AdamW step on it.
        ``views``: the leaf tensors to use (a captured CUDA graph's); ``cache``: autocast's weight-cast cache
        (off inside a graph capture)."""
        cfg = self.cfg
        r = self.rows(meta, c, w)
        if views is None:
            views = self.workspace.views(a, n, A)
        if cfg.debug_update_before_score and trains:  # ILLEGAL ordering, for tests and compliance checks only
            with self.autocast(cache):
                nll = self.forward(r.ids, r.targets, views)
            self._update(nll, r, views, a, n)
            with torch.no_grad(), self.autocast(cache):
                nll = self.forward(r.ids, r.targets, views)
            self._score(nll, r)
            return
        with self.autocast(cache):
            nll = self.forward(r.ids, r.targets, views)  # with grad: one graph serves scoring and training
        self._score(nll, r)
        if trains:
            self._update(nll, r, views, a, n)

    def _score(self, nll, r: _Rows) -> None:
        self.ledger.record_scored(r.positions, r.score)
        self.scores.add(nll.detach(), r.score, r.nbytes, r.positions)

    def _update(self, nll, r: _Rows, views, a: int, n: int) -> None:
        cfg = self.cfg
        self.ledger.record_update(r.used, r.used_mask)
        loss = (nll.mean(dim=-1) * r.train.to(nll.dtype)).sum()
        loss.backward()
        self.workspace.step_(views, a, n, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                             eps=cfg.adam_eps)
        self.summary["steps"] += 1

    # -------------------------------------------------------------------------------------------------- a batch

    def run_batch(self, batch, lane: Optional[LaneAdapters], A=None) -> None:
        """One batch: ``lane`` (its A is loaded and stored back) or ``A`` (a draw of the batch's own)."""
        cfg = self.cfg
        docs = batch.docs
        n = len(docs)
        pred = self.doc_len[docs] - 1
        steps = batch_steps(pred, self.C, self.ctx)
        host_meta = np.stack([self.doc_starts[docs], pred, -(-pred // self.C)]).astype(np.int64)
        meta_all = self._upload(host_meta)
        self.workspace.begin_batch(n)
        if lane is not None:
            if not cfg.warm_start_a:
                lane.draw_()
            lane.load()
        included_from = []  # per optimizer step: the first document in its rows
        for c, (a, active, w, trains) in enumerate(steps):
            if self.graphs is not None and self.graphs.eligible(batch, lane, n, w):
                self.graphs.run(self, meta_all, c, w, trains)
                lo = 0
            else:
                lo = a - 1 if (active == 1 and a > 0) else a  # never one row: a size-1 dim would recompile
                meta = (meta_all[0, lo:], meta_all[1, lo:], meta_all[2, lo:])
                self.step(meta, c, w, trains, lo, n, A)
            if trains:
                included_from.append(lo)
            self.summary["batch_steps_here"] += 1
        if lane is not None:
            lane.store(self._decay(n, included_from))
        self.progress.update(int(pred.sum()), docs=n)

    def _decay(self, n: int, included_from: list[int]) -> Optional[torch.Tensor]:
        """Per document: (1 - lr wd) to the power of the optimizer steps it sat out (None when it sat out none)."""
        missed = np.zeros(n, dtype=np.int64)
        for lo in included_from:
            missed[:lo] += 1
        if not missed.any():
            return None
        factor = (1.0 - self.cfg.lr * self.cfg.weight_decay) ** missed.astype(np.float64)
        return self._upload(factor)

    def _upload(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the device without waiting for the device (pinned memory, asynchronous copy)."""
        t = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _own_adapters(self, n: int, generator: torch.Generator, first_full: bool = False) -> list[torch.Tensor]:
        """A drawn for one batch of n documents; ``first_full``: draw a full lane set first (what a rank draws at
        the start before a batch of another size)."""
        if first_full:
            self.layout.draw_a_(self.layout.zeros(self.layout.a_names, self.P, "cpu", self.adapter_dtype), generator)
        A = self.layout.zeros(self.layout.a_names, n, self.device, self.adapter_dtype)
        self.layout.draw_a_(A, generator)
        return A

    # ------------------------------------------------------------------------------------------------- a phase

    def run_phase(self, k: int) -> dict:
        cfg = self.cfg
        self.ledger.check(f"before phase {k + 1}")
        docs = self.schedule.phase_docs[k]
        known = self.ledger.known_scored(self.dist_info)
        positions = torch.from_numpy(phase_positions(self.doc_starts, self.doc_len, docs)).to(self.device)
        self.ledger.record_update_known(positions, known)
        self.ledger.check(f"phase {k + 1} trains on its documents")
        stream = torch.from_numpy(phase_stream(self.val.tokens, self.doc_starts, self.doc_len, docs).astype(np.int64)
                                  ).to(self.device)
        info = phase_sgd(self.model, stream, chunk_tokens=cfg.phase_chunk_tokens, seq_len=self.eval_cfg.eval_seq_len,
                         lr=cfg.phase_lr, momentum=cfg.phase_momentum, clip=cfg.phase_grad_clip, rows=cfg.phase_rows,
                         dist_info=self.dist_info, autocast=self.autocast if self.device.type == "cuda" else None)
        return {"after_batches": self.schedule.prefixes[k], "docs": int(len(docs)),
                "scored_docs": int(sum(len(b.docs) for b in self.schedule.batches[: self.schedule.prefixes[k]])),
                "stream_tokens": int(stream.numel()), **info}

    # ------------------------------------------------------------------------------------------------- the run

    def run(self) -> TTTOutcome:
        cfg = self.cfg
        warmup_s = self.compile(self.eval_cfg.compile_warmup_steps) if self.eval_cfg.compile else 0.0
        self.summary["compiled"] = self.compiled
        graphs_before = _unique_graphs()
        if cfg.cuda_graphs:
            from pgolf.evaluate.ttt_graphs import StepGraphs

            self.graphs = StepGraphs(self)
        sched = self.schedule
        side = [b for b in sched.batches if b.side]
        w0 = {k: v.detach().clone() for k, v in self.model.state_dict().items()} if side else None
        runnable = sched.runnable_phases()
        score_start = time.perf_counter()
        for seg in range(runnable + 1):
            seg_start = time.perf_counter()
            for lane_id in self.my_lanes:
                lane = self.lanes[lane_id]
                later = [b for b in sched.batches if b.lane == lane_id and not b.side and b.segment >= seg]
                if later:
                    lane.draw_()  # the record draws a new reusable set at the start and after every phase
                for batch in sched.lane_batches(lane_id, seg, side=False):
                    if batch.fresh:
                        self.run_batch(batch, None, self._own_adapters(len(batch.docs), lane.generator, False))
                    else:
                        self.run_batch(batch, lane)
            if seg == runnable and side:
                self._run_side(w0)
            sync_device(self.device)
            self.summary["segments"].append({"segment": seg, "seconds": time.perf_counter() - seg_start})
            if seg < runnable:
                self.summary["phases"].append(self.run_phase(seg))
        self.ledger.check("end of evaluation")
        sync_device(self.device)
        score_s = time.perf_counter() - score_start
        self.scores.finish()
        self.progress.update(0, force=True)
        self.summary.update({"phases_skipped_after_last_batch": len(sched.prefixes) - runnable,
                             "graphs_compiled_while_scoring": _unique_graphs() - graphs_before if self.eval_cfg.compile else 0,
                             **(self.graphs.summary() if self.graphs is not None else {}),
                             "compile_warmup_s": warmup_s})
        # the set's targets: with score_next_bos (the record's), every position but the first
        return TTTOutcome(self.scores, self.ledger, self.summary, warmup_s, score_s,
                          expected_targets=self.val.target_mask())

    def _run_side(self, w0: dict) -> None:
        """Side batches (this process's lanes): the pre-phase weights, adapters of their own (chain-isolated: the
        draws a rank makes for its first batch), run after the phased work."""
        final = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(w0)
        first, after_first = None, None
        for lane_id in self.my_lanes:
            for batch in self.schedule.lane_batches(lane_id, self.schedule.num_segments - 1, side=True):
                if first is None:  # Generator(seed)'s first full set: the same for every side batch, drawn once
                    gen = torch.Generator().manual_seed(self.seed)
                    first = self.layout.zeros(self.layout.a_names, self.P, "cpu", self.adapter_dtype)
                    self.layout.draw_a_(first, gen)
                    after_first = gen.get_state()
                if batch.fresh:  # a batch of another size draws its own set next, as a rank's first batch does
                    gen = torch.Generator()
                    gen.set_state(after_first)
                    A = self._own_adapters(len(batch.docs), gen, first_full=False)
                else:
                    A = [t.to(self.device, copy=True) for t in first]
                self.run_batch(batch, None, A)
        self.model.load_state_dict(final)


def _unique_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return 0


def record_lora_ttt(model, val: ValidationSet, eval_cfg: EvaluateConfig, seed: int, *, device, dist_info=None,
                    keep_tokens: bool = False, write=None, schedule=None) -> TTTOutcome:
    """Run the record variant of LoRA TTT over the whole validation set (see the module docstring). ``schedule``:
    a :class:`~pgolf.evaluate.ttt_plan.TTTSchedule` to run instead of the one the config gives (tests: the lanes of
    a recorded run); it is checked like any other."""
    model.looping = model.cfg.loop_count > 1
    for p in model.parameters():
        p.requires_grad_(False)
    return RecordTTT(model, val, eval_cfg, seed, device=device, dist_info=dist_info, keep_tokens=keep_tokens,
                     write=write, schedule=schedule).run()
