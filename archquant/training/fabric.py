"""Build a Lightning ``Fabric`` from ``TrainerConfig`` (devices, strategy, precision, CPU threads)."""

from __future__ import annotations

import os

import torch
from lightning.fabric import Fabric


def _cpu_threads(trainer_cfg, world: int) -> int:
    """Intra-op threads per process: the configured value, else the cores split between processes.

    Several CPU processes each taking every core oversubscribe the machine and run slower than one.
    """
    if trainer_cfg.num_threads > 0:
        return trainer_cfg.num_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // world)


def make_fabric(trainer_cfg, loggers=None, *, launch: bool = True) -> Fabric:
    """Create (and launch) a Fabric for ``trainer.*`` settings.

    With ``devices > 1`` and a DDP strategy, ``launch`` starts the other processes: Lightning re-runs the
    current command (a Hydra command keeps its run folder), so call this from a script or CLI entry point.

    Args:
        trainer_cfg: ``archquant.config.TrainerConfig``.
        loggers: Fabric/Lightning loggers (see ``make_loggers``).
        launch: call ``fabric.launch()`` (set up the process group).

    Returns:
        The Fabric; ``fabric.device`` is where tensors go, ``fabric.world_size`` the number of processes.
    """
    if trainer_cfg.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RuntimeError("trainer.accelerator=gpu but no CUDA device is visible; use trainer=cpu")
    fabric = Fabric(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        strategy=trainer_cfg.strategy,
        precision=trainer_cfg.precision,
        loggers=loggers,
    )
    if fabric.device.type == "cpu":
        torch.set_num_threads(_cpu_threads(trainer_cfg, trainer_cfg.devices))
    if launch:
        fabric.launch()
    return fabric
