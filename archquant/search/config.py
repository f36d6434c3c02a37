"""Configs of the ``search``, ``budget`` and ``slo`` groups."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BudgetConfig:
    """Targets the search must meet (None = unconstrained).

    Attributes:
        latency_ms: target latency of the scenario in the chosen backend (ms).
        memory_mb: target weight memory (MB, 1e6 bytes), quantisation scales included.
    """

    latency_ms: float | None = None
    memory_mb: float | None = None

    def __post_init__(self) -> None:
        for key in ("latency_ms", "memory_mb"):
            val = getattr(self, key)
            if val is not None and not val > 0:
                raise ValueError(f"budget.{key} must be > 0 (or null for no budget), got {val}")


@dataclass
class SearchConfig:
    """The differentiable search (DESIGN section 5-6).

    Attributes:
        steps: maximum optimisation steps.
        batch_size: calibration sequences per step.
        arch_lr: Adam learning rate of the gate logits.
        weight_lr: learning rate of the supernet weights (0 = frozen).
        tau_start, tau_end: Gumbel-Softmax temperature, annealed exponentially.
        hard: straight-through hard samples (else soft).
        kd_temperature: temperature of the logit KL.
        lambda_latency, lambda_memory: penalty weights.
        warmup_steps: steps before the penalties bite.
        prune_every: entropy-pruner period (steps).
        prune_epsilon: normalised-entropy threshold below which a gate is fixed.
        checkpoint_every: steps between atomic checkpoints.
        seed: RNG seed (Gumbel noise, data order).
    """

    steps: int = 150
    batch_size: int = 4
    arch_lr: float = 0.05
    weight_lr: float = 0.0
    tau_start: float = 5.0
    tau_end: float = 0.1
    hard: bool = False
    kd_temperature: float = 1.0
    lambda_latency: float = 5.0
    lambda_memory: float = 5.0
    warmup_steps: int = 10
    prune_every: int = 10
    prune_epsilon: float = 0.1
    checkpoint_every: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "prune_every", "checkpoint_every"):
            if getattr(self, key) <= 0:
                raise ValueError(f"search.{key} must be > 0, got {getattr(self, key)}")
        for key in ("arch_lr", "tau_start", "tau_end", "kd_temperature"):
            if not getattr(self, key) > 0:
                raise ValueError(f"search.{key} must be > 0, got {getattr(self, key)}")
        for key in ("weight_lr", "lambda_latency", "lambda_memory", "warmup_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"search.{key} must be >= 0, got {getattr(self, key)}")
        if not 0 < self.prune_epsilon < 1:
            raise ValueError(f"search.prune_epsilon must be in (0, 1), got {self.prune_epsilon}")
        if self.tau_end > self.tau_start:
            raise ValueError(f"search.tau_end ({self.tau_end}) must be <= search.tau_start ({self.tau_start})")


@dataclass
class SloConfig:
    """Service-level objective used by ``archquant-pick``.

    Attributes:
        latency_ms: the latency the picked point must meet (ms, in the front's backend and scenario).
    """

    latency_ms: float | None = None

    def __post_init__(self) -> None:
        if self.latency_ms is not None and not self.latency_ms > 0:
            raise ValueError(f"slo.latency_ms must be > 0, got {self.latency_ms}")
