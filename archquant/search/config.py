"""Configs of the ``search``, ``budget``, ``slo``, ``pareto`` and ``run`` groups."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


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
            if val is not None and not (val > 0 and math.isfinite(val)):
                raise ValueError(f"budget.{key} must be > 0 and finite (or null for no budget), got {val}")


@dataclass
class SearchConfig:
    """The differentiable search: KD + budget penalties on Gumbel-Softmax gates, with the entropy pruner.

    Attributes:
        steps: maximum optimisation steps.
        batch_size: calibration sequences per step.
        arch_lr: Adam learning rate of the gate logits.
        weight_lr: learning rate of the supernet weights (0 = frozen).
        tau_start, tau_end: Gumbel-Softmax temperature, annealed exponentially.
        hard: straight-through hard samples (else soft).
        kd_temperature: temperature of the logit KL.
        lambda_latency, lambda_memory: penalty weights.
        lambda_growth: after warm-up, each step a budget is exceeded (in expectation) its weight grows by
            this factor (x(1+g)), and shrinks back towards the configured weight while it is met. A fixed
            weight only meets the budget if it happens to outweigh the KD gradient; the growth finds the
            weight that does (a dual-ascent-style update). 0 = fixed weights.
        warmup_steps: steps before the penalties bite.
        prune_every: entropy-pruner period (steps).
        prune_epsilon: normalised-entropy threshold below which a gate is fixed.
        checkpoint_every: steps between atomic checkpoints.
        seed: RNG seed (Gumbel noise, data order).
        teacher_topk: teacher logits kept per token for KD (0 = all); the rest of the mass is one "tail"
            bucket, so the loss is a KL between coarsened distributions (exact when nothing is cut).
        ce_weight: weight of the next-token cross-entropy added to the KD term (0 = KD only).
        reference_check: after the search, score the found arch and the simple references that meet the
            latency budget (full width at one quantised bit-width; importance-pruned uniform shapes) by
            held-out KD on materialised models, and keep the best (``search.json`` records a replacement).
        allocate_bits: with ``reference_check``, add the greedy bit allocation by measured sensitivity
            (``search.allocate``; one held-out KD per bits gate and lower choice, measured once per session)
            to the references.
        refine_evals: with ``reference_check``, after the best of the searched arch and the references is
            chosen, a local search over its bits gates (``search.allocate.refine``: raise one gate, or raise one
            and lower another, within the budget), each neighbour scored by held-out KD, at most this many
            scorings. 0 = off.
        repair: after the argmax, move open gates to cheaper choices (least probability lost first)
            until the predicted latency/memory meet the budget.
        keep_checkpoints: how many recent checkpoints to keep.
        width_prior: initial logit bonus of the widest choice of every width gate (hidden, heads, head
            size, MLP), falling linearly to 0 at the narrowest: the search starts near the original
            shape and cuts width only where the budget needs it more than the KD loss resists. 0 = uniform
            (on SmolLM2, 30-step searches without it cut widths where lowering bits was cheaper).
        mix_outputs_max_tokens: calibration rows per process up to which open bits gates mix their
            outputs (one matmul per bits choice) instead of one mixed weight (``ElasticLinear``); equal
            results, cheaper for short batches. 0 = always mix weights.
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
    lambda_growth: float = 0.1
    warmup_steps: int = 10
    prune_every: int = 10
    prune_epsilon: float = 0.1
    checkpoint_every: int = 25
    seed: int = 0
    teacher_topk: int = 64
    ce_weight: float = 0.0
    repair: bool = True
    reference_check: bool = True
    allocate_bits: bool = True
    refine_evals: int = 0
    keep_checkpoints: int = 2
    mix_outputs_max_tokens: int = 0
    width_prior: float = 3.0

    def __post_init__(self) -> None:
        if self.refine_evals < 0:
            raise ValueError(f"search.refine_evals must be >= 0 (0 = off), got {self.refine_evals}")
        for key in ("steps", "batch_size", "prune_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, key) <= 0:
                raise ValueError(f"search.{key} must be > 0, got {getattr(self, key)}")
        for key in ("arch_lr", "tau_start", "tau_end", "kd_temperature"):
            if not getattr(self, key) > 0:
                raise ValueError(f"search.{key} must be > 0, got {getattr(self, key)}")
        for key in ("weight_lr", "lambda_latency", "lambda_memory", "warmup_steps", "teacher_topk", "ce_weight",
                    "lambda_growth", "mix_outputs_max_tokens", "width_prior"):
            if getattr(self, key) < 0:
                raise ValueError(f"search.{key} must be >= 0, got {getattr(self, key)}")
        if not 0 < self.prune_epsilon < 1:
            raise ValueError(f"search.prune_epsilon must be in (0, 1), got {self.prune_epsilon}")
        if self.tau_end > self.tau_start:
            raise ValueError(f"search.tau_end ({self.tau_end}) must be <= search.tau_start ({self.tau_start})")
        for key in ("arch_lr", "weight_lr", "tau_start", "tau_end", "kd_temperature", "lambda_latency", "lambda_memory"):
            if not math.isfinite(getattr(self, key)):
                raise ValueError(f"search.{key} must be finite, got {getattr(self, key)}")


@dataclass
class SloConfig:
    """Service-level objective used by ``archquant-pick``.

    Attributes:
        latency_ms: the latency the picked point must meet (ms, in the front's backend and scenario).
        front: the ``pareto.json`` to pick from (or the folder holding it).
        metric: what "most accurate" means: ``ppl`` (lowest held-out perplexity), ``accuracy`` (highest
            mean zero-shot accuracy) or ``auto`` (accuracy when every point has it, else perplexity).
        output: where ``picked.json`` goes (relative to the run folder).
    """

    latency_ms: float | None = None
    front: str | None = None
    metric: str = "auto"
    output: str = "picked.json"

    def __post_init__(self) -> None:
        if self.latency_ms is not None and not self.latency_ms > 0:
            raise ValueError(f"slo.latency_ms must be > 0, got {self.latency_ms}")
        if self.metric not in ("auto", "ppl", "accuracy"):
            raise ValueError(f"slo.metric must be auto, ppl or accuracy, got {self.metric!r}")


@dataclass
class ParetoConfig:
    """``archquant-pareto``: which points to collect and how to evaluate them.

    Attributes:
        runs: folders searched recursively for ``search.json`` (e.g. a ``-m`` sweep folder).
        baselines: built-in sequential baselines by name (``prune_quantise``: importance pruning to one uniform
            shape, then uniform quantisation, at each searched budget; ``archquant.search.baselines``) and/or
            JSON files of extra points (``{"points": [...]}``, same fields as ``pareto.json``).
        include_full: add the original model (full width, 16-bit) as a reference point.
        uniform_bits: also add the full-width model with every linear and the lm_head at each of these
            weight bits (e.g. ``[8, 4]``: what plain uniform quantisation gives) as reference points.
        presets: llama.cpp's own quantisation of the original model, one point per ``llama-quantize`` preset
            (``Q8_0``, ``Q4_K_M``, ...; ``original`` is the model's own GGUF file), evaluated on llama.cpp's
            logits and timed with the other points (``latency.backend=llamacpp`` only). None: the backend's
            default (llama.cpp: ``original, Q8_0, Q6_K, Q5_K_M, Q5_0, Q4_K_M, Q4_1, Q4_0, Q3_K_M``; none
            elsewhere); ``[]``: none.
        measure: time every point in the serving backend (else the predicted latency is used, and said).
        timing_rounds: the points are timed together, in at least this many rounds that each time every point
            once (rotated order), and a point's latency is the median over rounds: the machine's drift then
            hits every point alike instead of reordering them.
        timing_max_rounds: rounds continue, up to this many, while any point's interval is wider than
            ``timing_ci`` (or has not yet reached ``timing_confidence``); each extra round times every point
            again. ``timing_max_rounds = timing_rounds`` times a fixed number of rounds (1: one timing per
            point, no interval).
        timing_ci: the target relative half-width of a point's latency interval: 0.03 = the interval (a
            distribution-free order-statistic interval of the median over rounds) lies within ±3% of the
            median. ``pareto.json`` records each point's interval (``latency_ci_ms``), whether or not the
            target was reached within ``timing_max_rounds`` (``extra.measurement.settled``).
        timing_confidence: the interval's coverage; 0.95 needs at least 6 rounds (with fewer, the interval is
            ``[min, max]``, of lower coverage, and recorded as such).
        zero_shot: also run the ``eval`` group's zero-shot tasks on every point (slow on CPU).
        output: where ``pareto.json`` goes (``pareto.png`` beside it), relative to the run folder.
    """

    runs: list[str] = field(default_factory=list)
    baselines: list[str] = field(default_factory=list)
    include_full: bool = True
    uniform_bits: list[int] = field(default_factory=list)
    presets: list[str] | None = None
    measure: bool = True
    timing_rounds: int = 3
    timing_max_rounds: int = 15
    timing_ci: float = 0.03
    timing_confidence: float = 0.95
    zero_shot: bool = False
    output: str = "pareto.json"

    def __post_init__(self) -> None:
        if self.timing_rounds < 1:
            raise ValueError(f"pareto.timing_rounds must be >= 1, got {self.timing_rounds}")
        if self.timing_max_rounds < self.timing_rounds:
            raise ValueError(f"pareto.timing_max_rounds ({self.timing_max_rounds}) must be >= "
                             f"pareto.timing_rounds ({self.timing_rounds})")
        if not (self.timing_ci > 0 and math.isfinite(self.timing_ci)):
            raise ValueError(f"pareto.timing_ci must be > 0 and finite (a relative half-width), got {self.timing_ci}")
        if not 0 < self.timing_confidence < 1:
            raise ValueError(f"pareto.timing_confidence must be in (0, 1), got {self.timing_confidence}")
        from archquant.search.baselines import check_baselines

        check_baselines(self.baselines)
        if self.presets is not None:
            from archquant.engine.presets import check_presets

            self.presets = check_presets(self.presets)

    def resolved_presets(self, backend: str) -> list[str]:
        """The presets to put on a front served by ``backend`` (``presets``, or the backend's default)."""
        from archquant.engine.presets import DEFAULT_PRESETS

        if self.presets is None:
            return list(DEFAULT_PRESETS) if backend == "llamacpp" else []
        if self.presets and backend != "llamacpp":
            from archquant.utils.errors import UserError

            raise UserError(f"pareto.presets={self.presets} are llama.cpp files; they go on a latency.backend=llamacpp "
                            "front (set pareto.presets=[] for this backend)")
        return list(self.presets)


@dataclass
class RunConfig:
    """``archquant-run``, the main job: a ladder of searches -> Pareto -> pick -> distil/export -> evaluate.

    Attributes:
        budget_fractions: the ladder, as fractions of the full model's predicted latency (device-independent).
        budgets_ms: an explicit ladder in ms (overrides ``budget_fractions`` when set).
        slo_fraction: the SLO to pick with when ``slo.latency_ms`` is unset, as a fraction of the full model.
        distill: distil the picked architecture (when the distillation stage is installed).
        export: export the picked model (when the export stage is installed).
        evaluate: run the ``eval`` group on the picked model.
    """

    budget_fractions: list[float] = field(default_factory=lambda: [0.5, 0.65, 0.8])
    budgets_ms: list[float] | None = None
    slo_fraction: float = 0.7
    distill: bool = True
    export: bool = True
    evaluate: bool = True

    def __post_init__(self) -> None:
        if not self.budget_fractions or any(not 0 < f <= 1 for f in self.budget_fractions):
            raise ValueError(f"run.budget_fractions must be fractions in (0, 1], got {list(self.budget_fractions)}")
        if self.budgets_ms is not None and any(not b > 0 for b in self.budgets_ms):
            raise ValueError(f"run.budgets_ms must all be > 0, got {list(self.budgets_ms)}")
        if not 0 < self.slo_fraction <= 1:
            raise ValueError(f"run.slo_fraction must be in (0, 1], got {self.slo_fraction}")
