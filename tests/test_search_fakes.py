"""Contract-complete stand-ins for the supernet and the latency model (STYLE item 9), and their own checks.

``FakeSupernet`` is a bigram LM whose logits drift from the teacher's in proportion to the expected
"damage" of the gate choices (0 for the first choice of every gate); ``AnalyticLatency`` is additive in
the gates. Both follow the contracts of ``archquant.supernet`` / ``archquant.latency``, so the
search, pruner, checkpoints and DDP path can be tested in milliseconds without the real ones.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn

from archquant.core.arch import Arch
from archquant.core.space import SpaceConfig, resolve_space
from archquant.models.tiny import tiny_llama_config

VOCAB = 48


def tiny_space(num_layers: int = 2):
    cfg = SpaceConfig(width_multiple=32, group_size=32)
    return resolve_space(cfg, tiny_llama_config(num_hidden_layers=num_layers))


class FakeTeacher(nn.Module):
    """The full-choice bigram model, with the HF ``model(input_ids=...).logits`` interface."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone(), requires_grad=False)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])  # [B, S, V]


class FakeSupernet(nn.Module):
    """Bigram stand-in following the ``Supernet`` contract (gate order, one-hot fixed gates, fix_gate)."""

    def __init__(self, space, seed: int = 0, vocab: int = VOCAB) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.space = space
        self.gate_names = list(space.gates())
        self.gate_logits = nn.ParameterList(
            [nn.Parameter(torch.zeros(len(opts))) for opts in space.gates().values()]
        )
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=g) * 2)
        self.register_buffer("noise", 0.3 * torch.randn(vocab, vocab, generator=g))
        # damage of each choice: 0 for the first (widest, most precise), growing along the list
        self._damage = [
            torch.linspace(0, 1, len(opts)) * (0.5 + torch.rand((), generator=g)) if len(opts) > 1 else torch.zeros(1)
            for opts in space.gates().values()
        ]
        self.fixed: dict[str, int] = {}
        self.dropped: list[str] = []  # gates whose "other branches" were dropped, in order
        self.mode = "vectorized"

    def teacher(self) -> FakeTeacher:
        return FakeTeacher(self.table.detach())

    def arch_parameters(self):
        return list(self.gate_logits)

    def weight_parameters(self):
        return [self.table]

    def _onehot(self, name: str, index: int) -> torch.Tensor:
        p = torch.zeros(len(self.space.gates()[name]), device=self.table.device)
        p[index] = 1.0
        return p

    def probs(self):
        return {
            n: self._onehot(n, self.fixed[n]) if n in self.fixed else torch.softmax(a, -1)
            for n, a in zip(self.gate_names, self.gate_logits)
        }

    def sample_probs(self, tau: float, hard: bool = False, generator=None):
        out = {}
        for n, a in zip(self.gate_names, self.gate_logits):
            if n in self.fixed:
                out[n] = self._onehot(n, self.fixed[n])
                continue
            u = torch.rand(a.shape, generator=generator, device=a.device).clamp(1e-9, 1 - 1e-9)
            y = torch.softmax((a - torch.log(-torch.log(u))) / tau, -1)
            if hard:
                y = (self._onehot(n, int(y.argmax())) - y).detach() + y
            out[n] = y
        return out

    def forward(self, input_ids, probs=None):
        if probs is None:
            probs = {n: self._onehot(n, int(p.argmax())) for n, p in self.probs().items()}
        damage = sum((probs[n] * d.to(probs[n].device)).sum() for n, d in zip(self.gate_names, self._damage))
        return self.table[input_ids] + damage * self.noise[input_ids]  # [B, S, V]

    def fix_gate(self, name: str, index: int) -> None:
        if name not in self.space.gates():
            raise KeyError(name)
        self.fixed[name] = int(index)
        self.dropped.append(name)

    def open_gates(self):
        return [n for n in self.gate_names if n not in self.fixed and len(self.space.gates()[n]) > 1]

    def argmax_arch(self) -> Arch:
        gates = self.space.gates()
        return Arch.from_choices(self.space, {n: gates[n][int(p.argmax())] for n, p in self.probs().items()})

    def set_arch(self, arch: Arch) -> None:
        gates = self.space.gates()
        for n, v in arch.to_choices(self.space).items():
            self.fix_gate(n, gates[n].index(v))


class AnalyticLatency:
    """Additive latency/memory model: ``base + sum_g <p_g, c_g>``, costs proportional to the choice value."""

    def __init__(self, space, seed: int = 0, base_ms: float = 1.0, base_mb: float = 2.0) -> None:
        g = torch.Generator().manual_seed(seed + 1)
        self.space = space
        self.base_ms, self.base_mb = base_ms, base_mb
        self.cost_ms, self.cost_mb = {}, {}
        for name, opts in space.gates().items():
            rel = torch.tensor([float(v) for v in opts]) / max(float(max(opts)), 1.0)
            self.cost_ms[name] = rel * (0.2 + torch.rand((), generator=g))
            self.cost_mb[name] = rel * (0.5 + torch.rand((), generator=g))

    def _expect(self, probs, costs, base):
        return base + sum((probs[n].float().cpu() * c).sum() for n, c in costs.items())

    def expected_ms(self, probs):
        return self._expect(probs, self.cost_ms, self.base_ms)

    def expected_mb(self, probs):
        return self._expect(probs, self.cost_mb, self.base_mb)

    def _onehot(self, arch):
        gates = self.space.gates()
        out = {}
        for n, v in arch.to_choices(self.space).items():
            p = torch.zeros(len(gates[n]))
            p[gates[n].index(v)] = 1
            out[n] = p
        return out

    def predict_ms(self, arch) -> float:
        return float(self.expected_ms(self._onehot(arch)))

    def predict_mb(self, arch) -> float:
        return float(self.expected_mb(self._onehot(arch)))

    def range_ms(self):
        from archquant.search.budget import smallest_arch

        return self.predict_ms(smallest_arch(self.space)), self.predict_ms(Arch.full(self.space))


# ---- the fakes' own contract checks ------------------------------------------------------------
def test_fake_supernet_follows_the_gate_contract():
    sn = FakeSupernet(tiny_space())
    assert sn.gate_names == list(sn.space.gates())
    assert len(sn.arch_parameters()) == len(sn.gate_names)
    name = sn.open_gates()[0]
    sn.fix_gate(name, 1)
    p = sn.sample_probs(1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(p[name], torch.tensor([0.0, 1.0] + [0.0] * (len(p[name]) - 2)))
    assert all(len(p[n]) == len(opts) for n, opts in sn.space.gates().items())
    assert name not in sn.open_gates()


def test_fake_full_choice_reproduces_the_teacher():
    sn = FakeSupernet(tiny_space())
    ids = torch.randint(0, VOCAB, (2, 5))
    full = {n: sn._onehot(n, 0) for n in sn.gate_names}
    torch.testing.assert_close(sn(ids, probs=full), sn.teacher()(input_ids=ids).logits, rtol=0, atol=0)


def test_analytic_latency_predict_equals_expectation_on_onehot():
    space = tiny_space()
    lm = AnalyticLatency(space)
    arch = Arch.random(space, 3)
    probs = lm._onehot(arch)
    assert abs(lm.predict_ms(arch) - float(lm.expected_ms(probs))) < 1e-6
    lo, hi = lm.range_ms()
    assert lo < lm.predict_ms(arch) <= hi
