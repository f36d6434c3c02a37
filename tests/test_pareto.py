"""Pareto front and SLO pick: non-dominated set against brute force, pick semantics, files written."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from archquant.search.pareto import (
    ParetoPoint,
    collect_runs,
    load_points,
    non_dominated,
    plot_front,
    resolve_metric,
    save_front,
)
from archquant.search.pick import pick_point


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
    assert d["version"] == 1 and d["front"] == [p.name for p in front] and d["latency"] == latency
    assert [p.name for p in load_points(tmp_path)] == [p.name for p in pts]
    plot_front(tmp_path / "pareto.png", pts, front, metric="ppl", latency=latency, device="cpu-2t")
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_repeated_names_are_made_unique():
    from archquant.search.pareto import unique_names

    pts = [ParetoPoint(name=n) for n in ("full", "a", "full", "a#2", "a", "full")]
    assert [p.name for p in unique_names(pts)] == ["full", "a", "full#2", "a#2", "a#3", "full#3"]
