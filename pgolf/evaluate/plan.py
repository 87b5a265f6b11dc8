"""``pgolf eval-plan``: how long a recipe's evaluation will take on N GPUs, before spending an 8-GPU run on it.

Why: the evaluation budget (600 s on 8 GPUs) covers loading, compile warm-up and scoring with TTT, and the cost
of document-batched LoRA TTT is not proportional to tokens: a batch takes as many steps as its LONGEST document
has chunks, each step's price depends on its slot length, and every slot length is one more compiled graph. The
schedule below replays exactly the batching of :func:`pgolf.evaluate.ttt.lora_ttt` (documents longest first, batches of
``docs_per_batch``, batch ``b`` on process ``b % world``, phases synchronising all processes) on the validation
documents' lengths, and prices it with per-step costs measured on one GPU (a costs JSON, or the ``slot_timing``
of an earlier ``eval.json``).

Model of the time on ``world`` GPUs::

    total = load + warm-up + sum over segments (max over processes of sum_steps cost[L]) + sum over phases
            (phase tokens / world / phase tokens-per-second)

A segment is the run of rounds between two phases: processes never wait for each other inside one, and all of
them wait for the slowest before a phase. Left out (small against the figures measured so far, stated rather
than guessed): the all-reduce of phase gradients, the final all-reduce of the scores, host work between steps.
Steps that only score (a document's last chunk, no update) are priced like update steps, so the figure errs long.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pgolf.config import ConfigError, TTTConfig
from pgolf.io import read_json_object
from pgolf.evaluate.ttt import compiled_slot_lengths, longest_first, phase_plan, slot_length_for_window

RECORD_VAL_DOCS = 50_000  # data.md: the record scores RECORD_VAL_TOKENS targets over these
LOGNORMAL_SIGMA = 0.9  # spread of the synthetic document lengths (FineWeb-like: median ~640, long tail)


# --------------------------------------------------------------------------------------------------------------
# the schedule: pure functions of the document lengths and the TTT config
# --------------------------------------------------------------------------------------------------------------


def batch_slot_steps(doc_targets: np.ndarray, cfg: TTTConfig) -> Counter:
    """Steps per slot length of one LoRA batch whose documents have ``doc_targets`` targets each.

    Step ``c`` holds chunk ``c`` of every document that still has one; its slot must hold the longest window,
    which is the longest document's: ``min((c + 1) * chunk_tokens, n_max, context_tokens)`` tokens.
    """
    n_max = int(doc_targets.max(initial=0))
    steps: Counter = Counter()
    for c in range(-(-n_max // cfg.chunk_tokens)):
        steps[slot_length_for_window(min((c + 1) * cfg.chunk_tokens, n_max, cfg.context_tokens), cfg)] += 1
    return steps


@dataclasses.dataclass(frozen=True)
class Segment:
    """Rounds between two phases: per process, its steps per slot length; then the phase (if any) that ends it."""

    steps_per_rank: tuple[Counter, ...]  # [world] slot length -> steps
    phase_tokens: int  # targets the phase after this segment trains on (all processes together); 0 = no phase


@dataclasses.dataclass(frozen=True)
class LoraSchedule:
    world_size: int
    segments: tuple[Segment, ...]
    slot_lengths_compiled: tuple[int, ...]  # the warm-up compiles one graph per slot length a step can use
    # the batch of the longest document (batch 0): its steps run one after another on one process, before the
    # first phase, so no process count makes the evaluation shorter than this batch
    longest_batch_steps: Counter

    def steps_per_rank(self) -> list[Counter]:
        total = [Counter() for _ in range(self.world_size)]
        for seg in self.segments:
            for rank, steps in enumerate(seg.steps_per_rank):
                total[rank].update(steps)
        return total


def lora_schedule(doc_lengths: np.ndarray, cfg: TTTConfig, world_size: int) -> LoraSchedule:
    """The step schedule of :func:`pgolf.evaluate.ttt.lora_ttt` for documents of ``doc_lengths`` tokens (BOS included)."""
    if world_size < 1:
        raise ValueError(f"world_size: expected >= 1, got {world_size}")
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    if len(lengths) == 0 or int(lengths.min()) < 1:
        raise ValueError("doc_lengths: expected at least one document, each of >= 1 token (its BOS)")
    order = longest_first(lengths)  # the queue of lora_ttt
    targets = lengths[order] - 1
    S = cfg.docs_per_batch
    num_batches = -(-len(order) // S)
    num_rounds = -(-num_batches // world_size)
    phases = phase_plan(cfg, order, num_batches, world_size)
    segments: list[Segment] = []
    current = [Counter() for _ in range(world_size)]
    for r in range(num_rounds):
        for rank in range(world_size):
            b = r * world_size + rank
            if b < num_batches:
                current[rank].update(batch_slot_steps(targets[b * S : (b + 1) * S], cfg))
        if r in phases:
            first, last = phases[r]
            segments.append(Segment(tuple(current), int(targets[first:last].sum())))
            current = [Counter() for _ in range(world_size)]
    segments.append(Segment(tuple(current), 0))
    return LoraSchedule(world_size, tuple(segments), compiled_slot_lengths(cfg), batch_slot_steps(targets[:S], cfg))


# --------------------------------------------------------------------------------------------------------------
# costs and the projection
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalCosts:
    """Measured prices on one GPU. ``compile_seconds``: warm-up per slot length (cold inductor cache)."""

    step_seconds: dict[int, float]  # slot length -> seconds per LoRA step (score + update)
    compile_seconds: dict[int, float]
    phase_tokens_per_s: float  # one GPU, forward + backward of the whole model over already-scored documents
    load_seconds: float
    measured_with: dict[str, Any]  # the settings the prices hold for (docs_per_batch, lora_rank, model, device)
    source: str
    warm_compile_seconds: Optional[float] = None  # warm-up per slot length when the inductor cache is warm

    @staticmethod
    def from_json(path: str | Path) -> "EvalCosts":
        data = read_json_object(path, "costs JSON")

        def need(key: str):
            if key not in data:
                raise ConfigError(f"{path}: missing field '{key}'")
            return data[key]

        try:
            return EvalCosts(
                step_seconds={int(k): float(v) for k, v in need("step_seconds").items()},
                compile_seconds={int(k): float(v) for k, v in need("compile_seconds").items()},
                phase_tokens_per_s=float(need("phase_tokens_per_s")),
                load_seconds=float(need("load_seconds")),
                measured_with=dict(data.get("measured_with", {})),
                source=str(data.get("source", path)),
                warm_compile_seconds=float(data["warm_compile_seconds"]) if "warm_compile_seconds" in data else None,
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{path}: expected numbers keyed by slot length ({exc})") from None

    @staticmethod
    def from_eval_result(path: str | Path) -> "EvalCosts":
        """Prices from an ``eval.json`` of a LoRA-TTT run: its ``slot_timing``, phases and timings."""
        data = read_json_object(path, "evaluation result")
        ttt = data.get("ttt") or {}
        timing = ttt.get("slot_timing")
        if not timing:
            raise ConfigError(f"{path}: no ttt.slot_timing (expected the eval.json of a LoRA-TTT run)")
        phases = [p for p in ttt.get("phases", []) if p.get("tokens") and p.get("seconds")]
        if not phases:
            raise ConfigError(f"{path}: no phase with tokens and seconds, so no phase tokens/s to project with")
        timings = data.get("timings") or {}
        compiled = max(int(ttt.get("compiled_shapes", 0)), 1)
        warm_up_each = float(timings.get("warmup_s", 0.0)) / compiled
        return EvalCosts(
            step_seconds={int(k): v["seconds"] / v["steps"] for k, v in timing.items() if v["steps"]},
            compile_seconds={int(k): warm_up_each for k in timing},
            phase_tokens_per_s=sum(p["tokens"] for p in phases) / sum(p["seconds"] for p in phases),
            load_seconds=float(timings.get("load_s", 0.0)),
            measured_with={"docs_per_batch": ttt.get("docs_per_batch")},
            source=str(path),
        )


def _priced(table: dict[int, float], length: int, what: str, source: str) -> float:
    if length not in table:
        raise ConfigError(f"{source}: no {what} for slot length {length} (has {sorted(table)}); measure it with "
                          f"benchmarks/bench_eval.py --mode lora --compile and add it")
    return table[length]


def project(schedule: LoraSchedule, costs: EvalCosts, compile_cache: str = "cold") -> dict[str, Any]:
    """Projected seconds of each part of the evaluation on ``schedule.world_size`` GPUs (see the module doc).

    ``compile_cache`` ``warm``: every slot length costs ``costs.warm_compile_seconds`` (an inductor cache left by
    an earlier run of the same graphs on that machine) instead of its cold compile.
    """
    world = schedule.world_size

    def seconds(steps: Counter) -> float:
        return sum(n * _priced(costs.step_seconds, L, "step_seconds", costs.source) for L, n in steps.items())

    score_s = 0.0
    phase_s = 0.0
    busiest = [0.0] * world
    for seg in schedule.segments:
        per_rank = [seconds(steps) for steps in seg.steps_per_rank]
        score_s += max(per_rank)
        busiest = [a + b for a, b in zip(busiest, per_rank)]
        phase_s += seg.phase_tokens / world / costs.phase_tokens_per_s
    if compile_cache == "warm":
        if costs.warm_compile_seconds is None:
            raise ConfigError(f"{costs.source}: no warm_compile_seconds, so no warm-cache projection")
        warmup_s = costs.warm_compile_seconds * len(schedule.slot_lengths_compiled)
    else:
        warmup_s = sum(_priced(costs.compile_seconds, L, "compile_seconds", costs.source)
                       for L in schedule.slot_lengths_compiled)
    steps = schedule.steps_per_rank()
    total = costs.load_seconds + warmup_s + score_s + phase_s
    return {
        "world_size": world,
        "compile_cache": compile_cache,
        "slot_lengths_compiled": list(schedule.slot_lengths_compiled),
        "steps_per_rank_max": max(sum(s.values()) for s in steps),
        "steps_by_slot_length_busiest_rank": {str(L): n for L, n in sorted(steps[int(np.argmax(busiest))].items())},
        "phases": sum(1 for seg in schedule.segments if seg.phase_tokens),
        "phase_tokens": sum(seg.phase_tokens for seg in schedule.segments),
        "load_s": round(costs.load_seconds, 1),
        "warmup_s": round(warmup_s, 1),
        "lora_score_s": round(score_s, 1),
        "lora_idle_s_mean": round(score_s - sum(busiest) / world, 1),  # waiting for the slowest before phases/end
        "longest_batch_s": round(seconds(schedule.longest_batch_steps), 1),  # a floor for lora_score_s
        "phase_s": round(phase_s, 1),
        "total_s": round(total, 1),
    }


# --------------------------------------------------------------------------------------------------------------
# document lengths and the command
# --------------------------------------------------------------------------------------------------------------


def synthetic_doc_lengths(num_docs: int, mean_targets: float, seed: int = 0) -> np.ndarray:
    """Log-normal document lengths (BOS included) whose targets average ``mean_targets`` (sigma 0.9)."""
    mu = math.log(mean_targets) - LOGNORMAL_SIGMA**2 / 2
    rng = np.random.default_rng(seed)
    return np.maximum(np.rint(rng.lognormal(mu, LOGNORMAL_SIGMA, size=num_docs)), 1).astype(np.int64) + 1


def measured_with_notes(costs: EvalCosts, cfg: TTTConfig) -> list[str]:
    notes = []
    for key in ("docs_per_batch", "lora_rank", "checkpoint_activations"):
        measured = costs.measured_with.get(key)
        if measured is not None and measured != getattr(cfg, key):
            notes.append(f"costs measured with {key}={measured}, the recipe uses {getattr(cfg, key)}: "
                         f"step prices do not carry over, re-measure")
    return notes


# --------------------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------------------

DEFAULT_LENGTHS = Path(__file__).resolve().parents[2] / "benchmarks" / "record_doc_lengths.txt"


def _record_doc_len(args, run_cfg) -> tuple[np.ndarray, str]:
    """Document lengths in the record's convention (own tokens + the next BOS; the last document: its own)."""
    from pgolf.evaluate.plan_record import load_doc_lengths

    if args.lengths:
        lengths = load_doc_lengths(args.lengths)
        return lengths, f"{args.lengths} ({len(lengths)} documents)"
    if args.data_dir:
        from pgolf.evaluate.valdata import load_validation

        val = load_validation(args.data_dir, byte_accounting="lut" if args.tokenizer else "auto",
                              tokenizer_path=args.tokenizer, max_docs=run_cfg.evaluate.max_docs, score_next_bos=True)
        return val.score_ends - val.doc_starts, f"{args.data_dir} ({val.num_docs} documents)"
    if args.docs is None and DEFAULT_LENGTHS.exists():
        lengths = load_doc_lengths(DEFAULT_LENGTHS)
        return lengths, f"{DEFAULT_LENGTHS.name}: the record's 50,000 validation documents rebuilt from its logs"
    docs = args.docs or RECORD_VAL_DOCS
    lengths = synthetic_doc_lengths(docs, args.mean_targets, args.seed) + 1
    lengths[-1] -= 1  # the last document has no next BOS
    return lengths, f"synthetic log-normal, {docs} documents, mean {args.mean_targets} targets"


