"""The search commands end to end on the tiny Llama: CLI errors, kill -9 + resume, 2-process DDP, Pareto + pick."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _tiny import TINY_OVERRIDES as TINY
from _tiny import budget_between, tiny_feasible
from _tiny import compose_config as _cfg

from archquant.utils.errors import UserError


def _cli(verb: str) -> str:
    exe = shutil.which(f"archquant-{verb}")
    if exe is None:
        pytest.skip(f"archquant-{verb} is not on PATH (pip install -e .)")
    return exe


@pytest.fixture(scope="module")
def feasible():
    """The tiny model's feasible latency range under the pinned roofline (so budgets fit any machine)."""
    return tiny_feasible()


def _budget(feasible, frac):
    return budget_between(feasible, frac)


def test_infeasible_budget_is_refused_before_training_with_the_range(tmp_path, feasible, capsys):
    from archquant.cli import run_verb
    from archquant.commands.search import search_job
    from archquant.search.budget import BudgetError
    from archquant.utils.errors import EXIT_USER_ERROR

    cfg = _cfg(TINY + [f"budget.latency_ms={feasible.min_ms / 2}"], tmp_path)
    with pytest.raises(BudgetError, match=r"below the smallest subnet.*feasible range is"):
        search_job(cfg)
    assert not (tmp_path / "checkpoints").exists()  # nothing was trained
    cfg = _cfg(TINY + [f"budget.latency_ms={feasible.max_ms * 3}"], tmp_path)
    with pytest.raises(BudgetError, match="above the full model"):
        search_job(cfg)
    # the command: one line on stderr naming the range, exit code 2, no traceback
    with pytest.raises(SystemExit) as err:
        run_verb("search", cfg)
    assert err.value.code == EXIT_USER_ERROR
    err_text = capsys.readouterr().err
    msg = err_text.strip().splitlines()[-1]  # (a roofline warning may come before it)
    assert msg.startswith("archquant-search: ") and "above the full model" in msg and "Traceback" not in err_text


def test_session_reads_the_latency_table_of_the_configured_thread_count(tmp_path, monkeypatch):
    """On CPU the device name, hence the table found, carries the thread count: a session reads the table of
    ``trainer.num_threads`` (the count its stages run and time with), not of whatever torch's count is when a
    Python-API user first asks for the feasible range, and leaves torch's count as it found it."""
    import torch

    import archquant.commands.session as session_mod
    from archquant.commands.session import Session
    from archquant.utils.env import device_name, torch_threads

    seen = []
    real = session_mod.load_table_for
    monkeypatch.setattr(session_mod, "load_table_for", lambda *a, **k: (seen.append(device_name("cpu")), real(*a, **k))[1])
    with torch_threads(1):
        session = Session.load(_cfg(TINY + ["trainer.num_threads=3"], tmp_path))
        session.feasible()
        assert torch.get_num_threads() == 1
        assert seen == [device_name("cpu").removesuffix("-1t") + "-3t"]
        assert session.where().endswith("-3t")
        # 0 leaves torch's count: the table of the threads the process runs with
        unset = Session.load(_cfg(TINY + ["trainer.num_threads=0"], tmp_path))
        unset.feasible()
        assert seen[-1].endswith("-1t") and torch.get_num_threads() == 1


def test_killed_search_resumes_to_the_same_architecture(tmp_path, feasible):
    from archquant.commands.search import search_job
    from archquant.training.checkpoint import ResumeMismatchError

    ov = TINY + ["search.steps=80", f"budget.latency_ms={_budget(feasible, 0.5)}"]
    ref = search_job(_cfg(ov, tmp_path / "ref"), progress=False)

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, _cli("search"), *ov, f"hydra.run.dir={run}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((run / "checkpoints").glob("step-*.ckpt")):
            assert proc.poll() is None, "the search ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "arch.json").exists()  # killed mid-search
    done = sorted(int(p.name[5:13]) for p in (run / "checkpoints").glob("step-*.ckpt"))
    assert done and done[-1] < 80

    resumed = search_job(_cfg(ov + [f"resume={run}"], tmp_path / "hydra2"), progress=False)
    assert resumed.arch == ref.arch
    rec_ref = json.loads((tmp_path / "ref" / "search.json").read_text())
    rec_run = json.loads((run / "search.json").read_text())
    assert [h["kd"] for h in rec_run["history"]] == [h["kd"] for h in rec_ref["history"]]

    # a resume under another config is refused, naming the key
    with pytest.raises(ResumeMismatchError, match=r"budget\.latency_ms \(checkpoint"):
        search_job(_cfg(TINY + ["search.steps=80", f"budget.latency_ms={_budget(feasible, 0.6)}", f"resume={run}"], tmp_path))


