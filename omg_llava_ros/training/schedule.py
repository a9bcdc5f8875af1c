"""Learning-rate schedules and the wall-clock budget a stage fits its step count to."""

from __future__ import annotations

import math
import time

from omg_llava_ros.training.config import TrainConfig

# Parts of `TrainConfig.budget_minutes` per stage: about the default recipe's split (perception,
# then instruction tuning, carry the quality), without stage 3, whose counting and existence
# questions stage 4's mix also asks.
BUDGET_SHARES = {0: 0.45, 1: 0.03, 2: 0.40, 3: 0.0, 4: 0.08, 5: 0.04, 6: 0.0, 7: 0.0}


# A budgeted stage measures its pace from its PACE_FROM-th step on (the first ones are slow) and
# fits its step count FIRST_FIT steps later, then again every REFIT_EVERY steps over all steps
# measured: the 90-minute run's stage 0 went 2.45 s a step over its first steps and 2.1 on
# average, and a single early fit left 5.6 of its 40.5 minutes unused.
PACE_FROM, FIRST_FIT, REFIT_EVERY = 5, 20, 100


def budgeted_steps(step: int, spent: float, pace: float, minutes: float, most: int) -> int:
    """Total steps of a stage that has spent `spent` s at `step`, going `pace` s a step, so that it
    ends within `minutes` (never more than `most`, never fewer than it has run)."""
    return max(step, min(most, step + int((minutes * 60 - spent) / pace)))


def cosine_lr(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def stage_lr(cfg: TrainConfig, stage: int, step: int, total: int | None = None) -> float:
    """The learning rate of `stage` at `step`: one warmup + cosine cycle over the stage's `total`
    steps (default: its configured steps); for stage 0 a new cycle starts at each of
    `stage0_restarts` before the last step, from its own rate."""
    total = total if total is not None else getattr(cfg, f"stage{stage}_steps")
    base = getattr(cfg, f"stage{stage}_lr")
    starts = [(0, base)]
    if stage == 0:
        starts += sorted((s, lr) for s, lr in cfg.stage0_restarts if 0 < s < total)
    ends = [s for s, _ in starts[1:]] + [total]
    cycle = next((i for i, end in enumerate(ends) if step < end), len(ends) - 1)
    (start, lr), end = starts[cycle], ends[cycle]
    return cosine_lr(step - start, end - start, lr)


class Clock:
    """Wall-clock time spent in a stage, across resumptions."""

    def __init__(self, minutes: float, spent: float = 0.0):
        self.budget = minutes * 60
        self.start = time.monotonic() - spent

    @property
    def spent(self) -> float:
        return time.monotonic() - self.start

    def done(self) -> bool:
        return self.spent >= self.budget