def eval_plan(args) -> dict[str, Any]:
    """``pgolf eval-plan``: the projection (or the record's replay) as a dict (see the CLI's help)."""
    from pgolf.config import load_run_config

    run_cfg = load_run_config(args.config)
    ttt = run_cfg.evaluate.ttt
    if ttt.mode != "lora":
        raise ConfigError(f"{args.config}: evaluate.ttt.mode is '{ttt.mode}'; eval-plan projects LoRA TTT only")
    schedule = args.schedule if args.schedule != "auto" else ("pgolf" if ttt.variant == "record" else "legacy")
    doc_len, where = _record_doc_len(args, run_cfg)
    if schedule == "legacy":
        result = _legacy_plan(args, ttt, doc_len)
    elif args.from_eval:
        raise ConfigError("--from-eval prices the legacy schedule only (its slot_timing); use --costs")
    else:
        from pgolf.evaluate.plan_record import RecordCosts

        costs = RecordCosts.from_json(args.costs)
        if args.warm_compile_seconds is not None:
            costs = dataclasses.replace(costs, warm_compile_seconds=args.warm_compile_seconds)
        result = (_record_replay(args, ttt, doc_len, costs, run_cfg.evaluate.eval_seq_len) if schedule == "record"
                  else _pgolf_plan(args, ttt, doc_len, costs))
        result["notes"] = [f"costs measured with {k}={v}, the recipe uses {getattr(ttt, k)}"
                           for k, v in costs.measured_with.items()
                           if k in ("docs_per_batch", "lora_rank") and v != getattr(ttt, k)]
        if costs.measured_with.get("checkpoint_activations"):
            result["notes"].append("costs measured with activation recompute (checkpoint_activations=True); the "
                                   "record variant runs without it: re-measure")
        result["costs"] = costs.source
        result["targets"] = int((doc_len - 1).sum())
    result.update({"documents": where, "budget_s": run_cfg.evaluate.max_eval_seconds,
                   "margin_s": round(run_cfg.evaluate.max_eval_seconds - result["total_s"], 1)})
    return result


