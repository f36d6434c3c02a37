"""What the profiler and the validation time: the quantised-linear runtime, a model swapped onto it, timers.

``make_linear_runner`` is the one place that decides which module runs a quantised linear:
``archquant.kernels.qlinear.QuantLinear`` when it is installed, else a plain ``F.linear`` on the
dequantised weight (what the supernet simulates; it runs at fp32 speed whatever the bits, and tables
made with it say so in ``header.method``).
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from archquant.backends import Backend, get_backend
from archquant.latency.scenario import Scenario

LINEAR_PATHS = {
    "q": ("self_attn", "q_proj"),
    "k": ("self_attn", "k_proj"),
    "v": ("self_attn", "v_proj"),
    "o": ("self_attn", "o_proj"),
    "gate": ("mlp", "gate_proj"),
    "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}


def _quant_linear_cls():
    try:
        from archquant.kernels.qlinear import QuantLinear
    except ImportError:
        return None
    return QuantLinear


def runtime_name() -> str:
    """Which module ``make_linear_runner`` builds (recorded in every table header)."""
    return "QuantLinear" if _quant_linear_cls() is not None else "F.linear fallback (archquant.kernels.qlinear missing)"


class FallbackLinear(nn.Module):
    """``F.linear`` on the cached dequantised weight, after the backend's activation fake-quant.

    Shape: ``x [..., K]`` -> ``[..., N]``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, wbits: int, abits: int, group_size: int,
                 backend: Backend) -> None:
        super().__init__()
        with torch.no_grad():
            w = backend.fake_quant_weight(weight.detach(), wbits, group_size)
        self.register_buffer("weight", w.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.wbits, self.abits, self.backend = wbits, abits, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.abits < 16:
            x = self.backend.fake_quant_act(x, self.abits, self.wbits)
        return F.linear(x, self.weight, self.bias)


def make_linear_runner(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    wbits: int,
    abits: int,
    group_size: int,
    backend: Backend | str = "torch",
    paths: tuple[str, ...] | None = None,
) -> nn.Module:
    """The module that serves one linear at ``wbits``/``abits`` (QuantLinear, or the fallback).

    Args:
        weight: fp weight on the target device. Shape: ``[N, K]``.
        bias: ``[N]`` or None.
        wbits, abits: bit-widths (16 = unquantised).
        group_size: weight-quantisation group size (must divide K when ``wbits < 16``).
        backend: the engine whose quantiser semantics the fallback simulates.
        paths: restrict QuantLinear's execution paths (None: it measures and picks the fastest).

    Raises:
        BackendError: bits the backend has no kernel for.
    """
    backend = get_backend(backend) if isinstance(backend, str) else backend
    if wbits not in backend.weight_bits or abits not in backend.act_bits:
        from archquant.backends import BackendError

        raise BackendError(
            f"backend {backend.name!r} has no kernel for W{wbits}A{abits} (weights {backend.weight_bits}, "
            f"activations {backend.act_bits})"
        )
    cls = _quant_linear_cls()
    if cls is not None:
        return cls.from_float(weight.detach(), None if bias is None else bias.detach(), wbits, abits, group_size,
                              backend=backend, paths=paths)
    return FallbackLinear(weight, bias, wbits, abits, group_size, backend)


def to_runtime(model: nn.Module, *, copy: bool = False) -> nn.Module:
    """Swap every decoder linear (and the lm_head) for ``make_linear_runner`` modules.

    Bits come from ``model.config.quant`` (a materialised subnet) or are 16 (a plain HF model).
    Linears are built from the stored raw weights, as exporters do. This is what a latency
    measurement of the ``torch``/``triton`` backends must time: a materialised subnet on its own
    runs fake-quantised fp32 weights, at fp32 speed whatever its bits.

    Args:
        model: a materialised ``ArchQuantForCausalLM`` or a Llama-family HF model.
        copy: swap in a deep copy and leave ``model`` untouched (default: in place).
    """
    if copy:
        import copy as _copy

        model = _copy.deepcopy(model)
    quant = getattr(model.config, "quant", None) or {}
    backend = get_backend(quant.get("backend", "torch"), quant.get("backend_options"))
    g = int(quant.get("group_size", 64))
    layers = model.model.layers
    qlayers = quant.get("layers") or [{}] * len(layers)
    if len(qlayers) != len(layers):
        raise ValueError(f"config.quant has {len(qlayers)} layer entries for {len(layers)} blocks")
    for layer, lq in zip(layers, qlayers):
        wbits, abits = lq.get("wbits", {}), int(lq.get("abits", 16))
        for lin, (sub, attr) in LINEAR_PATHS.items():
            parent = getattr(layer, sub)
            mod = getattr(parent, attr)
            bits = int(wbits.get(lin, 16))
            setattr(parent, attr, make_linear_runner(mod.weight, getattr(mod, "bias", None), bits, abits, g, backend))
    lm_bits = int(quant.get("lm_head_bits", 16))
    head = model.lm_head
    model.lm_head = make_linear_runner(head.weight, getattr(head, "bias", None), lm_bits, 16, g, backend)
    return model


def linear_path_decisions() -> dict[str, str]:
    """Which QuantLinear path each profiled shape ran (``K x N / bits / M bucket -> path``), for table headers."""
    try:
        from archquant.kernels.path_select import path_cache
    except ImportError:
        return {}
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
        _FLUSH[key] = torch.zeros(2 * last_level_cache_bytes() // 4, device=device)
    buf = _FLUSH[key]
    buf.fill_(float(buf[0]) + 1.0)


def time_op_ms(fn: Callable[[], object], device: torch.device | str = "cpu", min_run_time: float = 0.2,
               cold: bool = False) -> float:
    """Median milliseconds of ``fn()`` after warm-up.

    CUDA: ``triton.testing.do_bench`` (flushes L2 between runs, median). CPU, ``cold``: the median of
    single calls, each after ``flush_cache`` (in a decode step every op's weights and KV cache arrive
    from DRAM: the whole model streams through the cache between two uses), ``max(15, 250 *
    min_run_time)`` calls. CPU, warm: ``torch.utils.benchmark.Timer.blocked_autorange`` with torch's
    current thread count (the Timer otherwise runs single-threaded), median over blocks.
    """
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=max(20, int(min_run_time * 1000)), return_mode="median"))
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
    model: nn.Module, scenario: Scenario, *, repeats: int = 7, steps: int = 8, seed: int = 0
) -> float:
    """End-to-end milliseconds of one scenario forward of a whole model (median of ``repeats``).

    ``decode``: fill the KV cache with ``context`` tokens (untimed), then time ``steps`` one-token
    forwards and report ms per token; the cache is cropped back to ``context`` between repeats.
    ``prefill``: one ``[batch, prefill_len]`` forward into an empty cache, logits of the last position.
    """
    device = next(model.parameters(), torch.empty(0)).device
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
        ctx = torch.randint(0, vocab, (scenario.batch, scenario.context), generator=gen).to(device)
        step = torch.randint(0, vocab, (scenario.batch, 1), generator=gen).to(device)
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
