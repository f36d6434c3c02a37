"""A small shared base for Lightning Fabric loops (search, distillation): setup, logging, checkpoints."""

from archquant.training.checkpoint import CheckpointManager, ResumeMismatchError, config_identity, diff_identity
from archquant.training.fabric import make_fabric
from archquant.training.loggers import make_loggers
from archquant.training.loop import FabricLoop, NonFiniteLossError

__all__ = [
    "CheckpointManager",
    "FabricLoop",
    "NonFiniteLossError",
    "ResumeMismatchError",
    "config_identity",
    "diff_identity",
    "make_fabric",
    "make_loggers",
]
