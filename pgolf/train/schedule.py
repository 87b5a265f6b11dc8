"""The training schedule: time budget, training fraction and the learning-rate multiplier.

The schedule is time-based when ``max_wallclock_seconds > 0``: the fraction of the loop's budget used so far drives
the warmdown and the loop switch (read at the top of each step), and the run stops after the first step that ENDS
at or past the budget. It is step-based (``step / iterations``) otherwise. PR #1855 does the same with a budget of
600 - 0.5 s (its run's GPTQ_RESERVE_SECONDS); pgolf's strict reading reserves 8 s for the Hessians
(``train.budget_reading``, ``train.reserve_seconds``). With equal budgets the functions below equal the record's on
a 0.01 s grid (tests/test_record_train_oracle.py).
"""

from __future__ import annotations

from pgolf.config import TrainConfig


def lr_multiplier(frac: float, warmdown_fraction: float, min_lr_fraction: float) -> float:
    """1 until ``1 - warmdown_fraction`` of training, then linear to 0, floored at ``min_lr_fraction``.

    Record: warmdown 0.85, floor 0.10 -> ``max((1 - frac) / 0.85, 0.10)`` after frac = 0.15.
    """
    if warmdown_fraction <= 0 or frac < 1.0 - warmdown_fraction:
        return 1.0
    return max((1.0 - frac) / warmdown_fraction, min_lr_fraction)


def training_budget_seconds(cfg: TrainConfig) -> float:
    """The loop's share of the wallclock cap, the same under both budget readings: ``max_wallclock_seconds -
    reserve_seconds``. The reading changes what `pgolf comply` adds to the loop's time, not the loop."""
    return max(cfg.max_wallclock_seconds - cfg.reserve_seconds, 0.0)


def training_fraction(step: int, elapsed_s: float, cfg: TrainConfig) -> float:
    """Progress in [0, 1]: elapsed time over the loop budget, or ``step / iterations`` without a wallclock cap.

    Computed in milliseconds, as the record computes it, so that the two agree to the last bit (seconds would
    differ in the last place now and then, and so would every learning rate). The record does not clamp at 1;
    clamping changes neither the multiplier (floored) nor the loop switch.
    """
    if cfg.max_wallclock_seconds > 0:
        budget_ms = 1e3 * cfg.max_wallclock_seconds - 1e3 * cfg.reserve_seconds
        return min(1e3 * elapsed_s / max(budget_ms, 1e-9), 1.0)
    return min(step / cfg.iterations, 1.0)
