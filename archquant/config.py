"""The root config: one dataclass per Hydra group, registered in Hydra's ConfigStore.

YAML files under ``configs/`` extend these schemas with values; every key is validated in the
dataclasses' ``__post_init__`` with a message naming the override key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from archquant.core.space import SpaceConfig, named_types
from archquant.data.config import DataConfig
from archquant.distill.config import DistillConfig
from archquant.evaluation.config import EvalConfig
from archquant.export.config import ExportConfig
from archquant.latency.config import LatencyConfig
from archquant.models.config import ModelConfig
from archquant.search.config import BudgetConfig, ParetoConfig, RunConfig, SearchConfig, SloConfig


@dataclass
class TrainerConfig:
    """Lightning Fabric / Trainer settings shared by search and distillation.

    Attributes:
        accelerator: ``cpu``, ``gpu`` or ``auto``.
        devices: number of devices (processes) to run on.
        strategy: ``auto``, ``ddp``, ``fsdp`` ...
        precision: Lightning precision string (``32-true``, ``bf16-mixed``).
        num_threads: torch intra-op threads on CPU (0 = leave torch's default).
    """

    accelerator: str = "cpu"
    devices: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_threads: int = 0

    def __post_init__(self) -> None:
        if self.devices <= 0:
            raise ValueError(f"trainer.devices must be > 0, got {self.devices}")
        if self.num_threads < 0:
            raise ValueError(f"trainer.num_threads must be >= 0, got {self.num_threads}")


@dataclass
class LoggerConfig:
    """Experiment logging: ``csv`` (default), ``wandb`` (offline unless ``offline=false``) or ``none``."""

    kind: str = "csv"
    project: str = "archquant"
    offline: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("csv", "wandb", "none"):
            raise ValueError(f"logger.kind must be csv, wandb or none, got {self.kind!r}")


@dataclass
class Config:
    """Everything one archquant command reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slo: SloConfig = field(default_factory=SloConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    pareto: ParetoConfig = field(default_factory=ParetoConfig)
    run: RunConfig = field(default_factory=RunConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    out_dir: str = "."
    resume: str | None = None  # a run folder to continue from its latest checkpoint (same config required)
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """GGUF type names in ``space.wbits`` / ``space.lm_head_bits`` become ``latency.types`` (added to any
        listed there) and the bit-width slots those types fill, so every later reader sees bit-widths."""
        names = named_types(self.space)
        if not names:
            return
        if self.latency.backend != "llamacpp":
            raise ValueError(f"space.wbits / space.lm_head_bits name GGUF types {names}, which only "
                             f"latency.backend=llamacpp stores; write bit-widths (e.g. [16,8,4]) for "
                             f"latency.backend={self.latency.backend}")
        from archquant.backends.llamacpp import ALLOWED_TYPES, BackendError, LlamaCppBackend, types_from_names

        palette = [t for ts in ALLOWED_TYPES.values() for t in ts]
        unknown = [n for n in names if n not in palette]
        if unknown:
            raise BackendError(f"space.wbits / space.lm_head_bits name {unknown}: not a bit-width nor a type this "
                               f"llama.cpp backend writes and runs; choose bit-widths or from {palette}")
        types = list(dict.fromkeys([str(t).upper() for t in self.latency.types] + [n for n in names if n != "F16"]))
        self.latency = dataclasses.replace(self.latency, types=types)  # validates the names
        self.space = LlamaCppBackend(types_from_names(types)).name_slots(self.space)


def register_configs() -> None:
    """Register the schema of the root config and of every group with Hydra's ConfigStore."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, node in (
        ("model", ModelConfig),
        ("data", DataConfig),
        ("space", SpaceConfig),
        ("budget", BudgetConfig),
        ("latency", LatencyConfig),
        ("search", SearchConfig),
        ("eval", EvalConfig),
        ("slo", SloConfig),
        ("trainer", TrainerConfig),
        ("logger", LoggerConfig),
        ("pareto", ParetoConfig),
        ("run", RunConfig),
        ("distill", DistillConfig),
        ("export", ExportConfig),
    ):
        cs.store(group=group, name=f"base_{group}", node=node)


def to_object(cfg: DictConfig | Config) -> Config:
    """Turn a composed DictConfig into validated dataclasses (runs every ``__post_init__``)."""
    if isinstance(cfg, Config):
        return cfg
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, Config):
        raise TypeError("config does not follow the archquant schema (missing `- base_config` in defaults?)")
    return obj
