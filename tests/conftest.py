"""Test-session setup: Triton runs in its CPU interpreter when no GPU is present; latency estimates are pinned.

``TRITON_INTERPRET`` is read when triton is first imported, so it is set here, before any test module
(or archquant module that imports triton) is collected. ``ARCHQUANT_ROOFLINE`` pins the roofline estimate
(used for the tiny model, which has no profiled table) to fixed parameters, so budgets derived from it are
the same on every machine, however fast or busy; subprocesses started by tests inherit it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("ARCHQUANT_ROOFLINE", str(Path(__file__).resolve().parent / "data" / "roofline.json"))


@pytest.fixture(scope="module")
def one_thread_module():
    """One intra-op thread for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread_module")``):
    tiny models gain nothing from more threads, and on a loaded machine the hand-offs dominate."""
    from tests._tiny import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="module")
def script(request):
    """The module ``scripts/<SCRIPT>.py`` named by the test module's ``SCRIPT`` constant, imported once."""
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{request.module.SCRIPT}.py"
    spec = importlib.util.spec_from_file_location(request.module.SCRIPT, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
