"""Pareto front of searched (and baseline) subnets: points, the non-dominated set, ``pareto.json`` and its plot."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from archquant.utils.errors import MissingFileError
from archquant.utils.io import atomic_write_json

if TYPE_CHECKING:
    from archquant.latency.measure import LatencyMeasurement

# 2: points carry ``latency_ci_ms`` / ``latency_ci_level`` (version-1 files read as points without them)
PARETO_VERSION = 2

# what a point's latency measurement sets: copied together to a twin (the same architecture timed once)
MEASURED_FIELDS = ("measured_ms", "measured_by", "latency_ci_ms", "latency_ci_level")


@dataclass
class ParetoPoint:
    """One candidate model on the front.

    Attributes:
        name: unique label (e.g. ``search@12ms``, ``full``).
        source: ``search``, ``full`` (the original model), ``uniform`` (full width at uniform bits), ``preset``
            (llama.cpp's own quantisation of the original, ``extra["gguf"]`` its file) or ``baseline``.
        arch: the ``Arch`` record as a dict (None for the original model).
        budget_ms: the latency target it was searched for.
        predicted_ms, predicted_mb: the latency model's predictions.
        measured_ms: latency measured in the serving backend (None if not measured).
        measured_by: how ``measured_ms`` was taken.
        latency_ci_ms: ``[lo, hi]``, the confidence interval of ``measured_ms`` (a median over timing rounds;
            ``latency.interval.median_interval``); None when not measured or timed once. The pick treats
            two points whose intervals overlap as indistinguishable in latency.
        latency_ci_level: that interval's exact coverage (e.g. 0.96875 for 6 rounds at 95% asked).
        memory_mb: weight memory (MB = 1e6 bytes; predicted, or the file size where measured).
        ppl: held-out perplexity (lower is better).
        val_kd: KD to the teacher on held-out calibration blocks (from the search).
        accuracy: mean zero-shot accuracy (headline metric per task), when evaluated.
        zero_shot: per-task results, when evaluated.
        run_dir: the search run folder.
    """

    name: str
    source: str = "search"
    arch: dict[str, Any] | None = None
    budget_ms: float | None = None
    predicted_ms: float | None = None
    predicted_mb: float | None = None
    measured_ms: float | None = None
    measured_by: str | None = None
    latency_ci_ms: list[float] | None = None
    latency_ci_level: float | None = None
    memory_mb: float | None = None
    ppl: float | None = None
    val_kd: float | None = None
    accuracy: float | None = None
    zero_shot: dict[str, Any] | None = None
    run_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.latency_ci_ms is not None:
            lo, hi = (float(x) for x in self.latency_ci_ms)  # a JSON list or a measurement's tuple
            if not lo <= hi:
                raise ValueError(f"{self.name}: latency_ci_ms must be [lo, hi] with lo <= hi, got {self.latency_ci_ms}")
            self.latency_ci_ms = [lo, hi]

    @property
    def latency_ms(self) -> float | None:
        """Measured latency where there is one, else the prediction."""
        return self.measured_ms if self.measured_ms is not None else self.predicted_ms

    @property
    def latency_interval(self) -> tuple[float, float] | None:
        """``(lo, hi)`` of the measured latency; None for a prediction or a single timing (no known spread)."""
        if self.measured_ms is None or self.latency_ci_ms is None:
            return None
        return self.latency_ci_ms[0], self.latency_ci_ms[1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ParetoPoint:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def with_measurement(point: ParetoPoint, m: LatencyMeasurement) -> ParetoPoint:
    """``point`` with its measured latency: the median, how it was taken, its interval and the full record
    (``extra["measurement"]``: per-round samples, rounds, whether the interval settled)."""
    return dataclasses.replace(
        point,
        measured_ms=m.ms,
        measured_by=m.method,
        latency_ci_ms=None if m.ci_ms is None else [float(x) for x in m.ci_ms],
        latency_ci_level=m.ci_level,
        extra={**point.extra, "measurement": m.to_dict()},
    )


def point_from_run(run_dir: str | Path) -> ParetoPoint:
    """A point from an ``archquant-search`` run folder (``search.json`` + ``arch.json``)."""
    run_dir = Path(run_dir)
    rec = json.loads((run_dir / "search.json").read_text())
    arch = json.loads((run_dir / "arch.json").read_text())
    budget = rec.get("budget", {}).get("latency_ms")
    res = rec["result"]
    name = f"search@{budget:g}ms" if budget is not None else f"search:{run_dir.name}"
    return ParetoPoint(
        name=name,
        source="search",
        arch=arch,
        budget_ms=budget,
        predicted_ms=res.get("predicted_ms"),
        predicted_mb=res.get("predicted_mb"),
        memory_mb=res.get("predicted_mb"),
        val_kd=res.get("val_kd"),
        run_dir=str(run_dir),
        extra={"latency": rec.get("config", {}).get("latency", {})},
    )


def collect_runs(folders: list[str | Path]) -> list[ParetoPoint]:
    """Every completed search run (a folder with ``search.json`` and ``arch.json``) under ``folders``."""
    points = []
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            raise MissingFileError(f"pareto.runs: {folder} does not exist")
        for rec in sorted(folder.rglob("search.json")):
            if (rec.parent / "arch.json").exists():
                points.append(point_from_run(rec.parent))
    return unique_names(points)


def unique_names(points: list[ParetoPoint]) -> list[ParetoPoint]:
    """Rename repeated names ``name#2``, ``name#3``, ... in place (two runs at one budget, a baseline file
    reusing ``full``): a front, its plot and the pick refer to points by name."""
    seen = {p.name for p in points}
    count: dict[str, int] = {}
    for p in points:
        count[p.name] = count.get(p.name, 0) + 1
        if count[p.name] > 1:
            k = count[p.name]
            while f"{p.name}#{k}" in seen:
                k += 1
            count[p.name] = k
            p.name = f"{p.name}#{k}"
            seen.add(p.name)
    return points


def load_points(path: str | Path) -> list[ParetoPoint]:
    """Points of a ``pareto.json`` or of a baseline file (``{"points": [...]}``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "pareto.json"
    if not path.exists():
        raise MissingFileError(f"{path} does not exist (write one with archquant-pareto)")
    d = json.loads(path.read_text())
    return [ParetoPoint.from_dict(p) for p in d["points"]]


def metric_of(point: ParetoPoint, metric: str) -> float | None:
    """The quality value to minimise: perplexity, or negated accuracy."""
    if metric == "ppl":
        return point.ppl
    if metric == "accuracy":
        return None if point.accuracy is None else -point.accuracy
    raise ValueError(f"metric must be ppl or accuracy, got {metric!r}")


def resolve_metric(points: list[ParetoPoint], metric: str = "auto") -> str:
    """``auto`` -> ``accuracy`` when every point has one, else ``ppl``."""
    if metric != "auto":
        return metric
    return "accuracy" if points and all(p.accuracy is not None for p in points) else "ppl"


def non_dominated(points: list[ParetoPoint], metric: str = "ppl") -> list[ParetoPoint]:
    """The points no other point beats on both latency and quality (ties in both kept once each).

    A point is dominated when another is no slower and no worse, and strictly better in one of the two.
    Points without a latency or a metric value are left out. Sorted by latency. Latency here is the median
    (or the prediction): a dropped point is no better in quality and not measurably faster than the point
    dominating it, whatever their intervals; the intervals matter to the pick (``pick_point``).
    """
    valid = [p for p in points if p.latency_ms is not None and metric_of(p, metric) is not None]
    valid = [p for p in valid if math.isfinite(p.latency_ms) and math.isfinite(metric_of(p, metric))]
    front = []
    for p in valid:
        lp, mp = p.latency_ms, metric_of(p, metric)
        dominated = any(
            q is not p
            and q.latency_ms <= lp
            and metric_of(q, metric) <= mp
            and (q.latency_ms < lp or metric_of(q, metric) < mp)
            for q in valid
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: (p.latency_ms, metric_of(p, metric)))


def save_front(
    path: str | Path,
    points: list[ParetoPoint],
    front: list[ParetoPoint],
    *,
    metric: str,
    latency: dict[str, Any],
    header: dict[str, Any],
) -> None:
    """Write ``pareto.json``: every point, the names on the front, the latency setting and the metric."""
    atomic_write_json(
        path,
        {
            "version": PARETO_VERSION,
            "header": header,
            "latency": latency,
            "metric": metric,
            "points": [p.to_dict() for p in points],
            "front": [p.name for p in front],
        },
    )


def plot_front(
    path: str | Path, points: list[ParetoPoint], front: list[ParetoPoint], *, metric: str, latency: dict, device: str
) -> None:
    """``pareto.png``: every point, the front as a step line, measured latencies with their intervals as
    horizontal error bars, axes with units, device and scenario in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def y(p):
        return p.ppl if metric == "ppl" else p.accuracy

    measured = all(p.measured_ms is not None for p in points if p.latency_ms is not None)
    scen = latency.get("scenario", "?")
    what = (
        f"batch {latency.get('batch')}, context {latency.get('context')}"
        if scen == "decode"
        else f"batch {latency.get('batch')} x {latency.get('prefill_len')} tokens"
    )
    fig, ax = plt.subplots(figsize=(9, 5.5))
    pts = [p for p in points if p.latency_ms is not None and y(p) is not None]
    ours = [p for p in pts if p.source not in ("preset", "baseline")]
    ax.scatter([p.latency_ms for p in ours], [y(p) for p in ours], c="0.6", label="searched / reference points", zorder=2)
    baselines = [p for p in pts if p.source == "baseline"]
    if baselines:  # the sequential baselines the joint search must beat
        ax.scatter([p.latency_ms for p in baselines], [y(p) for p in baselines], marker="^", facecolors="none",
                   edgecolors="C1", label="sequential baselines", zorder=2)
    presets = [p for p in pts if p.source == "preset"]
    if presets:  # llama.cpp's own quantisation of the original: the baseline a CPU user already has
        ax.scatter([p.latency_ms for p in presets], [y(p) for p in presets], marker="s", facecolors="none",
                   edgecolors="C3", label="llama-quantize presets", zorder=2)
    timed = [p for p in pts if p.latency_interval is not None]
    if timed:  # a point's latency is a median over rounds; the bar is its interval (measure_interleaved)
        levels = sorted({round(p.latency_ci_level, 3) for p in timed if p.latency_ci_level is not None})
        label = "latency interval" + (f" ({', '.join(f'{lv:.1%}' for lv in levels)})" if levels else "")
        ax.errorbar(
            [p.latency_ms for p in timed], [y(p) for p in timed],
            xerr=[[p.latency_ms - p.latency_interval[0] for p in timed],
                  [p.latency_interval[1] - p.latency_ms for p in timed]],
            fmt="none", ecolor="0.4", elinewidth=1, capsize=3, label=label, zorder=1,
        )
    if front:
        ax.step([p.latency_ms for p in front], [y(p) for p in front], where="post", c="C0", zorder=3)
        ax.scatter([p.latency_ms for p in front], [y(p) for p in front], c="C0", label="Pareto front", zorder=4)
    # one label per position: points of the same architecture share their figures (twins)
    groups: dict[tuple, list[str]] = {}
    for p in pts:
        groups.setdefault((p.latency_ms, y(p)), []).append(p.name)
    for (x, v), names in groups.items():
        text = " = ".join(names[:2]) + (f" (+{len(names) - 2})" if len(names) > 2 else "")
        ax.annotate(text, (x, v), textcoords="offset points", xytext=(4, 4), fontsize=6.5)
    values = [y(p) for p in pts]
    if metric == "ppl" and values and max(values) > 3 * min(values):
        ax.set_yscale("log")  # a few collapsed points would otherwise flatten the rest
    unit = "ms per token" if scen == "decode" else "ms per prefill"
    ax.set_xlabel(f"{'measured' if measured else 'PREDICTED'} latency ({unit}; {latency.get('backend')} {scen}, {what})")
    ax.set_ylabel("held-out perplexity (lower is better)" if metric == "ppl" else "mean zero-shot accuracy")
    ax.set_title(f"archquant Pareto front on {device}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
