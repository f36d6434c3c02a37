"""Measured choice of a QuantLinear execution path, cached per (device, M bucket, K, N, bits).

No path is fastest everywhere on CPU (measured in NOTES.md and ``scripts/bench_kernels.py``): the
bf16 int4 kernel wins batch-1 decode while fp32 ``F.linear`` wins prefill-sized M by 2-3x, and the
crossover moves with the shape. So each shape class is timed once, on the first call, and the winner
is remembered for every layer of the same shape.

Decode-sized M (<= ``COLD_MAX_M``) is timed with a cold cache (a buffer larger than the last-level
cache is written between calls): in a model forward each layer's weights come from DRAM, and a warm
loop would favour the largest (fp32) format. Candidates are interleaved round by round so that load
from other processes hits them alike, and the lower quartile decides: preemption by other processes
only ever adds time (measured here: 2-thread kernels stalling 10-20 ms on a loaded 2-core machine),
so a low quantile estimates a path's own cost better than the median or mean.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

M_BUCKET_CAP = 256  # CPU: larger M reuses the 256 decision (measured here: fp32 dense already wins at 128 and 256)
CUDA_M_BUCKET_CAP = 4096  # CUDA: GEMM-vs-dequantise crossovers lie between 64 and a few thousand rows
COLD_MAX_M = 16
_BUDGET_S = 2.0  # measuring time per key, after the first round
_MIN_ROUNDS, _MAX_ROUNDS = 3, 15
_DROP_FACTOR = 3.0  # a candidate this much slower than the best in round 1 is not timed again


@dataclass(frozen=True)
class PathKey:
    """What a path decision depends on."""

    device: str
    m_bucket: int
    k: int
    n: int
    wbits: int
    abits: int
    group_size: int
    dtype: str  # activation dtype: fp32 and bf16 inputs run different kernels
    candidates: tuple[str, ...] = ()  # sorted names measured; a restricted module gets its own entry


@dataclass
class PathChoice:
    """A decision and the per-path times (ms, lower quartile) it was made from."""

    path: str
    timings_ms: dict[str, float]


_CACHE: dict[PathKey, PathChoice] = {}
_FLUSH: dict[str, torch.Tensor] = {}


def m_bucket(m: int, device: torch.device | str = "cpu") -> int:
    """Next power of two >= m, capped at ``M_BUCKET_CAP`` (``CUDA_M_BUCKET_CAP`` on CUDA)."""
    cap = CUDA_M_BUCKET_CAP if torch.device(device).type == "cuda" else M_BUCKET_CAP
    b = 1
    while b < m and b < cap:
        b *= 2
    return b


def device_key(device: torch.device) -> str:
    from archquant.utils.env import device_name

    return device_name(str(device)) if device.type == "cuda" else f"cpu-{torch.get_num_threads()}t"


def cached_choice(key: PathKey) -> PathChoice | None:
    return _CACHE.get(key)


def path_cache() -> dict[PathKey, PathChoice]:
    """A copy of every decision taken in this process (for logs and latency-table headers)."""
    return dict(_CACHE)


def clear_path_cache() -> None:
    _CACHE.clear()


def _llc_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            txt = f.read().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20}.get(txt[-1], 1)
        return int(txt.rstrip("KM")) * mult
    except (OSError, ValueError):
        return 32 << 20


def _flush_cache(device: torch.device) -> None:
    key = str(device)
    if key not in _FLUSH:
        with torch.inference_mode(False):  # a normal tensor: updatable in and out of inference mode
            _FLUSH[key] = torch.empty(2 * max(_llc_bytes(), 8 << 20) // 4, device=device)
    _FLUSH[key].add_(1.0)


def time_once(fn: Callable[[], object], device: torch.device, cold: bool) -> float:
    """Seconds one call of ``fn`` takes (synchronised on CUDA)."""
    if cold:
        _flush_cache(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def measure(candidates: dict[str, Callable[[], object]], device: torch.device, m: int) -> dict[str, float]:
    """Lower-quartile milliseconds per candidate, interleaved; slow candidates are dropped after round 1.

    Args:
        candidates: path name -> zero-argument callable running that path once.
        device: where they run.
        m: rows of the input they run on (decides cold vs warm timing).
    """
    if device.type == "cuda":
        return _measure_cuda(candidates)
    cold = m <= COLD_MAX_M
    with torch.no_grad():
        for fn in candidates.values():  # warm-up: allocations, lazy init, JIT compile
            fn()
        samples = {name: [time_once(fn, device, cold)] for name, fn in candidates.items()}
        best = min(s[0] for s in samples.values())
        alive = [n for n in candidates if samples[n][0] <= _DROP_FACTOR * best]
        per_round = sum(samples[n][0] for n in alive) + (1e-3 if cold else 0.0) * len(alive)
        rounds = int(min(_MAX_ROUNDS, max(_MIN_ROUNDS, _BUDGET_S / max(per_round, 1e-9))))
        for _ in range(rounds - 1):
            for name in alive:
                samples[name].append(time_once(candidates[name], device, cold))
    return {name: _lower_quartile(s) * 1e3 for name, s in samples.items()}


def _measure_cuda(candidates: dict[str, Callable[[], object]]) -> dict[str, float]:
    """GPU milliseconds per candidate as a CUDA graph replays it, L2 cleared before each call (``cuda_graph_ms``)."""
    with torch.no_grad():
        return {name: cuda_graph_ms(fn) for name, fn in candidates.items()}


_GRAPH_FALLBACK_WARNED: set[str] = set()


def cuda_graph_ms(fn: Callable[[], object], *, cold: bool = True, calls: int = 20, replays: int = 5) -> float:
    """Milliseconds of GPU time of one ``fn()`` call, timed the way a served decode step runs it.

    Measured on an H200 (``scripts/gpu_check.sh``): timed one call at a time, a small kernel's time is
    its Python dispatch and launch (bf16 ``F.linear`` 4096x4096 at M=1 read as 19 us, Triton and gemlite
    launches as 100-350 us whatever the shape), while a decode step replayed from a CUDA graph pays
    none of that (SmolLM2-135M: 3.1 ms/token replayed, 62.6 ms eagerly). So ``fn`` is captured
    ``calls`` times into one graph and the graph is replayed; with ``cold`` each call is preceded by a
    write of twice the L2 cache (a decode step reads every weight from HBM), and a graph of those writes
    alone is timed too and subtracted. Median over ``replays``. A function that cannot be captured
    (one that synchronises with the host) is timed with ``triton.testing.do_bench`` instead, with a warning.
    """
    device = torch.device("cuda", torch.cuda.current_device())
    flush = _l2_flush_buffer(device) if cold else None
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(side):
            fn()
            fn()  # warm-up: lazy preparation, autotuning, allocator
        torch.cuda.current_stream(device).wait_stream(side)
        work = _replay_ms(_capture(fn, flush, calls), replays)
        base = _replay_ms(_capture(None, flush, calls), replays) if cold else 0.0
    except RuntimeError as err:  # e.g. "operation not permitted when stream is capturing"
        torch.cuda.synchronize(device)
        key = getattr(fn, "__qualname__", repr(fn))
        if key not in _GRAPH_FALLBACK_WARNED:
            _GRAPH_FALLBACK_WARNED.add(key)
            warnings.warn(f"could not time {key} inside a CUDA graph ({err}); timing its launches with do_bench instead")
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5, rep=20, return_mode="median"))
    return max(work - base, 0.0) / calls


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20) or 64 << 20
        with torch.inference_mode(False):
            _FLUSH[key] = torch.empty(2 * l2, dtype=torch.uint8, device=device)
    return _FLUSH[key]


def _capture(fn: Callable[[], object] | None, flush: torch.Tensor | None, calls: int) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            if flush is not None:
                flush.zero_()
            if fn is not None:
                fn()
    return graph


def _replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    graph.replay()  # first replay uploads the graph
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _lower_quartile(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 4]


def choose(key: PathKey, candidates: dict[str, Callable[[], object]], device: torch.device) -> PathChoice:
    """The cached decision for ``key``, measuring ``candidates`` the first time.

    ``key.candidates`` must list ``candidates``' names (sorted); a single candidate is not measured.
    """
    if len(candidates) == 1:
        return PathChoice(next(iter(candidates)), {})
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    timings = measure(candidates, device, key.m_bucket)
    choice = PathChoice(min(timings, key=timings.get), timings)
    _CACHE[key] = choice
    return choice
