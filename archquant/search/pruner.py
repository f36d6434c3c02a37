"""The entropy-based pruner: fix gates whose distribution has collapsed (README, Design notes: search dynamics)."""

from __future__ import annotations

import math

import torch


def normalized_entropy(probs: torch.Tensor) -> float:
    """Entropy of a probability vector divided by log K, in [0, 1] (0 for a single choice).

    Shape:
        probs: [K].
    """
    k = probs.numel()
    if k <= 1:
        return 0.0
    p = probs.detach().float().clamp_min(0)
    p = p / p.sum()
    h = -(p * torch.log(p.clamp_min(1e-30))).sum()
    return float(h) / math.log(k)


class EntropyPruner:
    """Every ``every`` steps, fix each open gate whose normalised entropy is below ``epsilon`` to its argmax.

    ``Supernet.fix_gate`` drops the other branches physically (sliced weights, one quantiser), so the
    remaining steps get cheaper as gates collapse.

    Args:
        epsilon: normalised-entropy threshold in (0, 1).
        every: period in steps.
    """

    def __init__(self, epsilon: float, every: int) -> None:
        if not 0 < epsilon < 1:
            raise ValueError(f"search.prune_epsilon must be in (0, 1), got {epsilon}")
        if every <= 0:
            raise ValueError(f"search.prune_every must be > 0, got {every}")
        self.epsilon = epsilon
        self.every = every

    def due(self, step: int) -> bool:
        """True after steps every, 2 every, ... (``step`` counts from 0)."""
        return (step + 1) % self.every == 0

    def candidates(self, probs: dict[str, torch.Tensor], open_gates: list[str]) -> dict[str, int]:
        """Open gates that have collapsed, with the index to fix each to (in ``open_gates`` order)."""
        return {
            name: int(torch.argmax(probs[name]))
            for name in open_gates
            if normalized_entropy(probs[name]) < self.epsilon
        }

    def __call__(self, supernet, step: int, allow=None) -> dict[str, int]:
        """Fix the collapsed gates of ``supernet`` if the pruner is due; return ``{gate: index}`` fixed.

        Args:
            supernet: the ``Supernet`` (``probs``, ``open_gates``, ``fix_gate``).
            step: the step just completed (0-based).
            allow: optional ``allow(name, index, fixed_so_far) -> int | None``: the index to fix the
                gate to (normally ``index``; another one to enforce a space rule such as "keep one
                block"), or None to leave it open. Candidates come in gate order; ``fixed_so_far``
                includes the ones fixed in this call.
        """
        if not self.due(step):
            return {}
        with torch.no_grad():
            cands = self.candidates(supernet.probs(), supernet.open_gates())
        fixed: dict[str, int] = {}
        for name, index in cands.items():
            if allow is not None:
                index = allow(name, index, {**supernet.fixed, **fixed})
                if index is None:
                    continue
            supernet.fix_gate(name, index)
            fixed[name] = index
        return fixed
