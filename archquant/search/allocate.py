"""Bit allocation by measured sensitivity: the precision decisions of a full-width subnet, set greedily.

A HAWQ-style complement to the gradient search. Each bits gate (``layers.{l}.wbits.<group>``,
``lm_head.wbits``) is lowered alone from a full-width base at the most precise quantised choice, and the
held-out KD change is its sensitivity. Latency changes of one gate are exact and additive at fixed widths
(each op's table cost depends on its own gates only), so they come from the latency model once. The
allocation starts with every bits gate at its least precise quantised choice and raises, one step at a
time, the gate with the largest KD reduction per millisecond that still fits the budget (the greedy
knapsack), assuming sensitivities add (their first-order model, as in HAWQ / Q-Palette).

The result is one more reference a search must beat (``commands.search.check_references``): it is scored
on held-out KD like the searched arch, so a poor additivity assumption can only lose, never mislead.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

from archquant.core.arch import Arch
from archquant.core.space import Space
from archquant.search.baselines import full_shape, uniform_shape


def bits_gates(space: Space) -> list[str]:
    """The bits gates with more than one quantised (< 16) choice."""
    return [n for n, v in space.gates().items()
            if (".wbits." in n or n == "lm_head.wbits") and len([b for b in v if int(b) < 16]) > 1]


def quantised_choices(space: Space, gate: str) -> list[int]:
    """A bits gate's quantised choices, most precise first."""
    return sorted((int(b) for b in space.gates()[gate] if int(b) < 16), reverse=True)


def with_choice(space: Space, arch: Arch, gate: str, value) -> Arch:
    choice = arch.to_choices(space)
    choice[gate] = value
    return Arch.from_choices(space, choice)


def base_arch(space: Space) -> Arch:
    """Full width, every block kept, every bits gate at its most precise quantised choice (16 where it has none)."""
    def top(bits) -> int:
        return max((int(b) for b in bits if int(b) < 16), default=16)

    return uniform_shape(space, *full_shape(space), top(space.wbits), top(space.lm_head_bits))


@dataclasses.dataclass
class Sensitivity:
    """KD and latency change of each (bits gate, quantised choice) from ``base``."""

    base: Arch
    base_kd: float
    kd: dict[str, dict[int, float]]  # gate -> bits -> KD with that gate alone at bits
    ms: dict[str, dict[int, float]]  # gate -> bits -> predicted ms with that gate alone at bits

    def to_dict(self) -> dict:
        return {"base_kd": self.base_kd, "kd": self.kd, "ms": self.ms}


def measure(space: Space, latency_model, kd_of: Callable[[Arch], float], progress=None) -> Sensitivity:
    """Held-out KD and predicted ms of ``base_arch`` with each bits gate alone at each lower quantised choice.

    Args:
        kd_of: held-out KD of an arch (e.g. the supernet at its one-hot gates).
        progress: optional ``iterable -> iterable`` wrapper (a progress bar).
    """
    base = base_arch(space)
    base_kd, base_ms = kd_of(base), float(latency_model.predict_ms(base))
    kd: dict[str, dict[int, float]] = {}
    ms: dict[str, dict[int, float]] = {}
    for gate in (progress or (lambda x: x))(bits_gates(space)):
        top, *lower = quantised_choices(space, gate)
        kd[gate], ms[gate] = {top: base_kd}, {top: base_ms}
        for b in lower:
            arch = with_choice(space, base, gate, b)
            kd[gate][b], ms[gate][b] = kd_of(arch), float(latency_model.predict_ms(arch))
    return Sensitivity(base, base_kd, kd, ms)


