"""Benchmark the search on SmolLM2-135M: wall time, step time before vs after entropy collapse, and per
budget the achieved predicted and measured latency against the target. Writes ``results/bench_search.json``.

    python scripts/bench_search.py            # full: 3 budgets x 150 steps (search/default), ~1 h on 2 cores
    python scripts/bench_search.py --quick    # smoke check: 1 budget x 20 short steps, a few minutes
    python scripts/bench_search.py --from-run runs/quick   # the same figures from a finished archquant-run folder
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _compose(overrides: list[str], out_dir: Path):
    from hydra import compose, initialize_config_dir

    from archquant.cli import CONFIG_DIR
    from archquant.config import register_configs, to_object

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=overrides)
        cfg.out_dir = str(out_dir)
        return to_object(cfg)


def step_times(history: list[dict]) -> dict:
    """Mean step time while every gate is open vs once at least half of them are fixed (or the last tenth)."""
    if not history:
        return {}
    n0 = history[0]["open_gates"]
    before = [h["step_s"] for h in history[1:] if h["open_gates"] == n0] or [history[0]["step_s"]]
    collapsed = [h["step_s"] for h in history if h["open_gates"] <= n0 / 2]
    tail = history[-max(1, len(history) // 10) :]
    return {
        "open_gates_start": n0,
        "open_gates_end": history[-1]["open_gates"],
        "before_s": statistics.mean(before),
        "after_collapse_s": statistics.mean(collapsed) if collapsed else None,
        "last_tenth_s": statistics.mean(h["step_s"] for h in tail),
        "speedup": (statistics.mean(before) / statistics.mean(collapsed)) if collapsed else None,
        "note": None if collapsed else "fewer than half of the gates were fixed: no collapsed phase to time",
    }


def budget_row(target: float, result: dict, history: list[dict], measured_ms: float | None, measured_by: str | None,
               wall_s: float, **extra) -> dict:
    """One budget's figures from a search result (``SearchResult.summary()``, as ``search.json`` stores it)."""
    pred = result["predicted_ms"]
    return {
        "target_ms": target,
        **extra,
        "predicted_ms": pred,
        "argmax_predicted_ms": result["argmax_predicted_ms"],
        "measured_ms": measured_ms,
        "measured_by": measured_by,
        "predicted_vs_target": pred / target - 1,
        "measured_vs_target": None if measured_ms is None else measured_ms / target - 1,
        "measured_vs_predicted": None if measured_ms is None else measured_ms / pred - 1,
        "meets_target_predicted": result["meets_budget"],
        "meets_target_measured": None if measured_ms is None else measured_ms <= target,
        "predicted_mb": result["predicted_mb"],
        "val_kd": result["val_kd"],
        "arch": result["arch"],
        "steps": result["steps"],
        "stop_reason": result["stop_reason"],
        "repair_moves": len(result["repair_moves"]),
        "search_wall_s": wall_s,
        "step_time": step_times(history),
    }


