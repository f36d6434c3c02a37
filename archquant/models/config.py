"""Config of the ``model`` group."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Which model to load.

    Attributes:
        name: ``smollm2-135m`` (embedded default), ``tiny-llama``, ``random:<shape>`` (random weights at a real
            model's shapes, e.g. ``random:llama-3.1-8b``), a local path or a hub id.
        dtype: parameter dtype of the original model (``float32``; ``bfloat16`` on GPU).
        seed: seed of the random ``tiny-llama`` weights.
    """

    name: str = "smollm2-135m"
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not self.name:
            raise ValueError("model.name must not be empty (e.g. model.name=smollm2-135m)")
