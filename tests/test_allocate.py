"""Greedy bit allocation by measured sensitivity (``search.allocate``) and its place among the references."""

from __future__ import annotations

import pytest

from archquant.commands.session import Session
from archquant.core.arch import Arch
from archquant.search.allocate import allocate, base_arch, bits_gates, measure, quantised_choices, refine
from tests._tiny import TINY_OVERRIDES, compose_config

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return Session.load(compose_config(TINY_OVERRIDES, tmp_path_factory.mktemp("alloc")))


def _synthetic_kd(space, weights):
    """An additive KD: each gate below its top quantised choice costs ``weights[gate]`` per step down."""
    def kd_of(arch):
        choice = arch.to_choices(space)
        total = 0.0
        for g in bits_gates(space):
            steps = quantised_choices(space, g)
            total += weights.get(g, 0.01) * steps.index(choice[g])
        return total

    return kd_of


def test_sensitivity_is_one_kd_per_gate_and_lower_choice(session):
    space, lm = session.space, session.latency_model
    calls = []
    kd = _synthetic_kd(space, {"lm_head.wbits": 5.0})
    sens = measure(space, lm, lambda a: calls.append(a) or kd(a))
    gates = bits_gates(space)
    assert gates and set(sens.kd) == set(gates)
    assert len(calls) == 1 + sum(len(quantised_choices(space, g)) - 1 for g in gates)
    assert sens.kd["lm_head.wbits"][4] == pytest.approx(5.0) and sens.base_kd == 0.0
    base_ms = lm.predict_ms(base_arch(space))
    for g in gates:  # lowering one gate never costs time
        assert all(ms <= base_ms + 1e-9 for ms in sens.ms[g].values())


def test_allocation_meets_the_budget_and_raises_the_most_sensitive_gate_first(session):
    space, lm = session.space, session.latency_model
    hot = "layers.1.wbits.down"
    sens = measure(space, lm, _synthetic_kd(space, {hot: 10.0}))
    gates = bits_gates(space)
    low = {g: quantised_choices(space, g)[-1] for g in gates}
    lowest = allocate(space, lm, sens, lm.predict_ms(base_arch(space)) * 10)
    assert all(lowest.to_choices(space)[g] == quantised_choices(space, g)[0] for g in gates)  # loose: all raised
    floor_choice = base_arch(space).to_choices(space) | low
    floor = lm.predict_ms(Arch.from_choices(space, floor_choice))
    assert allocate(space, lm, sens, floor * 0.999) is None  # below the all-lowest: nothing meets it
    at_floor = allocate(space, lm, sens, floor)
    assert all(at_floor.to_choices(space)[g] == low[g] for g in gates)
    one_step = floor + (sens.ms[hot][quantised_choices(space, hot)[0]] - sens.ms[hot][low[hot]]) * 1.0001
    pick = allocate(space, lm, sens, one_step)
    assert pick.to_choices(space)[hot] == quantised_choices(space, hot)[0]  # the costly gate goes up first
    assert lm.predict_ms(pick) <= one_step * (1 + 1e-6)
    previous = None
    for frac in (0.0, 0.3, 0.6, 1.0):  # a looser budget never lowers a gate
        budget = floor + frac * (lm.predict_ms(base_arch(space)) - floor)
        arch = allocate(space, lm, sens, budget)
        assert lm.predict_ms(arch) <= budget * (1 + 1e-6)
        bits = {g: arch.to_choices(space)[g] for g in gates}
        if previous is not None:
            assert all(bits[g] >= previous[g] for g in gates)
        previous = bits


