"""The score-before-update ledger of test-time training (rules C3/C4).

:class:`Ledger` records which stream positions were scored and which fed an update. It raises
:class:`LegalityError` the moment an update would use an unscored position (C3), a position is scored after it fed
an update (C3) or is scored twice, and checks at the end that every target was scored exactly once. The TTT loops
call it at the exact place where they score or step, so a reordering bug cannot slip past it.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor




class LegalityError(RuntimeError):
    """A scoring/update order that breaks the challenge's TTT rules (the message names the rule)."""


# --------------------------------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------------------------------


def raise_unless_complete(expected: np.ndarray, counts: np.ndarray) -> None:
    """LegalityError unless ``counts`` (scores per position, all processes) is 1 exactly where ``expected``."""
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


def _expected_mask(expected_targets, num_positions: int) -> np.ndarray:
    expected = np.asarray(expected_targets)
    if expected.dtype != bool:
        mask = np.zeros(num_positions, dtype=bool)
        mask[expected.astype(np.int64)] = True
        expected = mask
    if expected.shape != (num_positions,):
        raise ValueError(f"Ledger.check_complete: expected a mask of {num_positions} positions, got {expected.shape}")
    return expected


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
        raise_unless_complete(expected, counts)
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
# The device ledger (record-variant LoRA TTT): the same guarantees without a host sync per step
# --------------------------------------------------------------------------------------------------------------


class DeviceLedger:
    """The ledger's checks kept on the device, read at phase boundaries and at the end (:meth:`check`).

    ``scored`` and ``used`` are int32 counters per stream position (+ one dummy slot N that masked entries point
    to, so no step needs a data-dependent shape). A scoring call adds to ``violations``: [0] positions scored
    after they fed an update, [1] positions scored again; an update call: [2] positions it uses that were not
    scored yet. ``first`` keeps the smallest offending position of each kind. :meth:`check` (one host sync) raises
    :class:`LegalityError` naming C3 with the first offending position, so an illegal ordering anywhere before a
    check fails the run at that check, before its result can be used.
    """

    KINDS = ("is scored after it fed an update", "is scored twice", "feeds an update before it was scored")

    def __init__(self, num_positions: int, device):
        self.num_positions = num_positions
        self.device = torch.device(device)
        self.scored = torch.zeros(num_positions + 1, dtype=torch.int32, device=self.device)
        self.used = torch.zeros(num_positions + 1, dtype=torch.int32, device=self.device)
        self.violations = torch.zeros(3, dtype=torch.int64, device=self.device)
        self.first = torch.full((3,), num_positions, dtype=torch.int64, device=self.device)
        self.update_positions = torch.zeros((), dtype=torch.int64, device=self.device)
        self.updates = 0  # host count (the schedule knows it)
        self.score_calls = 0
        self.checks = 0
        self.complete_checked = False

    def _slots(self, positions: Tensor, mask: Tensor) -> Tensor:
        return torch.where(mask, positions, torch.full_like(positions, self.num_positions)).reshape(-1)

    def _note(self, kind: int, bad: Tensor, slots: Tensor) -> None:
        self.violations[kind] += bad.sum()
        self.first[kind] = torch.minimum(self.first[kind],
                                         torch.where(bad, slots, torch.full_like(slots, self.num_positions)).min())

    def record_scored(self, positions: Tensor, mask: Tensor) -> None:
        """Positions [...] (int64, device) scored where ``mask``; each at most once per call."""
        slots = self._slots(positions, mask)
        live = mask.reshape(-1)
        self._note(0, live & (self.used[slots] > 0), slots)
        self._note(1, live & (self.scored[slots] > 0), slots)
        self.scored.scatter_add_(0, slots, live.to(torch.int32))
        self.score_calls += 1

    def record_update(self, positions: Tensor, mask: Tensor) -> None:
        """Positions an optimizer update uses (inputs after a BOS, and targets) where ``mask``."""
        slots = self._slots(positions, mask)
        live = mask.reshape(-1)
        self._note(2, live & (self.scored[slots] == 0), slots)
        self.used.scatter_(0, slots, torch.ones_like(slots, dtype=torch.int32))  # masked entries: the dummy slot
        self.update_positions += live.sum()
        self.updates += 1

    def record_update_known(self, positions: Tensor, known_scored: Tensor) -> None:
        """An update (a phase) that uses ``positions`` scored on ANY process (``known_scored``: all-reduced)."""
        slots = positions.reshape(-1)
        self._note(2, known_scored[slots] == 0, slots)
        self.used[slots] = 1
        self.update_positions += slots.numel()
        self.updates += 1

    def known_scored(self, dist_info=None) -> Tensor:
        """Scores per position over all processes (int32 [N + 1])."""
        counts = self.scored.clone()
        if dist_info is not None and dist_info.enabled:
            import torch.distributed as dist

            dist.all_reduce(counts)
        return counts

    def check(self, where: str) -> None:
        """One host sync: raise LegalityError (C3) if anything so far broke the score-before-update order."""
        self.checks += 1
        counts = self.violations.tolist()
        if any(counts):
            kind = next(i for i in (2, 0, 1) if counts[i])  # an update on unscored tokens first: the cause
            position = int(self.first[kind])
            raise LegalityError(f"C3 (score before update) violated ({where}): position {position} "
                                f"{self.KINDS[kind]} ({counts[kind]} such positions)")

    def scored_counts(self, dist_info=None) -> np.ndarray:
        return self.known_scored(dist_info)[: self.num_positions].clamp(max=255).to(torch.uint8).cpu().numpy()

    def check_complete(self, expected_targets, scored_counts: Optional[np.ndarray] = None) -> None:
        expected = _expected_mask(expected_targets, self.num_positions)
        counts = self.scored_counts() if scored_counts is None else np.asarray(scored_counts)
        raise_unless_complete(expected, counts)
        self.complete_checked = True

    @property
    def used_mask(self) -> np.ndarray:
        return (self.used[: self.num_positions] > 0).cpu().numpy()

    def summary(self) -> dict:
        return {
            "positions": self.num_positions,
            "scored_here": int((self.scored[: self.num_positions] > 0).sum()),
            "score_calls": self.score_calls,
            "updates": self.updates,
            "update_positions_total": int(self.update_positions),
            "positions_used_by_updates": int((self.used[: self.num_positions] > 0).sum()),
            "device_checks": self.checks,
            "complete_checked": self.complete_checked,
        }