def _legacy_plan(args, ttt: TTTConfig, doc_len: np.ndarray) -> dict[str, Any]:
    ttt = dataclasses.replace(ttt, variant="legacy")
    if args.slot_lengths:
        ttt = dataclasses.replace(ttt, slot_lengths=tuple(int(x) for x in args.slot_lengths.split(",")))
    lengths = doc_len.copy()
    lengths[:-1] -= 1  # the legacy variant's documents end before the next BOS
    costs = EvalCosts.from_eval_result(args.from_eval) if args.from_eval else EvalCosts.from_json(args.costs)
    if args.warm_compile_seconds is not None:
        costs = dataclasses.replace(costs, warm_compile_seconds=args.warm_compile_seconds)
    result = project(lora_schedule(lengths, ttt, args.gpus), costs, args.compile_cache)
    result.update({"schedule": "legacy", "costs": costs.source, "notes": measured_with_notes(costs, ttt),
                   "targets": int((lengths - 1).sum())})
    return result


def _record_replay(args, ttt: TTTConfig, doc_len: np.ndarray, costs, seq_len: int) -> dict[str, Any]:
    from pgolf.evaluate.plan_record import replay_record

    if costs.phase_chunk_seconds is None:
        raise ConfigError(f"{costs.source}: no phase_chunk_seconds: the record's replay needs the record's own prices "
                          "(benchmarks/record_pr1855_costs.json)")
    recompile = costs.recompile or {}
    warmup = args.record_warmup_seconds if args.record_warmup_seconds is not None else float(
        recompile.get("warmup_seconds", costs.compile_seconds))
    ev = replay_record(doc_len, costs.step, world=args.gpus, per_batch=ttt.docs_per_batch, chunk=ttt.chunk_tokens,
                       ctx=ttt.context_tokens, bounds=ttt.phase_boundaries_docs,
                       phase_chunk_tokens=ttt.phase_chunk_tokens, phase_chunk_seconds=costs.phase_chunk_seconds,
                       phase_fixed_seconds=costs.phase_fixed_seconds,
                       delay_first=float(recompile.get("k0", 0.0)) * warmup,
                       delay_after_phase1=float(recompile.get("k1", 0.0)) * warmup)
    total = costs.load_seconds + warmup + ev["end"]
    return {"schedule": "record", "world_size": args.gpus, "pauses": [round(t, 1) for t in ev["pauses"]],
            "resumes": [round(t, 1) for t in ev["resumes"]], "pd": ev["pd"], "phase_prefixes": ev["prefixes"],
            "phase_chunks": ev["phase_chunks"], "ttt_timer_s": round(ev["end"], 1), "load_s": round(costs.load_seconds, 1),
            "warmup_s": round(warmup, 1), "total_s": round(total, 1),
            "claims_rank0": ev["claims"][0][:12]}


def _pgolf_plan(args, ttt: TTTConfig, doc_len: np.ndarray, costs) -> dict[str, Any]:
    from pgolf.evaluate.plan_record import project_record_variant
    from pgolf.evaluate.ttt_plan import schedule_of

    schedule = schedule_of(doc_len, per_batch=ttt.docs_per_batch, chunk=ttt.chunk_tokens, ctx=ttt.context_tokens,
                           bounds=ttt.phase_boundaries_docs, lanes=ttt.lanes, inflight=ttt.inflight_batches,
                           side_batches=ttt.side_batches)
    return project_record_variant(schedule, doc_len, costs, args.gpus, phase_chunk_tokens=ttt.phase_chunk_tokens,
                                  phase_rows=ttt.phase_rows,
                                  graph_width=ttt.cuda_graph_max_width if ttt.cuda_graphs else 0,
                                  compile_cache=args.compile_cache)
