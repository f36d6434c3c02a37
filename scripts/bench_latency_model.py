"""Validate the latency model: predicted vs measured end-to-end latency of materialised subnets.

For each scenario (decode ms/token, prefill ms) it materialises the full model and N random subnets,
runs them on the quantised-linear runtime (``archquant.kernels.swap.to_runtime``: QuantLinear), and
compares the measurement with the table's prediction: median and max relative error of the plain sum
of ops, then of a fitted ``scale * sum + offset`` correction (in-sample and leave-one-out, the honest
number). It also measures the decode speedup of all-8-bit and all-4-bit full-width models over fp32
against the roofline-predicted speedup. Writes ``results/bench_latency_model.json`` and a scatter PNG.

    python scripts/bench_latency_model.py                      # full: 20 subnets, decode + prefill
    python scripts/bench_latency_model.py --quick              # smoke: 3 subnets, few repeats
    python scripts/bench_latency_model.py --write-correction   # store the fitted correction in the tables
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from archquant.kernels.swap import to_runtime
from archquant.latency import LatencyModel, Scenario, load_table_for
from archquant.latency.config import LatencyConfig
from archquant.latency.loader import roofline_params
from archquant.latency.roofline import roofline_table, runtime_weight_bytes
from archquant.latency.runtime import RUNTIME_NAME, busy_warning, linear_path_decisions, machine_load, time_model_ms
from archquant.latency.signatures import arch_ops
from archquant.latency.table import LatencyTable
from archquant.models.registry import load_model
from archquant.supernet import Arch, SpaceConfig, build, materialize
from archquant.utils.env import run_header
from archquant.utils.io import atomic_write_json

GOALS = {"median_rel_err": 0.05, "max_rel_err": 0.12, "speedup_fraction_of_roofline": 0.7}


def rel_errors(pred: list[float], meas: list[float]) -> list[float]:
    return [abs(p - m) / m for p, m in zip(pred, meas)]


def summary(errs: list[float]) -> dict:
    return {"median": statistics.median(errs), "max": max(errs), "n": len(errs)}


def fit_line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least squares ``y = s * x + o``."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((a - mx) ** 2 for a in x)
    s = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx if sxx > 0 else 1.0
    return s, my - s * mx


def loo_errors(x: list[float], y: list[float]) -> list[float]:
    """Relative errors of the fitted correction, each point predicted by a fit on all the others."""
    out = []
    for i in range(len(x)):
        s, o = fit_line(x[:i] + x[i + 1:], y[:i] + y[i + 1:])
        out.append(abs(s * x[i] + o - y[i]) / y[i])
    return out


def correction_report(x: list[float], y: list[float]) -> dict:
    """Errors of the plain sum of ops ``x`` against measurements ``y``, and of a fitted linear correction."""
    s, o = fit_line(x, y)
    return {
        "error_sum_of_ops": summary(rel_errors(x, y)),
        "signed_bias_sum_of_ops": statistics.median([(a - b) / b for a, b in zip(x, y)]),
        "fitted_correction": {"scale": s, "offset_ms": o},
        "error_fitted_in_sample": summary(rel_errors([s * a + o for a in x], y)),
        "error_fitted_leave_one_out": summary(loo_errors(x, y)) if len(x) > 2 else None,
    }


def measure(sn, arch: Arch, scenario: Scenario, repeats: int, steps: int, cuda_graphs: bool = True) -> float:
    model = to_runtime(materialize(sn, arch)).eval()
    try:
        return time_model_ms(model, scenario, repeats=repeats, steps=steps, cuda_graphs=cuda_graphs)
    finally:
        del model
        gc.collect()


def validate_scenario(sn, space, args, scenario_name: str, log) -> dict:
    lat_cfg = LatencyConfig(backend=args.backend, scenario=scenario_name, batch=args.batch, context=args.context,
                            prefill_len=args.prefill_len, device=args.device)
    scenario = Scenario.from_config(lat_cfg)
    lm = load_table_for(lat_cfg, space)
    log(f"[{scenario_name}] {lm.describe()}")
    archs = [("full", Arch.full(space))] + [(f"random-{i}", Arch.random(space, args.seed + i)) for i in range(args.subnets)]
    points = []
    for name, arch in archs:
        t0 = time.perf_counter()
        meas = measure(sn, arch, scenario, args.repeats, args.steps)
        raw = lm.predict_ms(arch, corrected=False)
        points.append({"name": name, "arch": arch.summary(), "kept_blocks": len(arch.kept_layers),
                       "predicted_sum_ms": raw, "predicted_table_ms": lm.predict_ms(arch), "measured_ms": meas,
                       "predicted_mb": lm.predict_mb(arch)})
        log(f"  {name:10s} measured {meas:8.3f} ms  sum of ops {raw:8.3f} ms  ({(raw - meas) / meas:+.1%})  "
            f"[{arch.summary()}] {time.perf_counter() - t0:.0f}s")
    x = [p["predicted_sum_ms"] for p in points]
    y = [p["measured_ms"] for p in points]
    out = {
        "table": {"path": lm.table.header.get("path"), "method": lm.table.header.get("method"),
                  "estimate": lm.table.is_estimate, "date": lm.table.header.get("date"),
                  "correction_in_table": lm.table.correction},
        "scenario": scenario.header(),
        "points": points,
        "error_table_prediction": summary(rel_errors([p["predicted_table_ms"] for p in points], y)),
        **correction_report(x, y),
    }
    if args.write_correction and not lm.table.is_estimate and lm.table.header.get("path"):
        lm.table.correction = dict(out["fitted_correction"])
        lm.table.header.pop("path", None)
        path = out["table"]["path"]
        lm.table.header["correction_fit"] = {"script": "scripts/bench_latency_model.py", "subnets": len(points),
                                             "loo_error": out["error_fitted_leave_one_out"]}
        lm.table.save(path)
        log(f"  wrote the fitted correction into {path}")
    return out


def speedups(sn, space, args, log) -> dict:
    """Decode speedup of all-8-bit and all-4-bit full-width models over the float model (fp32 on CPU, the
    model's dtype on CUDA): measured vs roofline. On CUDA the eager (no graph) decode is timed too."""
    lat_cfg = LatencyConfig(backend=args.backend, scenario="decode", batch=args.batch, context=args.context,
                            device=args.device)
    scenario = Scenario.from_config(lat_cfg)
    params = roofline_params(args.device)
    roof = LatencyModel(space, roofline_table(space, sn.backend, scenario, params, args.device), sn.backend)
    table = load_table_for(lat_cfg, space)
    base = Arch.full(space)
    t_base = measure(sn, base, scenario, args.repeats, args.steps)
    out = {"fp32_measured_ms": t_base, "float_measured_ms": t_base, "roofline_params": params.to_dict(),
           "runtime": RUNTIME_NAME}
    cuda = args.device.startswith("cuda")
    if cuda:
        out["float_eager_ms"] = measure(sn, base, scenario, args.repeats, args.steps, cuda_graphs=False)
        log(f"  float model: {t_base:.3f} ms/token under CUDA graphs, {out['float_eager_ms']:.3f} eager")
    for bits in (8, 4):
        if bits not in space.wbits or bits not in space.lm_head_bits:
            continue
        arch = Arch.full(space, bits=bits)
        t = measure(sn, arch, scenario, args.repeats, args.steps)
        meas = t_base / t
        roof_pred = roof.predict_ms(base) / roof.predict_ms(arch)
        bytes_pred = _weight_bytes(space, base, params, sn.backend) / _weight_bytes(space, arch, params, sn.backend)
        out[f"w{bits}"] = {
            "measured_ms": t,
            **({"eager_ms": measure(sn, arch, scenario, args.repeats, args.steps, cuda_graphs=False)} if cuda else {}),
            "measured_speedup": meas,
            "roofline_speedup": roof_pred,
            "bandwidth_only_speedup": bytes_pred,
            "table_speedup": table.predict_ms(base) / table.predict_ms(arch),
            "fraction_of_roofline": meas / roof_pred,
        }
        log(f"  W{bits}: {t:.3f} ms/token vs float {t_base:.3f}: speedup {meas:.2f}x, roofline {roof_pred:.2f}x "
            f"(bandwidth only {bytes_pred:.2f}x) -> {meas / roof_pred:.2f} of roofline")
    return out


def _weight_bytes(space, arch: Arch, params, backend) -> float:
    """Bytes a decode step reads for weights in the runtime (fp32 at 16 bits; packed + scales below)."""
    total = 0.0
    for term, sig, _ in arch_ops(space, arch):
        if term.kind in ("linear", "lm_head"):
            n = sig["K"] * sig["N"]
            total += runtime_weight_bytes(backend, n, sig["wbits"], space.group_size, params)
    return total


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["scenarios"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = results["scenarios"][name]
        meas = [p["measured_ms"] for p in r["points"]]
        raw = [p["predicted_sum_ms"] for p in r["points"]]
        s, o = r["fitted_correction"]["scale"], r["fitted_correction"]["offset_ms"]
        ax.scatter(meas, raw, label=f"sum of ops (median err {r['error_sum_of_ops']['median']:.1%})", s=18)
        ax.scatter(meas, [s * a + o for a in raw], marker="x",
                   label=f"fitted correction (median err {r['error_fitted_in_sample']['median']:.1%})", s=18)
        lo, hi = min(meas + raw), max(meas + raw)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel("measured ms")
        ax.set_ylabel("predicted ms")
        ax.set_title(f"{name} ({len(meas)} subnets)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main_llamacpp(args, out: Path, log) -> int:
    """``--backend llamacpp``: random subnets exported to GGUF, timed in llama.cpp, vs the llama.cpp tables.

    ``--refit`` skips the timing and re-analyses the subnets of an earlier output file.
    """
    from _validate_llamacpp import validate_llamacpp  # next to this script (sys.path[0] when it runs)

    if args.refit:
        results = json.loads(Path(args.refit).read_text())
    else:
        if busy_warning():
            log(f"WARNING: {busy_warning()}")
        lat = LatencyConfig(backend="llamacpp", batch=args.batch, context=args.context, prefill_len=args.prefill_len,
                            types=list(args.types or []))
        t0 = time.perf_counter()
        space_cfg = None
        if args.types:  # the bit-widths the named types fill join the space, as the profiler's tables have them
            from archquant.backends.llamacpp import types_from_names
            from archquant.core.space import SpaceConfig

            space_cfg = SpaceConfig(wbits=sorted({16, 8, 4} | set(types_from_names(args.types)), reverse=True))
        res = validate_llamacpp(args.model, n=args.subnets, scenarios=tuple(args.scenarios), latency_cfg=lat,
                                space_cfg=space_cfg, seed=args.seed + 1, threads=args.threads or 2, log=log)
        results = {"header": run_header(args.device, script="bench_latency_model", backend="llamacpp", quick=args.quick,
                                        machine_load=machine_load()),
                   "args": vars(args), **res, "seconds": round(time.perf_counter() - t0, 1),
                   "machine_load_end": machine_load()}
    results["corrections"] = {}
    for name in results["scenarios"]:
        rows = [r[name] for r in results["subnets"]]
        x = [r.get("predicted_sum_ms", r["predicted_ms"]) for r in rows]
        rep = correction_report(x, [r["measured_ms"] for r in rows])
        results["corrections"][name] = rep
        e0, e2 = rep["error_sum_of_ops"], rep["error_fitted_leave_one_out"] or {}  # None below 3 subnets
        c = rep["fitted_correction"]
        log(f"{name:8s} sum of ops: median {e0['median']:.1%}, max {e0['max']:.1%} (bias {rep['signed_bias_sum_of_ops']:+.1%})"
            f" | correction scale {c['scale']:.3f}, offset {c['offset_ms']:+.3f} ms, leave-one-out: median "
            f"{e2.get('median', float('nan')):.1%}, max {e2.get('max', float('nan')):.1%}  (goals <= 5% / <= 12%)")
        if args.write_correction:
            path = results["table_headers"][name].get("path")
            if not path:
                log(f"  {name}: the table header has no path; correction not written")
                continue
            table = LatencyTable.load(path)
            table.correction = {"scale": c["scale"], "offset_ms": c["offset_ms"]}
            table.header.pop("path", None)
            table.header["correction_fit"] = {"script": "scripts/bench_latency_model.py --backend llamacpp",
                                              "subnets": len(rows), "loo_error": e2, "date": results["header"]["date"]}
            table.save(path)
            log(f"  wrote the fitted correction into {path}")
    atomic_write_json(out, results)
    log(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--backend", default="torch", choices=["torch", "triton", "llamacpp"],
                    help="llamacpp: subnets exported to GGUF and timed in llama.cpp against the llama.cpp tables")
    ap.add_argument("--scenarios", nargs="+", default=["decode", "prefill"], choices=["decode", "prefill"])
    ap.add_argument("--subnets", type=int, default=20, help="random subnets besides the full model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--prefill-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per subnet (median)")
    ap.add_argument("--steps", type=int, default=8, help="decode tokens per repeat")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-speedup", action="store_true", help="skip the W8/W4 speedup measurement")
    ap.add_argument("--write-correction", action="store_true", help="store the fitted correction in each table")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--group-size", type=int, default=0, help="space.group_size (0: the default)")
    ap.add_argument("--width-multiple", type=int, default=0, help="space.width_multiple (0: the default)")
    ap.add_argument("--types", nargs="*", default=None,
                    help="--backend llamacpp: GGUF types of the tables to check (latency.types, e.g. Q5_1 IQ4_NL)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (CUDA: decode replayed from CUDA graphs)")
    ap.add_argument("--dtype", default=None, help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--quick", action="store_true", help="smoke check: 3 subnets, 2 repeats, 4 decode steps")
    ap.add_argument("--out", default="results/bench_latency_model.json")
    ap.add_argument("--refit", metavar="JSON", default=None,
                    help="llamacpp: re-analyse the subnets of an earlier output instead of timing new ones")
    args = ap.parse_args(argv)
    if args.quick:
        args.subnets, args.repeats, args.steps = min(args.subnets, 3), 2, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out if not args.quick or args.out != ap.get_default("out") else "results/bench_latency_model.quick.json")
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.refit and args.backend != "llamacpp":
        ap.error("--refit re-analyses a --backend llamacpp output; pass --backend llamacpp")
    if args.backend == "llamacpp":
        if not out.name.startswith("bench_latency_model.llamacpp"):  # the torch runtime's default name, marked
            out = out.with_name(out.name.replace("bench_latency_model", "bench_latency_model.llamacpp"))
        return main_llamacpp(args, out, log)
    t0 = time.perf_counter()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    model, _ = load_model(args.model, dtype=dtype, device=args.device)
    space_kwargs = {k: v for k, v in (("group_size", args.group_size), ("width_multiple", args.width_multiple)) if v}
    sn = build(model.to(args.device), SpaceConfig(**space_kwargs), backend=args.backend)
    space = sn.space
    log(space.describe())
    if busy_warning():
        log(f"WARNING: {busy_warning()}")
    results = {"header": run_header(args.device, script="bench_latency_model", quick=args.quick, machine_load=machine_load()),
               "args": vars(args),
               "goals": GOALS, "runtime": RUNTIME_NAME, "scenarios": {}}
    for name in args.scenarios:
        results["scenarios"][name] = validate_scenario(sn, space, args, name, log)
    if not args.no_speedup:
        log("[speedup] decode, full width: fp32 vs all-8-bit vs all-4-bit (weights and lm_head)")
        results["speedup"] = speedups(sn, space, args, log)
    results["linear_paths"] = linear_path_decisions()
    results["seconds"] = time.perf_counter() - t0
    results["machine_load_end"] = machine_load()
    atomic_write_json(out, results)
    plot(results, out.with_suffix(".png"))
    log(f"\nwrote {out} and {out.with_suffix('.png')} in {results['seconds']:.0f} s")
    for name, r in results["scenarios"].items():
        e0, e1, e2 = r["error_sum_of_ops"], r["error_fitted_in_sample"], r["error_fitted_leave_one_out"] or {}
        log(f"{name:8s} sum of ops: median {e0['median']:.1%}, max {e0['max']:.1%} | fitted correction "
            f"(scale {r['fitted_correction']['scale']:.3f}, offset {r['fitted_correction']['offset_ms']:+.3f} ms): "
            f"median {e1['median']:.1%}, max {e1['max']:.1%}; leave-one-out median {e2.get('median', float('nan')):.1%}, "
            f"max {e2.get('max', float('nan')):.1%}  (goals <= 5% / <= 12%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
