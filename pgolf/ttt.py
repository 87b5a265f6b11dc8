"""Legal test-time training: every token is SCORED before it may feed a gradient (rules C1-C4).

Three pieces:

* :class:`Ledger` - which stream positions were scored and which fed an update. It raises
  :class:`LegalityError` the moment an update would use an unscored position (C3), a position is scored after it
  fed an update (C3) or is scored twice, and checks at the end that every target was scored exactly once. The TTT
  loops call it at the exact place where they score or step, so a reordering bug cannot slip past it.

* Document-batched LoRA TTT (``mode: lora``, PR #1530 / the record). Documents are sorted longest first and taken
  ``docs_per_batch`` at a time. Each document of a batch owns a slot of L tokens in one packed row and its own
  rank-r adapters on q, k, v, o, mlp.up, mlp.down and the LM head (``A [slots, in, r]``, ``B [slots, r, out]``,
  output ``x A B * alpha / r``). Every document is cut into chunks of ``chunk_tokens`` targets; for chunk c of
  all documents at once: forward over each document's window (up to ``context_tokens`` of its tokens ending at
  the chunk), SCORE the chunk's targets, then one optimizer step on the chunk's loss (none after a document's
  last chunk). The loss is the sum over documents of each one's mean chunk NLL and each slot's attention, smear
  and adapters see only that slot, so documents of a batch do not influence each other.
  Phased TTT: once ``phase_boundaries_docs[i]`` documents (in queue order) are scored, one global SGD pass
  (momentum, cosine LR over the pass) trains the BASE weights on already-scored documents, then scoring goes on.

* Chunked score-first TTT (``mode: chunked``, PR #549 / #1572 / #1523): the stream in chunks of
  ``stream_chunk_tokens`` targets; each chunk is scored under no_grad with the usual within-document windows,
  then ``chunk_epochs`` SGD steps on the whole model over it (cosine LR over chunks); the last chunk gets none.

Both run on N processes: LoRA batches go round-robin to ranks (phases synchronize); a stream chunk is split in
N contiguous parts whose gradients are summed. Everything random is drawn from generators seeded by ``seed``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from pgolf.config import EvaluateConfig, TTTConfig
from pgolf.scoring import (
    IGNORE,
    PAD_ID,
    NllRunner,
    PackedRow,
    Progress,
    ScoreAccumulator,
    cu_seqlens_bucket,
    pack_documents,
    stream_window_row,
)
from pgolf.valdata import ValidationSet


class LegalityError(RuntimeError):
    """A scoring/update order that breaks the challenge's TTT rules (the message names the rule)."""


# --------------------------------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------------------------------


