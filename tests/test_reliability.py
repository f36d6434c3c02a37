"""What a user relies on: the same command gives the same architecture, and a killed main job resumes to the
same front and pick as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from _tiny import TINY_OVERRIDES as TINY
from _tiny import budget_between, tiny_feasible
from _tiny import compose_config as _cfg


@pytest.fixture(scope="module")
def feasible():
    """The tiny model's feasible latency range under the pinned roofline (so budgets fit any machine)."""
    return tiny_feasible()


def _budget(feasible, frac):
    return budget_between(feasible, frac, digits=4)  # the ladder rounds to 4 digits and names folders by them


def test_the_same_search_twice_gives_the_same_architecture_on_the_tiny_model(tmp_path, feasible):
    from archquant.commands.search import search_job

    ov = TINY + ["search.steps=30", f"budget.latency_ms={_budget(feasible, 0.4)}"]
    a = search_job(_cfg(ov, tmp_path / "a"), progress=False)
    b = search_job(_cfg(ov, tmp_path / "b"), progress=False)
    assert (tmp_path / "a" / "arch.json").read_text() == (tmp_path / "b" / "arch.json").read_text()
    assert [h["kd"] for h in a.history] == [h["kd"] for h in b.history]  # the whole trajectory, not just the end


def test_a_main_job_killed_mid_search_resumes_to_the_uninterrupted_front_and_pick(tmp_path, feasible):
    """SIGKILL while the second search of the ladder runs; ``resume=<run folder>`` finishes it; the front and
    the pick equal those of a run that was never killed. Latency is the prediction here (``pareto.measure=false``):
    measured timings differ between any two runs, resumed or not, and are not what a resume must preserve."""
    from archquant.commands.run import main_job

    low, high = _budget(feasible, 0.3), _budget(feasible, 0.8)
    ov = TINY + [f"run.budgets_ms=[{low},{high}]", "pareto.measure=false", "run.distill=false", "run.export=false",
                 "run.evaluate=false", "run.slo_fraction=0.9"]
    ref = main_job(_cfg(ov, tmp_path / "ref"))

    run = tmp_path / "run"
    second = run / "searches" / f"latency_{high:g}ms"
    exe = os.path.join(os.path.dirname(sys.executable), "archquant-run")
    proc = subprocess.Popen([sys.executable, exe, *ov, f"hydra.run.dir={run}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list((second / "checkpoints").glob("step-*.ckpt")):
            assert proc.poll() is None, "the main job ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert (run / "searches" / f"latency_{low:g}ms" / "arch.json").exists()  # the first search had finished
    assert not (second / "arch.json").exists() and not (run / "pareto.json").exists()  # killed mid-search

    resumed = main_job(_cfg(ov + [f"resume={run}"], tmp_path / "hydra"))
    assert resumed["front"] == ref["front"] and resumed["slo_ms"] == ref["slo_ms"]
    assert resumed["picked"]["point"]["name"] == ref["picked"]["point"]["name"]
    for name in ("pareto.json", "picked.json"):
        assert _record(tmp_path / "ref", name) == _record(run, name)


def _record(folder, name):
    """A run's JSON record with its folder's path and the run header (dates, argv) taken out."""
    rec = json.loads((folder / name).read_text().replace(str(folder), "<run>"))
    rec.pop("header")
    return rec


@pytest.mark.slow
def test_the_same_search_twice_gives_the_same_architecture_on_smollm2(tmp_path):
    """The main job's search (llama.cpp latency, the quick preset's settings), twice from scratch."""
    from archquant.commands.search import search_job
    from archquant.commands.session import Session

    ov = ["preset=quick", "search.steps=8", "logger=none", "trainer.num_threads=2"]
    # the budget sits inside whatever table this machine has for trainer.num_threads=2 (the session reads that
    # count's table whatever torch's count is now); a fixed 12 ms lay above one machine's full model
    feasible = Session.load(_cfg(ov, tmp_path)).feasible()
    ov.append(f"budget.latency_ms={_budget(feasible, 0.6)}")
    search_job(_cfg(ov, tmp_path / "a"), progress=False)
    search_job(_cfg(ov, tmp_path / "b"), progress=False)
    a, b = (json.loads((tmp_path / d / "arch.json").read_text()) for d in ("a", "b"))
    assert a == b
    ha, hb = (json.loads((tmp_path / d / "search.json").read_text())["history"] for d in ("a", "b"))
    assert [h["kd"] for h in ha] == [h["kd"] for h in hb]
