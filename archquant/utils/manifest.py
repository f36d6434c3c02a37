"""``manifest.json``: the sha256 and size of every file of a folder (an export), checked before loading.

Loaders check a folder as a whole (``verify_manifest``); an engine that opens one file of such a folder
on its own (llama.cpp serving ``model.gguf``) checks just that file (``verify_file``), so a modified
or truncated copy is refused with its name instead of being served or crashing the engine.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from archquant.utils.errors import UserError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20


class ManifestError(UserError, ValueError):
    """An export folder whose files do not match its manifest (tampered, truncated or incomplete)."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (model files do not fit comfortably in memory twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    """Every regular file under ``folder`` except the manifest itself, sorted by relative path."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME and "__pycache__" not in p.parts)


def build_manifest(folder: str | Path) -> dict[str, Any]:
    """``{"version": 1, "algorithm": "sha256", "files": {relative path: {"sha256", "bytes"}}}`` of a folder."""
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in _files(folder)
    }
    return {"version": MANIFEST_VERSION, "algorithm": "sha256", "files": files}


def write_manifest(folder: str | Path) -> dict[str, Any]:
    """Hash every file of ``folder`` and write ``manifest.json`` there (call last, after every other file)."""
    folder = Path(folder)
    manifest = build_manifest(folder)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The parsed ``manifest.json`` of ``folder``; refuses a missing, unparsable or newer-version one."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.exists():
        raise ManifestError(f"{folder} has no {MANIFEST_NAME}; it is not a complete archquant export (re-run archquant-export)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path} is not valid JSON ({err}); re-run archquant-export") from err
    version = manifest.get("version")
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise ManifestError(
            f"{path} has manifest version {version!r}; this archquant reads up to version {MANIFEST_VERSION} "
            "(upgrade archquant to load this export)"
        )
    return manifest


def verify_manifest(folder: str | Path, *, only: list[str] | None = None) -> dict[str, Any]:
    """Check that every file listed in the manifest exists with the recorded size and sha256.

    Args:
        folder: the export folder.
        only: check just these relative paths (default: every listed file).

    Raises:
        ManifestError: naming each missing, resized or modified file.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    listed = manifest.get("files", {})
    names = list(listed) if only is None else only
    problems = []
    for name in names:
        entry = listed.get(name)
        p = folder / name
        if entry is None:
            problems.append(f"{name}: not in the manifest")
        elif not p.is_file():
            problems.append(f"{name}: missing")
        elif p.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: {p.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif sha256_file(p) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
    if problems:
        raise ManifestError(
            f"export folder {folder} does not match its manifest ({'; '.join(problems)}): the files were modified "
            "or copied incompletely. Re-copy the folder or re-run archquant-export."
        )
    return manifest


def verify_file(path: str | Path) -> bool:
    """Check one file against the ``manifest.json`` beside it, when there is one.

    For a loader that opens a single file of a folder (a GGUF served by llama.cpp): a file whose
    folder has a manifest must be listed there with the recorded size and sha256.

    Returns:
        True when the file was checked and matches; False when its folder has no manifest.

    Raises:
        ManifestError: naming the file when it is modified, truncated, missing or not listed.
    """
    path = Path(path)
    if not (path.parent / MANIFEST_NAME).is_file():
        return False
    verify_manifest(path.parent, only=[path.name])
    return True
