"""Resolve the data files named in ``DataConfig``: under the local root, or written from the Hub.

A missing file fails with the keys that fix it: where local files are (``data.root`` /
``$ARCHQUANT_DATA``) and, for a file the Hub provides, how to get it from there (``data.source=hub``,
or ``archquant-data pull <dir>`` on a machine with internet).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from archquant.data.config import CALIB_FILES, DataConfig
from archquant.data.errors import DataFileNotFoundError, DataFormatError, HubUnavailableError
from archquant.data.hub import HUB_FILES, set_datasets_offline, user_offline, write_hub_file
from archquant.utils.paths import DATA_ENV, default_data_root, hub_data_root

# re-exported: the errors and the offline switch have always been imported from here
__all__ = ["DataFileNotFoundError", "DataFormatError", "data_root", "file_sha256", "resolve_data_path", "set_datasets_offline"]


def data_root(data_cfg: DataConfig | None = None) -> Path:
    """The folder relative data names resolve against.

    ``data.root`` if set; else ``$ARCHQUANT_DATA`` or ``../shared/data`` (``data.source=local``), or
    ``$ARCHQUANT_CACHE/hub_data`` (``data.source=hub``: where the files written from the Hub are kept).
    """
    if data_cfg is not None and data_cfg.root:
        return Path(data_cfg.root).expanduser()
    if data_cfg is not None and data_cfg.source == "hub":
        return hub_data_root()
    return default_data_root()


def _lookup(data_cfg: DataConfig, key: str, root: Path) -> str:
    if key.startswith("task_files."):
        task = key.split(".", 1)[1]
        if task not in data_cfg.task_files:
            raise KeyError(f"no data file is configured for task {task!r}; known: {sorted(data_cfg.task_files)}")
        return data_cfg.task_files[task]
    if key not in ("calib_file", "ppl_file"):
        raise KeyError(f"unknown data key {key!r}; use calib_file, ppl_file or task_files.<task>")
    if key == "calib_file" and data_cfg.calib_file is None:
        # the first corpus present; else the first this source can provide (so the error names it)
        present = [c for c in CALIB_FILES if (root / c).is_file()]
        provided = [c for c in CALIB_FILES if data_cfg.source == "local" or c in HUB_FILES]
        return (present or provided)[0]
    return getattr(data_cfg, key)


# the Hub's two ways to a file, for the message when it is not on disk
HUB_WAYS = (
    "read it from the Hugging Face Hub: data.source=hub where there is internet, or "
    "`archquant-data pull <dir>` on a machine with internet, then data.root=<dir> here"
)


def resolve_data_path(data_cfg: DataConfig | None, key: str) -> Path:
    """Absolute path of the file behind a data config key, checked to exist.

    Under ``data.source=hub`` a relative name that is not on disk yet is written from the Hub first
    (``archquant.data.hub.HUB_FILES``); absolute paths are local files under either source.

    Args:
        data_cfg: the ``data`` config (None = defaults).
        key: ``calib_file``, ``ppl_file`` or ``task_files.<task>`` (e.g. ``task_files.piqa``).

    Returns:
        The file's path: the key's value if absolute, else ``data_root(data_cfg) / value``.

    Raises:
        DataFileNotFoundError: the file is missing (and the Hub could not provide it); the message
            names ``data.<key>``, ``data.root`` and the Hub's ways.
    """
    data_cfg = data_cfg or DataConfig()
    root = data_root(data_cfg)
    rel = Path(_lookup(data_cfg, key, root)).expanduser()
    path = rel if rel.is_absolute() else root / rel
    if path.is_file():
        return path.resolve()
    calib_default = key == "calib_file" and data_cfg.calib_file is None
    hub_has_it = calib_default or (not rel.is_absolute() and rel.as_posix() in HUB_FILES)
    if data_cfg.source == "hub" and not rel.is_absolute():
        if not hub_has_it:
            raise DataFileNotFoundError(
                f"data.{key}: {rel} is not a file the Hub provides (data.source=hub); it provides "
                f"{sorted(HUB_FILES)}. Use one of those names, or an absolute path to a local file."
            )
        try:
            return write_hub_file(rel.as_posix(), root).resolve()
        except HubUnavailableError as err:
            blocked = user_offline()
            note = f" ({', '.join(blocked)} set in the environment keeps datasets offline)" if blocked else ""
            raise DataFileNotFoundError(
                f"data.{key}: {rel} is neither in {root} nor readable from the Hugging Face Hub{note}: {err}. "
                f"Use local files instead: data.source=local and data.root=<dir> (or ${DATA_ENV}) at a folder that "
                f"holds {rel}, one that `archquant-data pull <dir>` wrote on a machine with internet if need be."
            ) from err
    where = "data.root" if data_cfg.root else f"data.root (or ${DATA_ENV})"
    wanted = " or ".join(CALIB_FILES) if calib_default else str(rel)
    root_note = "" if rel.is_absolute() else f" (data root {root}{'' if root.is_dir() else ', which does not exist'})"
    raise DataFileNotFoundError(
        f"data.{key}: file {path} not found{root_note}. Set data.{key}=/path/to/file, "
        f"or {where} to the folder that holds {wanted}{'; or ' + HUB_WAYS if hub_has_it else ''}."
    )


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (cache keys change when the text changes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
