"""Measured latency of a subnet in the engine that serves it: ``measure_latency(model_or_arch, latency_cfg)``.

One function for every backend; a backend plugs in its meter either as a ``measure_latency(model,
latency_cfg, **context)`` method on its ``Backend`` object or through ``register_latency_meter``.
Built in: ``torch``/``triton`` time the materialised model (``latency_tables.runtime.time_model_ms``);
``llamacpp`` writes the model as GGUF and times it in llama.cpp, which is what CPU users deploy.
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from archquant.backends import get_backend
from archquant.core.arch import Arch
from archquant.latency.interval import MedianInterval, median_interval
from archquant.latency.scenario import Scenario

log = logging.getLogger(__name__)

_METERS: dict[str, Callable[..., "LatencyMeasurement"]] = {}


@dataclass
class LatencyMeasurement:
    """One end-to-end timing: ``ms`` per scenario forward (per token for decode), the statistic ``method`` names
    (torch: median of ``samples``; llama.cpp: their minimum, the statistic its tables are fitted on).

    Attributes:
        ci_ms: where the figure is a median over timing rounds (``measure_interleaved``), the order-statistic
            confidence interval ``(lo, hi)`` of that median (``latency.interval.median_interval``); None
            for a single timing, whose spread is unknown.
        ci_level: the interval's exact coverage (below the confidence asked for when the rounds were too few).
    """

    ms: float
    method: str
    samples: list[float] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    ci_ms: tuple[float, float] | None = None
    ci_level: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"ms": self.ms, "method": self.method, "samples": self.samples,
                "ci_ms": None if self.ci_ms is None else [float(x) for x in self.ci_ms], "ci_level": self.ci_level,
                **self.details}


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
            "archquant.latency.measure.register_latency_meter or give the backend a measure_latency method"
        )
    return meter(model, latency_cfg, **context)


def _time_torch(model, latency_cfg, *, repeats: int = 7, **_) -> LatencyMeasurement:
    from archquant.latency.runtime import time_model_ms

    model.eval()
    ms = time_model_ms(model, Scenario.from_config(latency_cfg), repeats=repeats)
    return LatencyMeasurement(ms=float(ms), method="torch: transformers-style forward with KV cache, median")


register_latency_meter("torch")(_time_torch)
register_latency_meter("triton")(_time_torch)


def _llamacpp_setup(model, latency_cfg, path: Path, *, tokenizer=None, source_gguf=None, threads=None, **_):
    """Export ``model`` to ``path`` (the types it was materialised with) and return what timing needs."""
    from archquant.engine.gguf_writer import export_gguf, plan_gguf

    scenario = Scenario.from_config(latency_cfg)
    if scenario.batch != 1:
        raise ValueError(f"the llama.cpp meter times batch 1; got latency.batch={scenario.batch}")
    types = plan_gguf(model).types
    export_gguf(model, path, source_gguf=source_gguf, tokenizer=None if source_gguf else tokenizer, types=types)
    return scenario, threads or torch.get_num_threads(), types


def _time_gguf_file(path: Path, scenario: Scenario, threads: int, tokens: int | None, types: dict) -> LatencyMeasurement:
    """One llama.cpp session on ``path``, timed as the tables are profiled (``profiler.time_gguf``; ``tokens``
    decoded tokens, default the profiler's)."""
    from archquant.latency.llamacpp_profiler import DECODE_TOKENS, time_gguf

    res = time_gguf(path, scenario, threads=threads, decode_tokens=tokens or DECODE_TOKENS)
    samples = [float(s) for s in res["samples"]]
    # the statistic the llama.cpp tables are fitted on (the least-disturbed run); the median is kept too
    return LatencyMeasurement(
        ms=res["ms"],
        method=f"llama.cpp {scenario.name}, {threads} threads, minimum of {len(samples)} samples (as the tables)",
        samples=samples,
        details={"median_ms": res["median"], "gguf_mb": path.stat().st_size / 1e6,
                 "types": {str(k): v for k, v in types.items()}},
    )


@register_latency_meter("llamacpp")
def _time_llamacpp(
    model,
    latency_cfg,
    *,
    tokenizer=None,
    source_gguf: str | Path | None = None,
    threads: int | None = None,
    tokens: int | None = None,
    keep_gguf: str | Path | None = None,
    **_,
) -> LatencyMeasurement:
    """Export to GGUF with the model's tensor types and time it in llama.cpp (batch 1)."""
    with tempfile.TemporaryDirectory(prefix="archquant-gguf-") as tmp:
        path = Path(keep_gguf) if keep_gguf else Path(tmp) / "model.gguf"
        scenario, threads, types = _llamacpp_setup(model, latency_cfg, path, tokenizer=tokenizer,
                                                   source_gguf=source_gguf, threads=threads)
        return _time_gguf_file(path, scenario, threads, tokens, types)


# ---- several models timed together -------------------------------------------------------------
Timer = Callable[[], LatencyMeasurement]


def prepare_timer(model_fn: Callable[[], Any], latency_cfg, workdir: str | Path, *, model=None, **context) -> Timer:
    """A no-argument callable timing one model, for ``measure_interleaved``.

    llama.cpp: the model (``model`` if given, else ``model_fn()``) is exported once to ``workdir/model.gguf``
    now and not kept; every call times that file. Other backends: every call times ``model_fn()`` with
    ``measure_latency`` (a factory, so that a caller need not keep several large models alive at once).
    """
    if latency_cfg.backend == "llamacpp" and _METERS.get("llamacpp") is _time_llamacpp:  # not a user's own meter
        path = Path(workdir) / "model.gguf"
        path.parent.mkdir(parents=True, exist_ok=True)
        tokens = context.pop("tokens", None)
        scenario, threads, types = _llamacpp_setup(model if model is not None else model_fn(), latency_cfg, path,
                                                   **context)
        return lambda: _time_gguf_file(path, scenario, threads, tokens, types)
    return lambda: measure_latency(model_fn(), latency_cfg, **context)


def file_timer(path: str | Path, latency_cfg, *, threads: int | None = None, tokens: int | None = None) -> Timer:
    """A timer of a GGUF file as it is (a llama-quantize preset, the user's original file), for ``measure_interleaved``."""
    from archquant.engine.gguf_reader import read_header

    scenario = Scenario.from_config(latency_cfg)
    if scenario.batch != 1:
        raise ValueError(f"the llama.cpp meter times batch 1; got latency.batch={scenario.batch}")
    path = Path(path)
    _, tensors = read_header(path)
    types = {"file": sorted({t.type for t in tensors})}
    return lambda: _time_gguf_file(path, scenario, threads or torch.get_num_threads(), tokens, types)


def measure_interleaved(
    timers: dict[str, Timer],
    rounds: int = 3,
    progress: bool = False,
    *,
    max_rounds: int | None = None,
    ci: float = 0.03,
    confidence: float = 0.95,
) -> dict[str, LatencyMeasurement]:
    """Time several models in rounds, each timing every model once in a rotated order, until every model's
    median over rounds is known to within ``ci`` (or ``max_rounds`` is reached).

    A machine's speed drifts (here by up to 20% within an hour); timing model after model lets that drift
    reorder them. Interleaving spreads it over all of them: a model's figure is the median over rounds of
    its per-round statistic (for llama.cpp, a session's minimum, as its tables are fitted); ``samples``
    holds the per-round values, ``details["round_samples"]`` each round's raw samples. Three rounds were not
    enough here (two points read 8.05 vs 9.92 ms in one run, 9.44 vs 9.42 in another), so every figure
    carries its interval (``ci_ms``, ``latency.interval.median_interval``) and rounds continue while any
    model's interval is not yet within ``±ci`` of its median at ``confidence``: each extra round again times
    every model, so they stay interleaved. At 95% that takes at least 6 rounds (with fewer, no order-statistic
    interval reaches 95%), and ``max_rounds`` bounds the cost on a noisy machine; ``details`` records
    whether each model's interval ``settled``.

    Args:
        timers: name -> no-argument callable timing one model (``prepare_timer``).
        rounds: the minimum number of rounds (``pareto.timing_rounds``).
        max_rounds: the cap (``pareto.timing_max_rounds``); None = ``rounds`` (a fixed number of rounds).
        ci: the target relative half-width (``pareto.timing_ci``): 0.03 = the interval lies within ±3% of the
            median (its larger side counts).
        confidence: the interval's coverage (``pareto.timing_confidence``).
        progress: a progress bar.
    """
    max_rounds = rounds if max_rounds is None else max_rounds
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds} (pareto.timing_rounds)")
    if max_rounds < rounds:
        raise ValueError(f"max_rounds ({max_rounds}) must be >= rounds ({rounds}) (pareto.timing_max_rounds)")
    if not (ci > 0 and math.isfinite(ci)):
        raise ValueError(f"ci must be > 0 and finite, got {ci} (pareto.timing_ci)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence} (pareto.timing_confidence)")
    names = list(timers)
    per: dict[str, list[LatencyMeasurement]] = {n: [] for n in names}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=rounds * len(names), desc="timing (interleaved)", unit="run")
    done = 0
    while True:
        for j in range(len(names)):
            name = names[(j + done) % len(names)]
            per[name].append(timers[name]())
            if bar is not None:
                bar.update()
        done += 1
        if done >= max_rounds:
            break
        if done >= rounds:
            wide = _unsettled(per, ci, confidence)
            if not wide:
                break
            log.info("timing round %d of at most %d: %s", done + 1, max_rounds, "; ".join(wide[:3]))
            if bar is not None:
                bar.total += len(names)
                bar.refresh()
    if bar is not None:
        bar.close()
    out = {}
    for name, ms in per.items():
        values = [m.ms for m in ms]
        iv = median_interval(values, confidence)
        raw = [x for m in ms for x in m.samples]
        details = {**ms[0].details, "rounds": done, "round_samples": [m.samples for m in ms]}
        if raw:
            details["median_ms"] = float(statistics.median(raw))
        details["ci_target"] = ci
        details["ci_confidence"] = confidence
        details["settled"] = _settled(iv, ci)
        method = ms[0].method if done == 1 else f"median over {done} interleaved rounds of: {ms[0].method}"
        if iv is not None:
            method += f"; {iv.level:.1%} order-statistic interval"
        out[name] = LatencyMeasurement(
            ms=float(statistics.median(values)), method=method, samples=values, details=details,
            ci_ms=None if iv is None else (iv.lo, iv.hi), ci_level=None if iv is None else iv.level,
        )
    return out


def _settled(iv: MedianInterval | None, ci: float) -> bool:
    """The interval exists, has the confidence asked for and lies within ``±ci`` of the median."""
    return iv is not None and iv.reached and iv.rel_halfwidth <= ci


def _unsettled(per: dict[str, list[LatencyMeasurement]], ci: float, confidence: float) -> list[str]:
    """Why another round is needed: one line per model whose interval has not settled, widest first (empty
    when every interval has)."""
    wide = []
    for name, ms in per.items():
        iv = median_interval([m.ms for m in ms], confidence)
        if _settled(iv, ci):
            continue
        if iv is None or not iv.reached:
            level = "no interval" if iv is None else f"{iv.level:.1%} < {confidence:.0%} coverage"
            wide.append((math.inf, f"{name}: {level} after {len(ms)} rounds"))
        else:
            wide.append((iv.rel_halfwidth, f"{name}: ±{iv.rel_halfwidth:.1%} > ±{ci:.1%}"))
    return [why for _, why in sorted(wide, key=lambda w: -w[0])]
