"""Measured latency of a subnet in the engine that serves it: ``measure_latency(model_or_arch, latency_cfg)``.

One function for every backend; a backend plugs in its meter either as a ``measure_latency(model,
latency_cfg, **context)`` method on its ``Backend`` object or through ``register_latency_meter``.
Built in: ``torch``/``triton`` time the materialised model (``latency_tables.runtime.time_model_ms``);
``llamacpp`` writes the model as GGUF and times it in llama.cpp, which is what CPU users deploy.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from archquant.backends.base import get_backend
from archquant.latency_tables.scenario import Scenario
from archquant.supernet.arch import Arch

_METERS: dict[str, Callable[..., "LatencyMeasurement"]] = {}


@dataclass
class LatencyMeasurement:
    """One end-to-end timing: ``ms`` per scenario forward (per token for decode), the statistic ``method`` names
    (torch: median of ``samples``; llama.cpp: their minimum, the statistic its tables are fitted on)."""

    ms: float
    method: str
    samples: list[float] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ms": self.ms, "method": self.method, "samples": self.samples, **self.details}


def register_latency_meter(backend_name: str):
    """Decorator registering ``fn(model, latency_cfg, **context) -> LatencyMeasurement`` for a backend name."""

    def deco(fn):
        _METERS[backend_name] = fn
        return fn

    return deco


def measure_latency(model_or_arch, latency_cfg, *, supernet=None, **context) -> LatencyMeasurement:
    """Time a model (or an ``Arch``, materialised from ``supernet``) in ``latency.backend`` for ``latency.scenario``.

    Args:
        model_or_arch: a causal LM (materialised subnet or original model), or an ``Arch``.
        latency_cfg: ``LatencyConfig`` (backend, scenario, batch, context, prefill_len).
        supernet: needed when ``model_or_arch`` is an ``Arch``.
        **context: what a meter may need: ``tokenizer``, ``source_gguf`` (llama.cpp), ``threads``, ``repeats``.

    Raises:
        ValueError: an ``Arch`` without a supernet, or a backend with no meter.
    """
    model = model_or_arch
    if isinstance(model_or_arch, Arch):
        if supernet is None:
            raise ValueError("measure_latency(arch, ...) needs supernet= to materialise the architecture")
        from archquant.supernet import materialize

        model = materialize(supernet, model_or_arch)
    backend = get_backend(latency_cfg.backend)
    meter = getattr(backend, "measure_latency", None) or _METERS.get(backend.name)
    if meter is None:
        raise ValueError(
            f"backend {backend.name!r} has no latency meter; register one with "
            "archquant.search.measure.register_latency_meter or give the backend a measure_latency method"
        )
    return meter(model, latency_cfg, **context)


def _time_torch(model, latency_cfg, *, repeats: int = 7, **_) -> LatencyMeasurement:
    from archquant.latency_tables.runtime import time_model_ms

    model.eval()
    ms = time_model_ms(model, Scenario.from_config(latency_cfg), repeats=repeats)
    return LatencyMeasurement(ms=float(ms), method="torch: transformers-style forward with KV cache, median")


register_latency_meter("torch")(_time_torch)
register_latency_meter("triton")(_time_torch)


@register_latency_meter("llamacpp")
def _time_llamacpp(
    model,
    latency_cfg,
    *,
    tokenizer=None,
    source_gguf: str | Path | None = None,
    threads: int | None = None,
    tokens: int = 32,
    keep_gguf: str | Path | None = None,
    **_,
) -> LatencyMeasurement:
    """Export to GGUF with the backend's tensor types and time it in llama.cpp (batch 1)."""
    from archquant.backends.llamacpp.gguf_export import export_gguf
    from archquant.backends.llamacpp.runtime import LlamaCppRunner

    scenario = Scenario.from_config(latency_cfg)
    if scenario.batch != 1:
        raise ValueError(f"the llama.cpp meter times batch 1; got latency.batch={scenario.batch}")
    backend = get_backend("llamacpp")
    threads = threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="archquant-gguf-") as tmp:
        path = Path(keep_gguf) if keep_gguf else Path(tmp) / "model.gguf"
        export_gguf(model, path, source_gguf=source_gguf, tokenizer=None if source_gguf else tokenizer, types=backend.types)
        size_mb = path.stat().st_size / 1e6
        n_ctx = (scenario.context + 8) if scenario.name == "decode" else scenario.prefill_len
        with LlamaCppRunner(path, n_ctx=n_ctx, n_threads=threads, n_batch=max(n_ctx, 32)) as runner:
            if scenario.name == "decode":
                res = runner.time_decode(context=scenario.context, tokens=tokens)
            else:
                res = runner.time_prefill(length=scenario.prefill_len)
    samples = [float(s) for s in res["samples"]]
    # the statistic the llama.cpp tables are fitted on (the least-disturbed run); the median is kept too
    return LatencyMeasurement(
        ms=min(samples),
        method=f"llama.cpp {scenario.name}, {threads} threads, minimum of {len(samples)} samples (as the tables)",
        samples=samples,
        details={"median_ms": float(statistics.median(samples)), "gguf_mb": size_mb,
                 "types": {str(k): v for k, v in backend.types.items()}},
    )