def from_run(run: Path, out: Path) -> dict:
    """The benchmark's figures read from an ``archquant-run`` folder (its searches and its measured front)."""
    import json

    from archquant.utils.io import atomic_write_json

    rec = json.loads((run / "run.json").read_text())
    points = {p["name"]: p for p in json.loads((run / "pareto.json").read_text())["points"]}
    full = points.get("full", {})
    budgets = []
    for folder in rec["searches"]:
        s = json.loads((Path(folder) / "search.json").read_text())
        res, target = s["result"], s["budget"]["latency_ms"]
        point = next((p for p in points.values() if p.get("run_dir") == str(folder)), {})
        budgets.append(budget_row(target, res, s["history"], point.get("measured_ms"), point.get("measured_by"),
                                  res["wall_s"], ppl=point.get("ppl")))
    record = {
        "header": {**rec["header"], "from_run": str(run)},
        "source": "archquant-run folder (searches + measured Pareto points)",
        "feasible_ms": [rec["feasible"]["min_ms"], rec["feasible"]["max_ms"]],
        "full_model": {"predicted_ms": full.get("predicted_ms"), "measured_ms": full.get("measured_ms"),
                       "ppl": full.get("ppl")},
        "reference_points": {n: {k: p.get(k) for k in ("predicted_ms", "measured_ms", "ppl")}
                             for n, p in points.items() if p.get("source") == "uniform"},
        "search_total_wall_s": rec["timings_s"].get("search"),
        "budgets": budgets,
    }
    atomic_write_json(out, record)
    for b in budgets:
        st = b["step_time"]
        print(f"budget {b['target_ms']:.3f} ms: predicted {b['predicted_ms']:.3f}, measured {b['measured_ms']} ms, "
              f"{b['steps']} steps in {b['search_wall_s']:.0f} s; step {st.get('before_s', 0):.2f} s open -> "
              f"{st.get('last_tenth_s', 0):.2f} s last tenth (open gates {st.get('open_gates_start')} -> {st.get('open_gates_end')})")
    print(f"wrote {out}")
    return record


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke check: one budget, 20 short steps")
    ap.add_argument("--fractions", type=float, nargs="*", default=None, help="budgets as fractions of the full model's predicted latency")
    ap.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides (e.g. latency=torch_cpu)")
    ap.add_argument("--out", default=str(REPO / "results" / "bench_search.json"))
    ap.add_argument("--from-run", default=None, help="read the figures from a finished archquant-run folder instead")
    args = ap.parse_args(argv)
    if args.from_run:
        return from_run(Path(args.from_run), Path(args.out))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch

    from archquant.commands.search import search_job
    from archquant.commands.session import Session
    from archquant.core.arch import Arch
    from archquant.latency.measure import measure_latency
    from archquant.utils.env import run_header
    from archquant.utils.io import atomic_write_json

    if args.quick:
        fractions = args.fractions or [0.7]
        overrides = ["search=quick", "search.steps=20", "data.seq_len=64", "data.num_calib_blocks=8",
                     "data.num_val_blocks=2", "search.checkpoint_every=20"]
    else:
        fractions = args.fractions or [0.5, 0.65, 0.8]
        overrides = ["search=default"]
    overrides = ["model=smollm2-135m", "logger=none", "trainer.num_threads=2", *overrides, *args.overrides]
    work = Path(tempfile.mkdtemp(prefix="bench_search-"))
    cfg = _compose(overrides, work)
    t0 = time.perf_counter()
    ctx = Session.load(cfg)
    rng = ctx.feasible()
    ctx.targets()
    load_s = time.perf_counter() - t0
    measure_ctx = {"tokenizer": ctx.tokenizer, "source_gguf": ctx.gguf_source()}
    full_runs = [measure_latency(ctx.model, cfg.latency, **measure_ctx)]
    runs = []
    for frac in fractions:
        target = round(frac * rng.max_ms, 4)
        bcfg = _compose(overrides + [f"budget.latency_ms={target}"], work)
        t1 = time.perf_counter()
        res = search_job(bcfg, session=ctx, out_dir=work / f"budget_{frac:g}")
        wall = time.perf_counter() - t1
        model = ctx.materialize(Arch.from_dict(res.arch.to_dict()))
        measured = measure_latency(model, cfg.latency, **measure_ctx)
        runs.append(budget_row(target, res.summary(), res.history, measured.ms, measured.method, wall, fraction=frac))
        print(f"budget {target:.3f} ms: predicted {res.predicted_ms:.3f}, measured {measured.ms:.3f} ms, "
              f"{res.steps} steps in {wall:.1f} s ({res.stop_reason})", flush=True)
    # timed again after the searches: a load spike from other processes only ever adds time, so the
    # lower of the two is reported and both are kept
    full_runs.append(measure_latency(ctx.model, cfg.latency, **measure_ctx))
    record = {
        "header": run_header(cfg.latency.device, quick=args.quick),
        "model": cfg.model.name,
        "latency": {"backend": cfg.latency.backend, "scenario": cfg.latency.scenario, "batch": cfg.latency.batch,
                    "context": cfg.latency.context, "model": ctx.latency_model.describe()},
        "search": {"steps": cfg.search.steps, "batch_size": cfg.search.batch_size, "seq_len": cfg.data.seq_len,
                   "calib_blocks": cfg.data.num_calib_blocks, "threads": torch.get_num_threads()},
        "feasible_ms": [rng.min_ms, rng.max_ms],
        "full_model": {
            "predicted_ms": rng.max_ms,
            "measured_ms": min(m.ms for m in full_runs),
            "measurements": [m.to_dict() for m in full_runs],
        },
        "load_and_teacher_s": load_s,
        "total_wall_s": time.perf_counter() - t0,
        "budgets": runs,
    }
    out = Path(args.out)
    atomic_write_json(out, record)
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
