"""Resolve the data files named in ``DataConfig`` and fail with the key to set when one is missing."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from archquant.data.config import DataConfig
from archquant.utils.paths import DATA_ENV, default_data_root
from archquant.utils.errors import UserError


class DataFileNotFoundError(UserError, FileNotFoundError):
    """A configured data file does not exist; the message names the config key that fixes it."""


class DataFormatError(UserError, ValueError):
    """A data file exists but does not follow its schema (missing field, bad label, bad JSON)."""


def data_root(data_cfg: DataConfig | None = None) -> Path:
    """The benchmark folder: ``data.root``, else ``$ARCHQUANT_DATA``, else ``../shared/data``."""
    if data_cfg is not None and data_cfg.root:
        return Path(data_cfg.root).expanduser()
    return default_data_root()


def _lookup(data_cfg: DataConfig, key: str) -> str:
    if key.startswith("task_files."):
        task = key.split(".", 1)[1]
        if task not in data_cfg.task_files:
            raise KeyError(f"no data file is configured for task {task!r}; known: {sorted(data_cfg.task_files)}")
        return data_cfg.task_files[task]
    if key not in ("calib_file", "ppl_file"):
        raise KeyError(f"unknown data key {key!r}; use calib_file, ppl_file or task_files.<task>")
    return getattr(data_cfg, key)


def resolve_data_path(data_cfg: DataConfig | None, key: str) -> Path:
    """Absolute path of the file behind a data config key, checked to exist.

    Args:
        data_cfg: the ``data`` config (None = defaults).
        key: ``calib_file``, ``ppl_file`` or ``task_files.<task>`` (e.g. ``task_files.piqa``).

    Returns:
        The file's path: the key's value if absolute, else ``data_root(data_cfg) / value``.

    Raises:
        DataFileNotFoundError: the file is missing; the message names ``data.<key>`` and ``data.root``.
    """
    data_cfg = data_cfg or DataConfig()
    rel = Path(_lookup(data_cfg, key)).expanduser()
    root = data_root(data_cfg)
    path = rel if rel.is_absolute() else root / rel
    if not path.is_file():
        where = "data.root" if data_cfg.root else f"data.root (or ${DATA_ENV})"
        root_note = "" if rel.is_absolute() else f" (data root {root}{'' if root.is_dir() else ', which does not exist'})"
        raise DataFileNotFoundError(
            f"data.{key}: file {path} not found{root_note}. Set data.{key}=/path/to/file, "
            f"or {where} to the folder that holds {rel}."
        )
    return path.resolve()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (cache keys change when the text changes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def set_datasets_offline() -> None:
    """Keep ``datasets`` and the hub client off the network: every file archquant reads is local."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    offline = os.environ["HF_DATASETS_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE")
    if offline and "datasets" in sys.modules:  # imported earlier: its config already read the environment
        import datasets.config

        datasets.config.HF_DATASETS_OFFLINE = True
