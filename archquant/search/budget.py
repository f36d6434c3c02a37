"""Budget feasibility (checked before any training) and the final argmax architecture with budget repair."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from archquant.core.arch import Arch
from archquant.core.space import Space
from archquant.utils.errors import UserError


class BudgetError(UserError, ValueError):
    """A budget the space cannot meet, or one that does not constrain it at all."""


@dataclass
class FeasibleRange:
    """Predicted latency (ms) and weight memory (MB) of the smallest subnet and of the full model."""

    min_ms: float
    max_ms: float
    min_mb: float
    max_mb: float

    def to_dict(self) -> dict[str, float]:
        return {"min_ms": self.min_ms, "max_ms": self.max_ms, "min_mb": self.min_mb, "max_mb": self.max_mb}


def smallest_arch(space: Space) -> Arch:
    """The cheapest subnet: every gate at its last (narrowest, fewest-bit) choice, one block kept."""
    choice = {name: opts[-1] for name, opts in space.gates().items()}
    if space.depth:
        choice["layers.0.keep"] = 1  # a subnet keeps at least one block
    return Arch.from_choices(space, choice)


def feasible_range(latency_model, space: Space) -> FeasibleRange:
    """The range a budget must fall in: the smallest subnet's prediction up to the full model's.

    The upper end is the full model itself (not the slowest subnet of the space): a budget the original
    model already meets leaves the search nothing to do.
    """
    lo_ms = latency_model.range_ms()[0]
    full = Arch.full(space)
    if hasattr(latency_model, "range_mb"):
        lo_mb = latency_model.range_mb()[0]
    else:  # additive memory: the narrowest subnet with one block is the smallest
        lo_mb = latency_model.predict_mb(smallest_arch(space))
    return FeasibleRange(
        min_ms=float(lo_ms),
        max_ms=float(latency_model.predict_ms(full)),
        min_mb=float(lo_mb),
        max_mb=float(latency_model.predict_mb(full)),
    )


def check_budget(latency_model, space: Space, budget, where: str = "") -> FeasibleRange:
    """Refuse a budget below the smallest subnet's prediction or above the full model's.

    Args:
        latency_model: provides ``range_ms()`` and ``predict_mb(arch)``.
        space: the resolved space.
        budget: ``BudgetConfig``.
        where: words naming the backend/scenario/device, for the message.

    Raises:
        BudgetError: naming the key, the value and the feasible range.
    """
    rng = feasible_range(latency_model, space)
    suffix = f" ({where})" if where else ""
    problems = []
    for key, val, lo, hi, unit, what in (
        ("latency_ms", budget.latency_ms, rng.min_ms, rng.max_ms, "ms", "latency"),
        ("memory_mb", budget.memory_mb, rng.min_mb, rng.max_mb, "MB", "weight memory"),
    ):
        if val is None:
            continue
        feasible = f"the feasible range is {lo:.3g}-{hi:.3g} {unit}{suffix}"
        if val < lo:
            problems.append(
                f"budget.{key}={val:g} is below the smallest subnet's predicted {what} ({lo:.3g} {unit}); {feasible}"
            )
        elif val > hi:
            problems.append(
                f"budget.{key}={val:g} is above the full model's predicted {what} ({hi:.3g} {unit}), so it "
                f"constrains nothing; {feasible}"
            )
    if problems:
        raise BudgetError("; ".join(problems))
    return rng


def argmax_choices(space: Space, probs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``gate -> value`` of the most probable choice of every gate; keeps at least one block."""
    gates = space.gates()
    choice = {name: opts[int(torch.argmax(probs[name]))] for name, opts in gates.items()}
    if space.depth and not any(choice[f"layers.{l}.keep"] for l in range(space.num_layers)):
        best = max(range(space.num_layers), key=lambda l: float(probs[f"layers.{l}.keep"][0]))
        choice[f"layers.{best}.keep"] = 1
    return choice


def _excess(latency_model, arch: Arch, budget) -> float:
    out = 0.0
    if budget.latency_ms is not None:
        out += max(0.0, latency_model.predict_ms(arch) / budget.latency_ms - 1.0)
    if budget.memory_mb is not None:
        out += max(0.0, latency_model.predict_mb(arch) / budget.memory_mb - 1.0)
    return out


@dataclass
class Repair:
    """What ``repair_to_budget`` changed: ``(gate, from, to)`` moves and the remaining relative excess."""

    moves: list[tuple[str, Any, Any]] = field(default_factory=list)
    excess: float = 0.0


def repair_to_budget(
    space: Space,
    latency_model,
    choice: dict[str, Any],
    probs: dict[str, torch.Tensor],
    budget,
    open_gates: list[str],
) -> tuple[dict[str, Any], Repair]:
    """Greedily move open gates one choice cheaper until the predicted latency/memory meet the budget.

    Each move is the one with the most budget excess removed per nat of probability given up
    (``log p[current] - log p[next]``); fixed gates are settled and never moved. Stops when the budget
    is met or no move helps (``Repair.excess`` > 0 then, and the caller reports it).
    """
    gates = space.gates()
    choice = dict(choice)
    excess = _excess(latency_model, Arch.from_choices(space, choice), budget)
    rep = Repair(excess=excess)
    movable = [g for g in open_gates if len(gates[g]) > 1]
    while excess > 0:
        best = None
        for g in movable:
            opts = gates[g]
            i = opts.index(choice[g])
            if i + 1 >= len(opts):
                continue
            trial = dict(choice)
            trial[g] = opts[i + 1]
            if space.depth and not any(trial[f"layers.{l}.keep"] for l in range(space.num_layers)):
                continue
            new_excess = _excess(latency_model, Arch.from_choices(space, trial), budget)
            if new_excess >= excess:
                continue
            logp = torch.log(probs[g].detach().float().clamp_min(1e-12))
            cost = max(float(logp[i] - logp[i + 1]), 1e-6)
            score = (excess - new_excess) / cost
            if best is None or score > best[0]:
                best = (score, g, opts[i], opts[i + 1], new_excess)
        if best is None:
            break
        _, g, old, new, excess = best
        choice[g] = new
        rep.moves.append((g, old, new))
    rep.excess = excess if math.isfinite(excess) else float("inf")
    return choice, rep
