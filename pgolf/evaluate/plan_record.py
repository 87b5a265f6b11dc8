"""``pgolf eval-plan`` for the record variant of LoRA TTT: the record's own schedule replayed, and pgolf's priced.

Step prices (seconds): a LoRA step of n rows of width w costs ``a + b n w`` when it trains, ``a + f b n w`` when it
only scores (a batch's last step; f = ``score_only_factor``). The record computes every row of its batch in every
step (finished documents too); pgolf computes the active rows only, and with CUDA graphs the short steps cost
``graph_a + b P w`` (full batch rows).

``--schedule record`` (:func:`replay_record`): an event simulation of PR #1855's 8-rank loop. Every free rank claims
the next queue entry; after each finished batch, while phases remain, the document counter grows by the batch and
the pause flag rises at the next boundary; ranks stop at the barrier after their batch; the pause is when the last
in-flight batch ends; the phase takes ``(chunks - 1) p + q``; then every rank claims again. One-time delays: the
record recompiles its TTT graph before its first step (``k0`` x its warm-up time) and after phase 1 (``k1`` x the
same). Prices fitted to the record's logs (benchmarks/record_pr1855_costs.json) reproduce its logged phase pauses
within 10 % (tests/test_eval_plan.py, numbers in benchmarks/record_pr1855_timeline.json).

``--schedule pgolf`` (:func:`project_record_variant`): :func:`pgolf.evaluate.ttt_plan.schedule_of` (the object the
runner executes) priced per GPU: lane l runs on GPU l % world; in each segment a GPU runs its lanes' batches one
after the other; segments end at the slowest GPU; a phase costs its trained chunks x (tokens per GPU / phase
tokens-per-second) + a fixed part; side batches run in the last segment. Adapter draws on the CPU are priced per
draw.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from pgolf.config import ConfigError
from pgolf.io import read_json_object
from pgolf.evaluate.ttt_plan import (TTTSchedule, batch_steps, phase_chunks, phase_doc_sets, phase_stream_tokens,
                                     record_queue)


def load_doc_lengths(path: str | Path) -> np.ndarray:
    """Document lengths (the record's ``doc_len``: own tokens + the next BOS) from one int per line, or JSON with
    ``doc_len``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: expected UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        if path.suffix == ".json":
            values = json.loads(text)["doc_len"]
        else:
            values = [int(line) for line in text.split() if line.strip()]
        lengths = np.asarray(values, dtype=np.int64)
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: expected one document length per line or JSON with 'doc_len' ({exc})") from None
    if lengths.ndim != 1 or len(lengths) == 0 or int(lengths.min()) < 2:
        raise ConfigError(f"{path}: expected at least one length, each >= 2 (a document and its next BOS)")
    return lengths


@dataclasses.dataclass(frozen=True)
class StepPrices:
    a: float  # seconds per step
    b: float  # seconds per (row x width token)
    score_only_factor: float = 0.35
    graph_a: Optional[float] = None  # per-step seconds of a replayed CUDA graph (None: not measured)

    def step(self, rows: int, width: int, trains: bool) -> float:
        return self.a + (1.0 if trains else self.score_only_factor) * self.b * rows * width


@dataclasses.dataclass(frozen=True)
class RecordCosts:
    """Prices of the record variant (costs JSON with ``"format": 2``)."""

    step: StepPrices
    phase_tokens_per_s: float  # one GPU, phase forward + backward
    phase_fixed_seconds: float  # per phase (all-reduces, stream upload, optimizer build)
    load_seconds: float
    compile_seconds: float  # the one dynamic graph, cold inductor cache
    warm_compile_seconds: Optional[float]
    adapter_draw_seconds: float  # one CPU draw of a lane's A (docs_per_batch documents)
    source: str
    phase_chunk_seconds: Optional[float] = None  # the record's replay: seconds per phase chunk on 8 GPUs
    recompile: Optional[dict] = None  # the record's replay: {"k0", "k1", "warmup_seconds"}
    measured_with: dict = dataclasses.field(default_factory=dict)

    def negative_prices(self) -> list[str]:
        """The prices below 0 or not finite (a plan priced with them would promise negative seconds)."""
        recompile = self.recompile or {}
        prices = {
            **{f"step.{f.name}": getattr(self.step, f.name) for f in dataclasses.fields(self.step)},
            **{f.name: value for f in dataclasses.fields(self) if isinstance(value := getattr(self, f.name), float)},
            **{f"recompile.{key}": recompile[key] for key in ("k0", "k1", "warmup_seconds") if key in recompile},
        }
        return [f"{name} = {value}" for name, value in prices.items()
                if value is not None and not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value))]

    @staticmethod
    def from_json(path: str | Path) -> "RecordCosts":
        data = read_json_object(path, "costs JSON")
        if data.get("format") == 2:
            costs = RecordCosts._from_format_2(path, data)
        else:
            costs = RecordCosts.from_slot_prices(path, data)
        bad = costs.negative_prices()
        if bad:
            raise ConfigError(f"{path}: prices are seconds (or tokens per second), expected finite numbers >= 0: "
                              + ", ".join(bad))
        return costs

    @staticmethod
    def _from_format_2(path, data: dict) -> "RecordCosts":
        try:
            s = data["step"]
            return RecordCosts(
                step=StepPrices(float(s["a"]), float(s["b"]), float(s.get("score_only_factor", 0.35)),
                                float(s["graph_a"]) if s.get("graph_a") is not None else None),
                phase_tokens_per_s=float(data.get("phase_tokens_per_s", 0.0)),
                phase_fixed_seconds=float(data.get("phase_fixed_seconds", 0.0)),
                load_seconds=float(data.get("load_seconds", 0.0)),
                compile_seconds=float(data.get("compile_seconds", 0.0)),
                warm_compile_seconds=float(data["warm_compile_seconds"]) if "warm_compile_seconds" in data else None,
                adapter_draw_seconds=float(data.get("adapter_draw_seconds", 0.0)),
                source=str(data.get("source", path)),
                phase_chunk_seconds=float(data["phase_chunk_seconds"]) if "phase_chunk_seconds" in data else None,
                recompile=data.get("recompile"),
                measured_with=dict(data.get("measured_with", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: a format-2 costs file needs step.a and step.b numbers ({exc})") from None

    @staticmethod
    def from_slot_prices(path, data: dict) -> "RecordCosts":
        """A format-1 file (seconds per 64-slot step per power-of-two slot length): b from the two longest slots,
        a from the shortest (its price is overhead)."""
        try:
            table = {int(k): float(v) for k, v in data["step_seconds"].items()}
            slots = int((data.get("measured_with") or {}).get("docs_per_batch", 64))
            lengths = sorted(table)
            hi, lo = lengths[-1], lengths[-2]
            b = (table[hi] - table[lo]) / (slots * (hi - lo))
            a = max(table[hi] - b * slots * hi, table[lengths[0]] - b * slots * lengths[0])
            compile_s = max(float(v) for v in data["compile_seconds"].values())
            return RecordCosts(StepPrices(a, b), float(data["phase_tokens_per_s"]), 1.0, float(data["load_seconds"]),
                               compile_s, float(data["warm_compile_seconds"]) if "warm_compile_seconds" in data else None,
                               0.0, f"{data.get('source', path)} (per-slot prices read as a + b n w)",
                               measured_with=dict(data.get("measured_with", {})))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"{path}: expected per-slot step_seconds (two or more), compile_seconds, "
                              f"phase_tokens_per_s and load_seconds ({exc})") from None


def record_batch_seconds(lengths: np.ndarray, prices: StepPrices, chunk: int, ctx: int) -> float:
    """The record's price of a batch: every row of the batch in every step."""
    n = len(lengths)
    return float(sum(prices.step(n, w, trains) for _, _, w, trains in batch_steps(np.sort(lengths) - 1, chunk, ctx)))


# --------------------------------------------------------------------------------------------------------------
# the record's schedule, replayed
# --------------------------------------------------------------------------------------------------------------


def replay_record(doc_len: np.ndarray, prices: StepPrices, *, world: int = 8, per_batch: int = 64, chunk: int = 48,
                  ctx: int = 2048, bounds: Sequence[int] = (833, 1666, 2500), phase_chunk_tokens: int = 32768,
                  phase_chunk_seconds: float = 0.1138, phase_fixed_seconds: float = 1.92, delay_first: float = 0.0,
                  delay_after_phase1: float = 0.0) -> dict[str, Any]:
    """Seconds from the record's TTT timer start: each phase's pause and resume, the documents scored at each pause
    (``pd``), the end, and every rank's claimed queue entries."""
    queue = record_queue(doc_len, per_batch)
    durations = [record_batch_seconds(doc_len[e.docs], prices, chunk, ctx) for e in queue]
    sizes = [len(e.docs) for e in queue]
    Q = len(queue)
    t0, nxt, counter, phase, flag = delay_first, 0, 0, 0, False
    out: dict[str, Any] = {"pauses": [], "resumes": [], "pd": [], "prefixes": [], "phase_chunks": [],
                           "claims": [[] for _ in range(world)]}
    while True:
        heap: list = []
        for rank in range(world):
            if nxt < Q:
                out["claims"][rank].append(nxt)
                heapq.heappush(heap, (t0 + durations[nxt], rank, nxt))
                nxt += 1
        waiting: list[float] = []
        end = t0
        while heap:
            t, rank, q = heapq.heappop(heap)
            end = max(end, t)
            if phase < len(bounds):
                counter += sizes[q]
                flag = flag or counter >= bounds[phase]
                if flag:
                    waiting.append(t)
                    continue
            if nxt < Q:
                out["claims"][rank].append(nxt)
                heapq.heappush(heap, (t + durations[nxt], rank, nxt))
                nxt += 1
        if not (flag and phase < len(bounds)):
            out["end"] = end
            return out
        pause = max(waiting) if waiting else end
        docs = phase_doc_sets(queue, [nxt], [bounds[phase]])[0]
        chunks = phase_chunks(phase_stream_tokens(doc_len, docs), phase_chunk_tokens)
        t0 = pause + (chunks - 1) * phase_chunk_seconds + phase_fixed_seconds
        out["pauses"].append(pause)
        out["pd"].append(counter)
        out["prefixes"].append(nxt)
        out["phase_chunks"].append(chunks)
        out["resumes"].append(t0)
        if phase == 0:
            t0 += delay_after_phase1
        phase, flag = phase + 1, False


# --------------------------------------------------------------------------------------------------------------
# pgolf's schedule, priced
# --------------------------------------------------------------------------------------------------------------


def pgolf_batch_seconds(lengths_sorted: np.ndarray, prices: StepPrices, chunk: int, ctx: int,
                        graph_width: int = 0) -> float:
    """pgolf's price of a batch: active rows only; steps of width <= ``graph_width`` as full-batch graph replays."""
    n = len(lengths_sorted)
    total = 0.0
    for _, active, w, trains in batch_steps(lengths_sorted - 1, chunk, ctx):
        if graph_width and w <= graph_width and prices.graph_a is not None:
            total += prices.graph_a + (1.0 if trains else prices.score_only_factor) * prices.b * n * w
        else:
            total += prices.step(active, w, trains)
    return total


def project_record_variant(schedule: TTTSchedule, doc_len: np.ndarray, costs: RecordCosts, world: int, *,
                           phase_chunk_tokens: int, phase_rows: int, graph_width: int = 0,
                           compile_cache: str = "cold") -> dict[str, Any]:
    """Projected seconds of pgolf's record-variant evaluation on ``world`` GPUs (see the module docstring)."""
    if world < 1:
        raise ValueError(f"world: expected >= 1, got {world}")
    gpu_of = lambda lane: lane % world  # noqa: E731
    runnable = schedule.runnable_phases()
    segments = []
    phases = []
    for seg in range(runnable + 1):
        per_gpu = [0.0] * world
        draws = [0] * world
        for lane in range(schedule.lanes):
            if any(b.lane == lane and not b.side and b.segment >= seg for b in schedule.batches):
                draws[gpu_of(lane)] += 1
        for b in schedule.batches:
            runs_in = runnable if b.side else b.segment
            if runs_in != seg:
                continue
            lengths = doc_len[b.docs]
            per_gpu[gpu_of(b.lane)] += pgolf_batch_seconds(lengths, costs.step, schedule.chunk, schedule.ctx,
                                                           0 if (b.side or b.fresh) else graph_width)
            if b.side or b.fresh:
                draws[gpu_of(b.lane)] += 1 + int(b.side and b.fresh)
        busy = [t + d * costs.adapter_draw_seconds for t, d in zip(per_gpu, draws)]
        segments.append({"segment": seg, "seconds": round(max(busy), 1), "idle_s_mean": round(max(busy) - sum(busy) / world, 1)})
        if seg < runnable:
            tokens = phase_stream_tokens(doc_len, schedule.phase_docs[seg])
            chunks = phase_chunks(tokens, phase_chunk_tokens)
            rows_per_gpu = -(-phase_rows // world)
            per_chunk = phase_chunk_tokens * rows_per_gpu / phase_rows / max(costs.phase_tokens_per_s, 1e-9)
            phases.append({"phase": seg + 1, "docs": int(len(schedule.phase_docs[seg])), "tokens": tokens,
                           "chunks": chunks, "seconds": round((chunks - 1) * per_chunk + costs.phase_fixed_seconds, 1)})
    if compile_cache == "warm":
        if costs.warm_compile_seconds is None:
            raise ConfigError(f"{costs.source}: no warm_compile_seconds, so no warm-cache projection")
        warmup = costs.warm_compile_seconds
    else:
        warmup = costs.compile_seconds
    score = sum(s["seconds"] for s in segments) + sum(p["seconds"] for p in phases)
    total = costs.load_seconds + warmup + score
    return {"schedule": "pgolf", "world_size": world, "lanes": schedule.lanes, "compile_cache": compile_cache,
            "phase_prefixes": list(schedule.prefixes), "side_batches": [b.queue_index for b in schedule.batches if b.side],
            "segments": segments, "phases": phases, "load_s": round(costs.load_seconds, 1), "warmup_s": round(warmup, 1),
            "score_s": round(score, 1), "total_s": round(total, 1)}
