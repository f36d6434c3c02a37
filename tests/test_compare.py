"""The joint-vs-sequential analysis: families, targets, best per family at a target, speed-up, paired differences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from archquant.search.compare import (
    Scored,
    best_meeting,
    compare_at_targets,
    family_of,
    speedup_at_equal_ppl,
    targets_between,
)

TOKENS = 511


def scored(name, family, ms, ppl, shift=0.0, windows=40, seed=0):
    """A point whose per-window NLLs give exactly ``ppl`` (+ a per-window noise pattern shared across points)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 20, windows)
    base -= base.mean()
    nll = base + TOKENS * math.log(ppl) + shift * (np.arange(windows) % 2 - 0.5)
    return Scored(name, family, ms, ppl, tuple(float(x) for x in nll))


def test_family_of_pareto_points():
    assert family_of({"source": "search", "name": "search@9ms"}) == "joint"
    assert family_of({"source": "baseline", "extra": {"baseline": "sequential_search"}}) == "sequential_search"
    assert family_of({"source": "preset", "name": "original"}) == "original"
    assert family_of({"source": "preset", "name": "preset-Q4_0"}) == "preset"
    assert family_of({"source": "uniform"}) == "uniform"


def test_targets_lie_strictly_between():
    t = targets_between(8.0, 10.0, 3)
    assert t == pytest.approx([8.5, 9.0, 9.5])
    with pytest.raises(ValueError, match="no room"):
        targets_between(10.0, 9.0, 3)
    with pytest.raises(ValueError, match="at least one"):
        targets_between(8.0, 10.0, 0)


def test_best_meeting_takes_the_most_accurate_within_target():
    pts = [scored("a", "joint", 8.0, 50), scored("b", "joint", 9.0, 45), scored("c", "joint", 10.5, 40),
           scored("d", "preset", 8.5, 44)]
    assert best_meeting(pts, ("joint",), 9.5).name == "b"
    assert best_meeting(pts, ("joint",), 7.0) is None
    assert best_meeting(pts, ("joint", "preset"), 9.5).name == "d"


def test_speedup_at_equal_ppl():
    joint = scored("j", "joint", 8.0, 45)
    others = [scored("x", "sequential_search", 12.0, 44), scored("y", "sequential_search", 10.0, 45),
              scored("z", "prune_quantise", 7.0, 60)]
    s = speedup_at_equal_ppl(joint, others)
    assert s["speedup"] == pytest.approx(10.0 / 8.0) and s["versus"]["name"] == "y"
    assert speedup_at_equal_ppl(joint, others[2:]) == {"speedup": None, "versus": None}


def test_compare_reports_unmet_families_and_significant_differences():
    pts = [scored("j", "joint", 9.0, 44.0), scored("seq", "sequential_search", 8.8, 48.0),
           scored("pq", "prune_quantise", 11.0, 43.0), scored("orig", "original", 10.5, 42.0),
           scored("q4", "preset", 8.4, 53.0)]
    (row,) = compare_at_targets(pts, [9.5], TOKENS)
    assert row["joint"]["name"] == "j"
    assert row["versus"]["prune_quantise"]["unmet"] and row["versus"]["prune_quantise"]["point"] is None
    seq = row["versus"]["sequential_search"]
    assert seq["point"]["name"] == "seq" and not seq["same_point"]
    assert seq["joint_minus"]["diff"] == pytest.approx(44.0 - 48.0, rel=1e-6)
    lo, hi = seq["joint_minus"]["ci95"]
    assert lo <= -4.0 <= hi and hi < 0 and seq["joint_better"]
    assert row["versus"]["preset"]["point"]["name"] == "q4" and row["versus"]["preset"]["joint_better"]
    # the only baseline at least as accurate is pq (43 <= 44) at 11 ms
    assert row["speedup_vs_baselines"]["speedup"] == pytest.approx(11.0 / 9.0)
    # a full-width uniform point is what both baselines give at a looser budget: it counts for the speed-up
    (row,) = compare_at_targets(pts + [scored("w8", "uniform", 10.0, 43.5)], [9.5], TOKENS)
    assert row["speedup_vs_baselines"]["versus"]["name"] == "w8" and row["versus"]["sequential_search"]["point"]["name"] == "seq"
    assert row["speedup_vs_presets"]["versus"]["name"] == "orig"


def test_identical_points_tie_and_noise_keeps_zero_inside():
    j = scored("j", "joint", 9.0, 45.0)
    twin = Scored("seq", "sequential_search", 9.0, 45.0, j.window_nll)
    noisy = scored("pq", "prune_quantise", 9.0, 45.0, shift=40.0)  # same ppl, windows disagree both ways
    (row,) = compare_at_targets([j, twin, noisy], [9.5], TOKENS)
    tie = row["versus"]["sequential_search"]
    assert tie["same_point"] and tie["joint_minus"]["diff"] == 0 and not tie["joint_better"]
    assert not row["versus"]["prune_quantise"]["joint_minus"]["excludes_zero"]
    assert row["joint"] is not None and compare_at_targets([twin], [9.5], TOKENS)[0]["joint"] is None
