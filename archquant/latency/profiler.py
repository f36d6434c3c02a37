"""The profiler: time exactly the op signatures a space can produce, then fit the per-block/per-token overheads.

Ops run as the served model runs them (``QuantLinear`` for linears, the model's own
attention function, RMSNorm, SiLU-and-multiply, embedding) on inputs shaped by the scenario. For
decode-sized inputs (<= ``COLD_MAX_TOKENS`` rows) on CPU each timed call follows a cache flush, because
in a real decode step every weight and KV cache arrives from DRAM (the model streams through the cache
between two uses of a layer); prefill-sized ops reuse their weights across rows and are timed warm.
On CUDA ops are timed as a replayed CUDA graph runs them, L2 cleared before each call. What the ops do not see (residual adds, dispatch, RoPE tables,
masks) is measured by timing the whole model at several depths: the slope over depth minus the
block's ops is ``per_layer``, the intercept minus the model ops is ``per_token``.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from archquant.backends import Backend
from archquant.core.space import Space
from archquant.kernels.qlinear import QuantLinear
from archquant.latency.runtime import RUNTIME_NAME, time_model_ms, time_op_ms
from archquant.latency.scenario import Scenario
from archquant.latency.signatures import enumerate_signatures

COLD_MAX_TOKENS = 16  # rows up to which a linear is weight-bandwidth bound (decode), as in kernels.path_select


class OpRunners:
    """Builds a zero-argument callable per op signature, on ``device`` in ``dtype``, for one scenario."""

    def __init__(self, scenario: Scenario, backend: Backend, group_size: int, *, device="cpu", dtype=torch.float32,
                 vocab: int = 32000, attn_implementation: str = "sdpa", hidden_act: str = "silu", eps: float = 1e-5,
                 cold: bool | None = None, linear_paths: tuple[str, ...] | None = None) -> None:
        self.sc, self.backend, self.g = scenario, backend, group_size
        self.device, self.dtype = torch.device(device), dtype
        self.vocab, self.attn_impl, self.hidden_act, self.eps = vocab, attn_implementation, hidden_act, eps
        self.cold = self.device.type == "cpu" and scenario.tokens <= COLD_MAX_TOKENS if cold is None else cold
        self.linear_paths = linear_paths
        self.gen = torch.Generator().manual_seed(0)

    def _rand(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.gen) * scale).to(self.device, self.dtype)

    def linear(self, sig: dict, rows: int | None = None) -> Callable:
        k, n = sig["K"], sig["N"]
        rows = self.sc.tokens if rows is None else rows
        w = self._rand(n, k, scale=0.02)
        mod = QuantLinear.from_float(w, None, sig["wbits"], sig["abits"], self.g, self.backend, self.linear_paths)
        x = self._rand(self.sc.batch, rows // self.sc.batch, k)  # x: [B, S, K] as inside the model
        return lambda: mod(x)

    def lm_head(self, sig: dict) -> Callable:
        return self.linear(sig, rows=self.sc.lm_head_tokens)

    def attention(self, sig: dict) -> Callable:
        """RoPE on q/k, KV-cache append, the model's attention function, output reshape (no projections)."""
        h, kv, hd = sig["heads"], sig["kv_heads"], sig["head_dim"]
        b, s, past = self.sc.batch, self.sc.seq, self.sc.past
        q, k, v = self._rand(b, s, h * hd), self._rand(b, s, kv * hd), self._rand(b, s, kv * hd)
        cos, sin = self._rand(b, s, hd), self._rand(b, s, hd)
        pk, pv = self._rand(b, kv, past, hd), self._rand(b, kv, past, hd)
        mask = None
        if self.attn_impl == "eager" and s > 1:  # eager needs the explicit causal mask the model would build
            mask = torch.full((s, s), float("-inf"), device=self.device, dtype=self.dtype).triu(1)[None, None]
        return lambda: attention_core(q, k, v, cos, sin, pk, pv, head_dim=hd, attn_implementation=self.attn_impl, mask=mask)

    def norm(self, sig: dict) -> Callable:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        mod = LlamaRMSNorm(sig["d"], eps=self.eps).to(self.device, self.dtype)
        x = self._rand(self.sc.batch, self.sc.seq, sig["d"])
        return lambda: mod(x)

    def act(self, sig: dict) -> Callable:
        from transformers.activations import ACT2FN

        fn = ACT2FN[self.hidden_act]
        g, u = self._rand(self.sc.batch, self.sc.seq, sig["d"]), self._rand(self.sc.batch, self.sc.seq, sig["d"])
        return lambda: fn(g) * u

    def embedding(self, sig: dict) -> Callable:
        emb = nn.Embedding(self.vocab, sig["d"]).to(self.device, self.dtype)
        ids = torch.randint(0, self.vocab, (self.sc.batch, self.sc.seq), generator=self.gen).to(self.device)
        return lambda: emb(ids)

    def runner(self, kind: str, sig: dict) -> Callable:
        return getattr(self, kind)(sig)


