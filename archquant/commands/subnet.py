"""Load the base model and cut the subnet of an ``arch.json`` out of it, as the search did."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class Subnet:
    """The teacher (original model), its tokenizer, the arch and the materialised student."""

    teacher: nn.Module
    tokenizer: object
    arch: object
    student: nn.Module
    calib_ids: torch.Tensor


def load_arch(path: str | Path | None, teacher_config, key: str = "distill.arch"):
    """Read an ``arch.json`` and refuse one made for another base model (dimensions named)."""
    from archquant.core.arch import Arch
    from archquant.core.space import model_fingerprint

    if not path:
        raise ValueError(f"{key} is required: pass the arch.json written by archquant-search or archquant-pick "
                         f"({key}=/path/to/arch.json)")
    p = Path(path)
    if p.is_dir():
        p = p / "arch.json"
    arch = Arch.load(p)
    arch.check_model(model_fingerprint(teacher_config))
    return arch


def materialize_subnet(cfg, arch_path: str | Path | None, key: str = "distill.arch") -> Subnet:
    """Load ``model.name``, build the supernet exactly as ``archquant-search`` does (importance from the
    same calibration blocks, cached), and materialise ``arch`` from it.

    Raises:
        ArchError: the arch was made for another model or does not fit the space.
    """
    from archquant.data import calibration_blocks
    from archquant.models.registry import load_model
    from archquant.supernet import build, materialize

    teacher, tokenizer = load_model(cfg.model.name, dtype=getattr(torch, cfg.model.dtype), seed=cfg.model.seed)
    teacher.eval()
    arch = load_arch(arch_path, teacher.config, key)
    calib = calibration_blocks(tokenizer, cfg.data, "calib")
    sn = build(teacher, cfg.space, backend=cfg.latency.backend, calib_ids=calib)
    student = materialize(sn, arch)
    del sn
    log.info("subnet: %s", arch.summary())
    return Subnet(teacher=teacher, tokenizer=tokenizer, arch=arch, student=student, calib_ids=calib)
