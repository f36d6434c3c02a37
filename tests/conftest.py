"""Test-session setup: Triton runs in its CPU interpreter when no GPU is present.

``TRITON_INTERPRET`` is read when triton is first imported, so it is set here, before any test module
(or archquant module that imports triton) is collected.
"""

from __future__ import annotations

import os
import shutil

if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
