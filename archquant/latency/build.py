"""Build the latency table of a model, space, backend and scenario on this device (the ``archquant-profile`` verb's
work): llama.cpp's backend is timed in llama.cpp itself, the reference backends on this package's runtime.
"""

from __future__ import annotations

import time
from typing import Callable

from torch import nn

from archquant.backends import Backend, BackendError
from archquant.core.arch import Arch
from archquant.core.space import Space, SpaceConfig
from archquant.kernels.swap import to_runtime
from archquant.latency.config import LatencyConfig
from archquant.latency.llamacpp_profiler import profile_table as profile_llamacpp_table
from archquant.latency.model import LatencyModel
from archquant.latency.profiler import OpRunners, fit_overheads, method_string, profile_ops
from archquant.latency.runtime import busy_warning, linear_path_decisions, machine_load, time_model_ms
from archquant.latency.scenario import Scenario
from archquant.latency.table import LatencyTable, base_header
from archquant.supernet import build, materialize


def profile_table(model: nn.Module, space: Space, backend: Backend, scenario: Scenario,
                  latency_cfg: LatencyConfig) -> LatencyTable:
    """The table of ``backend``: timed in llama.cpp for ``llamacpp``, else on the reference runtime.

    Raises:
        BackendError: a backend with its own weight format and no profiler of its engine.
    """
    if backend.name == "llamacpp":
        return profile_llamacpp_table(model, space, scenario, latency_cfg, backend=backend)
    if type(backend).fake_quant_weight is not Backend.fake_quant_weight:
        # QuantLinear runs the reference quantiser; another weight format needs its own engine's profiler
        raise BackendError(f"backend {backend.name!r} has its own weight format but no profiler: profile "
                           "latency.backend=torch, or add its engine's profiler here")
    return profile_reference_table(model, space, backend, scenario, device=latency_cfg.device,
                                   min_run_time=latency_cfg.min_run_time, e2e_repeats=latency_cfg.e2e_repeats)


def depth_timings(model: nn.Module, space: Space, scenario: Scenario, depths: list[int], backend: Backend,
                  *, repeats: int = 5, log: Callable[[str], None] = print) -> dict[int, float]:
    """Whole-model ms at each depth, the model running on the quantised-linear runtime.

    The timed model is ``materialize(full arch with blocks >= depth skipped)``, exactly what the validation runs.
    """
    sn = build(model, _space_config_of(space), backend=backend)
    out = {}
    for depth in depths:
        arch = Arch.full(space)
        for i, la in enumerate(arch.layers):
            la.keep = i < depth
        sub = to_runtime(materialize(sn, arch).eval())
        out[depth] = time_model_ms(sub, scenario, repeats=repeats)
        del sub
    return out


def _space_config_of(space: Space):
    """A ``SpaceConfig`` that resolves to ``space`` (absolute widths as fractions of the original)."""
    fp = space.fingerprint
    qpg = fp["num_attention_heads"] // fp["num_key_value_heads"]
    return SpaceConfig(
        hidden=[h / fp["hidden_size"] for h in space.hidden],
        kv_groups=[k / fp["num_key_value_heads"] for k in space.kv_groups],
        q_per_group=[q / qpg for q in space.q_per_group],
        head_dim=[h / fp["head_dim"] for h in space.head_dim],
        mlp=[m / fp["intermediate_size"] for m in space.mlp],
        depth=space.depth,
        wbits=list(space.wbits),
        abits=list(space.abits),
        lm_head_bits=list(space.lm_head_bits),
        group_size=space.group_size,
        width_multiple=1,
        bits_granularity=space.bits_granularity,
    )


def profile_reference_table(model: nn.Module, space: Space, backend: Backend, scenario: Scenario, *, device: str = "cpu",
                  min_run_time: float = 0.1, e2e_repeats: int = 5, cold: bool | None = None,
                  log: Callable[[str], None] = print) -> LatencyTable:
    """The reference runtime's table: profile every op signature of ``space`` and fit the overheads (not saved)."""
    t0 = time.perf_counter()
    load_start = machine_load()
    if busy_warning():
        log(f"WARNING: {busy_warning()}")
    cfg = model.config
    dtype = next(model.parameters()).dtype
    runners = OpRunners(
        scenario, backend, space.group_size, device=device, dtype=dtype, vocab=int(cfg.vocab_size),
        attn_implementation=getattr(cfg, "_attn_implementation", None) or "sdpa",
        hidden_act=getattr(cfg, "hidden_act", "silu"), eps=float(getattr(cfg, "rms_norm_eps", 1e-5)), cold=cold,
    )
    ops = profile_ops(space, runners, min_run_time=min_run_time, log=log)
    header = {
        **base_header(space, backend, scenario, device, method_string(device, min_run_time, runners.cold)),
        "dtype": str(dtype).replace("torch.", ""),
        "attn_implementation": runners.attn_impl,
        "space": space.to_dict(),
        "linear_paths": linear_path_decisions(),
    }
    zero = [{"name": "per_layer", "ms": 0.0}, {"name": "per_token", "ms": 0.0}]  # fitted below
    table = LatencyTable(header=header, ops={**ops, "overhead": zero})
    lm = LatencyModel(space, table, backend)
    full = Arch.full(space)
    parts = lm.breakdown_ms(full)
    model_names = {"embed_tokens", "norm", "lm_head"}
    block_ms = sum(v for k, v in parts.items() if k not in model_names) / space.num_layers
    model_ms = sum(v for k, v in parts.items() if k in model_names)
    L = space.num_layers
    depths = sorted({L, max(1, L // 2), max(1, L // 4)})
    log(f"timing the whole model at depths {depths} for the per-block / per-token overheads")
    depth_ms = depth_timings(model.to(device), space, scenario, depths, backend, repeats=e2e_repeats, log=log)
    if len(depth_ms) >= 2:
        over = fit_overheads(depth_ms, block_ms, model_ms)
    else:  # a one-block model: no slope to fit, everything unexplained is per token
        over = {"per_layer": 0.0, "per_token": depth_ms[L] - block_ms - model_ms}
    table.ops["overhead"] = [{"name": k, "ms": round(v, 6)} for k, v in over.items()]
    table.header["overhead_fit"] = {"depth_ms": {str(k): round(v, 4) for k, v in depth_ms.items()},
                                    "block_ops_ms": round(block_ms, 4), "model_ops_ms": round(model_ms, 4)}
    table.header["profile_seconds"] = round(time.perf_counter() - t0, 1)
    table.header["machine_load"] = {"start": load_start, "end": machine_load()}
    ops_sum = L * block_ms + model_ms
    log(f"overheads: per_layer {over['per_layer']:.4f} ms, per_token {over['per_token']:.4f} ms "
        f"(full model measured {depth_ms[L]:.3f} ms; ops sum {ops_sum:.3f} ms)")
    if not 0.5 < ops_sum / depth_ms[L] < 1.5:
        log(f"WARNING: the isolated ops sum to {ops_sum / depth_ms[L]:.2f}x the whole model's time: the timings were "
            "disturbed (a busy machine?) or the ops do not describe this model; re-profile on a quiet machine")
    return LatencyTable.from_dict(table.to_dict())