def test_reference_check_scores_the_allocation(tmp_path):
    from archquant.commands.search import check_references
    from archquant.search.result import SearchResult

    probe = Session.load(compose_config(TINY_OVERRIDES, tmp_path))
    low = {g: quantised_choices(probe.space, g)[-1] for g in bits_gates(probe.space)}
    floor = probe.latency_model.predict_ms(Arch.from_choices(probe.space, base_arch(probe.space).to_choices(probe.space) | low))
    budget = round(floor + 0.5 * (probe.latency_model.predict_ms(base_arch(probe.space)) - floor), 6)
    cfg = compose_config(TINY_OVERRIDES + [f"budget.latency_ms={budget}"], tmp_path)
    session = Session.load(cfg)
    _, val = session.targets()
    space, lm = session.space, session.latency_model
    worst = {n: v[-1] for n, v in space.gates().items()}
    worst.update({f"layers.{i}.keep": 1 for i in range(space.num_layers)})
    bad = Arch.from_choices(space, worst)
    res = SearchResult(arch=bad, predicted_ms=lm.predict_ms(bad), predicted_mb=lm.predict_mb(bad),
                       argmax_predicted_ms=lm.predict_ms(bad), meets_budget=True, stop_reason="max_steps", steps=1)
    out = check_references(res, session, cfg, val)
    assert session._sensitivity is not None  # measured once, kept for the session's other budgets
    greedy = allocate(space, lm, session._sensitivity, cfg.budget.latency_ms)
    assert greedy is not None and out.val_kd <= out.reference["searched_val_kd"]
    cfg_off = compose_config(TINY_OVERRIDES + [f"budget.latency_ms={cfg.budget.latency_ms}", "search.allocate_bits=false"],
                             tmp_path)
    fresh = Session.load(cfg_off)
    check_references(res, fresh, cfg_off, val)
    assert fresh._sensitivity is None
    cfg_ref = compose_config(TINY_OVERRIDES + [f"budget.latency_ms={cfg.budget.latency_ms}", "search.refine_evals=6"],
                             tmp_path)
    refined = check_references(res, session, cfg_ref, val)
    rec = refined.reference["refine"]
    assert rec["evals"] <= 6 and rec["kd"] <= rec["start_kd"] and refined.val_kd <= out.val_kd + 1e-12
    assert lm.predict_ms(refined.arch) <= cfg.budget.latency_ms * (1 + 1e-6)


def test_local_search_fixes_what_additive_sensitivities_get_wrong(session):
    """Two gates that hurt only together: measured one at a time they look free, so the greedy allocation lowers
    both; the local search scores real neighbours and raises one of them, within the budget and the scorings."""
    space, lm = session.space, session.latency_model
    gates = bits_gates(space)
    a, b = "layers.0.wbits.qkv", "layers.1.wbits.down"
    assert a in gates and b in gates
    weights = {g: 0.01 * (i + 1) for i, g in enumerate(gates)} | {a: 0.0, b: 0.0}
    additive = _synthetic_kd(space, weights)

    def kd_of(arch):
        choice = arch.to_choices(space)
        low = [g for g in (a, b) if choice[g] != quantised_choices(space, g)[0]]
        return additive(arch) + (10.0 if len(low) == 2 else 0.0)  # an interaction the sensitivities cannot see

    sens = measure(space, lm, kd_of)
    assert all(sens.kd[g][quantised_choices(space, g)[-1]] == sens.base_kd for g in (a, b))  # look free alone
    low = {g: quantised_choices(space, g)[-1] for g in gates}
    floor = lm.predict_ms(Arch.from_choices(space, base_arch(space).to_choices(space) | low))
    budget = floor + 0.5 * (lm.predict_ms(base_arch(space)) - floor)
    greedy = allocate(space, lm, sens, budget)
    assert kd_of(greedy) >= 10.0  # both left low: free in the additive model
    calls = []
    out = refine(space, lm, sens, greedy, budget, lambda x: calls.append(x) or kd_of(x), max_evals=40)
    assert out.kd < 10.0 and out.kd == pytest.approx(kd_of(out.arch)) and out.start_kd == kd_of(greedy)
    assert lm.predict_ms(out.arch) <= budget * (1 + 1e-6)
    assert out.evals == len(calls) - 1 <= 40 and out.accepted  # one scoring of the start, then <= max_evals
    again = refine(space, lm, sens, greedy, budget, kd_of, max_evals=1)
    assert again.evals <= 1
    settled = refine(space, lm, sens, out.arch, budget, kd_of, max_evals=40)
    assert settled.kd <= out.kd  # never worse than where it starts
