"""Schedules of the search: Gumbel temperature annealing and the warm-up before the budget penalties bite."""

from __future__ import annotations

import math


def temperature(step: int, steps: int, start: float, end: float) -> float:
    """Exponential annealing from ``start`` (step 0) to ``end`` (last step).

    Exponential rather than linear because what matters is the ratio of logit gaps to tau: each step
    sharpens the samples by the same factor.
    """
    if steps <= 1:
        return end
    frac = min(max(step / (steps - 1), 0.0), 1.0)
    return start * math.exp(frac * math.log(end / start))


def penalty_scale(step: int, warmup_steps: int) -> float:
    """0 during warm-up, 1 after: the gates first learn what the KD loss prefers, then the budget bites."""
    return 0.0 if step < warmup_steps else 1.0