class Ledger:
    """Per-position record of scoring and updates over the validation stream (global indices, numpy bool arrays).

    ``scored``: scored by THIS process. ``known_scored``: scored here or by another process (after :meth:`sync`,
    or :meth:`note_scored_elsewhere` for a synchronous schedule). ``used``: fed an optimizer update here.
    """

    def __init__(self, num_positions: int):
        if num_positions < 0:
            raise ValueError(f"Ledger: num_positions must be >= 0, got {num_positions}")
        self.num_positions = num_positions
        self.scored = np.zeros(num_positions, dtype=bool)
        self.known_scored = np.zeros(num_positions, dtype=bool)
        self.used = np.zeros(num_positions, dtype=bool)
        self.score_calls = 0
        self.update_counts: list[int] = []  # per update: how many positions it used
        self.update_last_positions: list[int] = []  # per update: the largest position it used
        self.complete_checked = False

    def _check_positions(self, positions, what: str) -> np.ndarray:
        p = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(p) and (p.min() < 0 or p.max() >= self.num_positions):
            raise ValueError(f"Ledger.{what}: positions must lie in 0..{self.num_positions - 1}, got {p.min()}..{p.max()}")
        return p

    def record_scored(self, positions) -> None:
        """Mark ``positions`` scored. C3: none may have fed an update already, none may be scored twice."""
        p = self._check_positions(positions, "record_scored")
        used = p[self.used[p]]
        if len(used):
            raise LegalityError(
                f"C3 (score before update) violated: position {int(used[0])} is scored after it fed an update "
                f"({len(used)} such positions in this call)"
            )
        again = p[self.known_scored[p]]
        if len(again) == 0 and len(np.unique(p)) != len(p):
            values, counts = np.unique(p, return_counts=True)
            again = values[counts > 1]
        if len(again):
            raise LegalityError(
                f"position {int(again[0])} scored twice (C3: no token is re-scored; {len(again)} such positions)"
            )
        self.scored[p] = True
        self.known_scored[p] = True
        self.score_calls += 1

    def record_update(self, positions) -> None:
        """Mark ``positions`` as feeding one optimizer update. C3: every one must have been scored already."""
        p = self._check_positions(positions, "record_update")
        unscored = p[~self.known_scored[p]]
        if len(unscored):
            raise LegalityError(
                f"C3 (score before update) violated: an update uses position {int(unscored[0])} before it was scored "
                f"({len(unscored)} unscored positions in this update)"
            )
        self.used[p] = True
        self.update_counts.append(int(len(p)))
        self.update_last_positions.append(int(p.max()) if len(p) else -1)

    def note_scored_elsewhere(self, positions) -> None:
        """Positions another process scored in a step that is already complete (synchronous schedules only)."""
        p = self._check_positions(positions, "note_scored_elsewhere")
        self.known_scored[p] = True

    def sync(self, dist_info) -> None:
        """Make ``known_scored`` the union over all processes (an all-reduce MAX of one byte per position)."""
        if dist_info is None or not dist_info.enabled:
            return
        import torch.distributed as dist

        t = torch.from_numpy(self.known_scored.astype(np.uint8)).to(dist_info.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self.known_scored = t.cpu().numpy().astype(bool)

    def scored_counts(self, dist_info=None) -> np.ndarray:
        """How many processes scored each position: uint8 [N] (summed over processes when distributed)."""
        counts = self.scored.astype(np.uint8)
        if dist_info is None or not dist_info.enabled:
            return counts
        import torch.distributed as dist

        t = torch.from_numpy(counts).to(dist_info.device)
        dist.all_reduce(t)
        return t.cpu().numpy()

    def check_complete(self, expected_targets, scored_counts: Optional[np.ndarray] = None) -> None:
        """Every expected target scored exactly once and nothing else scored. ``expected_targets``: bool mask [N]
        or an index array; ``scored_counts`` (from :meth:`scored_counts`) covers all processes."""
        expected = np.asarray(expected_targets)
        if expected.dtype != bool:
            mask = np.zeros(self.num_positions, dtype=bool)
            mask[self._check_positions(expected, "check_complete")] = True
            expected = mask
        if expected.shape != (self.num_positions,):
            raise ValueError(f"Ledger.check_complete: expected a mask of {self.num_positions} positions, got {expected.shape}")
        counts = self.scored.astype(np.uint8) if scored_counts is None else np.asarray(scored_counts)
        problems = []
        for name, bad in (
            ("never scored", expected & (counts == 0)),
            ("scored twice", counts > 1),
            ("scored but not a target", ~expected & (counts > 0)),
        ):
            where = np.flatnonzero(bad)
            if len(where):
                problems.append(f"{len(where)} positions {name} (first {int(where[0])})")
        if problems:
            raise LegalityError("every target must be scored exactly once: " + "; ".join(problems))
        self.complete_checked = True

    def summary(self) -> dict:
        counts = np.asarray(self.update_counts, dtype=np.int64)
        return {
            "positions": self.num_positions,
            "scored_here": int(self.scored.sum()),
            "score_calls": self.score_calls,
            "updates": int(len(counts)),
            "update_positions_total": int(counts.sum()),
            "positions_used_by_updates": int(self.used.sum()),
            "max_update_last_position": int(max(self.update_last_positions, default=-1)),
            "complete_checked": self.complete_checked,
        }


# --------------------------------------------------------------------------------------------------------------
# Batched per-document LoRA
# --------------------------------------------------------------------------------------------------------------

# target name -> module paths inside each block
BLOCK_TARGETS = {"q": ("attn.q",), "k": ("attn.k",), "v": ("attn.v",), "o": ("attn.o",), "mlp": ("mlp.up", "mlp.down")}


class BatchedLoRA(nn.Module):
    """``base(x) + alpha / r * (x A) B`` with one (A, B) per slot.

    x [T, in] with T = slots * L is viewed as [slots, L, in]; A [slots, in, r], B [slots, r, out]. A starts small
    and random (seeded), B at zero, so a fresh adapter leaves the model unchanged. ``active`` False bypasses it.
    """

    def __init__(self, base: nn.Module, in_features: int, out_features: int, slots: int, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.in_features, self.out_features, self.slots, self.rank = in_features, out_features, slots, rank
        self.scale = alpha / rank
        device = base.weight.device
        self.A = nn.Parameter(torch.zeros(slots, in_features, rank, device=device))
        self.B = nn.Parameter(torch.zeros(slots, rank, out_features, device=device))
        self.active = True

    @torch.no_grad()
    def reset(self, generator: torch.Generator, keep_a: bool) -> None:
        """Fresh adapters: B = 0; A ~ U(-1/sqrt(in), 1/sqrt(in)) drawn on the CPU (same values on any device)."""
        self.B.zero_()
        if not keep_a:
            bound = 1.0 / math.sqrt(self.in_features)
            a = torch.rand(self.A.shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
            self.A.copy_(a)

    def forward(self, x: Tensor) -> Tensor:  # [T, in] -> [T, out]
        y = self.base(x)
        if not self.active:
            return y
        xs = x.reshape(self.slots, -1, self.in_features)  # [S, L, in]
        delta = torch.bmm(torch.bmm(xs, self.A.to(xs.dtype)), self.B.to(xs.dtype))  # [S, L, out]
        return y + (self.scale * delta).reshape(x.shape[0], self.out_features).to(y.dtype)


class SlotSmear(nn.Module):
    """SmearGate that treats every slot start as a row start (no predecessor), so no slot sees its neighbour.

    The model's gate masks only at BOS; a slot holding a window that starts mid-document would otherwise mix in
    the last token of the previous slot (another document or padding).
    """

    def __init__(self, inner: nn.Module, slots: int):
        super().__init__()
        self.inner = inner
        self.slots = slots
        self.active = True

    def forward(self, x: Tensor, input_ids: Tensor, bos_id: int) -> Tensor:  # x [T, d]
        out = self.inner(x, input_ids, bos_id)
        if not self.active:
            return out
        T = x.shape[0]
        first = torch.arange(T, device=x.device) % (T // self.slots) == 0  # [T]
        return torch.where(first[:, None], x, out)


class CheckpointedBlock(nn.Module):
    """Recompute a block's activations in backward instead of storing them (``torch.utils.checkpoint``).

    A LoRA step backpropagates through every block application for slots x context tokens (64 x 2048 in the
    record): stored activations alone would pass 70 GB. Checkpointing keeps only each application's inputs and
    costs one extra forward per block in backward. Without grad it is a plain call.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, x0: Tensor, ctx: tuple) -> Tensor:
        if not torch.is_grad_enabled():
            return self.block(x, x0, ctx)
        return torch.utils.checkpoint.checkpoint(self.block, x, x0, ctx, use_reentrant=False)

    def forward_lanes(self, *args):
        if not torch.is_grad_enabled():
            return self.block.forward_lanes(*args)
        return torch.utils.checkpoint.checkpoint(self.block.forward_lanes, *args, use_reentrant=False)


class LoraAdapters:
    """The adapters attached to a model (see :func:`attach_lora`)."""

    def __init__(self, wrappers: dict[str, BatchedLoRA], smear: Optional[SlotSmear]):
        self.wrappers = wrappers
        self.smear = smear

    def parameters(self) -> list[nn.Parameter]:
        return [p for w in self.wrappers.values() for p in (w.A, w.B)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def reset(self, generator: torch.Generator, keep_a: bool) -> None:
        for name in sorted(self.wrappers):
            self.wrappers[name].reset(generator, keep_a)

    def set_active(self, active: bool) -> None:
        for w in self.wrappers.values():
            w.active = active
        if self.smear is not None:
            self.smear.active = active


@contextlib.contextmanager
def attach_lora(model: nn.Module, cfg: TTTConfig, slots: int) -> Iterator[LoraAdapters]:
    """Wrap the target modules of ``model`` with :class:`BatchedLoRA` (its smear with :class:`SlotSmear`, and its
    blocks with :class:`CheckpointedBlock` when ``cfg.checkpoint_activations``), freeze the base weights; on exit put
    the original modules and ``requires_grad`` flags back."""
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    wrappers: dict[str, BatchedLoRA] = {}
    smear = None
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for i, block in enumerate(model.blocks):
            for target in cfg.lora_targets:
                for path in BLOCK_TARGETS.get(target, ()):
                    parent_path, attr = path.rsplit(".", 1)
                    parent = block.get_submodule(parent_path)
                    base = getattr(parent, attr)
                    out_features, in_features = base.weight.shape
                    wrapper = BatchedLoRA(base, in_features, out_features, slots, cfg.lora_rank, cfg.lora_alpha)
                    setattr(parent, attr, wrapper)
                    replaced.append((parent, attr, base))
                    wrappers[f"blocks.{i}.{path}"] = wrapper
        if "head" in cfg.lora_targets:
            base = model.lm_head
            out_features, in_features = base.weight.shape
            wrapper = BatchedLoRA(base, in_features, out_features, slots, cfg.lora_rank, cfg.lora_alpha)
            model.lm_head = wrapper
            replaced.append((model, "lm_head", base))
            wrappers["lm_head"] = wrapper
        if getattr(model, "smear", None) is not None:
            original = model.smear
            smear = SlotSmear(original, slots)
            model.smear = smear
            replaced.append((model, "smear", original))
        if cfg.checkpoint_activations:
            for i, block in enumerate(model.blocks):
                model.blocks[i] = CheckpointedBlock(block)
                replaced.append((model.blocks, str(i), block))
        yield LoraAdapters(wrappers, smear)
    finally:
        for parent, attr, original in reversed(replaced):
            setattr(parent, attr, original)
        for name, p in model.named_parameters():
            p.requires_grad_(requires.get(name, p.requires_grad))


# --------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TTTOutcome:
    accumulator: ScoreAccumulator
    ledger: Ledger
    summary: dict
    warmup_s: float
    score_s: float


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """``base_lr * (1 + cos(pi * step / total_steps)) / 2``: base_lr at step 0, decaying towards 0."""
    if total_steps <= 1:
        return base_lr
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def _all_reduce_sum_grads(params: Sequence[nn.Parameter], dist_info) -> None:
    """Sum gradients over processes in one flat all-reduce (missing grads count as zeros)."""
    if dist_info is None or not dist_info.enabled:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def _scored_nll(nll: Tensor, row: PackedRow) -> tuple[np.ndarray, np.ndarray]:
    """(positions, nll in float64) of the scored entries of a row."""
    mask = row.scored
    values = nll.detach().float().cpu().numpy()[mask].astype(np.float64)
    return row.target_positions[mask], values


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lora_doc_order(val: ValidationSet) -> np.ndarray:
    """Document indices longest first (ties: stream order) - the queue of document-batched TTT."""
    return longest_first(val.doc_lengths())


def longest_first(doc_lengths: np.ndarray) -> np.ndarray:
    """Indices of ``doc_lengths`` (int [D]) longest first, ties in stream order (a stable sort)."""
    return np.argsort(-np.asarray(doc_lengths), kind="stable")


# --------------------------------------------------------------------------------------------------------------
# LoRA TTT
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _SlotChunk:
    """What one document contributes to one step: its window and its chunk's targets (stream positions)."""

    slot: int
    window_start: int  # first input position
    input_end: int  # one past the last input position (= last target position)
    target_start: int  # first target position of the chunk
    doc_start: int
    last_chunk: bool


def slot_lengths(cfg: TTTConfig) -> tuple[int, ...]:
    """The slot lengths a LoRA step may use (each one a compiled graph): ``cfg.slot_lengths``, or by default the
    powers of two from 128 below ``context_tokens`` followed by ``context_tokens`` itself."""
    if cfg.slot_lengths:
        return tuple(cfg.slot_lengths)
    powers = [1 << k for k in range(7, 32) if (1 << k) < cfg.context_tokens]
    return (*powers, cfg.context_tokens)


def slot_length_for_window(max_window: int, cfg: TTTConfig) -> int:
    """Slot length L of a step: the smallest allowed length that holds the step's longest window."""
    for length in slot_lengths(cfg):
        if length >= max_window:
            return length
    raise ValueError(f"a LoRA window of {max_window} tokens exceeds every slot length {slot_lengths(cfg)}")


def compiled_slot_lengths(cfg: TTTConfig) -> tuple[int, ...]:
    """The slot lengths some step can use (a window of k chunks, k = 1 .. context): one compiled graph each."""
    windows = range(1, -(-cfg.context_tokens // cfg.chunk_tokens) + 1)
    return tuple(sorted({slot_length_for_window(min(cfg.context_tokens, k * cfg.chunk_tokens), cfg) for k in windows}))


def _lora_step_plan(val: ValidationSet, docs: np.ndarray, cfg: TTTConfig, chunk: int) -> list[_SlotChunk]:
    plan = []
    C = cfg.chunk_tokens
    for slot, d in enumerate(docs.tolist()):
        start, end = int(val.doc_starts[d]), int(val.doc_ends[d])
        n_targets = end - start - 1
        n_chunks = -(-n_targets // C)
        if chunk >= n_chunks:
            continue
        target_start = start + 1 + chunk * C
        target_end = start + 1 + min((chunk + 1) * C, n_targets)  # exclusive
        input_end = target_end - 1
        window_start = max(start, input_end - cfg.context_tokens)
        plan.append(_SlotChunk(slot, window_start, input_end, target_start, start, chunk == n_chunks - 1))
    return plan


def _lora_row(val: ValidationSet, plan: list[_SlotChunk], slots: int, L: int) -> PackedRow:
    """The packed row of one step: slot b holds its window left-aligned in [b*L, (b+1)*L), the rest is padding."""
    T = slots * L
    input_ids = np.full(T, PAD_ID, dtype=np.int64)
    target_ids = np.full(T, IGNORE, dtype=np.int64)
    target_positions = np.full(T, -1, dtype=np.int64)
    bounds = [0]
    lengths = {p.slot: p.input_end - p.window_start for p in plan}
    for b in range(slots):
        bounds.extend([b * L + lengths.get(b, 0), (b + 1) * L])
    for p in plan:
        n = p.input_end - p.window_start
        base = p.slot * L
        input_ids[base : base + n] = val.tokens[p.window_start : p.input_end]
        positions = np.arange(p.window_start + 1, p.input_end + 1)  # target of each input
        scored = positions >= p.target_start
        target_ids[base : base + n][scored] = val.tokens[positions[scored]]
        target_positions[base : base + n][scored] = positions[scored]
    return PackedRow(input_ids, target_ids, target_positions, np.asarray(bounds, dtype=np.int32), L)


def _lora_update_loss(nll: Tensor, row: PackedRow, plan: list[_SlotChunk], L: int) -> tuple[Optional[Tensor], np.ndarray]:
    """Sum over updating documents of their mean chunk NLL, and the positions that update uses."""
    weights = np.zeros(len(row.input_ids), dtype=np.float32)
    used = []
    for p in plan:
        if p.last_chunk:
            continue
        base = p.slot * L
        n = p.input_end - p.window_start
        scored = row.scored[base : base + n]
        weights[base : base + n][scored] = 1.0 / scored.sum()
        used.append(np.arange(max(p.window_start, p.doc_start + 1), p.input_end + 1))
    if not used:
        return None, np.zeros(0, dtype=np.int64)
    w = torch.from_numpy(weights).to(nll.device)
    return (nll * w).sum(), np.concatenate(used)


def phase_plan(cfg: TTTConfig, order: np.ndarray, num_batches: int, world_size: int) -> dict[int, tuple[int, int]]:
    """round index -> (first, last) queue indices of the documents its phase trains on, for rounds that end one.

    A phase runs at the end of the first round after which at least ``boundary`` documents are scored; boundaries
    crossed in the same round share one phase.
    """
    plan: dict[int, tuple[int, int]] = {}
    bounds = list(cfg.phase_boundaries_docs)
    per_round = world_size * cfg.docs_per_batch
    num_rounds = -(-num_batches // world_size)
    last_end = 0
    for r in range(num_rounds):
        scored = min((r + 1) * per_round, len(order))
        crossed = False
        while bounds and scored >= bounds[0]:
            bounds.pop(0)
            crossed = True
        if crossed and r < num_rounds - 1:  # nothing is left to score after the last round
            first = 0 if cfg.phase_scope == "scored_prefix" else last_end
            plan[r] = (first, scored)
            last_end = scored
    return plan


def lora_ttt(
    model: nn.Module,
    val: ValidationSet,
    eval_cfg: EvaluateConfig,
    seed: int,
    *,
    device: torch.device,
    dist_info=None,
    keep_tokens: bool = False,
    write: Optional[Callable[[dict], None]] = None,
) -> TTTOutcome:
    """Document-batched LoRA TTT (with phases when configured) over the whole validation set. See the module doc."""
    cfg = eval_cfg.ttt
    rank = dist_info.rank if dist_info is not None else 0
    world = dist_info.world_size if dist_info is not None else 1
    is_main = rank == 0
    S = cfg.docs_per_batch
    order = lora_doc_order(val)
    batches = [order[i : i + S] for i in range(0, len(order), S)]
    num_rounds = -(-len(batches) // world)
    phases = phase_plan(cfg, order, len(batches), world)
    acc = ScoreAccumulator(val, keep_tokens)
    ledger = Ledger(val.num_positions)
    progress = Progress("ttt-lora", val.target_count, val.num_docs, eval_cfg.progress_every_seconds, is_main, write, world)
    summary: dict = {"mode": "lora", "batches": len(batches), "rounds": num_rounds, "docs_per_batch": S,
                     "steps": 0, "phases": []}

    base_params = list(model.parameters())  # before the adapters exist
    with attach_lora(model, cfg, S) as adapters:
        runner = NllRunner(model, device, compile=eval_cfg.compile)
        # phase passes: eager unless asked (each phase row shape is a whole-model forward+backward graph costing
        # minutes of compile, for passes that train on a few million tokens in all)
        phase_runner = NllRunner(model, device, compile=eval_cfg.compile and cfg.phase_compile)
        summary["adapter_parameters"] = adapters.num_parameters()
        summary["phase_compiled"] = phase_runner.compiled

        # ---- compile warm-up on random tokens: every slot length, with and without backward; phase rows
        warmup_s = 0.0
        if eval_cfg.compile and eval_cfg.compile_warmup_steps > 0:
            shapes = [(S * L, cu_seqlens_bucket(2 * S + 1), L) for L in compiled_slot_lengths(cfg)]
            gen_seed = seed + 7_919
            warmup_s += runner.warmup(shapes, eval_cfg.compile_warmup_steps, backward=True, seed=gen_seed)
            if phases and phase_runner.compiled:
                adapters.set_active(False)
                for p in base_params:
                    p.requires_grad_(True)
                rows = pack_documents(val, order[: max(b for _, b in phases.values())],
                                      phase_row_tokens(eval_cfg, world), eval_cfg.eval_seq_len)
                phase_shapes = sorted({phase_runner.shape_of(r) for r in rows})
                warmup_s += phase_runner.warmup(phase_shapes, eval_cfg.compile_warmup_steps, backward=True,
                                                seed=gen_seed)
                for p in base_params:
                    p.requires_grad_(False)
                adapters.set_active(True)
        score_start = time.perf_counter()
        for r in range(num_rounds):
            b = r * world + rank
            if b < len(batches):
                # warm start reuses the A this process trained on its previous batch (never the untrained zeros)
                keep_a = cfg.warm_start_a and r > 0
                _lora_batch(val, batches[b], b, keep_a, cfg, seed, runner, adapters, acc, ledger, progress, summary)
            if r in phases:
                first, last = phases[r]
                summary["phases"].append(
                    _phase_pass(model, val, order[first:last], eval_cfg, phase_runner, adapters, base_params, ledger,
                                dist_info, after_docs=last)
                )
        _sync(device)
        score_s = time.perf_counter() - score_start
    progress.update(0, force=True)
    summary["compiled_shapes"] = len(runner.shapes)
    summary["compile_failures"] = runner.compile_failures + phase_runner.compile_failures  # shapes run eagerly
    return TTTOutcome(acc, ledger, summary, warmup_s, score_s)


def _lora_batch(val, docs, batch_index, keep_a, cfg: TTTConfig, seed, runner, adapters, acc, ledger, progress,
                summary) -> None:
    """Score and adapt one batch of documents, chunk by chunk, with fresh adapters (B = 0; A new or kept)."""
    S = cfg.docs_per_batch
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + batch_index)  # independent of the process count
    adapters.reset(gen, keep_a=keep_a)
    params = adapters.parameters()
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.beta1, weight_decay=cfg.weight_decay)
    n_targets = val.doc_lengths()[docs] - 1
    n_chunks = int((-(-n_targets // cfg.chunk_tokens)).max(initial=0))
    for c in range(n_chunks):
        plan = _lora_step_plan(val, docs, cfg, c)
        if not plan:
            continue
        L = slot_length_for_window(max(p.input_end - p.window_start for p in plan), cfg)
        row = _lora_row(val, plan, S, L)
        updates = any(not p.last_chunk for p in plan)
        step_start = time.perf_counter()

        def step(nll: Tensor) -> None:
            loss, used = _lora_update_loss(nll, row, plan, L)
            ledger.record_update(used)  # raises before stepping if any position is unscored (C3)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            summary["steps"] += 1

        if cfg.debug_update_before_score and updates:  # ILLEGAL ordering, for tests and compliance checks only
            step(runner(row))
            with torch.no_grad():
                nll = runner(row)
            positions, values = _scored_nll(nll, row)
            ledger.record_scored(positions)
            acc.add(positions, values)
            continue
        nll = runner(row)  # with grad even when nothing updates: one compiled graph per slot length, not two
        positions, values = _scored_nll(nll, row)
        ledger.record_scored(positions)
        acc.add(positions, values)
        if updates:
            step(nll)
        _sync(runner.device)  # nll already came to the host; this only closes the step for its timing
        _add_slot_timing(summary, L, time.perf_counter() - step_start, len(positions))
        progress.update(len(positions), docs=sum(p.last_chunk for p in plan))
    progress.update(0, docs=int((n_targets == 0).sum()))


def _add_slot_timing(summary: dict, slot_length: int, seconds: float, scored_tokens: int) -> None:
    """Accumulate steps, seconds and scored tokens per slot length: the figures a time projection needs."""
    entry = summary.setdefault("slot_timing", {}).setdefault(str(slot_length), {"steps": 0, "seconds": 0.0,
                                                                                 "scored_tokens": 0})
    entry["steps"] += 1
    entry["seconds"] += seconds
    entry["scored_tokens"] += int(scored_tokens)


def phase_row_tokens(eval_cfg: EvaluateConfig, world_size: int) -> int:
    """Tokens per process per phase step: one SGD step covers ``phase_chunk_tokens`` over all processes."""
    return max(-(-eval_cfg.ttt.phase_chunk_tokens // world_size), eval_cfg.eval_seq_len + 1)


def _phase_pass(model, val, docs, eval_cfg: EvaluateConfig, runner, adapters, base_params, ledger, dist_info,
                after_docs: int) -> dict:
    """One global SGD pass (momentum, cosine LR) over already-scored documents, on the base weights.

    The documents are packed (queue order, within-document windows) into rows of :func:`phase_row_tokens`; a step
    takes one row per process and sums their gradients, so it sees about ``phase_chunk_tokens`` tokens whatever
    the process count. The loss of a step is the mean over its rows of each row's mean NLL.
    """
    cfg = eval_cfg.ttt
    start = time.perf_counter()
    rank = dist_info.rank if dist_info is not None else 0
    world = dist_info.world_size if dist_info is not None else 1
    ledger.sync(dist_info)  # documents scored on other processes are trained on here
    # padded to static shapes only for a compiled runner (phase passes run eagerly by default)
    rows = list(pack_documents(val, docs, phase_row_tokens(eval_cfg, world), eval_cfg.eval_seq_len, pad=runner.compiled))
    steps = -(-len(rows) // world)
    tokens = 0  # targets this process trained on
    adapters.set_active(False)
    for p in base_params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(base_params, lr=cfg.phase_lr, momentum=cfg.phase_momentum)
    for k in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg.phase_lr, k, steps)
        rows_in_step = min(world, len(rows) - k * world)
        i = k * world + rank
        if i < len(rows):
            row = rows[i]
            ledger.record_update(row.used_positions)
            nll = runner(row)
            tokens += int(row.scored.sum())
            (nll.sum() / max(int(row.scored.sum()), 1) / rows_in_step).backward()
        _all_reduce_sum_grads(base_params, dist_info)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for p in base_params:
        p.requires_grad_(False)
    adapters.set_active(True)
    _sync(runner.device)
    seconds = time.perf_counter() - start
    return {"after_docs": after_docs, "docs": int(len(docs)), "rows": len(rows), "steps": steps,
            "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9)}


# --------------------------------------------------------------------------------------------------------------
# Chunked score-first TTT
# --------------------------------------------------------------------------------------------------------------


def stream_chunks(num_positions: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of stream positions 1..N-1 (position 0 is the first BOS, never a target)."""
    return [(lo, min(lo + chunk_tokens, num_positions)) for lo in range(1, num_positions, chunk_tokens)]


def _split(lo: int, hi: int, parts: int, index: int) -> tuple[int, int]:
    """The index-th of ``parts`` contiguous near-equal pieces of [lo, hi)."""
    n = hi - lo
    return lo + n * index // parts, lo + n * (index + 1) // parts


def chunked_ttt(
    model: nn.Module,
    val: ValidationSet,
    eval_cfg: EvaluateConfig,
    seed: int,
    *,
    device: torch.device,
    dist_info=None,
    keep_tokens: bool = False,
    write: Optional[Callable[[dict], None]] = None,
) -> TTTOutcome:
    """Score a stream chunk under no_grad, then SGD on the whole model over it; the last chunk is never trained."""
    cfg = eval_cfg.ttt
    rank = dist_info.rank if dist_info is not None else 0
    world = dist_info.world_size if dist_info is not None else 1
    L = eval_cfg.eval_seq_len
    chunks = stream_chunks(val.num_positions, cfg.stream_chunk_tokens)
    row_tokens = -(-cfg.stream_chunk_tokens // world) + L + 1 if eval_cfg.compile else None  # + predecessor
    acc = ScoreAccumulator(val, keep_tokens)
    ledger = Ledger(val.num_positions)
    progress = Progress("ttt-chunked", val.target_count, val.num_docs, eval_cfg.progress_every_seconds, rank == 0, write, world)
    if cfg.bigram_hash_buckets:  # eval-time table, zero contribution now, trained below with the whole model
        from pgolf.bigram_hash import BigramHash  # here: a bundle of a recipe without it leaves the module out

        model.bigram_hash = BigramHash(
            cfg.bigram_hash_buckets, cfg.bigram_hash_dim or model.cfg.model_dim, model.cfg.model_dim,
            model.cfg.vocab_size, model.bos_id, generator=torch.Generator().manual_seed(seed + 104_729),
        ).to(device)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    runner = NllRunner(model, device, compile=eval_cfg.compile)
    opt = torch.optim.SGD(params, lr=cfg.chunk_lr, momentum=cfg.chunk_momentum)
    doc_starts = val.doc_starts

    warmup_s = 0.0
    if eval_cfg.compile and eval_cfg.compile_warmup_steps > 0:  # one graph per row shape, always with grad
        shapes = sorted({runner.shape_of(stream_window_row(val, *_split(lo, hi, world, rank), L, row_tokens))
                         for lo, hi in chunks if _split(lo, hi, world, rank)[0] < _split(lo, hi, world, rank)[1]})
        warmup_s += runner.warmup(shapes, eval_cfg.compile_warmup_steps, backward=True, seed=seed + 7_919)

    def targets_in(lo: int, hi: int) -> int:
        return (hi - lo) - int(np.searchsorted(doc_starts, hi) - np.searchsorted(doc_starts, lo))

    def step(row: Optional[PackedRow], nll: Optional[Tensor], chunk_targets: int) -> None:
        """One SGD step on the chunk: this process's part of the mean NLL, gradients summed over processes."""
        if row is not None:
            ledger.record_update(row.used_positions)  # C3: raises if any position is not yet scored
            (nll.sum() / max(chunk_targets, 1)).backward()
        _all_reduce_sum_grads(params, dist_info)
        opt.step()
        opt.zero_grad(set_to_none=True)

    score_start = time.perf_counter()
    steps = 0
    for k, (lo, hi) in enumerate(chunks):
        rlo, rhi = _split(lo, hi, world, rank)
        row = stream_window_row(val, rlo, rhi, L, row_tokens) if rlo < rhi else None
        trains = k < len(chunks) - 1 and cfg.chunk_epochs > 0
        chunk_targets = targets_in(lo, hi)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg.chunk_lr, k, len(chunks) - 1)
        epochs_left = cfg.chunk_epochs if trains else 0
        if cfg.debug_update_before_score and trains:  # ILLEGAL ordering, for tests and compliance checks only
            step(row, runner(row) if row is not None else None, chunk_targets)
            epochs_left -= 1
            steps += 1
        # Score (with grad on, so the first epoch reuses this very forward: one compiled graph, one pass saved)
        nll = runner(row) if row is not None else None
        if row is not None:
            positions, values = _scored_nll(nll, row)
            ledger.record_scored(positions)
            acc.add(positions, values)
            progress.update(len(positions), docs=int(np.searchsorted(doc_starts, rhi) - np.searchsorted(doc_starts, rlo)))
        if world > 1:  # every process has scored its part before any gradient is exchanged
            ledger.note_scored_elsewhere(np.concatenate([np.arange(lo, rlo), np.arange(rhi, hi)]))
        for epoch in range(epochs_left):
            step(row, nll if epoch == 0 else (runner(row) if row is not None else None), chunk_targets)
            steps += 1
        del nll
    _sync(device)
    score_s = time.perf_counter() - score_start
    for p in params:
        p.requires_grad_(False)
    progress.update(0, force=True)
    summary = {"mode": "chunked", "chunks": len(chunks), "steps": steps, "chunk_epochs": cfg.chunk_epochs,
               "compiled_shapes": len(runner.shapes), "compile_failures": list(runner.compile_failures),
               "bigram_hash_buckets": cfg.bigram_hash_buckets}
    return TTTOutcome(acc, ledger, summary, warmup_s, score_s)


def run_ttt(model, val, eval_cfg: EvaluateConfig, seed: int, **kwargs) -> TTTOutcome:
    """Dispatch on ``eval_cfg.ttt.mode`` ("lora" or "chunked"); the model's weights are changed in place."""
    torch.manual_seed(seed)
    mode = eval_cfg.ttt.mode
    if mode == "lora":
        return lora_ttt(model, val, eval_cfg, seed, **kwargs)
    if mode == "chunked":
        return chunked_ttt(model, val, eval_cfg, seed, **kwargs)
    raise ValueError(f"run_ttt: mode {mode!r} has no TTT (use pgolf.evaluate.score_model for mode 'none')")
