"""Config of the ``distill`` group (``archquant-distill``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from archquant.core.linears import LINEARS


@dataclass
class LoraConfig:
    """Optional LoRA adapters (``peft``), merged into the weights before export.

    Attributes:
        enabled: train adapters (with the base weights frozen) instead of the full weights.
        rank: adapter rank r; must not exceed any adapted linear's input or output width.
        alpha: scaling numerator (the update is ``alpha / r * B A``).
        targets: linear names to adapt (``q k v o gate up down``).
    """

    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: list(LINEARS))

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"distill.lora.rank must be > 0, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"distill.lora.alpha must be > 0, got {self.alpha}")
        bad = [t for t in self.targets if t not in LINEARS]
        if bad or not self.targets:
            raise ValueError(f"distill.lora.targets must be a non-empty subset of q,k,v,o,gate,up,down, got {list(self.targets)}")


@dataclass
class DistillConfig:
    """Knowledge distillation of a materialised subnet with QAT (quantisation-aware: the forward uses the backend's quantiser).

    Attributes:
        arch: the ``arch.json`` to materialise (from ``archquant-search`` / ``archquant-pick``).
        steps: optimisation steps.
        batch_size: calibration blocks per step.
        lr: AdamW learning rate (LoRA: of the adapters).
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up, then cosine decay to ``min_lr_ratio * lr``.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        grad_clip: gradient-norm clip (0 = off).
        kd_temperature: temperature of the logit KL.
        teacher_topk: teacher log-probabilities kept per token (0 = the full vocabulary).
        ce_weight: weight of next-token cross-entropy added to KD.
        hidden_weight: weight of the hidden-state loss (MSE of the student's block outputs, through a
            learned projection, to the teacher's at the same original block); 0 = off.
        train_embeddings: also train the embedding (and untied lm_head); default off (it is 21%-37% of
            the parameters and carries little of the quantisation error).
        eval_every: steps between held-out KD evaluations (0 = only before and after).
        ppl_windows: windows of ``data.ppl_file`` scored before and after (0 = held-out blocks only).
        checkpoint_every: steps between atomic checkpoints.
        keep_checkpoints: how many recent checkpoints to keep.
        seed: data-order seed.
        output: folder (in the run folder) of the distilled model.
        lora: adapter settings.
    """

    arch: str | None = None
    steps: int = 200
    batch_size: int = 4
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    kd_temperature: float = 1.0
    teacher_topk: int = 64
    ce_weight: float = 0.0
    hidden_weight: float = 0.0
    train_embeddings: bool = False
    eval_every: int = 0
    ppl_windows: int = 8
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    output: str = "distilled"
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, key) <= 0:
                raise ValueError(f"distill.{key} must be > 0, got {getattr(self, key)}")
        for key in ("lr", "kd_temperature"):
            if not getattr(self, key) > 0:
                raise ValueError(f"distill.{key} must be > 0, got {getattr(self, key)}")
        for key in ("weight_decay", "warmup_steps", "grad_clip", "teacher_topk", "ce_weight", "hidden_weight", "eval_every", "ppl_windows"):
            if getattr(self, key) < 0:
                raise ValueError(f"distill.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"distill.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.output:
            raise ValueError("distill.output must name a folder (e.g. distill.output=distilled)")
