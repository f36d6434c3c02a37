"""Config of the ``export`` group (``archquant-export``, ``archquant-generate``)."""

from __future__ import annotations

from dataclasses import dataclass

FORMATS = ("packed", "compressed_tensors", "gguf")
FLOAT_DTYPES = ("float16", "bfloat16", "float32")


ENGINES = ("auto", "llamacpp", "torch")


@dataclass
class ExportConfig:
    """What to export, in which formats, where; and the ``generate`` settings.

    Attributes:
        arch: an ``arch.json`` (from ``archquant-search``/``-pick``) to materialise from ``model.name``.
        checkpoint: a folder written by ``archquant-distill`` (holds the weights and its ``arch.json``);
            wins over ``arch``.
        record: a JSON file whose facts (predicted/measured latency, metrics) go into ``archquant.json``
            (e.g. ``picked.json`` or ``search.json``); the distillation record is added automatically.
        formats: any of ``packed`` (always written), ``compressed_tensors``, ``gguf``; null = ``packed`` +
            ``compressed_tensors`` (+ ``gguf`` when ``latency.backend=llamacpp`` on CPU).
        out: the export folder (relative to the run folder unless absolute).
        float_dtype: storage dtype of the embedding and 16-bit linears.
        overwrite: replace an existing export folder.
        verify: load the written folder back and check the round trip is bit-exact.
        path: export folder (or model name) that ``archquant-generate`` runs (null = ``model.name``).
        prompt: prompt of ``archquant-generate``.
        max_new_tokens: tokens ``archquant-generate`` adds (greedy).
        engine: what ``archquant-generate`` runs: ``auto`` (the folder's ``model.gguf`` in llama.cpp when there
            is one and ``llama-cpp-python`` is installed, else the packed model), ``llamacpp`` or ``torch``.
    """

    arch: str | None = None
    checkpoint: str | None = None
    record: str | None = None
    formats: list[str] | None = None
    out: str = "export"
    float_dtype: str = "float16"
    overwrite: bool = False
    verify: bool = True
    path: str | None = None
    prompt: str = "The capital of France is"
    max_new_tokens: int = 32
    engine: str = "auto"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"export.engine must be one of {list(ENGINES)}, got {self.engine!r}")
        if self.formats is not None:
            unknown = [f for f in self.formats if f not in FORMATS]
            if unknown:
                raise ValueError(f"export.formats has unknown entries {unknown}; choose from {list(FORMATS)}")
        if self.float_dtype not in FLOAT_DTYPES:
            raise ValueError(f"export.float_dtype must be one of {list(FLOAT_DTYPES)}, got {self.float_dtype!r}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"export.max_new_tokens must be > 0, got {self.max_new_tokens}")
        if not self.out:
            raise ValueError("export.out must name a folder (e.g. export.out=export)")

    def resolved_formats(self, backend: str, device: str) -> list[str]:
        """``formats``, or the default for this backend/device; ``packed`` always first."""
        if self.formats is None:
            out = ["packed", "compressed_tensors"]
            if backend == "llamacpp" and device == "cpu":
                out.append("gguf")
        else:
            out = list(dict.fromkeys(["packed", *self.formats]))
        return out
