"""The joint-vs-sequential experiment's bookkeeping: the run record that carries a front to another machine, and
the points its comparison rests on (the ones scored on the whole test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from archquant.search.compare import Scored, compare_at_targets

SCRIPT = "exp_joint_vs_sequential"


@pytest.fixture(scope="module")
def exp(script):
    return script


def _front(tmp_path: Path) -> tuple[Path, list[dict]]:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- preset=quick\n- run.distill=false\n- hydra.run.dir=x\n")
    points = [{"name": "search@9ms", "source": "search", "arch": {"hidden": 576}},
              {"name": "preset-Q4_0", "source": "preset", "extra": {"preset": "Q4_0", "gguf": "/gone/Q4_0.gguf"}}]
    (run / "pareto.json").write_text(json.dumps({"points": points}))
    return run, points


def test_a_run_folder_leaves_a_record_that_stands_in_for_it(exp, tmp_path):
    run, points = _front(tmp_path)
    record = tmp_path / "results" / "exp.run.json"
    got_run, overrides, got = exp.load_run(str(run), tmp_path / "out", [0.5], [], record)
    # each point also carries the reference its search was replaced by (read from its run folder, here none)
    points = [{**p, "reference": None} for p in points]
    assert got_run == run and overrides == ["preset=quick", "run.distill=false"] and got == points
    assert json.loads(record.read_text()) == {"overrides": overrides, "points": points}
    # on another machine: the record alone gives the same overrides and front (and a folder for the session)
    again = exp.load_run(str(record), tmp_path / "elsewhere", [0.5], [], tmp_path / "unused.json")
    assert again[1:] == (overrides, points) and again[0] == tmp_path / "elsewhere" / "run" and again[0].is_dir()
    assert not (tmp_path / "unused.json").exists()


def test_a_file_that_is_not_a_record_or_a_folder_without_a_front_is_refused_by_name(exp, tmp_path):
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"points": []}))
    with pytest.raises(SystemExit, match="is not a run record"):
        exp.load_run(str(bad), tmp_path, [0.5], [], tmp_path / "r.json")
    run, _ = _front(tmp_path)
    (run / "pareto.json").unlink()
    with pytest.raises(SystemExit, match="has no pareto.json"):
        exp.load_run(str(run), tmp_path, [0.5], [], tmp_path / "r.json")


def test_the_compared_points_are_the_picks_each_familys_best_and_the_speedup_references(exp):
    def pt(name, family, ms, ppl):
        return Scored(name, family, ms, ppl, (ppl / 10, ppl / 10 + 1.0))

    pts = [pt("joint-a", "joint", 9.0, 30.0), pt("joint-b", "joint", 11.0, 29.0),
           pt("pq-fast", "prune_quantise", 8.0, 40.0), pt("pq-slow", "prune_quantise", 12.5, 35.0),
           pt("seq", "sequential_search", 9.5, 33.0), pt("uni-w8", "uniform", 13.0, 28.5),
           pt("uni-w4", "uniform", 8.5, 34.0), pt("Q4_0", "preset", 8.8, 36.0), pt("Q8_0", "preset", 13.5, 28.6),
           pt("original", "original", 12.0, 28.4)]
    comparisons = compare_at_targets(pts, [10.0, 11.5], 511)
    # picks joint-a (10 ms) and joint-b (11.5 ms); at both targets pq-fast, seq and Q4_0 are their families' best;
    # the fastest baseline as accurate as either pick is uni-w8, the fastest such preset the original
    assert exp.needed_names(comparisons, "original") == {"joint-a", "joint-b", "pq-fast", "seq", "Q4_0", "uni-w8",
                                                         "original"}


def test_finer_scores_follow_the_choice_until_it_needs_no_coarse_point(exp):
    """The coarse windows rank 'a' first, the finer ones rank it behind 'b': 'b' is scored finely too, and the
    choice settles on points that all have finer scores; 'c' (never a contender) is not rescored."""
    coarse = {"a": {"ppl": 30.0}, "b": {"ppl": 31.0}, "c": {"ppl": 40.0}}
    finer = {"a": {"ppl": 32.0}, "b": {"ppl": 31.5}, "c": {"ppl": 39.0}}
    asked = []

    def choose(scores):
        return {min(scores, key=lambda n: scores[n]["ppl"])}

    def score(names):
        asked.append(names)
        return {n: finer[n] for n in names}

    fine = exp.refine_scores(coarse, choose, score)
    assert asked == [["a"], ["b"]] and set(fine) == {"a", "b"}
    assert exp._reference({"reference": "uniform-w8", "run_dir": "/elsewhere"}) == "uniform-w8"


def test_the_picture_keeps_collapsed_points_on_its_edge_instead_of_squashing_the_rest(exp, tmp_path):
    rows = [{"name": "original", "family": "original", "ms": 12.0, "ci_ms": [11.5, 12.5], "ppl": 30.0},
            {"name": "search@8ms", "family": "joint", "ms": 10.0, "ci_ms": [9.5, 10.5], "ppl": 33.0},
            {"name": "prune_quantise-w8@8ms", "family": "prune_quantise", "ms": 11.0, "ppl": 522.0},
            {"name": "prune_quantise-w4@8ms", "family": "prune_quantise", "ms": 10.0, "ppl": 34.0,
             "same_as": "uniform-w4"}]
    path = tmp_path / "front.png"
    low, top = exp.plot(rows, [{"target_ms": 11.0}], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the axis spans the comparable points (1.4x the original's perplexity), not the collapsed one at 522
    assert top == pytest.approx(1.4 * 30.0) and low == pytest.approx(0.97 * 30.0)


def test_points_whose_records_hold_the_finer_windows_join_them_and_the_table_says_on_how_many(exp):
    fine = {"a": {"ppl": 31.0, "windows": 589}}
    recorded = {"b": {"ppl": 33.0, "windows": 589}, "c": {"ppl": None, "windows": 589, "unscored": 300}}
    got = exp.with_recorded(fine, ["a", "b", "c"], lambda n: recorded[n])
    assert got == {"a": fine["a"], "b": recorded["b"]} and fine == {"a": {"ppl": 31.0, "windows": 589}}

    def row(name, ppl, windows):
        return {"name": name, "family": "preset", "ms": 10.0, "ci_ms": [9.0, 11.0], "ppl": ppl,
                "ppl_windows": windows, "file_mb": 90.0}

    table = exp.markdown({"points": [row("a", 31.0, 589), row("c", 35.0, 37)], "comparisons": []})
    assert "| ppl | windows | MB |" in table and "| 31.00 | 589 | 90.0 |" in table and "| 35.00 | 37 | 90.0 |" in table
    # one reading for every point: no windows column
    assert "windows" not in exp.markdown({"points": [row("a", 31.0, 589)], "comparisons": []})


def test_the_zero_shot_columns_carry_each_task_with_its_error_and_the_mean_where_every_task_was_scored(exp):
    zs = {"piqa": {"acc": 0.6, "acc_norm": 0.64, "stderr": 0.011, "metric": "acc_norm"},
          "boolq": {"acc": 0.42, "stderr": 0.022, "metric": "acc"}}
    rows = [{"name": "a", "family": "joint", "ms": 10.0, "ppl": 31.0, "file_mb": 90.0, "zero_shot": zs},
            {"name": "b", "family": "preset", "ms": 9.0, "ppl": 35.0, "file_mb": 80.0,
             "zero_shot": {"piqa": zs["piqa"]}},
            {"name": "c", "family": "preset", "ms": 8.0, "ppl": 36.0, "file_mb": 70.0}]
    table = exp.markdown({"points": rows, "comparisons": []}).split("\n")
    assert table[0].endswith("| piqa | boolq | zero-shot mean |") and table[1].count("---") == 8
    by_name = {line.split(" | ")[0].removeprefix("| "): line for line in table[2:5]}
    assert by_name["a"].endswith("| 0.640 +- 0.011 | 0.420 +- 0.022 | 0.530 |")
    assert by_name["b"].endswith("| 0.640 +- 0.011 |  |  |") and by_name["c"].endswith("| 70.0 |  |  |  |")
