"""Paired bootstrap of a perplexity difference between two models scored on the same windows.

Perplexity is ``exp(sum NLL / tokens)`` over fixed windows; two models scored on the same windows differ
window by window far less than their perplexities vary across windows, so the interval of the
*difference* comes from resampling windows jointly (the same draw for both models). Percentile interval
of ``ppl_a - ppl_b`` over ``iters`` resamples, with a fixed seed.
"""

from __future__ import annotations

import math

import numpy as np


def paired_ppl_difference(nll_a, nll_b, tokens_per_window: int, iters: int = 2000, level: float = 0.95,
                          seed: int = 0) -> dict:
    """``ppl(a) - ppl(b)`` and its paired-bootstrap percentile interval.

    Args:
        nll_a, nll_b: summed NLL of each window (``perplexity(..., per_window=True)["window_nll"]``), same windows
            in the same order. Shape: ``[W]``.
        tokens_per_window: predicted tokens per window (``seq_len - 1``).
        iters: bootstrap resamples.
        level: interval coverage.

    Returns:
        ``{diff, ci: [lo, hi], level, iters, windows, excludes_zero}``.

    Raises:
        ValueError: the two lists differ in length or are empty.
    """
    a, b = np.asarray(nll_a, dtype=np.float64), np.asarray(nll_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired bootstrap needs two equal-length lists of window NLLs, got {a.shape} and {b.shape}")
    w = a.size
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, w, size=(iters, w))
    denom = w * tokens_per_window
    diffs = np.exp(a[idx].sum(1) / denom) - np.exp(b[idx].sum(1) / denom)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    diff = math.exp(a.sum() / denom) - math.exp(b.sum() / denom)
    return {"diff": diff, "ci": [float(lo), float(hi)], "level": level, "iters": iters, "windows": w,
            "excludes_zero": bool(lo > 0 or hi < 0)}
