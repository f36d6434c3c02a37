"""The search loop on the contract fakes: budgets met, pruning, resume, NaN guard, budget checks, repair."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from lightning.fabric import Fabric
from test_search_fakes import VOCAB, AnalyticLatency, FakeSupernet, tiny_space

from archquant.core.arch import Arch
from archquant.search.budget import BudgetError, argmax_choices, check_budget, feasible_range, repair_to_budget
from archquant.search.config import BudgetConfig, SearchConfig
from archquant.search.loop import ArchSearch, SearchSetupError, run_search
from archquant.search.teacher import compute_teacher_targets
from archquant.training import NonFiniteLossError, ResumeMismatchError

torch.set_num_threads(1)


def _setup(seed=0):
    space = tiny_space()
    sn = FakeSupernet(space, seed=seed)
    lm = AnalyticLatency(space, seed=seed)
    ids = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(seed))
    teacher = compute_teacher_targets(sn.teacher(), ids, topk=8, temperature=1.0)
    return space, sn, lm, teacher


def _cfg(**kw):
    base = dict(steps=60, batch_size=4, arch_lr=0.1, warmup_steps=5, prune_every=5, checkpoint_every=10)
    return SearchConfig(**{**base, **kw})


def _mid_budget(lm, space, frac=0.5):
    rng = feasible_range(lm, space)
    return BudgetConfig(latency_ms=rng.min_ms + frac * (rng.max_ms - rng.min_ms))


def _fabric():
    return Fabric(accelerator="cpu", devices=1, loggers=[])


def test_search_meets_the_latency_budget_and_records_its_history(tmp_path):
    space, sn, lm, teacher = _setup()
    budget = _mid_budget(lm, space)
    res = run_search(sn, lm, teacher, _cfg(repair=False), budget, tmp_path, progress=False)
    assert res.meets_budget and res.predicted_ms <= budget.latency_ms
    assert res.predicted_ms == pytest.approx(lm.predict_ms(res.arch))
    # the KD term keeps it from collapsing to the smallest subnet
    assert res.predicted_ms > feasible_range(lm, space).min_ms
    assert [h["step"] for h in res.history] == list(range(res.steps))
    assert {"kd", "lat_penalty", "expected_ms", "tau", "open_gates", "step_s"} <= set(res.history[0])


def test_without_a_budget_kd_alone_keeps_the_full_model(tmp_path):
    space, sn, lm, teacher = _setup()
    res = run_search(sn, lm, teacher, _cfg(), BudgetConfig(), tmp_path, progress=False)
    assert res.arch == Arch.full(space)


def test_penalty_does_not_bite_during_warmup(tmp_path):
    space, sn, lm, teacher = _setup()
    budget = _mid_budget(lm, space, 0.1)
    res = run_search(sn, lm, teacher, _cfg(steps=8, warmup_steps=4), budget, tmp_path, progress=False)
    for h in res.history:
        assert h["lat_penalty"] > 0  # the full-ish start violates a tight budget
        if h["step"] < 4:
            assert h["loss"] == pytest.approx(h["kd"], rel=1e-6)
        else:
            assert h["loss"] > h["kd"] + 1e-6


def test_entropy_pruner_fixes_gates_and_the_search_stops_when_all_are_fixed(tmp_path):
    space, sn, lm, teacher = _setup()
    res = run_search(sn, lm, teacher, _cfg(steps=400, arch_lr=0.3), _mid_budget(lm, space), tmp_path, progress=False)
    assert res.stop_reason == "all gates fixed" and res.steps < 400
    opens = [h["open_gates"] for h in res.history]
    assert opens == sorted(opens, reverse=True) and opens[-1] == 0
    assert set(res.fixed) == set(space.searchable())
    assert all(rec["step"] >= 5 and (rec["step"] + 1) % 5 == 0 for rec in res.fixed.values())  # after warm-up, on period
    assert sn.dropped == list(res.fixed)  # fix_gate was called once per gate, in that order
    # fixed gates are the argmax of the result
    for name, rec in res.fixed.items():
        assert res.arch.to_choices(space)[name] == rec["value"]


def test_killed_search_resumes_to_the_same_architecture(tmp_path):
    cfg = _cfg(steps=40)
    space, sn, lm, teacher = _setup()
    budget = _mid_budget(lm, space)
    ref = run_search(sn, lm, teacher, cfg, budget, tmp_path / "ref", progress=False)

    space, sn, lm, teacher = _setup()

    class Killed(ArchSearch):
        def after_step(self, step, metrics):
            super().after_step(step, metrics)
            if step == 23:
                raise KeyboardInterrupt("killed")

    loop = Killed(_fabric(), sn, lm, teacher, cfg, budget, tmp_path / "run", identity={"b": budget.latency_ms}, progress=False)
    loop.prepare(False)
    with pytest.raises(KeyboardInterrupt):
        loop.fit()
    space, sn, lm, teacher = _setup()  # a fresh process: fresh supernet
    res = run_search(sn, lm, teacher, cfg, budget, tmp_path / "run", identity={"b": budget.latency_ms}, resume=True, progress=False)
    assert res.arch == ref.arch
    assert [h["kd"] for h in res.history] == [h["kd"] for h in ref.history]
    assert res.fixed == ref.fixed


def test_resume_with_another_budget_is_refused_naming_the_key(tmp_path):
    space, sn, lm, teacher = _setup()
    budget = _mid_budget(lm, space)
    run_search(sn, lm, teacher, _cfg(steps=10), budget, tmp_path, progress=False)
    other = dataclasses.replace(budget, latency_ms=budget.latency_ms * 1.1)
    with pytest.raises(ResumeMismatchError, match=r"budget\.latency_ms"):
        run_search(FakeSupernet(space), lm, teacher, _cfg(steps=10), other, tmp_path, resume=True, progress=False)


def test_nan_loss_stops_at_its_step_and_keeps_the_last_checkpoint(tmp_path):
    space, sn, lm, teacher = _setup()
    budget = _mid_budget(lm, space)
    calls = {"n": 0}
    real = lm.expected_ms

    def flaky(probs):
        calls["n"] += 1
        return real(probs) * (float("nan") if calls["n"] == 14 else 1.0)  # step 13 (0-based)

    lm.expected_ms = flaky
    with pytest.raises(NonFiniteLossError, match=r"at step 13.*step-00000010\.ckpt"):
        run_search(sn, lm, teacher, _cfg(steps=30), budget, tmp_path, progress=False)
    assert (tmp_path / "checkpoints" / "step-00000010.ckpt").exists()


def test_trainable_weights_move_and_survive_resume(tmp_path):
    space, sn, lm, teacher = _setup()
    cfg = _cfg(steps=10, weight_lr=1e-2)
    before = sn.table.detach().clone()
    run_search(sn, lm, teacher, cfg, BudgetConfig(), tmp_path, identity={"lr": 1e-2}, progress=False)
    assert not torch.equal(sn.table, before)
    fresh = FakeSupernet(space)
    loop = ArchSearch(_fabric(), fresh, lm, teacher, cfg, BudgetConfig(), tmp_path, identity={"lr": 1e-2}, progress=False)
    loop.prepare(True)
    assert torch.equal(fresh.table, sn.table)
    assert loop.weight_opt.state_dict()["state"]  # Adam moments restored too


def test_batch_must_split_evenly_and_fit_the_data(tmp_path):
    space, sn, lm, teacher = _setup()

    class TwoProcs:
        world_size, global_rank, device = 2, 0, torch.device("cpu")

    with pytest.raises(SearchSetupError, match="divisible"):
        ArchSearch(TwoProcs(), sn, lm, teacher, _cfg(batch_size=3), BudgetConfig(), tmp_path, identity={})
    with pytest.raises(SearchSetupError, match="num_calib_blocks"):
        ArchSearch(_fabric(), sn, lm, teacher, _cfg(batch_size=32), BudgetConfig(), tmp_path, identity={})


def test_infeasible_and_pointless_budgets_are_refused_with_the_range():
    space = tiny_space()
    lm = AnalyticLatency(space)
    rng = feasible_range(lm, space)
    with pytest.raises(BudgetError, match=r"below the smallest subnet.*feasible range is"):
        check_budget(lm, space, BudgetConfig(latency_ms=rng.min_ms * 0.5))
    with pytest.raises(BudgetError, match=r"above the full model.*feasible range is"):
        check_budget(lm, space, BudgetConfig(latency_ms=rng.max_ms * 2))
    with pytest.raises(BudgetError, match=r"budget\.memory_mb"):
        check_budget(lm, space, BudgetConfig(memory_mb=rng.min_mb * 0.5))
    assert check_budget(lm, space, BudgetConfig(latency_ms=(rng.min_ms + rng.max_ms) / 2)) == rng


def test_repair_moves_open_gates_until_the_budget_is_met():
    space = tiny_space()
    lm = AnalyticLatency(space)
    probs = {n: torch.softmax(torch.linspace(1, 0, len(o)), 0) for n, o in space.gates().items()}  # argmax = full
    choice = argmax_choices(space, probs)
    budget = _mid_budget(lm, space, 0.4)
    open_gates = list(space.searchable())[2:]  # the first two stay fixed
    fixed_part = {g: choice[g] for g in list(space.searchable())[:2]}
    new, rep = repair_to_budget(space, lm, choice, probs, budget, open_gates)
    arch = Arch.from_choices(space, new)
    assert rep.excess == 0 and lm.predict_ms(arch) <= budget.latency_ms
    assert all(new[g] == v for g, v in fixed_part.items())
    assert all(g in open_gates for g, _, _ in rep.moves)
    # greedy stops as soon as it is met: undoing the last move breaks the budget
    g, old, _ = rep.moves[-1]
    assert lm.predict_ms(Arch.from_choices(space, {**new, g: old})) > budget.latency_ms
