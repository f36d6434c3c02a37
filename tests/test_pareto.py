"""Pareto front and SLO pick: non-dominated set against brute force, pick semantics (with latency intervals),
files written and read back."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from archquant.latency.measure import LatencyMeasurement, measure_interleaved
from archquant.search.config import ParetoConfig
from archquant.search.pareto import (
    MEASURED_FIELDS,
    ParetoPoint,
    collect_runs,
    load_points,
    non_dominated,
    plot_front,
    resolve_metric,
    save_front,
    with_measurement,
)
from archquant.search.pick import indistinguishable, pick_point


def _points(n=40, seed=0):
    rng = random.Random(seed)
    pts = [ParetoPoint(name=f"p{i}", measured_ms=rng.choice([1, 2, 3, 4, 5]) * 1.0, ppl=rng.uniform(10, 30)) for i in range(n)]
    pts.append(ParetoPoint(name="dup", measured_ms=pts[0].measured_ms, ppl=pts[0].ppl))  # exact tie
    return pts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_non_dominated_matches_brute_force(seed):
    pts = _points(seed=seed)
    front = non_dominated(pts, "ppl")
    brute = {
        p.name
        for p in pts
        if not any(q.latency_ms <= p.latency_ms and q.ppl <= p.ppl and (q.latency_ms, q.ppl) != (p.latency_ms, p.ppl) for q in pts)
    }
    assert {p.name for p in front} == brute
    assert [p.latency_ms for p in front] == sorted(p.latency_ms for p in front)
    # along the front, faster always means worse
    for a, b in itertools.pairwise(front):
        assert a.ppl >= b.ppl or a.latency_ms == b.latency_ms


def test_measured_latency_wins_over_predicted_and_accuracy_is_maximised():
    a = ParetoPoint(name="a", predicted_ms=1.0, measured_ms=5.0, ppl=10, accuracy=0.6)
    b = ParetoPoint(name="b", predicted_ms=3.0, ppl=12, accuracy=0.7)
    assert a.latency_ms == 5.0 and b.latency_ms == 3.0
    assert [p.name for p in non_dominated([a, b], "ppl")] == ["b", "a"]
    assert [p.name for p in non_dominated([a, b], "accuracy")] == ["b"]  # b is faster and more accurate
    assert resolve_metric([a, b]) == "accuracy"
    assert resolve_metric([a, ParetoPoint(name="c", predicted_ms=1, ppl=3)]) == "ppl"


def test_pick_the_most_accurate_point_meeting_the_slo():
    pts = [
        ParetoPoint(name="fast", measured_ms=2.0, ppl=30.0),
        ParetoPoint(name="mid", measured_ms=5.0, ppl=20.0),
        ParetoPoint(name="slow", measured_ms=9.0, ppl=15.0),
    ]
    res = pick_point(pts, 6.0)
    assert res.met and res.point.name == "mid" and "mid" in res.message
    assert res.ambiguous == [] and res.to_dict()["ambiguous"] == []  # no intervals: as before
    assert pick_point(pts, 9.0).point.name == "slow"  # the SLO is inclusive
    none = pick_point(pts, 1.0)
    assert not none.met and none.point is None and none.fastest.name == "fast"
    assert "no point meets slo.latency_ms=1" in none.message and "fast" in none.message
    with pytest.raises(ValueError, match="slo.latency_ms"):
        pick_point(pts, 0)


def _fake_run(folder, budget, predicted):
    folder.mkdir(parents=True)
    (folder / "arch.json").write_text(json.dumps({"version": 1, "hidden": 64}))
    (folder / "search.json").write_text(
        json.dumps(
            {
                "budget": {"latency_ms": budget},
                "result": {"predicted_ms": predicted, "predicted_mb": 1.0, "val_kd": 0.1},
                "config": {"latency": {"backend": "torch", "scenario": "decode"}},
            }
        )
    )


def test_collect_runs_reads_a_sweep_folder_and_skips_unfinished_runs(tmp_path):
    _fake_run(tmp_path / "0", 10.0, 9.5)
    _fake_run(tmp_path / "1", 12.0, 11.0)
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "search.json").write_text("{}")  # killed before arch.json: not a point
    pts = collect_runs([tmp_path])
    assert [(p.name, p.predicted_ms, p.budget_ms) for p in pts] == [("search@10ms", 9.5, 10.0), ("search@12ms", 11.0, 12.0)]
    with pytest.raises(FileNotFoundError, match="pareto.runs"):
        collect_runs([tmp_path / "missing"])


def test_front_files_round_trip_and_plot_has_units(tmp_path):
    pts = _points(10)
    front = non_dominated(pts, "ppl")
    latency = {"backend": "llamacpp", "scenario": "decode", "batch": 1, "context": 256}
    save_front(tmp_path / "pareto.json", pts, front, metric="ppl", latency=latency, header={"device": "x"})
    d = json.loads((tmp_path / "pareto.json").read_text())
    assert d["version"] == 2 and d["front"] == [p.name for p in front] and d["latency"] == latency
    assert [p.name for p in load_points(tmp_path)] == [p.name for p in pts]
    plot_front(tmp_path / "pareto.png", pts, front, metric="ppl", latency=latency, device="cpu-2t")
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_repeated_names_are_made_unique():
    from archquant.search.pareto import unique_names

    pts = [ParetoPoint(name=n) for n in ("full", "a", "full", "a#2", "a", "full")]
    assert [p.name for p in unique_names(pts)] == ["full", "a", "full#2", "a#2", "a#3", "full#3"]


# ---- latency intervals ------------------------------------------------------------------------------
def _timed(name, ms, lo, hi, ppl, level=0.96875):
    return ParetoPoint(name=name, measured_ms=ms, latency_ci_ms=[lo, hi], latency_ci_level=level, ppl=ppl)


def test_the_slo_inside_intervals_is_reported_and_the_pick_keeps_meeting_by_median():
    # the pair: search@13.33ms read 8.05 and uniform-w8 9.92 in one run, 9.44 vs 9.42 in another
    search = _timed("search@13.33ms", 9.0, 8.05, 9.44, ppl=20.0)
    uniform = _timed("uniform-w8", 9.5, 9.1, 9.92, ppl=18.0)
    fast = _timed("search@8ms", 6.0, 5.9, 6.1, ppl=30.0)
    res = pick_point([search, uniform, fast], 9.3)
    assert res.met and res.point.name == "search@13.33ms"  # uniform-w8's median is above the SLO: not picked
    kinds = [(a["kind"], a["name"]) for a in res.ambiguous]
    # search's interval reaches above 9.3; uniform-w8 is more accurate and its interval holds 9.3; and the two
    # overlap; search@8ms is clearly faster and clearly meets: not mentioned
    assert kinds == [("slo", "search@13.33ms"), ("slo", "uniform-w8"), ("order", "uniform-w8")]
    rec = res.ambiguous[1]
    assert rec["latency_ci_ms"] == [9.1, 9.92] and rec["ppl"] == 18.0 and rec["meets"] is False
    assert "may meet" in rec["note"] and rec["more_accurate"] is True and res.ambiguous[0]["more_accurate"] is False
    assert "uniform-w8 (more accurate): its median is above the SLO" in res.message and "[8.050, 9.440]" in res.message
    assert res.to_dict()["ambiguous"] == res.ambiguous


def test_indistinguishable_points_never_cost_quality():
    # a and b overlap; the pick is the more accurate b, whatever the medians' order
    a = _timed("a", 5.0, 4.8, 5.3, ppl=25.0)
    b = _timed("b", 5.2, 4.9, 5.4, ppl=21.0)
    c = _timed("c", 7.0, 6.9, 7.1, ppl=15.0)
    assert indistinguishable(a, b) and not indistinguishable(b, c)
    res = pick_point([a, b, c], 6.0)
    assert res.point.name == "b" and [(x["kind"], x["name"]) for x in res.ambiguous] == [("order", "a")]
    assert res.ambiguous[0]["more_accurate"] is False and "overlaps b's" in res.ambiguous[0]["note"]
    # none meets 4.0: the fastest named is the most accurate of the points indistinguishable from the lowest median
    none = pick_point([a, b, c], 4.0)
    assert not none.met and none.fastest.name == "b" and "(a)" in none.message and none.ambiguous == []
    # the SLO inside intervals while none meets: every such point, most accurate first
    some = pick_point([a, b, c], 4.85)
    assert [x["name"] for x in some.ambiguous] == ["a"] and "may meet" in some.ambiguous[0]["note"]
    some = pick_point([a, b, c], 4.95)
    assert [x["name"] for x in some.ambiguous] == ["b", "a"]


def test_points_without_an_interval_pick_as_before():
    predicted = ParetoPoint(name="pred", predicted_ms=5.0, ppl=10.0)
    timed_once = ParetoPoint(name="once", measured_ms=5.1, ppl=12.0)  # one round: no interval
    wide = _timed("wide", 4.0, 1.0, 9.0, ppl=20.0)
    assert predicted.latency_interval is None and timed_once.latency_interval is None
    assert not indistinguishable(predicted, wide) and not indistinguishable(timed_once, wide)
    res = pick_point([predicted, timed_once, wide], 5.5)
    assert res.point.name == "pred" and res.ambiguous == []
    assert pick_point([predicted, timed_once, wide], 4.5).point.name == "wide"


def test_measured_intervals_round_trip_through_pareto_json(tmp_path):
    vals = {"a": [10.0, 10.2, 9.9, 10.1, 9.8, 10.0], "b": [12.0] * 6}
    timers = {n: (lambda it: lambda: LatencyMeasurement(ms=next(it), method="fake"))(iter(v)) for n, v in vals.items()}
    measured = measure_interleaved(timers, rounds=6)
    pts = [with_measurement(ParetoPoint(name="a", ppl=20.0), measured["a"]),
           with_measurement(ParetoPoint(name="b", ppl=15.0), measured["b"]), ParetoPoint(name="p", predicted_ms=3, ppl=40)]
    assert pts[0].latency_ci_ms == [9.8, 10.2] and pts[0].latency_ci_level == pytest.approx(1 - 2 / 64)
    assert pts[0].extra["measurement"]["samples"] == vals["a"] and pts[0].measured_ms == 10.0
    front = non_dominated(pts, "ppl")
    latency = {"backend": "llamacpp", "scenario": "decode", "batch": 1, "context": 256}
    save_front(tmp_path / "pareto.json", pts, front, metric="ppl", latency=latency, header={})
    back = load_points(tmp_path)
    assert [(p.name, p.latency_ci_ms, p.latency_ci_level, p.latency_interval) for p in back] == [
        (p.name, p.latency_ci_ms, p.latency_ci_level, p.latency_interval) for p in pts]
    assert back[2].latency_interval is None
    assert json.loads((tmp_path / "pareto.json").read_text())["points"][0]["latency_ci_ms"] == [9.8, 10.2]
    assert all(hasattr(back[0], f) for f in MEASURED_FIELDS)
    plot_front(tmp_path / "pareto.png", back, front, metric="ppl", latency=latency, device="cpu-2t")  # error bars
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a version-1 file (no interval fields) still reads, as points without intervals
    d = json.loads((tmp_path / "pareto.json").read_text())
    for p in d["points"]:
        p.pop("latency_ci_ms"), p.pop("latency_ci_level")
    (tmp_path / "v1.json").write_text(json.dumps({**d, "version": 1}))
    assert [p.latency_interval for p in load_points(tmp_path / "v1.json")] == [None, None, None]
    with pytest.raises(ValueError, match="latency_ci_ms"):
        ParetoPoint(name="x", measured_ms=1.0, latency_ci_ms=[2.0, 1.0])


@pytest.mark.parametrize(
    "kwargs,key",
    [({"timing_rounds": 5, "timing_max_rounds": 4}, "pareto.timing_max_rounds"),
     ({"timing_ci": 0}, "pareto.timing_ci"), ({"timing_ci": float("inf")}, "pareto.timing_ci"),
     ({"timing_confidence": 0}, "pareto.timing_confidence"), ({"timing_confidence": 1.5}, "pareto.timing_confidence")],
)
def test_timing_settings_are_validated_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ParetoConfig(**kwargs)
    assert ParetoConfig().timing_max_rounds == 15 and ParetoConfig().timing_ci == 0.03
