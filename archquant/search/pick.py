"""Pick from a Pareto front by latency SLO: the most accurate point that meets it, or say that none does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from archquant.search.pareto import ParetoPoint, metric_of, resolve_metric


@dataclass
class PickResult:
    """The outcome of ``pick_point``.

    Attributes:
        met: some point meets the SLO.
        point: the picked point (None when none meets the SLO).
        fastest: the fastest point (named when none meets the SLO).
        slo_ms: the SLO.
        metric: ``ppl`` or ``accuracy``.
        message: one sentence for the user.
    """

    met: bool
    point: ParetoPoint | None
    fastest: ParetoPoint | None
    slo_ms: float
    metric: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "met": self.met,
            "slo_ms": self.slo_ms,
            "metric": self.metric,
            "message": self.message,
            "point": None if self.point is None else self.point.to_dict(),
            "fastest": None if self.fastest is None else self.fastest.to_dict(),
        }


def _describe(p: ParetoPoint, metric: str) -> str:
    q = f"ppl {p.ppl:.3f}" if metric == "ppl" else f"accuracy {p.accuracy:.3f}"
    how = "measured" if p.measured_ms is not None else "predicted"
    return f"{p.name} ({p.latency_ms:.3f} ms {how}, {q})"


def pick_point(points: list[ParetoPoint], slo_ms: float, metric: str = "auto") -> PickResult:
    """The most accurate point whose latency (measured, else predicted) is within ``slo_ms``.

    Args:
        points: candidates (the front or every point; the answer is the same).
        slo_ms: latency the point must meet (ms).
        metric: ``ppl``, ``accuracy`` or ``auto`` (see ``resolve_metric``).

    Raises:
        ValueError: ``slo_ms`` not > 0, or no point has both a latency and the metric.
    """
    if not slo_ms > 0:
        raise ValueError(f"slo.latency_ms must be > 0, got {slo_ms}")
    metric = resolve_metric(points, metric)
    valid = [p for p in points if p.latency_ms is not None and metric_of(p, metric) is not None]
    if not valid:
        raise ValueError(f"no point has both a latency and a {metric} value to pick by")
    fastest = min(valid, key=lambda p: (p.latency_ms, metric_of(p, metric)))
    meeting = [p for p in valid if p.latency_ms <= slo_ms]
    if not meeting:
        return PickResult(
            met=False,
            point=None,
            fastest=fastest,
            slo_ms=slo_ms,
            metric=metric,
            message=f"no point meets slo.latency_ms={slo_ms:g}; the fastest point is {_describe(fastest, metric)}",
        )
    best = min(meeting, key=lambda p: (metric_of(p, metric), p.latency_ms))
    return PickResult(
        met=True,
        point=best,
        fastest=fastest,
        slo_ms=slo_ms,
        metric=metric,
        message=f"picked {_describe(best, metric)} for slo.latency_ms={slo_ms:g}",
    )
