"""``SearchResult``: what one search produced (the architecture, its predictions, the step history)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from archquant.core.arch import Arch


@dataclass
class SearchResult:
    """What one search produced.

    Attributes:
        arch: the chosen subnet (argmax of the gates, repaired to the budget when asked).
        predicted_ms, predicted_mb: the latency model's prediction for ``arch``.
        argmax_predicted_ms: the prediction for the plain argmax, before repair.
        meets_budget: the prediction is within every set budget.
        stop_reason: ``all gates fixed`` or ``max_steps``.
        steps: optimisation steps run (in total, across resumes).
        history: one record per step (loss terms, tau, expected latency/memory, open gates, step time).
        fixed: ``gate -> {"index", "value", "step"}`` in the order the pruner fixed them.
        repair_moves: ``(gate, from, to)`` changes made by the budget repair.
        val_kd: KD of ``arch`` to the teacher on held-out blocks (None without them).
        wall_s: wall time of the loop in this process.
        reference: when a simple reference architecture meeting the budget had a lower held-out KD than the
            searched one and replaced it (``search.reference_check``): its name and both KDs.
    """

    arch: Arch
    predicted_ms: float
    predicted_mb: float
    argmax_predicted_ms: float
    meets_budget: bool
    stop_reason: str
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    fixed: dict[str, dict[str, Any]] = field(default_factory=dict)
    repair_moves: list = field(default_factory=list)
    val_kd: float | None = None
    wall_s: float = 0.0
    reference: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """The scalar part (for ``search.json``'s ``result`` and logs)."""
        return {
            "arch": self.arch.summary(),
            "predicted_ms": self.predicted_ms,
            "predicted_mb": self.predicted_mb,
            "argmax_predicted_ms": self.argmax_predicted_ms,
            "meets_budget": self.meets_budget,
            "stop_reason": self.stop_reason,
            "steps": self.steps,
            "val_kd": self.val_kd,
            "reference": self.reference,
            "wall_s": self.wall_s,
            "repair_moves": [list(m) for m in self.repair_moves],
        }
