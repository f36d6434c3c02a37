"""Where archquant keeps its caches and where it looks for the benchmark data (shared or from the Hub)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "ARCHQUANT_CACHE"
DATA_ENV = "ARCHQUANT_DATA"


def cache_dir() -> Path:
    """Root of every on-disk cache (models, tokenised blocks, importance scores).

    Override with ``$ARCHQUANT_CACHE``; defaults to ``~/.cache/archquant``.
    """
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "archquant")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def default_data_root() -> Path:
    """Root of the benchmark/calibration text files.

    Override with ``$ARCHQUANT_DATA`` or the ``data.root`` config key. The default is the
    ``shared/data`` folder beside the repository checkout (``../shared/data``).
    """
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2]  # archquant/utils/paths.py -> the checkout
    for candidate in (repo.parent / "shared" / "data", repo / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return repo.parent / "shared" / "data"


def hub_data_root() -> Path:
    """Where ``data.source=hub`` keeps the files it wrote from the Hub: ``$ARCHQUANT_CACHE/hub_data``.

    Not the shared data folder: that one is read-only input, and a hub file (a seeded sample, for
    instance) is not byte-for-byte the shared file of the same name.
    """
    return cache_dir() / "hub_data"
