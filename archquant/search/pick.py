"""Pick from a Pareto front by latency SLO: the most accurate point that meets it, or say that none does, and
say where the latency measurements cannot tell (the SLO or two points' order inside their intervals)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from archquant.search.pareto import ParetoPoint, metric_of, resolve_metric
from archquant.utils.errors import InputError


@dataclass
class PickResult:
    """The outcome of ``pick_point``.

    Attributes:
        met: some point meets the SLO (its latency, the median of measured rounds, is <= the SLO).
        point: the picked point (None when none meets the SLO).
        fastest: the fastest point by latency, or, among the points indistinguishable in latency from it
            (overlapping intervals), the most accurate (named when none meets the SLO).
        slo_ms: the SLO.
        metric: ``ppl`` or ``accuracy``.
        message: what was picked, and what the measurements could not decide.
        ambiguous: one record per uncertainty that bears on the pick (empty when the intervals settle it):
            ``kind`` ``"slo"`` (the SLO lies inside the point's latency interval, so whether it meets the SLO
            is not established) or ``"order"`` (the point's interval overlaps the picked point's, so which of
            the two is faster is not established); with the point's ``name``, ``latency_ms``,
            ``latency_ci_ms``, the metric's value, ``meets``, ``more_accurate`` (than the picked point; None
            when none is picked) and a ``note``.
    """

    met: bool
    point: ParetoPoint | None
    fastest: ParetoPoint | None
    slo_ms: float
    metric: str
    message: str
    ambiguous: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "met": self.met,
            "slo_ms": self.slo_ms,
            "metric": self.metric,
            "message": self.message,
            "ambiguous": self.ambiguous,
            "point": None if self.point is None else self.point.to_dict(),
            "fastest": None if self.fastest is None else self.fastest.to_dict(),
        }


def indistinguishable(a: ParetoPoint, b: ParetoPoint) -> bool:
    """Both latencies are measured with an interval and the intervals overlap: the timing cannot order them.

    Overlap is the conservative test (two 95% intervals can overlap a little while a paired test would
    separate the points), chosen because it is what a reader of the plot's error bars sees. A prediction
    has no interval and is never indistinguishable: it behaves as before intervals existed.
    """
    ia, ib = a.latency_interval, b.latency_interval
    return ia is not None and ib is not None and ia[0] <= ib[1] and ib[0] <= ia[1]


def slo_inside(p: ParetoPoint, slo_ms: float) -> bool:
    """The interval holds latencies on both sides of the SLO (``lo <= slo < hi``; meeting is ``<= slo``), so
    whether the point meets it is not established."""
    iv = p.latency_interval
    return iv is not None and iv[0] <= slo_ms < iv[1]


def _quality(p: ParetoPoint, metric: str) -> float:
    return p.ppl if metric == "ppl" else p.accuracy


def _describe(p: ParetoPoint, metric: str) -> str:
    q = f"ppl {p.ppl:.3f}" if metric == "ppl" else f"accuracy {p.accuracy:.3f}"
    how = "measured" if p.measured_ms is not None else "predicted"
    iv = p.latency_interval
    spread = "" if iv is None else f" [{iv[0]:.3f}, {iv[1]:.3f}]"
    return f"{p.name} ({p.latency_ms:.3f} ms{spread} {how}, {q})"


def _record(kind: str, p: ParetoPoint, metric: str, slo_ms: float, note: str, more_accurate: bool | None = None
            ) -> dict[str, Any]:
    return {"kind": kind, "name": p.name, "latency_ms": p.latency_ms, "latency_ci_ms": p.latency_ci_ms,
            metric: _quality(p, metric), "meets": p.latency_ms <= slo_ms, "more_accurate": more_accurate,
            "note": note}


def _uncertain(ambiguous: list[dict[str, Any]]) -> str:
    """The records as one clause per point: ``name (more accurate): note; note``."""
    notes: dict[str, list[str]] = {}
    for a in ambiguous:
        notes.setdefault(a["name"], []).append(a["note"])
    rank = {a["name"]: a["more_accurate"] for a in ambiguous}
    return "; ".join(f"{name}{' (more accurate)' if rank[name] else ''}: {', and '.join(ns)}"
                     for name, ns in notes.items())


def pick_point(points: list[ParetoPoint], slo_ms: float, metric: str = "auto") -> PickResult:
    """The most accurate point whose latency (measured median, else predicted) is within ``slo_ms``, with what
    the latency intervals leave open.

    The rule, precisely:

    * a point **meets** the SLO when its latency (the median over timing rounds, or the prediction) is
      ``<= slo_ms``; the pick is the most accurate meeting point (ties: the faster). Uncertainty never moves
      the pick to a point whose median is above the SLO, nor to a less accurate one: among points the timing
      cannot tell apart, quality decides.
    * two measured points are **indistinguishable** when their intervals overlap (``indistinguishable``).
    * ``ambiguous`` records (``PickResult``): the picked point when the SLO lies inside its interval (it may
      not meet it); every more accurate point above the SLO whose interval holds the SLO (it may meet it);
      every point indistinguishable from the picked one. With no point meeting: every point whose interval
      holds the SLO, most accurate first.
    * ``fastest``: the point of lowest latency, or the most accurate of those indistinguishable from it.

    Points without an interval (predicted, or timed once) take part by their latency alone, as before.

    Args:
        points: candidates (the front or every point; the answer is the same).
        slo_ms: latency the point must meet (ms).
        metric: ``ppl``, ``accuracy`` or ``auto`` (see ``resolve_metric``).

    Raises:
        ValueError: ``slo_ms`` not > 0, or no point has both a latency and the metric.
    """
    if not slo_ms > 0:
        raise InputError(f"slo.latency_ms must be > 0, got {slo_ms}")
    metric = resolve_metric(points, metric)
    valid = [p for p in points if p.latency_ms is not None and metric_of(p, metric) is not None]
    if not valid:
        raise InputError(f"no point has both a latency and a {metric} value to pick by")

    def by_quality(p):
        return metric_of(p, metric), p.latency_ms

    by_speed = min(valid, key=lambda p: (p.latency_ms, metric_of(p, metric)))
    fastest = min([by_speed] + [p for p in valid if indistinguishable(p, by_speed)], key=by_quality)
    fastest_note = "" if fastest is by_speed else (
        f", the most accurate of the points indistinguishable in latency from the lowest median ({by_speed.name})")
    meeting = [p for p in valid if p.latency_ms <= slo_ms]
    if not meeting:
        maybe = sorted((p for p in valid if slo_inside(p, slo_ms)), key=by_quality)
        ambiguous = [_record("slo", p, metric, slo_ms, "its median is above the SLO but its interval holds it, "
                             "so it may meet it") for p in maybe]
        message = (f"no point meets slo.latency_ms={slo_ms:g}; the fastest point is "
                   f"{_describe(fastest, metric)}{fastest_note}")
        if maybe:
            message += "; the timing cannot tell: " + _uncertain(ambiguous)
        return PickResult(met=False, point=None, fastest=fastest, slo_ms=slo_ms, metric=metric, message=message,
                          ambiguous=ambiguous)

    best = min(meeting, key=by_quality)
    ambiguous = []
    if slo_inside(best, slo_ms):
        ambiguous.append(_record("slo", best, metric, slo_ms,
                                 "its interval reaches above the SLO, so it may not meet it", False))
    better = [p for p in sorted(valid, key=by_quality) if by_quality(p) < by_quality(best)]  # all above the SLO
    ambiguous += [_record("slo", p, metric, slo_ms, "its median is above the SLO but its interval holds it, "
                          "so it may meet it", True) for p in better if slo_inside(p, slo_ms)]
    for p in sorted(valid, key=lambda p: p.latency_ms):
        if p is not best and indistinguishable(p, best):
            ambiguous.append(_record("order", p, metric, slo_ms, f"its latency interval overlaps {best.name}'s",
                                     by_quality(p) < by_quality(best)))
    message = f"picked {_describe(best, metric)} for slo.latency_ms={slo_ms:g}"
    if ambiguous:
        message += "; the timing cannot tell: " + _uncertain(ambiguous)
    return PickResult(met=True, point=best, fastest=fastest, slo_ms=slo_ms, metric=metric, message=message,
                      ambiguous=ambiguous)
