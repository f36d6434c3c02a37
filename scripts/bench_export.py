"""Benchmark: the exported picked subnet (packed folder, QuantLinear runtime) vs the original fp32 model on CPU.

Reports decode ms/token at a context, prefill ms, peak RSS (each model timed in its own process, so the
RSS is that model's), file size, and the latency the table (or roofline estimate) predicted for the subnet.
Writes ``results/bench_export.json`` (``--quick``: ``results/bench_export.quick.json``).

    python scripts/bench_export.py --quick                     # smoke check (~1-2 min)
    python scripts/bench_export.py --arch <run>/searches/latency_13.3287ms/arch.json   # full run on a searched arch
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _peak_rss_mb() -> float:
    """This process's peak RSS. ``VmHWM`` restarts at exec; ``ru_maxrss`` would inherit the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(kind: str, path: str, context: int, prefill: int, steps: int, repeats: int, threads: int) -> dict:
    """Load one model, time decode and prefill, report peak RSS (runs in a child process)."""
    torch.set_num_threads(threads)
    from archquant.latency.runtime import time_model_ms
    from archquant.latency.scenario import Scenario

    t0 = time.perf_counter()
    if kind == "export":
        from archquant.export import load

        model = load(path)
    else:
        from archquant.models.registry import load_model

        model, _ = load_model(path)
    load_s = time.perf_counter() - t0
    decode = time_model_ms(model, Scenario("decode", 1, context, prefill), repeats=repeats, steps=steps)
    pre = time_model_ms(model, Scenario("prefill", 1, context, prefill), repeats=repeats)
    rss_mb = _peak_rss_mb()
    paths = sorted({getattr(m, "path", None) for m in model.modules() if type(m).__name__ == "QuantLinear"} - {None})
    return {"decode_ms_per_token": decode, "prefill_ms": pre, "peak_rss_mb": rss_mb, "load_s": load_s,
            "quantlinear_paths": paths}


def _run_worker(kind: str, path: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, path, "--context", str(args.context), "--prefill",
           str(args.prefill), "--steps", str(args.steps), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def default_arch(space):
    """A picked-like subnet when no ``--arch`` is given: every block kept, MLP at 0.75, W4 (down_proj W8),
    8-bit lm_head, 16-bit activations (uniform, so compressed-tensors is written too)."""
    from archquant.supernet import Arch

    gates = space.gates()
    choice = {}
    for name, opts in gates.items():
        if name.endswith(".mlp"):
            choice[name] = opts[min(1, len(opts) - 1)]
        elif ".wbits." in name:
            choice[name] = 8 if name.endswith("down") else min(opts)
        elif name == "lm_head.wbits":
            choice[name] = 8 if 8 in opts else opts[0]
        else:
            choice[name] = opts[0]
    return Arch.from_choices(space, choice)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short timings, no importance ordering (smoke check)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--arch", default=None, help="arch.json of the picked subnet (default: a W4/W8 uniform subnet)")
    ap.add_argument("--backend", default="torch", help="latency backend whose prediction is reported")
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--prefill", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    q = args.quick
    args.context = args.context or (64 if q else 256)
    args.prefill = args.prefill or (32 if q else 128)
    args.steps = args.steps or (4 if q else 16)
    args.repeats = args.repeats or (3 if q else 7)
    if args.worker:
        print(json.dumps(_worker(args.worker[0], args.worker[1], args.context, args.prefill, args.steps,
                                 args.repeats, args.threads)))
        return

    torch.set_num_threads(args.threads)
    import dataclasses

    from archquant.commands.session import Session
    from archquant.config import Config
    from archquant.export import save
    from archquant.latency import load_table_for
    from archquant.latency.config import LatencyConfig
    from archquant.models.config import ModelConfig
    from archquant.utils.env import run_header
    from archquant.utils.io import atomic_write_json

    cfg = Config(model=ModelConfig(name=args.model),
                 latency=LatencyConfig(backend=args.backend, scenario="decode", context=args.context,
                                       prefill_len=args.prefill))
    session = Session.load(cfg)
    tok = session.tokenizer
    arch = session.load_arch(args.arch, "--arch") if args.arch else default_arch(session.space)
    sub = session.materialize(arch)
    pred = {"decode": session.predicted(arch)}
    prefill_lm = load_table_for(dataclasses.replace(cfg.latency, scenario="prefill"), session.space, session.backend)
    pred["prefill"] = {"predicted_ms": float(prefill_lm.predict_ms(arch)), "scenario": "prefill"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "export"
        t0 = time.perf_counter()
        save(sub, arch, folder, tokenizer=tok, formats=("packed", "compressed_tensors"), record={"predicted": pred})
        export_s = time.perf_counter() - t0
        sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
        exported = _run_worker("export", str(folder), args)
    original = _run_worker("original", args.model, args)
    from archquant.models.embedded import EMBEDDED_NAME, ensure_embedded_checkpoint

    orig_dir = ensure_embedded_checkpoint() if args.model == EMBEDDED_NAME else Path(args.model)
    orig_bytes = sum(p.stat().st_size for p in Path(orig_dir).glob("*.safetensors"))
    packed_bytes = sizes.get("model.safetensors", 0)
    ct_bytes = sizes.get("compressed-tensors/model.safetensors")
    result = {
        "header": run_header("cpu", quick=q),
        "model": args.model,
        "arch": arch.summary(),
        "workload": {"context": args.context, "prefill_len": args.prefill, "decode_steps": args.steps,
                     "repeats": args.repeats, "threads": args.threads, "batch": 1},
        "original_fp32": {**original, "file_mb": orig_bytes / 1e6},
        "exported_packed": {**exported, "file_mb": packed_bytes / 1e6,
                            "compressed_tensors_file_mb": None if ct_bytes is None else ct_bytes / 1e6,
                            "export_s": export_s},
        "speedup": {"decode": original["decode_ms_per_token"] / exported["decode_ms_per_token"],
                    "prefill": original["prefill_ms"] / exported["prefill_ms"]},
        "predicted": pred,
        "notes": [
            "QuantLinear picks its CPU path (dense fp32 or int4pack bf16) by measurement per shape",
            "the embedded SmolLM2 weights are dequantised Q4_1 (4-bit, blocks of 32): see README, The embedded default model",
        ],
    }
    out = ROOT / "results" / ("bench_export.quick.json" if q else "bench_export.json")
    atomic_write_json(out, result)
    print(json.dumps({k: result[k] for k in ("arch", "original_fp32", "exported_packed", "speedup", "predicted")},
                     indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
