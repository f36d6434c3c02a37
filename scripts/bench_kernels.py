"""Benchmark the quantised-linear paths on SmolLM2-135M shapes; writes results/bench_kernels.json.

CPU (always): every QuantLinear path (fp32 ``dense``, bf16 ``int4pack_bf16``) for 8/4-bit weights and
16/8-bit activations, the path QuantLinear's measurement picks, and baselines that are not our
quantiser format (fp32/bf16 ``F.linear`` on the float weight, torch's per-channel
``_weight_int8pack_mm``, fbgemm's per-channel dynamic W8A8), with each path's error against the
fp32 fake-quant forward. Decode-sized M is timed with a cold cache (see ``path_select``).

CUDA (when present; skipped cleanly otherwise): every QuantLinear path on CUDA (our Triton GEMV /
tiled kernels, gemlite, torch's tinygemm int4, bf16 over the dequantised weight) against bf16
``F.linear`` on the float weight and the HBM roofline, the path QuantLinear picks, and a summary of
the picked path's speedup per (bits, group, M) against the goals (W4 >= 2.5x, W8 >= 1.6x at M <= 16;
never slower than bf16 at large M). ``--shapes llama8b`` uses Llama-3.1-8B's layers.

    python scripts/bench_kernels.py            # full run (CPU: several minutes)
    python scripts/bench_kernels.py --quick    # smoke check: one shape, one M
    python scripts/bench_kernels.py --layers lm_head --m 1 --threads 1   # one targeted row
    python scripts/bench_kernels.py --skip-cpu --shapes llama8b --groups 64 128 --m 1 4 16 512 2048   # GPU goals
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from archquant.kernels import path_select
from archquant.kernels.qlinear import QuantLinear
from archquant.quant.reference import fake_quant_act, fake_quant_weight
from archquant.utils.env import run_header
from archquant.utils.io import atomic_write_json

# (K, N) of SmolLM2-135M's linears: hidden 576, 3 KV heads x 64, MLP 1536, vocab 49152
SHAPES = {
    "q_proj/o_proj": (576, 576),
    "k_proj/v_proj": (576, 192),
    "gate_proj/up_proj": (576, 1536),
    "down_proj": (1536, 576),
    "lm_head": (576, 49152),
}
GROUP = 64
# (K, N) of Llama-3.1-8B's linears: hidden 4096, 8 KV heads x 128, MLP 14336, vocab 128256
SHAPES_8B = {
    "q/o_proj": (4096, 4096),
    "k/v_proj": (4096, 1024),
    "gate/up_proj": (4096, 14336),
    "down_proj": (14336, 4096),
    "lm_head": (4096, 128256),
}
SHAPE_SETS = {"smollm2": SHAPES, "llama8b": SHAPES_8B}
# nominal HBM bandwidth (bytes/s) by device-name fragment, for the "vs spec" column only
NOMINAL_BW = {"h100 nvl": 3.9e12, "h100 pcie": 2.0e12, "h100": 3.35e12, "h200": 4.8e12, "a100": 2.0e12}


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _time(fns: dict, device: torch.device, m: int) -> dict[str, float]:
    """Interleaved lower-quartile ms, cold cache for decode-sized M on CPU: the method QuantLinear uses."""
    return path_select.measure(fns, device, m)


def bench_cpu(shapes: dict, ms: list[int], bits_list: list[int], abits_list: list[int]) -> list[dict]:
    rows = []
    dev = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    for name, (k, n) in shapes.items():
        w = torch.randn(n, k, generator=gen) * 0.05
        for m in ms:
            x = torch.randn(m, k, generator=gen)
            # baselines on the float weight (not our quantiser; for scale only)
            base = {"fp32_linear": lambda: F.linear(x, w)}
            if m <= 16:  # bf16 GEMM is ~100x slower than fp32 for large M on AVX2: minutes for lm_head
                wb = w.bfloat16()
                base["bf16_linear"] = lambda: F.linear(x.bfloat16(), wb)
            wi8 = (w / (w.abs().amax(1, keepdim=True) / 127)).round().to(torch.int8)
            s8 = (w.abs().amax(1) / 127).bfloat16()
            base["int8pack_bf16_per_channel"] = lambda: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), wi8, s8)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sc = (w.abs().amax(1) / 127).double().clamp_min(1e-12)
                    wq = torch.quantize_per_channel(w, sc, torch.zeros(n, dtype=torch.long), 0, torch.qint8)
                    packed = torch.ops.quantized.linear_prepack(wq, None)
                base["fbgemm_w8a8_per_channel"] = lambda: torch.ops.quantized.linear_dynamic(x, packed)
            except (RuntimeError, AttributeError) as e:  # quantized engine missing in this build
                print(f"  fbgemm baseline unavailable: {e}")
            tb = _time(base, dev, m)
            rows.append({"device": "cpu", "layer": name, "K": k, "N": n, "M": m, "kind": "baseline",
                         "ms": {kk: round(v, 4) for kk, v in tb.items()}})
            shown = " ".join(f"{kk}={v:.3f}" for kk, v in tb.items())
            print(f"[cpu] {name:18s} K={k:5d} N={n:6d} M={m:4d} baselines {shown}", flush=True)
            for wbits in bits_list:
                for abits in abits_list:
                    ql = QuantLinear.from_float(w, None, wbits=wbits, abits=abits, group_size=GROUP)
                    paths = ql.applicable_paths(dev)
                    ref = F.linear(fake_quant_act(x, abits), fake_quant_weight(w, wbits, GROUP))
                    fns = {p: (lambda p=p: ql.run_path(p, x)) for p in paths}
                    t = _time(fns, dev, m)
                    errs = {p: _rel_err(ql.run_path(p, x), ref) for p in paths}
                    path_select.clear_path_cache()
                    picked = ql.select_path(dev, m)
                    rows.append({
                        "device": "cpu", "layer": name, "K": k, "N": n, "M": m, "wbits": wbits, "abits": abits,
                        "kind": "qlinear", "ms": {p: round(v, 4) for p, v in t.items()},
                        "rel_err_vs_fake_quant": {p: float(f"{e:.3g}") for p, e in errs.items()},
                        "picked": picked,
                        "picked_timings_ms": {p: round(v, 4) for p, v in ql.last_choice.timings_ms.items()},
                        "packed_bytes": ql.nbytes(), "fp32_bytes": n * k * 4,
                    })
                    shown = " ".join(f"{p}={t[p]:.3f}ms(err {errs[p]:.1e})" for p in paths)
                    print(f"[cpu] {name:18s} K={k:5d} N={n:6d} M={m:4d} W{wbits}A{abits:<2d} {shown} -> picks {picked}",
                          flush=True)
    return rows


def _bandwidth(device: torch.device) -> float:
    """Achievable device-memory bandwidth (bytes/s) from a 1 GiB device-to-device copy."""
    import triton.testing

    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100)
    return 2 * src.numel() * 4 / (ms * 1e-3)  # read + write


def bench_cuda(shapes: dict, ms: list[int], bits_list: list[int], groups: list[int],
               save=lambda rows, info: None) -> tuple[list[dict], dict]:
    """Every CUDA QuantLinear path (ours, gemlite, tinygemm, bf16 over the dequantised weight) vs bf16 ``F.linear``.

    Times are GPU time under CUDA-graph replay with the L2 cleared before each call
    (``path_select.cuda_graph_ms``: a decode step reads every weight from HBM, and a served step pays no
    Python or launch time); errors are against the fp32 product with the dequantised weight.
    """

    dev = torch.device("cuda")
    bw = _bandwidth(dev)
    gpu = torch.cuda.get_device_name(dev).lower()
    nominal = next((v for kk, v in NOMINAL_BW.items() if kk in gpu), None)
    info = {"gpu": gpu, "copy_bandwidth_GBps": round(bw / 1e9, 1),
            "nominal_bandwidth_GBps": nominal and round(nominal / 1e9, 1)}
    print(f"[cuda] {gpu}: copy bandwidth {bw / 1e9:.0f} GB/s (nominal {nominal and nominal / 1e9} GB/s)")
    rows = []
    gen = torch.Generator(device=dev).manual_seed(0)
    bench = path_select.cuda_graph_ms  # GPU time as a replayed decode graph sees it, L2 cleared before each call
    weights = {name: (torch.randn(n, k, generator=gen, device=dev) * 0.05).bfloat16() for name, (k, n) in shapes.items()}
    layers: dict[tuple, QuantLinear] = {}  # quantised once per (layer, bits, group), reused for every M
    for m in ms:  # decode-sized M first: a run cut short still has them for every shape
        for name, (k, n) in shapes.items():
            wb = weights[name]
            x = torch.randn(m, k, generator=gen, device=dev).bfloat16()
            t_bf16 = bench(lambda: F.linear(x, wb))
            for bits in bits_list:
                for g in groups:
                    key = (name, bits, g)
                    if key not in layers:
                        layers[key] = QuantLinear.from_float(wb, None, wbits=bits, abits=16, group_size=g)
                    ql = layers[key]
                    paths = ql.applicable_paths(dev, x.dtype)
                    ref = F.linear(x.float(), ql.dequantized_weight(torch.float32))
                    t, errs, failed = {}, {}, {}
                    for p in paths:
                        try:
                            errs[p] = _rel_err(ql.run_path(p, x), ref)
                            t[p] = bench(lambda p=p: ql.run_path(p, x))
                        except Exception as e:  # a library kernel that cannot run this shape
                            failed[p] = f"{type(e).__name__}: {e}"[:200]
                    del ref
                    with warnings.catch_warnings(record=True):
                        warnings.simplefilter("always")
                        picked = ql.select_path(dev, m, x.dtype)
                    weight_bytes = n * k * bits / 8 + n * (k // g) * 3
                    moved = weight_bytes + m * k * 2 + m * n * 2
                    roof_ms = moved / bw * 1e3
                    row = {
                        "device": gpu, "layer": name, "K": k, "N": n, "M": m, "wbits": bits, "group_size": g,
                        "ms": {p: round(v, 5) for p, v in t.items()}, "bf16_linear_ms": round(t_bf16, 5),
                        "roofline_ms": round(roof_ms, 5), "bytes_moved": int(moved),
                        "speedup_vs_bf16": {p: round(t_bf16 / v, 3) for p, v in t.items()},
                        "rel_err_vs_dequantised": {p: float(f"{e:.3g}") for p, e in errs.items()},
                        "failed": failed, "picked": picked,
                        "picked_speedup_vs_bf16": round(t_bf16 / t[picked], 3) if picked in t else None,
                    }
                    rows.append(row)
                    shown = " ".join(f"{p}={v * 1e3:.1f}us" for p, v in t.items())
                    save(rows, info)  # a run cut short keeps what it measured
                    print(f"[cuda] {name:12s} M={m:5d} W{bits}g{g:<3d} bf16={t_bf16 * 1e3:.1f}us roof={roof_ms * 1e3:.1f}us "
                          f"{shown} -> picks {picked} ({row['picked_speedup_vs_bf16']}x)", flush=True)
    return rows, info


def cuda_summary(rows: list[dict]) -> dict:
    """Per (bits, group, M): min and median speedup over bf16 of the path QuantLinear picks, vs the goals."""
    goals = {8: 1.6, 4: 2.5}
    out = {}
    for bits, g, m in sorted({(r["wbits"], r["group_size"], r["M"]) for r in rows}):
        sp = [r["picked_speedup_vs_bf16"] for r in rows
              if (r["wbits"], r["group_size"], r["M"]) == (bits, g, m) and r["picked_speedup_vs_bf16"]]
        if not sp:
            continue
        goal = goals.get(bits) if m <= 16 else 1.0
        out[f"w{bits}g{g}/m{m}"] = {"min": min(sp), "median": statistics.median(sp), "goal": goal,
                                     "met": goal is not None and min(sp) >= goal * 0.97}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one shape, M=1, 4-bit: a smoke check (< 1 min)")
    ap.add_argument("--out", default="results/bench_kernels.json")
    ap.add_argument("--skip-cpu", action="store_true", help="only the CUDA section")
    ap.add_argument("--shapes", default="smollm2", choices=sorted(SHAPE_SETS), help="whose layer shapes")
    ap.add_argument("--layers", nargs="+", help="subset of the shape set's layers")
    ap.add_argument("--groups", nargs="+", type=int, default=[GROUP], help="CUDA: weight group sizes")
    ap.add_argument("--m", nargs="+", type=int, help="token counts M (overrides the preset)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (the CPU path choice depends on it)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    all_shapes = SHAPE_SETS[args.shapes]
    if args.quick:
        shapes = dict([next(iter(all_shapes.items()))])
        cpu_ms, gpu_ms, bits, abits = [1], [1, 128], [4], [16]
    else:
        shapes = all_shapes
        cpu_ms, gpu_ms, bits, abits = [1, 128, 256], [1, 4, 16, 512, 2048], [8, 4], [16, 8]
    if args.layers:
        unknown = set(args.layers) - set(all_shapes)
        if unknown:
            ap.error(f"unknown layers {sorted(unknown)} for --shapes {args.shapes}; known: {sorted(all_shapes)}")
        shapes = {kk: all_shapes[kk] for kk in args.layers}
    if args.m:
        cpu_ms = gpu_ms = args.m

    result = {"header": run_header("cuda" if torch.cuda.is_available() else "cpu", quick=args.quick),
              "group_size": GROUP, "cpu": [], "cuda": [], "cuda_info": None}
    if not args.skip_cpu:
        result["cpu"] = bench_cpu(shapes, cpu_ms, bits, abits)
    try:
        import triton  # noqa: F401

        have_triton = True
    except ImportError:
        have_triton = False
    if torch.cuda.is_available() and have_triton:
        def save(rows, info):
            result["cuda"], result["cuda_info"] = rows, info
            atomic_write_json(Path(args.out), result)

        result["cuda"], result["cuda_info"] = bench_cuda(shapes, gpu_ms, bits, args.groups, save)
        result["cuda_summary"] = cuda_summary(result["cuda"])
        for key, v in result["cuda_summary"].items():
            print(f"[cuda] {key:14s} picked path vs bf16: min {v['min']:.2f}x median {v['median']:.2f}x "
                  f"(goal {v['goal']}x: {'met' if v['met'] else 'MISSED'})")
    else:
        reason = "no CUDA device" if not torch.cuda.is_available() else "triton is not installed"
        result["cuda_skipped"] = reason
        print(f"[cuda] skipped: {reason}")
    if result["cpu"]:
        picks = [r["picked"] for r in result["cpu"] if r["kind"] == "qlinear"]
        result["cpu_summary"] = {p: picks.count(p) for p in sorted(set(picks))}
        if result["cpu_summary"]:
            print("[cpu] QuantLinear picks:", result["cpu_summary"])
    qrows = [r for r in result["cpu"] if r["kind"] == "qlinear"]
    errs = [e for r in qrows for p, e in r["rel_err_vs_fake_quant"].items() if p != "dense"]
    if errs:
        result["cpu_int4pack_rel_err_max"] = max(errs)
        result["cpu_int4pack_rel_err_median"] = statistics.median(errs)
    atomic_write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