def allocate(space: Space, latency_model, sens: Sensitivity, budget_ms: float) -> Arch | None:
    """The greedy bit allocation meeting ``budget_ms`` (predicted), or None when even the least precise does not.

    Starts with every bits gate at its least precise quantised choice and repeatedly raises the gate whose next
    choice removes the most KD per added millisecond among those that still fit, until none fits (gates whose
    measured gain is <= 0, i.e. below the measurement's noise, go up last rather than never).
    """
    steps = {g: sorted(by_bits, reverse=True) for g, by_bits in sens.kd.items()}  # each gate's choices, measured
    current = {g: s[-1] for g, s in steps.items()}
    choice = sens.base.to_choices(space)
    choice.update(current)
    arch = Arch.from_choices(space, choice)
    ms = float(latency_model.predict_ms(arch))
    if ms > budget_ms * (1 + 1e-9):
        return None
    while True:
        best, best_ratio = None, -float("inf")
        for g, b in current.items():
            i = steps[g].index(b)
            if i == 0:
                continue
            nb = steps[g][i - 1]
            # a measured gain <= 0 is noise (more bits do not hurt in expectation): such gates go up last
            gain = sens.kd[g][b] - sens.kd[g][nb]
            cost = sens.ms[g][nb] - sens.ms[g][b]
            if ms + cost > budget_ms:
                continue
            ratio = gain / max(cost, 1e-9)
            if ratio > best_ratio:
                best, best_ratio = (g, nb, cost), ratio
        if best is None:
            break
        g, nb, cost = best
        current[g] = nb
        ms += cost
    choice.update(current)
    arch = Arch.from_choices(space, choice)
    return arch if latency_model.predict_ms(arch) <= budget_ms * (1 + 1e-6) else None


@dataclasses.dataclass
class LocalResult:
    """What ``refine`` found: the arch, its KD, and each evaluated move."""

    arch: Arch
    kd: float
    start_kd: float
    evals: int
    accepted: list[dict]


def _moves(sens: Sensitivity, choice: dict, slack_ms: float) -> list[tuple[float, dict]]:
    """Bits moves from ``choice`` that fit ``slack_ms`` (predicted ms left under the budget), with the KD change the
    additive sensitivities predict (negative = better): one gate up, or one gate up and another down."""
    steps = {g: sorted(by_bits, reverse=True) for g, by_bits in sens.kd.items()}
    ups, downs = [], []
    for g, s in steps.items():
        b = choice[g]
        if b not in s:  # e.g. kept at 16 by a search: not a move this neighbourhood knows
            continue
        i = s.index(b)
        if i > 0:
            nb = s[i - 1]
            ups.append((g, nb, sens.kd[g][nb] - sens.kd[g][b], sens.ms[g][nb] - sens.ms[g][b]))
        if i + 1 < len(s):
            nb = s[i + 1]
            downs.append((g, nb, sens.kd[g][nb] - sens.kd[g][b], sens.ms[g][nb] - sens.ms[g][b]))
    out = [(dkd, {g: nb}) for g, nb, dkd, dms in ups if dms <= slack_ms]
    for gu, bu, kd_u, ms_u in ups:
        for gd, bd, kd_d, ms_d in downs:
            if gd != gu and ms_u + ms_d <= slack_ms:
                out.append((kd_u + kd_d, {gu: bu, gd: bd}))
    out.sort(key=lambda m: m[0])
    return out


def refine(space: Space, latency_model, sens: Sensitivity, start: Arch, budget_ms: float,
           kd_of: Callable[[Arch], float], max_evals: int, start_kd: float | None = None) -> LocalResult:
    """First-improvement local search over the bits gates of ``start``, each candidate scored by ``kd_of``.

    The greedy allocation trusts that sensitivities add; this checks its neighbours for real: moves (raise one
    gate, or raise one and lower another) that fit the budget are tried in the order of the KD change the
    sensitivities predict, each materialised and scored by held-out KD; the first that lowers it is taken and the
    neighbourhood recomputed. Widths stay as ``start`` has them. At most ``max_evals`` scorings.
    """
    cur = start
    cur_kd = kd_of(start) if start_kd is None else start_kd
    first_kd, evals, accepted, tried = cur_kd, 0, [], set()
    while evals < max_evals:
        choice = cur.to_choices(space)
        slack = budget_ms - float(latency_model.predict_ms(cur))
        improved = False
        for predicted, move in _moves(sens, choice, slack):
            key = json.dumps({**choice, **move}, sort_keys=True, default=str)
            if key in tried:
                continue
            tried.add(key)
            cand = Arch.from_choices(space, {**choice, **move})
            if latency_model.predict_ms(cand) > budget_ms * (1 + 1e-6):
                continue
            kd = kd_of(cand)
            evals += 1
            if kd < cur_kd:
                accepted.append({"move": move, "kd": kd, "predicted_change": predicted, "eval": evals})
                cur, cur_kd, improved = cand, kd, True
                break
            if evals >= max_evals:
                break
        if not improved:
            break
    return LocalResult(cur, cur_kd, first_kd, evals, accepted)
