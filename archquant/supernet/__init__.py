"""The weight-entangled supernet: build it from a model, search its gates, materialise a subnet."""

from archquant.core.arch import Arch, ArchError, LayerArch
from archquant.core.space import Space, SpaceConfig, SpaceError, resolve_space
from archquant.supernet.build import UnsupportedModelError, build
from archquant.supernet.gates import GateError
from archquant.supernet.materialize import materialize
from archquant.supernet.model import Supernet

__all__ = [
    "Arch",
    "ArchError",
    "GateError",
    "LayerArch",
    "Space",
    "SpaceConfig",
    "SpaceError",
    "Supernet",
    "UnsupportedModelError",
    "build",
    "materialize",
    "resolve_space",
]