def attention_core(q, k, v, cos, sin, past_k, past_v, *, head_dim: int, attn_implementation: str = "sdpa",
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """What ``LlamaAttention.forward`` does between its projections (the timed ``attention`` op).

    Shape: ``q [B, S, H*hd]``, ``k, v [B, S, KV*hd]``, ``cos, sin [B, S, hd]``, ``past_k, past_v
    [B, KV, P, hd]`` (``P = 0``: empty cache) -> ``[B, S, H*hd]``.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

    b, s, _ = q.shape
    qs = q.view(b, s, -1, head_dim).transpose(1, 2)
    ks = k.view(b, s, -1, head_dim).transpose(1, 2)
    vs = v.view(b, s, -1, head_dim).transpose(1, 2)
    qs, ks = apply_rotary_pos_emb(qs, ks, cos, sin)
    if past_k.shape[-2]:  # DynamicCache.update concatenates; an empty cache just stores the new states
        ks, vs = torch.cat([past_k, ks], dim=-2), torch.cat([past_v, vs], dim=-2)
    module = _AttnShim(qs.shape[1] // ks.shape[1])
    attn_fn = ALL_ATTENTION_FUNCTIONS.get_interface(attn_implementation, eager_attention_forward)
    out, _ = attn_fn(module, qs, ks, vs, mask, dropout=0.0, scaling=head_dim**-0.5)
    return out.reshape(b, s, -1).contiguous()


class _AttnShim(nn.Module):
    """The attributes HF attention functions read from their calling module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal, self.layer_idx = groups, True, 0
        self.eval()


def profile_ops(
    space: Space,
    runners: OpRunners,
    *,
    min_run_time: float = 0.1,
    kinds: tuple[str, ...] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, list[dict]]:
    """Time every distinct signature of ``space`` (``kind -> [{**sig, "ms"}]``); overheads are left out."""
    sigs = {k: v for k, v in enumerate_signatures(space).items() if k != "overhead" and (kinds is None or k in kinds)}
    total = sum(len(v) for v in sigs.values())
    log(f"profiling {total} distinct op signatures ({', '.join(f'{k} {len(v)}' for k, v in sigs.items())})")
    ops: dict[str, list[dict]] = {}
    done, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for kind, rows in sigs.items():
            out = []
            for sig in rows:
                fn = runners.runner(kind, sig)
                out.append({**sig, "ms": round(time_op_ms(fn, runners.device, min_run_time, runners.cold), 6)})
                del fn
                done += 1
                if done % 50 == 0 or done == total:
                    el = time.perf_counter() - t0
                    log(f"  {done}/{total} signatures, {el:.0f} s elapsed, ~{el / done * (total - done):.0f} s left")
            ops[kind] = out
    return ops


def fit_overheads(depth_ms: dict[int, float], block_ops_ms: float, model_ops_ms: float) -> dict[str, float]:
    """Least-squares line ``ms = a + b * depth`` through whole-model timings -> the two overheads.

    Args:
        depth_ms: blocks kept -> measured end-to-end ms.
        block_ops_ms: sum of one full block's op entries.
        model_ops_ms: sum of the model ops (embedding, final norm, lm_head) at full width.

    Returns:
        ``{"per_layer": b - block_ops_ms, "per_token": a - model_ops_ms}`` (may be negative when the
        isolated ops are slower than inside the model, e.g. cache-cold timings of a model that fits in cache).
    """
    xs, ys = list(depth_ms), list(depth_ms.values())
    if len(xs) < 2:
        raise ValueError("fit_overheads needs timings at two or more depths")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"per_layer": slope - block_ops_ms, "per_token": my - slope * mx - model_ops_ms}


def time_depths(model: nn.Module, scenario: Scenario, depths: list[int], *, repeats: int = 5) -> dict[int, float]:
    """End-to-end ms of ``model`` truncated to its first ``depth`` blocks, for each depth (restored after)."""
    layers, n0 = model.model.layers, model.config.num_hidden_layers
    out = {}
    try:
        for depth in depths:
            model.model.layers = nn.ModuleList(list(layers)[:depth])
            model.config.num_hidden_layers = depth
            out[depth] = time_model_ms(model, scenario, repeats=repeats)
    finally:
        model.model.layers, model.config.num_hidden_layers = layers, n0
    return out


def method_string(device: torch.device | str, min_run_time: float, cold: bool) -> str:
    dev = torch.device(device)
    timer = "CUDA-graph replay, L2 cleared before each call" if dev.type == "cuda" else (
        f"torch.utils.benchmark blocked_autorange median (min_run_time {min_run_time} s, {torch.get_num_threads()} threads)"
    )
    cache = "; ops timed cache-cold: median of single calls, each after writing a 2x LLC buffer" if cold else ""
    return f"per-op {timer}, linears via {RUNTIME_NAME}{cache}; overheads fitted from whole-model timings over depth"
