"""``archquant-profile``: build the latency table of this device for a model, search space, backend and scenario.

    archquant-profile latency.backend=torch latency.scenario=decode          # the committed CPU tables
    archquant-profile latency.backend=torch latency.scenario=prefill
    archquant-profile model=tiny-llama space=tiny latency.backend=torch latency.min_run_time=0.01   # smoke
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from archquant.backends import Backend, BackendError, get_backend
from archquant.latency.loader import table_path
from archquant.latency.model import LatencyModel
from archquant.latency.profiler import OpRunners, fit_overheads, method_string, profile_ops, time_depths
from archquant.latency.roofline import measure_roofline, save_roofline
from archquant.kernels.swap import to_runtime
from archquant.latency.runtime import busy_warning, linear_path_decisions, machine_load, time_model_ms
from archquant.latency.scenario import Scenario
from archquant.latency.table import LatencyTable
from archquant.core.arch import Arch
from archquant.core.space import Space, resolve_space
from archquant.utils.env import device_name, now, versions


def _materialize():
    """``archquant.supernet.materialize``'s verbs, or None where the supernet package is not installed."""
    try:
        from archquant.supernet import build, materialize
    except ImportError:
        return None
    return build, materialize


def depth_timings(model: nn.Module, space: Space, scenario: Scenario, depths: list[int], backend: Backend,
                  *, repeats: int = 5, log: Callable[[str], None] = print) -> dict[int, float]:
    """Whole-model ms at each depth, the model running on the quantised-linear runtime.

    With the supernet installed the timed model is ``materialize(full arch with blocks >= depth
    skipped)``, i.e. exactly what the validation runs; otherwise the HF model truncated to ``depth``.
    """
    verbs = _materialize()
    if verbs is None:
        log("  (archquant.supernet.materialize not available: timing the HF model truncated in depth)")
        return time_depths(to_runtime(model), scenario, depths, repeats=repeats)
    build, materialize = verbs
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
    from archquant.core.space import SpaceConfig

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


def profile_table(model: nn.Module, space: Space, backend: Backend, scenario: Scenario, *, device: str = "cpu",
                  min_run_time: float = 0.1, e2e_repeats: int = 5, cold: bool | None = None,
                  log: Callable[[str], None] = print) -> LatencyTable:
    """Profile every op signature of ``space`` and fit the overheads; returns the table (not saved)."""
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
        "device": device_name(device),
        "backend": backend.name,
        **scenario.header(),
        "model": dict(space.fingerprint),
        "versions": versions(),
        "date": now(),
        "method": method_string(device, min_run_time, runners.cold),
        "threads": torch.get_num_threads(),
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


def _uses_reference_quantiser(backend: Backend) -> bool:
    # QuantLinear implements the reference quantiser; a backend with its own weight format needs its own timer.
    return type(backend).fake_quant_weight is Backend.fake_quant_weight


def profile(cfg) -> LatencyTable:
    """The ``archquant-profile`` verb: profile, write ``latency_tables/<device>/<model>-<backend>-<scenario>.json``.

    A backend that serves through another engine supplies ``backend.profile_table(model, space,
    scenario, latency_cfg) -> LatencyTable``; the others are timed with this package's runtime.
    """
    from archquant.models.registry import load_model

    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    lat = cfg.latency
    if lat.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("archquant-profile: latency.device=cuda but no CUDA device is visible; use latency.device=cpu")
    backend = get_backend(lat.backend)
    dtype = getattr(torch, cfg.model.dtype)
    model, _ = load_model(cfg.model.name, dtype=dtype, seed=cfg.model.seed)
    model.eval()
    space = resolve_space(backend.restrict_space(cfg.space, model.config), model.config)
    scenario = Scenario.from_config(lat)
    out = Path(lat.out) if lat.out else table_path(cfg.model.name, backend.name, scenario, lat.device)
    print(f"archquant-profile: {cfg.model.name} on {device_name(lat.device)}, backend {backend.name}, "
          f"scenario {scenario.header()}")
    print(space.describe())
    hook = getattr(backend, "profile_table", None)
    if hook is not None:
        table = hook(model, space, scenario, lat)
    elif _uses_reference_quantiser(backend):
        table = profile_table(model, space, backend, scenario, device=lat.device, min_run_time=lat.min_run_time,
                              e2e_repeats=lat.e2e_repeats)
    else:
        raise BackendError(
            f"backend {backend.name!r} has its own weight format but no profile_table hook: its engine must time itself "
            "(install the backend's profiler, or profile latency.backend=torch)"
        )
    table.save(out)
    save_roofline(out.parent / "roofline.json", measure_roofline(lat.device, dtype), lat.device)
    lm = LatencyModel(space, table, backend)
    lo, hi = lm.range_ms()
    print(f"wrote {out} ({sum(len(v) for v in table.ops.values())} entries); "
          f"full model predicted {lm.predict_ms(Arch.full(space)):.3f} ms, space range {lo:.3f}-{hi:.3f} ms")
    return table

