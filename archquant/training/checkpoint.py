"""Atomic checkpoints that carry the config they were made with, so a resume with another config is refused."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path
from typing import Any

import torch

from archquant.utils.errors import MissingFileError, UserError
from archquant.utils.io import atomic_write_bytes

CHECKPOINT_VERSION = 1
_NAME = re.compile(r"^step-(\d{8})\.ckpt$")


class ResumeMismatchError(UserError, ValueError):
    """A resume folder whose checkpoint was written under a different config."""


def config_identity(cfg: Any, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """Flatten a (dataclass / dict) config into ``{"group.key": value}``, leaving out ``ignore`` prefixes.

    The result is what a checkpoint must agree with on resume: keys that change the run's trajectory.
    """
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            node = dataclasses.asdict(node)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            if not any(prefix == p or prefix.startswith(p + ".") for p in ignore):
                flat[prefix] = list(node) if isinstance(node, tuple) else node

    walk("", cfg)
    return flat


def diff_identity(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ, as ``key (checkpoint: a, now: b)`` lines, sorted."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{k} (checkpoint: {saved.get(k, '<absent>')!r}, now: {current.get(k, '<absent>')!r})"
        for k in keys
        if saved.get(k, "<absent>") != current.get(k, "<absent>")
    ]


class CheckpointManager:
    """``<folder>/step-XXXXXXXX.ckpt`` files, each written atomically, the newest ``keep`` kept.

    A process killed while writing leaves at most a hidden temporary file, never a truncated
    checkpoint, so ``latest()`` always names a loadable file.
    """

    def __init__(self, folder: str | Path, identity: dict[str, Any], keep: int = 2) -> None:
        if keep <= 0:
            raise ValueError(f"keep must be > 0, got {keep}")
        self.folder = Path(folder)
        self.identity = identity
        self.keep = keep

    def paths(self) -> list[Path]:
        """Existing checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        paths = self.paths()
        return paths[-1] if paths else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` for ``step`` (call on rank 0 only) and drop checkpoints older than ``keep``."""
        buf = io.BytesIO()
        torch.save({"version": CHECKPOINT_VERSION, "step": step, "identity": self.identity, "state": state}, buf)
        path = self.folder / f"step-{step:08d}.ckpt"
        atomic_write_bytes(path, buf.getvalue())
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def load(self, path: str | Path | None = None) -> tuple[int, dict[str, Any]]:
        """Load a checkpoint (default: the latest) after checking it was made with the same config.

        Returns:
            ``(step, state)``: the number of completed steps and the loop's state.

        Raises:
            FileNotFoundError: no checkpoint in the folder.
            ResumeMismatchError: the checkpoint's config differs; the message names every differing key.
        """
        path = Path(path) if path is not None else self.latest()
        if path is None or not path.exists():
            raise MissingFileError(f"no checkpoint (step-*.ckpt) in {self.folder}")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("version") != CHECKPOINT_VERSION:
            raise ResumeMismatchError(
                f"{path} has checkpoint version {blob.get('version')!r}; this archquant reads {CHECKPOINT_VERSION}"
            )
        diff = diff_identity(blob["identity"], self.identity)
        if diff:
            raise ResumeMismatchError(
                f"cannot resume from {path.parent.parent}: it was made with a different config; differing keys: "
                + "; ".join(diff)
                + ". Resume with the same overrides, or start a fresh run folder."
            )
        return int(blob["step"]), blob["state"]
