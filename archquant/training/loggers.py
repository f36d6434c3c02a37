"""Experiment loggers from ``LoggerConfig``: CSV by default, Weights & Biases (offline unless asked), none."""

from __future__ import annotations

import os
from pathlib import Path


def make_loggers(logger_cfg, out_dir: str | Path, name: str = "") -> list:
    """Loggers for ``Fabric(loggers=...)``; Fabric only writes from rank 0.

    ``csv`` writes ``<out_dir>/logs/version_<n>/metrics.csv`` (a resumed run gets the next version, so
    nothing logged before the interruption is overwritten). ``wandb`` runs offline by default
    (``WANDB_MODE=offline``: no network; ``wandb sync <out_dir>/wandb/offline-run-*`` uploads later).

    Args:
        logger_cfg: ``archquant.config.LoggerConfig``.
        out_dir: the run folder.
        name: experiment name (e.g. ``search``).
    """
    out_dir = Path(out_dir)
    if logger_cfg.kind == "none":
        return []
    if logger_cfg.kind == "csv":
        from lightning.fabric.loggers import CSVLogger

        return [CSVLogger(root_dir=str(out_dir / "logs"), name="", flush_logs_every_n_steps=10)]
    if logger_cfg.kind == "wandb":
        if logger_cfg.offline:
            os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        from lightning.pytorch.loggers import WandbLogger

        return [
            WandbLogger(
                project=logger_cfg.project, name=name or None, save_dir=str(out_dir), offline=logger_cfg.offline
            )
        ]
    raise ValueError(f"logger.kind must be csv, wandb or none, got {logger_cfg.kind!r}")
