"""Check the llama.cpp latency tables: predicted vs measured latency of random materialised subnets.

Each subnet is cut from the supernet (``materialize``), exported with ``export_gguf`` (real
quantised weights) and timed in llama.cpp with the same runner and statistic the profiler used; the
prediction is ``LatencyModel.predict_ms`` over the committed table. A helper of
``bench_latency_model.py --backend llamacpp`` (imported from this folder), which writes the result.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

GOALS = {"median_rel_err": 0.05, "max_rel_err": 0.12}


def _summary(pred: list[float], meas: list[float]) -> dict:
    p, m = np.asarray(pred), np.asarray(meas)
    rel = np.abs(p - m) / m
    return {
        "n": int(len(m)),
        "median_rel_err": round(float(np.median(rel)), 4),
        "max_rel_err": round(float(rel.max()), 4),
        "mean_signed_rel_err": round(float(np.mean((p - m) / m)), 4),
        "meets_goals": bool(np.median(rel) <= GOALS["median_rel_err"] and rel.max() <= GOALS["max_rel_err"]),
    }


def validate_llamacpp(
    model_name: str = "smollm2-135m",
    *,
    n: int = 20,
    scenarios: tuple[str, ...] = ("decode", "prefill"),
    space_cfg=None,
    latency_cfg=None,
    tables: dict[str, str | Path] | None = None,
    seed: int = 1,
    threads: int | None = None,
    sessions: int = 3,
    log: Callable[[str], None] = print,
) -> dict:
    """Predicted vs measured llama.cpp latency of ``n`` random subnets, per scenario.

    Args:
        model_name: registry name, path or hub id of the base model.
        n: number of random subnets (depth uniform in 1..L, other gates uniform).
        scenarios: which tables to check (``decode`` at ``latency.context``, ``prefill`` at ``latency.prefill_len``).
        space_cfg: ``SpaceConfig`` (default: ``SpaceConfig()``, the README's default space), restricted by the
            llama.cpp backend.
        latency_cfg: ``LatencyConfig`` giving context / prefill length / strictness (default values otherwise).
        tables: scenario -> table path overriding the committed table lookup.
        seed: subnet sampling seed (the profiler uses 0: these subnets are not the ones it fitted on).
        threads: llama.cpp threads (default: torch's thread count).
        sessions: timing sessions (model loads) per subnet and scenario; the measurement is the tables'
            statistic over them (``session_stat``): one session alone scatters by ~10% on a shared VM.

    Returns:
        ``{"scenarios": {name: summary}, "subnets": [{arch summary, bits, file MB, predicted/measured per scenario}],
        "goals": GOALS, "table_headers": {...}}``.
    """
    import dataclasses

    import torch

    from archquant.backends import get_backend
    from archquant.core.space import SpaceConfig, resolve_space
    from archquant.engine.gguf_writer import export_gguf
    from archquant.engine.llamacpp import require_llama_cpp
    from archquant.latency.config import LatencyConfig
    from archquant.latency.llamacpp_profiler import per_session, sample_archs, session_stat, time_gguf
    from archquant.latency.loader import load_table_for
    from archquant.latency.scenario import Scenario
    from archquant.models.embedded import EMBEDDED_NAME, ensure_embedded_gguf
    from archquant.models.registry import load_model
    from archquant.supernet import build, materialize

    require_llama_cpp()
    threads = int(threads or torch.get_num_threads())
    base_lat = latency_cfg or LatencyConfig()
    backend = get_backend("llamacpp", base_lat.backend_options())  # latency.types: the tables of those types
    model, tok = load_model(model_name)
    space_cfg = space_cfg or SpaceConfig()
    space = resolve_space(backend.restrict_space(space_cfg, model.config), model.config)
    models, scen = {}, {}
    for name in scenarios:
        lat = dataclasses.replace(base_lat, backend="llamacpp", scenario=name,
                                  table=str((tables or {}).get(name)) if (tables or {}).get(name) else None)
        models[name] = load_table_for(lat, space, backend)
        scen[name] = Scenario.from_config(lat)
        log(models[name].describe())
    sn = build(model, space_cfg, backend=backend)
    archs = sample_archs(space, n, random.Random(seed))
    export_kw = {"source_gguf": ensure_embedded_gguf()} if model_name == EMBEDDED_NAME else {"tokenizer": tok}
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="archquant-validate-") as tmp:
        for i, arch in enumerate(archs):
            path = export_gguf(materialize(sn, arch), Path(tmp) / f"sub{i}.gguf", **export_kw)
            row = {"summary": arch.summary(), "blocks": len(arch.kept_layers), "hidden": arch.hidden,
                   "lm_head_bits": arch.lm_head_bits, "file_mb": round(path.stat().st_size / 1e6, 2)}
            for name in scenarios:
                samples = [x for _ in range(sessions) for x in time_gguf(path, scen[name], threads=threads)["samples"]]
                res = {"ms": session_stat(samples, per_session(scen[name])), "median": float(np.median(samples))}
                row[name] = {"predicted_ms": round(models[name].predict_ms(arch), 4),
                             "predicted_sum_ms": round(models[name].predict_ms(arch, corrected=False), 4),
                             "measured_ms": round(res["ms"], 4),
                             "measured_median_ms": round(res["median"], 4)}
            path.unlink()
            rows.append(row)
            log(f"  [{i + 1}/{n}] {row['summary']}: " + ", ".join(
                f"{s} pred {row[s]['predicted_ms']:.2f} / meas {row[s]['measured_ms']:.2f} ms" for s in scenarios))
    out = {
        "scenarios": {s: _summary([r[s]["predicted_ms"] for r in rows], [r[s]["measured_ms"] for r in rows]) for s in scenarios},
        "subnets": rows,
        "goals": GOALS,
        "statistic": f"median over {sessions} sessions of the session minimum (as the tables)",
        "threads": threads,
        "table_headers": {s: {k: models[s].table.header.get(k) for k in ("device", "date", "method", "path", "fit")}
                          for s in scenarios},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    for s, summ in out["scenarios"].items():
        log(f"{s}: median rel err {summ['median_rel_err']:.3f}, max {summ['max_rel_err']:.3f} "
            f"(goals {GOALS['median_rel_err']}, {GOALS['max_rel_err']}) -> {'met' if summ['meets_goals'] else 'NOT met'}")
    return out