def test_two_process_gloo_search_follows_the_single_process_one(tmp_path, feasible):
    ov = TINY + ["search.steps=20", "search.batch_size=2", f"budget.latency_ms={_budget(feasible, 0.5)}"]
    from archquant.commands.search import search_job

    single = search_job(_cfg(ov, tmp_path / "one"), progress=False)
    out = tmp_path / "ddp"
    res = subprocess.run([sys.executable, _cli("search"), *ov, "trainer=ddp_cpu", "trainer.num_threads=1",
                          f"hydra.run.dir={out}"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "train_ddp_process_1.log").exists()  # a second process really ran
    rec = json.loads((out / "search.json").read_text())
    one = json.loads((tmp_path / "one" / "search.json").read_text())
    # the same global batch split over two processes (1 thread each vs 2 threads), gradients averaged: the
    # same trajectory up to float summation order. Adam divides by the gradient's running RMS, so that noise
    # in near-zero gradients moves the logits by ~1e-4 relative per step and KD (~4e-3 nats here) by <1%
    # after 20 steps; the chosen subnet must not move at all
    assert len(rec["history"]) == len(one["history"]) == 20
    for a, b in zip(rec["history"], one["history"]):
        assert a["kd"] == pytest.approx(b["kd"], rel=2e-2, abs=1e-5)
        assert a["expected_ms"] == pytest.approx(b["expected_ms"], rel=2e-3)
    assert json.loads((out / "arch.json").read_text()) == single.arch.to_dict()


def test_pareto_and_pick_on_two_searches(tmp_path, feasible, monkeypatch):
    from archquant.commands.pareto import pareto_job
    from archquant.commands.pick import pick_job
    from archquant.commands.search import search_job
    from archquant.commands.session import Session
    from archquant.search.pick import indistinguishable

    cfg0 = _cfg(TINY, tmp_path)
    session = Session.load(cfg0)
    for frac in (0.2, 0.7):
        b = _budget(feasible, frac)
        search_job(_cfg(TINY + ["search.steps=20", f"budget.latency_ms={b}"], tmp_path), session=session,
                   out_dir=tmp_path / "sweep" / f"{frac}", progress=False)
    shutil.copytree(tmp_path / "sweep" / "0.2", tmp_path / "sweep" / "0.2-again")  # the same subnet twice
    cfg = _cfg(TINY + [f"pareto.runs=[{tmp_path / 'sweep'}]", "pareto.timing_max_rounds=4"], tmp_path)
    points, front = pareto_job(cfg, session=session)
    assert {p.source for p in points} == {"search", "full"} and len(points) == 4
    twins = [p for p in points if p.run_dir and Path(p.run_dir).name.startswith("0.2")]
    assert twins[0].measured_ms == twins[1].measured_ms and twins[1].extra["same_arch_as"] == twins[0].name
    points = [p for p in points if p is not twins[1]]
    for p in points:
        assert p.measured_ms > 0 and p.ppl > 1 and "torch" in p.measured_by
        rounds = p.extra["measurement"]["rounds"]
        assert 3 <= rounds <= 4 and f"{rounds} interleaved rounds" in p.measured_by  # pareto.timing_max_rounds=4
        assert len(p.extra["measurement"]["samples"]) == rounds
        lo, hi = p.latency_ci_ms
        assert lo <= p.measured_ms <= hi
    cached = json.loads((tmp_path / "sweep" / "0.7" / "point.json").read_text())["values"]
    assert "ppl" in cached and "measured_ms" not in cached  # latency is never cached: always timed together

    ppl_mod = importlib.import_module("archquant.evaluation.perplexity")  # the package re-exports the function
    real = ppl_mod.perplexity

    def only_the_original(model, *a, **k):  # the original has no run folder, hence no cache
        assert model is session.model, "perplexity recomputed for a searched point although its point.json matches"
        return real(model, *a, **k)

    monkeypatch.setattr(ppl_mod, "perplexity", only_the_original)
    again, again_front = pareto_job(cfg, session=session)  # searched points' quality from the cache, latency timed afresh
    assert {p.name: p.ppl for p in again if p.source == "search"} == {p.name: p.ppl for p in twins + points if p.source == "search"}
    monkeypatch.undo()
    rec = json.loads((tmp_path / "pareto.json").read_text())
    # pareto.json is the second call's: its front (timed afresh, so on a busy machine not always the first's)
    assert set(rec["front"]) == {p.name for p in again_front} and rec["metric"] == "ppl"
    assert (tmp_path / "pareto.png").exists()
    assert all((tmp_path / "sweep" / f / "point.json").exists() for f in ("0.2", "0.7"))  # evaluation cache

    # the pick reads pareto.json as the second call wrote it: its latencies, not the first call's (the points
    # are timed afresh on every call, and on a busy machine their order may change between calls)
    points = [p for p in again if not p.extra.get("same_arch_as")]
    fastest = min(points, key=lambda p: p.measured_ms)
    slowest = max(points, key=lambda p: p.measured_ms)
    picked = pick_job(_cfg(TINY + [f"slo.latency_ms={slowest.measured_ms}", f"slo.front={tmp_path}"], tmp_path))
    assert picked.met and picked.point.ppl == min(p.ppl for p in points)
    none = pick_job(_cfg(TINY + [f"slo.latency_ms={fastest.measured_ms / 10}", f"slo.front={tmp_path}"], tmp_path))
    # the fastest, or a more accurate point the timing cannot tell from it (overlapping intervals)
    assert not none.met and (none.fastest.name == fastest.name or indistinguishable(none.fastest, fastest))
    saved = json.loads((tmp_path / "picked.json").read_text())
    assert saved["met"] is False and "no point meets" in saved["message"]
    # as a command: exit code 3 when no point meets the SLO (picked.json written all the same), 0 when one does
    from archquant.cli import run_verb
    from archquant.utils.errors import EXIT_OK, EXIT_SLO_UNMET

    (tmp_path / "picked.json").unlink()
    unmet = _cfg(TINY + [f"slo.latency_ms={fastest.measured_ms / 10}", f"slo.front={tmp_path}"], tmp_path)
    assert run_verb("pick", unmet) == EXIT_SLO_UNMET
    assert json.loads((tmp_path / "picked.json").read_text())["met"] is False
    met = _cfg(TINY + [f"slo.latency_ms={slowest.measured_ms}", f"slo.front={tmp_path}"], tmp_path)
    assert run_verb("pick", met) == EXIT_OK


def test_main_job_on_the_tiny_model(tmp_path, feasible):
    from archquant.commands.run import main_job

    ov = TINY + [
        "search.steps=10",
        f"run.budgets_ms=[{_budget(feasible, 0.3)},{_budget(feasible, 0.8)}]",  # inside the range on any roofline
        "distill=quick",
        "distill.steps=2",
        "distill.batch_size=2",
        "distill.ppl_windows=1",
        "eval.tasks=[piqa]",
        "eval.limit=4",
        "eval.progress=false",
    ]
    rec = main_job(_cfg(ov, tmp_path))
    assert len(rec["searches"]) == 2 and all((Path(s) / "arch.json").exists() for s in rec["searches"])
    for name in ("pareto.json", "pareto.png", "picked.json", "eval.json", "run.json"):
        assert (tmp_path / name).exists(), name
    assert rec["slo_ms"] > 0 and rec["picked"]["message"]
    assert rec["stages"]["distill"].startswith("done"), rec["stages"]
    assert rec["stages"]["export"].startswith("done"), rec["stages"]
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["full"]["tasks"]["piqa"]["n"] == 4 and ev["picked"]["perplexity"]["ppl"] > 1
    # a resumed main job keeps the finished searches (no new checkpoints written)
    before = {p: p.stat().st_mtime for p in tmp_path.rglob("searches/*/arch.json")}
    main_job(_cfg(ov + [f"resume={tmp_path}", "run.distill=false", "run.export=false", "run.evaluate=false"], tmp_path / "x"))
    assert {p: p.stat().st_mtime for p in tmp_path.rglob("searches/*/arch.json")} == before


def test_uniform_reference_points_join_the_front_and_export_when_picked(tmp_path, feasible):
    from archquant.commands.pareto import pareto_job
    from archquant.commands.pick import pick_job
    from archquant.commands.run import distill_and_export
    from archquant.commands.search import search_job
    from archquant.commands.session import Session
    from archquant.core.arch import Arch

    cfg0 = _cfg(TINY, tmp_path)
    session = Session.load(cfg0)
    search_job(_cfg(TINY + ["search.steps=4", f"budget.latency_ms={_budget(feasible, 0.5)}"], tmp_path), session=session,
               out_dir=tmp_path / "sweep" / "a", progress=False)
    cfg = _cfg(TINY + [f"pareto.runs=[{tmp_path / 'sweep'}]", "pareto.uniform_bits=[8,4]"], tmp_path)
    points, _ = pareto_job(cfg, session=session)
    uniform = {p.name: p for p in points if p.source == "uniform"}
    assert set(uniform) == {"uniform-w8", "uniform-w4"}
    for b in (8, 4):
        p = uniform[f"uniform-w{b}"]
        arch = Arch.from_dict(p.arch)
        assert arch.lm_head_bits == b and all(set(la.wbits.values()) == {b} for la in arch.layers)
        assert arch.hidden == max(session.space.hidden) and all(la.keep for la in arch.layers)
        assert p.measured_ms > 0 and p.ppl > 1
    assert uniform["uniform-w4"].predicted_mb < uniform["uniform-w8"].predicted_mb
    slowest = max(p.measured_ms for p in points)
    pick_job(_cfg(TINY + [f"slo.latency_ms={slowest}", f"slo.front={tmp_path}"], tmp_path))  # the main job's record
    notes, model = distill_and_export(_cfg(TINY + ["run.distill=false"], tmp_path), session, tmp_path, uniform["uniform-w4"])
    assert notes["export"].startswith("done"), notes
    exported = json.loads((tmp_path / "export" / "archquant.json").read_text())
    assert exported["arch"] == uniform["uniform-w4"].arch  # the picked reference point's record is what was exported
    assert model.config.quant["lm_head_bits"] == 4

    with pytest.raises(UserError, match="pareto.uniform_bits has 3"):
        pareto_job(_cfg(TINY + [f"pareto.runs=[{tmp_path / 'sweep'}]", "pareto.uniform_bits=[3]"], tmp_path), session=session)


def test_prune_quantise_baseline_joins_the_front_at_the_searched_budgets(tmp_path, feasible):
    from archquant.commands.pareto import pareto_job
    from archquant.commands.search import search_job
    from archquant.commands.session import Session
    from archquant.core.arch import Arch
    from archquant.search.baselines import BaselineError, prune_quantise

    session = Session.load(_cfg(TINY, tmp_path))
    lm, space = session.latency_model, session.space
    lo, hi = feasible.min_ms, feasible.max_ms
    cands = {(c.bits, c.target_ms): c for c in prune_quantise(space, lm, [lo * 0.5, lo + 0.5 * (hi - lo), hi])}
    for b in (8, 4):
        assert cands[(b, lo * 0.5)].arch is None  # below the fastest subnet: reported, not dropped
        mid, top = cands[(b, lo + 0.5 * (hi - lo))], cands[(b, hi)]
        for c in (mid, top):
            assert c.predicted_ms <= c.target_ms and c.arch.is_uniform()
            assert all(la.keep and set(la.wbits.values()) == {b} for la in c.arch.layers)
        assert top.predicted_mb >= mid.predicted_mb  # a looser target never prunes more
        # the largest shape meeting the target: no uniform shape of more MB at these bits fits
        assert Arch.full(space, bits=b).to_dict() == top.arch.to_dict()

    budget = _budget(feasible, 0.5)
    search_job(_cfg(TINY + ["search.steps=4", f"budget.latency_ms={budget}"], tmp_path), session=session,
               out_dir=tmp_path / "sweep" / "a", progress=False)
    cfg = _cfg(TINY + [f"pareto.runs=[{tmp_path / 'sweep'}]", "pareto.baselines=[prune_quantise]"], tmp_path)
    points, _ = pareto_job(cfg, session=session)
    base = [p for p in points if p.extra.get("baseline") == "prune_quantise"]
    assert {p.extra["bits"] for p in base} == {8, 4} and all(p.budget_ms == budget for p in base)
    for p in base:
        assert p.extra.get("unmet") or (p.measured_ms > 0 and p.ppl > 1)
    with pytest.raises(BaselineError, match=r"'sequential'.*prune_quantise"):
        _cfg(TINY + ["pareto.baselines=[sequential]"], tmp_path)


def test_a_search_result_worse_than_a_reference_meeting_the_budget_is_replaced(tmp_path, feasible):
    from archquant.commands.search import check_references, model_kd
    from archquant.commands.session import Session
    from archquant.core.arch import Arch
    from archquant.search.result import SearchResult

    cfg = _cfg(TINY + [f"budget.latency_ms={feasible.max_ms}"], tmp_path)
    session = Session.load(cfg)
    _, val = session.targets()
    space = session.space
    gates = space.gates()
    worst = {n: v[-1] for n, v in gates.items()}  # narrowest, lowest bits, blocks skipped
    worst.update({f"layers.{i}.keep": 1 for i in range(space.num_layers)})
    bad = Arch.from_choices(space, worst)
    lm = session.latency_model
    res = SearchResult(arch=bad, predicted_ms=lm.predict_ms(bad), predicted_mb=lm.predict_mb(bad),
                       argmax_predicted_ms=lm.predict_ms(bad), meets_budget=True, stop_reason="max_steps", steps=1)
    out = check_references(res, session, cfg, val)
    assert out.reference is not None and out.reference["searched_val_kd"] > out.reference["val_kd"]
    assert out.arch.to_dict() != bad.to_dict() and out.predicted_ms <= feasible.max_ms * (1 + 1e-6)
    assert abs(model_kd(session.materialize(out.arch), val, cfg.search.kd_temperature) - out.val_kd) < 1e-6
    again = check_references(out, session, cfg, val)  # the best reference is not replaced by itself
    assert again.arch.to_dict() == out.arch.to_dict()


def test_references_keep_the_lm_head_at_more_bits_where_the_budget_allows(tmp_path, feasible):
    from archquant.commands.session import Session
    from archquant.search.baselines import reference_candidates

    session = Session.load(_cfg(TINY, tmp_path))
    lm, space = session.latency_model, session.space
    refs = dict(reference_candidates(space, lm, feasible.max_ms))
    assert {"uniform-w8", "uniform-w4", "uniform-w4-head8", "uniform-w4-head16", "uniform-w8-head16"} <= set(refs)
    mixed = refs["uniform-w4-head8"]
    assert mixed.lm_head_bits == 8 and all(set(la.wbits.values()) == {4} and la.keep for la in mixed.layers)
    assert lm.predict_ms(refs["uniform-w4"]) < lm.predict_ms(mixed) < lm.predict_ms(refs["uniform-w4-head16"])
    tight = dict(reference_candidates(space, lm, lm.predict_ms(refs["uniform-w4"])))
    assert "uniform-w4" in tight and not any(name.startswith("uniform-w4-head") for name in tight)


def test_sequential_search_baseline_searches_at_16_bits_then_quantises(tmp_path, feasible):
    from archquant.commands.pareto import pareto_job
    from archquant.commands.search import search_job
    from archquant.commands.session import Session
    from archquant.core.arch import Arch
    from archquant.search.baselines import room_budget

    session = Session.load(_cfg(TINY, tmp_path))
    budget = _budget(feasible, 0.5)
    search_job(_cfg(TINY + ["search.steps=4", f"budget.latency_ms={budget}"], tmp_path), session=session,
               out_dir=tmp_path / "sweep" / "a", progress=False)
    cfg = _cfg(TINY + ["search.steps=4", f"pareto.runs=[{tmp_path / 'sweep'}]", "pareto.baselines=[sequential_search]"],
               tmp_path / "out")
    points, _ = pareto_job(cfg, session=session)
    base = {p.extra["bits"]: p for p in points if p.extra.get("baseline") == "sequential_search"}
    assert set(base) == {8, 4} and not base[8].extra.get("unmet")
    lm = session.latency_model
    for b, p in base.items():
        room = room_budget(session.space, lm, budget, b)
        assert p.extra["search_budget_ms"] == pytest.approx(room, rel=1e-3) and room > budget  # room for quantising
        if p.extra.get("unmet"):
            continue
        arch = Arch.from_dict(p.arch)
        assert arch.lm_head_bits == b and all(set(la.wbits.values()) == {b} for la in arch.layers if la.keep)
        assert p.extra["meets_target"] == (lm.predict_ms(arch) <= budget * (1 + 1e-6))
        folder = tmp_path / "out" / "baselines" / "sequential_search" / f"w{b}_{budget:g}ms"
        searched = json.loads((folder / "search.json").read_text())
        assert searched["space"]["wbits"] == [16]  # the architecture was searched with the bits fixed at 16
        assert searched["budget"]["latency_ms"] == pytest.approx(room, rel=1e-6)
        assert Arch.load(folder / "arch.json").hidden == arch.hidden
    again, _ = pareto_job(cfg, session=session)  # a rerun reuses the baseline searches
    assert {p.name: p.arch for p in again if p.source == "baseline"} == {p.name: p.arch for p in base.values()}
