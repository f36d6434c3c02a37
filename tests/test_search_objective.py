"""Search objective, schedules and the entropy pruner against closed forms and torch references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_search_fakes import FakeSupernet, tiny_space

from archquant.search.objective import hinge_penalty, kd_loss, next_token_ce
from archquant.search.pruner import EntropyPruner, normalized_entropy
from archquant.search.schedule import penalty_scale, temperature


def _logits(seed, shape=(2, 5, 40)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kd_with_full_teacher_matches_torch_kl_div(T):
    s, t = _logits(0).requires_grad_(), _logits(1)
    t_lp = F.log_softmax(t / T, -1)
    ref = F.kl_div(F.log_softmax(s / T, -1), t_lp, log_target=True, reduction="none").sum(-1).mean() * T**2
    ours = kd_loss(s, t_lp, None, T)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    g_ours = torch.autograd.grad(ours, s)[0]
    s2 = s.detach().requires_grad_()
    g_ref = torch.autograd.grad(
        F.kl_div(F.log_softmax(s2 / T, -1), t_lp, log_target=True, reduction="none").sum(-1).mean() * T**2, s2
    )[0]
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)


def test_topk_kd_is_the_kl_of_the_coarsened_distributions():
    s, t = _logits(2), _logits(3)
    t_lp = F.log_softmax(t, -1)
    full = kd_loss(s, t_lp)
    val, idx = t_lp.topk(8, -1)
    topk = kd_loss(s, val, idx)
    # closed form: KL over {top-8 tokens} + one bucket for the rest
    p, q = t_lp.exp(), F.softmax(s, -1)
    p8, q8 = p.gather(-1, idx), q.gather(-1, idx)
    p_rest, q_rest = 1 - p8.sum(-1), 1 - q8.sum(-1)
    ref = ((p8 * (p8.log() - q8.log())).sum(-1) + p_rest * (p_rest.log() - q_rest.log())).mean()
    torch.testing.assert_close(topk, ref, rtol=1e-4, atol=1e-6)
    assert 0 <= float(topk) <= float(full) + 1e-6  # coarsening never increases a KL
    # cutting nothing gives back the full KL
    val_all, idx_all = t_lp.topk(40, -1)
    torch.testing.assert_close(kd_loss(s, val_all, idx_all), full, rtol=1e-4, atol=1e-5)


def test_kd_is_zero_for_the_teacher_itself():
    t = _logits(4)
    val, idx = F.log_softmax(t, -1).topk(5, -1)
    assert float(kd_loss(t, val, idx)) == pytest.approx(0.0, abs=1e-5)


def test_next_token_ce_matches_cross_entropy():
    logits, ids = _logits(5), torch.randint(0, 40, (2, 5))
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(next_token_ce(logits, ids), ref)


def test_hinge_penalty_closed_form():
    v = torch.tensor(12.0)
    assert float(hinge_penalty(v, 10.0)) == pytest.approx(0.04)
    assert float(hinge_penalty(torch.tensor(9.0), 10.0)) == 0.0
    assert float(hinge_penalty(v, None)) == 0.0
    x = torch.tensor(15.0, requires_grad=True)
    hinge_penalty(x, 10.0).backward()
    assert float(x.grad) == pytest.approx(2 * 0.5 / 10)


def test_temperature_anneals_exponentially_between_the_endpoints():
    taus = [temperature(s, 11, 5.0, 0.1) for s in range(11)]
    assert taus[0] == pytest.approx(5.0) and taus[-1] == pytest.approx(0.1)
    ratios = [b / a for a, b in zip(taus, taus[1:])]
    assert all(r == pytest.approx(ratios[0]) for r in ratios)  # constant ratio: exponential
    assert penalty_scale(4, 5) == 0.0 and penalty_scale(5, 5) == 1.0


def test_normalized_entropy_closed_forms():
    assert normalized_entropy(torch.ones(4) / 4) == pytest.approx(1.0)
    assert normalized_entropy(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([0.9, 0.1])
    assert normalized_entropy(p) == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2))
    assert normalized_entropy(torch.tensor([1.0])) == 0.0


def test_pruner_fixes_exactly_the_collapsed_gates_on_its_period():
    sn = FakeSupernet(tiny_space())
    names = sn.open_gates()
    with torch.no_grad():
        sn.gate_logits[sn.gate_names.index(names[0])].copy_(torch.tensor([0.0, 9.0, 0.0]))  # collapsed on index 1
        sn.gate_logits[sn.gate_names.index(names[1])].copy_(torch.tensor([1.0, 0.0, 0.0]))  # still open
    pruner = EntropyPruner(epsilon=0.1, every=5)
    assert pruner(sn, step=3) == {}  # not due
    assert pruner(sn, step=4) == {names[0]: 1}
    assert sn.fixed == {names[0]: 1} and names[0] not in sn.open_gates()
    with pytest.raises(ValueError, match="prune_epsilon"):
        EntropyPruner(epsilon=1.5, every=5)


def test_width_prior_favours_the_widest_choice_of_width_gates_only():
    from archquant.search.loop import add_width_prior
    from archquant.supernet.gates import GateSet

    gates = GateSet({"hidden": [64, 48, 32], "layers.0.mlp": [256, 128], "layers.0.wbits.qkv": [16, 8, 4],
                     "layers.0.keep": [1, 0], "layers.0.head_dim": [16]})
    add_width_prior(gates, 2.0)
    logit = lambda n: gates.logits[gates.index[n]].detach()  # noqa: E731
    torch.testing.assert_close(logit("hidden"), torch.tensor([2.0, 1.0, 0.0]))
    torch.testing.assert_close(logit("layers.0.mlp"), torch.tensor([2.0, 0.0]))
    assert torch.equal(logit("layers.0.wbits.qkv"), torch.zeros(3))  # bits and depth keep their init
    assert torch.equal(logit("layers.0.keep"), torch.zeros(2))
    assert torch.equal(logit("layers.0.head_dim"), torch.zeros(1))  # fixed (single choice): untouched
