"""What the profiler and the validation time with: timers, the machine's load, the runtime's path decisions.

Models and linears are timed on the packed runtime ``archquant.kernels.qlinear.QuantLinear``
(``archquant.kernels.swap.to_runtime`` puts a model on it); ``RUNTIME_NAME`` is what table headers
record for it.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from archquant.kernels.path_select import path_cache
from archquant.latency.scenario import Scenario

RUNTIME_NAME = "QuantLinear"  # the module every timed linear runs (recorded in table headers' ``method``)


def linear_path_decisions() -> dict[str, str]:
    """Which QuantLinear path each profiled shape ran (``K x N / bits / M bucket -> path``), for table headers."""
    return {
        f"{k.k}x{k.n}/w{k.wbits}a{k.abits}g{k.group_size}/m{k.m_bucket}": c.path
        for k, c in sorted(path_cache().items(), key=lambda kv: (kv[0].k, kv[0].n, kv[0].wbits, kv[0].abits, kv[0].m_bucket))
    }


def machine_load() -> dict[str, float]:
    """1-minute load average and CPU count: timings on a busy shared machine are inflated, so record it."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = float("nan")
    return {"loadavg_1m": round(load1, 2), "cpus": os.cpu_count() or 1}


def busy_warning() -> str | None:
    """A message when other processes occupy the CPU (load average above the core count), else None."""
    load = machine_load()
    if load["loadavg_1m"] > load["cpus"]:
        return (f"the machine is busy (1-min load average {load['loadavg_1m']} on {load['cpus']} CPUs): timings will be "
                "inflated and noisy; profile or validate on a quiet machine")
    return None


# ---- timers ----------------------------------------------------------------------------------
def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


_FLUSH: dict[str, torch.Tensor] = {}


def last_level_cache_bytes() -> int:
    """Size of the CPU's last-level cache (32 MiB when sysfs does not say)."""
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            txt = (idx / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
        best = max(best, int(txt.rstrip("KMG")) * mult)
    return best or 32 << 20


def flush_cache(device: torch.device | str = "cpu") -> None:
    """Write a buffer twice the last-level cache so that the next op finds its data in DRAM.

    Write-only (``fill_``): it evicts as well as a read-modify-write at half the memory traffic.
    """
    key = str(device)
    if key not in _FLUSH:
        with torch.inference_mode(False):  # a normal tensor: updatable in and out of inference mode
            _FLUSH[key] = torch.zeros(2 * last_level_cache_bytes() // 4, device=device)
    buf = _FLUSH[key]
    buf.fill_(float(buf[0]) + 1.0)


def time_op_ms(fn: Callable[[], object], device: torch.device | str = "cpu", min_run_time: float = 0.2,
               cold: bool = False) -> float:
    """Median milliseconds of ``fn()`` after warm-up.

    CUDA: GPU time as a CUDA graph replays the op (``kernels.path_select.cuda_graph_ms``: L2 cleared
    before each call, no Python or launch time), since the decode runtime replays graphs. CPU,
    ``cold``: the median of single calls, each after ``flush_cache`` (in a decode step every op's
    weights and KV cache arrive from DRAM: the whole model streams through the cache between two
    uses), ``max(15, 250 * min_run_time)`` calls. CPU, warm: ``torch.utils.benchmark.Timer.blocked_autorange``
    with torch's current thread count (the Timer otherwise runs single-threaded), median over blocks.
    """
    if torch.device(device).type == "cuda":
        from archquant.kernels.path_select import cuda_graph_ms

        return cuda_graph_ms(fn, calls=max(10, int(min_run_time * 1000)))
    for _ in range(3):
        fn()
    if cold:
        times = []
        for _ in range(max(15, int(250 * min_run_time))):
            flush_cache(device)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3
    import torch.utils.benchmark as benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return float(timer.blocked_autorange(min_run_time=min_run_time).median * 1e3)


def _forward(model: nn.Module, ids: torch.Tensor, cache, logits_to_keep: int | None):
    kwargs = {"use_cache": True}
    if cache is not None:
        kwargs["past_key_values"] = cache
    if logits_to_keep is not None:
        kwargs["logits_to_keep"] = logits_to_keep
    return model(input_ids=ids, **kwargs)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


def time_model_ms(
    model: nn.Module, scenario: Scenario, *, repeats: int = 7, steps: int = 8, seed: int = 0,
    cuda_graphs: bool = True,
) -> float:
    """End-to-end milliseconds of one scenario forward of a whole model (median of ``repeats``).

    ``decode``: fill the KV cache with ``context`` tokens (untimed), then time ``steps`` one-token
    forwards and report ms per token; the cache is cropped back to ``context`` between repeats. On
    CUDA (unless ``cuda_graphs=False``) the steps are replayed from a captured graph over a static
    cache (``archquant.engine.static_decode``), as a serving engine runs them.
    ``prefill``: one ``[batch, prefill_len]`` forward into an empty cache, logits of the last position.
    """
    device = next(model.parameters(), torch.empty(0)).device
    if scenario.name != "prefill" and device.type == "cuda" and cuda_graphs:
        return _time_graph_decode_ms(model, scenario, repeats=repeats, steps=steps, seed=seed)
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    keep = 1 if _accepts_logits_to_keep(model) else None
    if keep is None:
        warnings.warn("model.forward has no logits_to_keep: the lm_head runs on every position, unlike the tables")
    times = []
    with torch.inference_mode():
        if scenario.name == "prefill":
            ids = torch.randint(0, vocab, (scenario.batch, scenario.prefill_len), generator=gen).to(device)
            _forward(model, ids, None, keep)  # warm-up
            for _ in range(repeats):
                sync(device)
                t0 = time.perf_counter()
                _forward(model, ids, None, keep)
                sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        ctx, step = _decode_ids(vocab, scenario, seed, device)
        cache = _forward(model, ctx, None, keep).past_key_values
        for r in range(repeats + 1):  # the first round warms up
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                _forward(model, step, cache, keep)
            sync(device)
            if r:
                times.append((time.perf_counter() - t0) * 1e3 / steps)
            cache.crop(scenario.context - cache.get_seq_length())  # negative: drop the tokens just decoded
    return statistics.median(times)


def _decode_ids(vocab: int, scenario: Scenario, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode timing's random context ``[B, context]`` and next token ``[B, 1]`` (the same for both runtimes)."""
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randint(0, vocab, (scenario.batch, scenario.context), generator=gen).to(device)
    return ctx, torch.randint(0, vocab, (scenario.batch, 1), generator=gen).to(device)


def _time_graph_decode_ms(model: nn.Module, scenario: Scenario, *, repeats: int, steps: int, seed: int) -> float:
    """``time_model_ms``'s decode through ``StaticDecoder`` (CUDA graph replays), median ms per token."""
    from archquant.engine.static_decode import StaticDecoder

    device = next(model.parameters()).device
    ctx, step = _decode_ids(int(model.config.vocab_size), scenario, seed, device)
    dec = StaticDecoder(model, batch=scenario.batch, max_len=scenario.context + steps + 1, graph=True)
    dec.prefill(ctx)
    dec.capture()
    times = []
    for r in range(repeats + 1):  # the first round warms up
        dec.reset(scenario.context)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            dec.step(step)
        torch.cuda.synchronize(device)
        if r:
            times.append((time.perf_counter() - t0) * 1e3 / steps)
    return statistics.median(times)
