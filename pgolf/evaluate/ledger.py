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
