"""How well a median over timing rounds is known: a distribution-free confidence interval from order statistics.

Why order statistics rather than a bootstrap: timing affords few rounds (3 to 15), and there the percentile
bootstrap of a median is both optimistic and coarse. It cannot reach beyond the samples' range, so with 3
rounds its "95%" interval is ``[min, max]``, which covers the median only 75% of the time. The order-statistic
interval ``[x_(k), x_(n+1-k)]`` has an exact coverage for any continuous distribution of independent rounds
(a binomial sum, below), needs no random numbers (the same samples give the same interval), and says so
when the rounds are too few for the confidence asked. A machine whose speed drifts during the rounds breaks
the independence; that shows up as a wider interval, which is the warning wanted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class MedianInterval:
    """``[lo, hi]`` contains the median of the distribution the samples came from with probability ``level``.

    Attributes:
        median: the samples' median (the point estimate the interval is about).
        lo, hi: the bounds, two of the samples.
        level: the exact coverage, ``>= confidence`` unless the samples were too few for any pair to reach it.
        confidence: the coverage asked for.
    """

    median: float
    lo: float
    hi: float
    level: float
    confidence: float

    @property
    def reached(self) -> bool:
        """The interval has the confidence asked for (else it is ``[min, max]`` at a lower level)."""
        return self.level >= self.confidence

    @property
    def rel_halfwidth(self) -> float:
        """The larger distance from the median to a bound, relative to the median (the interval is not
        symmetric: the larger side is the one that can mislead)."""
        side = max(self.median - self.lo, self.hi - self.median)
        if side == 0:
            return 0.0
        return side / abs(self.median) if self.median else math.inf


def order_statistic_level(n: int, k: int) -> float:
    """Coverage of ``[x_(k), x_(n+1-k)]`` (1-based order statistics of ``n`` samples) for the median.

    The interval misses the median exactly when fewer than ``k`` samples fall below it, or fewer than ``k``
    above; the number below is Binomial(n, 1/2), so the coverage is ``1 - 2 P(B <= k-1)``.
    """
    if not 1 <= k <= (n + 1) // 2:
        raise ValueError(f"k must be in 1..{(n + 1) // 2} for n={n}, got {k}")
    below = sum(math.comb(n, i) for i in range(k))
    return 1.0 - 2.0 * below / 2**n


def median_interval(samples: list[float], confidence: float = 0.95) -> MedianInterval | None:
    """The narrowest symmetric order-statistic interval of the median with coverage ``>= confidence``.

    With too few samples for any pair to reach ``confidence`` (fewer than 6 at 95%), the interval is
    ``[min, max]`` and ``level`` its lower coverage (75% for 3 samples), so a caller can tell.

    Args:
        samples: independent values (here: one per timing round).
        confidence: the coverage asked for, in (0, 1).

    Returns:
        The interval, or None for fewer than 2 samples (one sample says nothing about its spread).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence} (pareto.timing_confidence)")
    xs = sorted(float(x) for x in samples)
    n = len(xs)
    if n < 2:
        return None
    median = (xs[(n - 1) // 2] + xs[n // 2]) / 2
    k, level = 1, order_statistic_level(n, 1)
    for j in range(2, n // 2 + 1):  # larger k = narrower; the coverage falls with k
        lv = order_statistic_level(n, j)
        if lv < confidence:
            break
        k, level = j, lv
    return MedianInterval(median=median, lo=xs[k - 1], hi=xs[n - k], level=level, confidence=confidence)
