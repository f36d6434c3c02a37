"""Joint search against the sequential baselines and llama.cpp's presets, at equal measured latency.

The analysis of the joint-vs-sequential experiment (``scripts/exp_joint_vs_sequential.py``) on plain
records: every point carries a family (``joint``: the search's result; ``prune_quantise`` /
``sequential_search``: the sequential baselines; ``preset`` / ``original``: llama.cpp's files; ``uniform``,
``full``: references), a measured latency, a perplexity and its per-window NLLs. At each latency target a
family is represented by its most accurate point whose measured median meets the target; the joint pick is
compared to each by a paired bootstrap over the same windows, and its speed-up at equal perplexity is the
latency of the fastest baseline point at least as accurate (full-width uniform points count: they are what
both baselines return at a budget that fits the full shape) divided by its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from archquant.evaluation.bootstrap import paired_ppl_difference

BASELINE_FAMILIES = ("prune_quantise", "sequential_search")
# what either baseline returns at a budget where the full shape fits after uniform quantisation
UNIFORM_FAMILIES = ("uniform",)
PRESET_FAMILIES = ("preset", "original")


@dataclasses.dataclass(frozen=True)
class Scored:
    """One point as the comparison sees it. ``window_nll``: summed NLL per perplexity window (same windows for all)."""

    name: str
    family: str
    ms: float
    ppl: float
    window_nll: tuple[float, ...] | None = None

    def brief(self) -> dict:
        return {"name": self.name, "family": self.family, "ms": round(self.ms, 3), "ppl": round(self.ppl, 4)}


def family_of(point: dict) -> str:
    """The family of a ``pareto.json`` point (``joint`` for a search's result)."""
    source = point.get("source")
    if source == "search":
        return "joint"
    if source == "baseline":
        return str((point.get("extra") or {}).get("baseline", "baseline"))
    if source == "preset":
        return "original" if point.get("name") == "original" else "preset"
    return str(source)


def targets_between(lo_ms: float, hi_ms: float, n: int) -> list[float]:
    """``n`` latency targets evenly inside ``(lo_ms, hi_ms)`` (the fastest preset and the original file)."""
    if n < 1:
        raise ValueError(f"need at least one target, got {n}")
    if not hi_ms > lo_ms:
        raise ValueError(f"no room for targets: the fastest preset ({lo_ms:.3f} ms) is not faster than the original "
                         f"({hi_ms:.3f} ms)")
    return [lo_ms + (hi_ms - lo_ms) * k / (n + 1) for k in range(1, n + 1)]


def best_meeting(points: Sequence[Scored], families: Sequence[str], target_ms: float) -> Scored | None:
    """The most accurate point of ``families`` whose latency meets ``target_ms`` (ties: the faster)."""
    ok = [p for p in points if p.family in families and p.ms <= target_ms]
    return min(ok, key=lambda p: (p.ppl, p.ms)) if ok else None


def speedup_at_equal_ppl(point: Scored, others: Sequence[Scored]) -> dict:
    """How much faster ``point`` is than the fastest of ``others`` that is at least as accurate.

    Returns ``{speedup, versus}``; ``speedup`` is None when none of ``others`` reaches ``point``'s perplexity
    (``point`` is then strictly better than all of them at any latency they offer)."""
    ok = [p for p in others if p.ppl <= point.ppl]
    if not ok:
        return {"speedup": None, "versus": None}
    ref = min(ok, key=lambda p: (p.ms, p.ppl))
    return {"speedup": ref.ms / point.ms, "versus": ref.brief()}


def _difference(a: Scored, b: Scored, tokens_per_window: int) -> dict | None:
    if a.window_nll is None or b.window_nll is None:
        return None
    d = paired_ppl_difference(a.window_nll, b.window_nll, tokens_per_window)
    return {"diff": d["diff"], "ci95": d["ci"], "windows": d["windows"], "excludes_zero": d["excludes_zero"]}


def compare_at_targets(points: Sequence[Scored], targets_ms: Sequence[float], tokens_per_window: int) -> list[dict]:
    """Per target: the joint pick, the best point of each baseline family and the best preset meeting it, the
    joint-minus-other perplexity difference with its paired-bootstrap 95% interval, and the joint pick's
    speed-up at equal perplexity over every baseline point at any latency, the full-width uniform points included
    (what both baselines return at a budget the full shape meets after uniform quantisation).

    A family with no point meeting a target is reported as ``unmet`` (None), never dropped."""
    baselines = [p for p in points if p.family in BASELINE_FAMILIES + UNIFORM_FAMILIES]
    rows = []
    for t in targets_ms:
        joint = best_meeting(points, ("joint",), t)
        row: dict = {"target_ms": t, "joint": None if joint is None else joint.brief(), "versus": {}}
        for fam, members in [(f, (f,)) for f in BASELINE_FAMILIES] + [("preset", PRESET_FAMILIES)]:
            other = best_meeting(points, members, t)
            entry: dict = {"point": None if other is None else other.brief(), "unmet": other is None}
            if joint is not None and other is not None:
                entry["same_point"] = joint.window_nll == other.window_nll and joint.ppl == other.ppl
                entry["joint_minus"] = _difference(joint, other, tokens_per_window)
                d = entry["joint_minus"]
                entry["joint_better"] = bool(d and d["excludes_zero"] and d["diff"] < 0)
            row["versus"][fam] = entry
        if joint is not None:
            row["speedup_vs_baselines"] = speedup_at_equal_ppl(joint, baselines)
            row["speedup_vs_presets"] = speedup_at_equal_ppl(joint, [p for p in points if p.family in PRESET_FAMILIES])
        rows.append(row)
    return rows
