"""Benchmark one search step: dense model vs vectorised supernet vs naive per-branch supernet.

A step is forward + next-token cross-entropy + backward, fp32, on SmolLM2-135M (B=4, S=256, 2 threads
by default). Variants, timed interleaved in one process so that machine noise hits them alike:

  * ``dense``: the original Hugging Face model, weights trainable (a plain training step);
  * ``vectorized``: the supernet with every gate open (soft Gumbel-Softmax sample), weights frozen,
    gradients to the gate logits: what ``archquant-search`` runs;
  * ``vectorized+weights``: the same with trainable shared weights (quantisers recomputed every step);
  * ``naive``: one forward per candidate branch, outputs mixed (``Supernet.mode = "naive"``).

The naive step keeps every branch's activations for the backward (about 0.8 GB per SmolLM2 block at
B=4, S=256: all 30 blocks would need ~28 GB), so it runs in a second phase on the first
``--naive-layers`` blocks (default 12), timed interleaved with the vectorised step at that same depth:
``naive/vectorized`` compares like with like (the ratio at 30 blocks is then not measured).

Peak memory: on CPU each variant also runs in a fresh subprocess that reports its resident-set size
before a step (after a warm-up step built the caches) and its peak (``VmHWM``); on CUDA,
``torch.cuda.max_memory_allocated``.
Prints a table and writes ``results/bench_supernet.json`` (``--quick``: ``bench_supernet.quick.json``).

    python scripts/bench_supernet.py                 # full run (CPU: ~8 minutes here)
    python scripts/bench_supernet.py --naive-layers 0  # naive on all blocks too (needs ~28 GB at B=4 S=256)
    python scripts/bench_supernet.py --quick         # smoke check: 2 blocks, B=1, S=64, 1 step
    python scripts/bench_supernet.py --variants dense,vectorized --steps 5
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from archquant.utils.env import run_header
from archquant.utils.io import atomic_write_json

VARIANTS = ("dense", "vectorized", "vectorized+weights", "naive")
GOALS = {"vectorized/dense": ("<=", 1.25), "naive/vectorized": (">=", 5.0)}
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="registry name, path or hub id")
    p.add_argument("--random-weights", action="store_true",
                   help="SmolLM2-135M's shapes with random weights (no download)")
    p.add_argument("--layers", type=int, default=0, help="keep only the first N blocks (0 = all)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--naive-layers", type=int, default=12,
                   help="blocks for the naive-vs-vectorised phase (0 = as many as --layers)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--hard", action="store_true", help="straight-through one-hot samples (same cost as soft)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="parameter dtype of the base model and the supernet")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses (CPU)")
    p.add_argument("--quick", action="store_true", help="smoke check: 2 blocks, B=1, S=64, 1 step")
    p.add_argument("--out", default=None)
    p.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers = args.layers or 2
        args.batch, args.seq, args.steps = 1, 64, 1
    if args.naive_layers < 0:
        p.error(f"--naive-layers must be >= 0, got {args.naive_layers}")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {VARIANTS}")
    return args


def load(args):
    """The base model (``--dtype``, optionally truncated to ``--layers`` blocks), on ``--device``."""
    from archquant.models.registry import load_model

    name = args.model
    if args.random_weights and not name.startswith("random:"):
        name = f"random:{name}"  # SmolLM2's shapes with random weights: timing does not depend on the values
    model, _ = load_model(name, dtype=getattr(torch, args.dtype), device=args.device)
    if args.layers and args.layers < model.config.num_hidden_layers:
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    return model.to(args.device)


def make_steps(model, args) -> dict:
    """``variant -> step()`` closures; the supernet is shared by the supernet variants."""
    from archquant.supernet import SpaceConfig, build

    def ce(logits, ids):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(args.device)
    steps = {}
    sn = None
    if any(v != "dense" for v in args.variants):
        sn = build(model, SpaceConfig(), backend="torch").to(args.device)
    if "dense" in args.variants:
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)

        def dense():
            loss = ce(model(input_ids=ids, use_cache=False).logits, ids)
            loss.backward()
            model.zero_grad(set_to_none=True)

        steps["dense"] = dense

    def sn_step(mode: str, train_weights: bool):
        def step():
            sn.mode = mode
            for p in sn.weight_parameters():
                p.requires_grad_(train_weights)
            probs = sn.sample_probs(args.tau, hard=args.hard)
            loss = ce(sn(ids, probs), ids)
            loss.backward()
            sn.zero_grad(set_to_none=True)

        return step

    for name, mode, train in (("vectorized", "vectorized", False), ("vectorized+weights", "vectorized", True),
                              ("naive", "naive", False)):
        if name in args.variants:
            steps[name] = sn_step(mode, train)
    info = {"open_gates": len(sn.open_gates()) if sn else None, "space": sn.space.describe() if sn else None,
            "supernet": sn}
    return steps, info


def quant_cache_mb(sn) -> float:
    """MB held by the supernet's cached quantised weight copies (beyond the shared Parameters)."""
    from archquant.supernet.linear import ElasticLinear

    seen, total = set(), 0
    for m in sn.modules():
        if isinstance(m, ElasticLinear) and id(m._cache) not in seen:
            seen.add(id(m._cache))
            total += m._cache.choices.nbytes_owned(m.weight) if m._cache.choices is not None else 0
            total += sum(t.numel() * t.element_size() for t in m._cache.single.values())
    return total / 1e6


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(steps: dict, args) -> dict[str, list[float]]:
    for fn in steps.values():  # warm-up: quantisation caches, allocator
        fn()
    times = {k: [] for k in steps}
    for _ in range(args.steps):
        for name, fn in steps.items():
            _sync(args.device)
            t = time.perf_counter()
            fn()
            _sync(args.device)
            times[name].append(time.perf_counter() - t)
    return times


def _status_mb(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MB (``ru_maxrss`` would carry the parent's peak over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"{key} not found in /proc/self/status")


def child_memory(args) -> None:
    """Run one variant in this (fresh) process and print its memory as JSON."""
    torch.set_num_threads(args.threads)
    model = load(args)
    args.variants = [args.child_memory]
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    steps, info = make_steps(model, args)
    steps[args.child_memory]()  # warm-up: builds the quantisation caches
    setup = _status_mb("VmRSS")
    steps[args.child_memory]()
    peak = _status_mb("VmHWM")
    out = {"rss_before_step_mb": round(setup, 1), "peak_rss_mb": round(peak, 1), "weights_mb": round(weights_mb, 1)}
    if info["supernet"] is not None:
        out["quant_cache_mb"] = round(quant_cache_mb(info["supernet"]), 1)
    print(json.dumps(out))


def memory_cpu(variants: list[str], layers: int, argv: list[str]) -> dict[str, dict]:
    """Each variant's memory, measured in a fresh subprocess on the first ``layers`` blocks."""
    base = [a for a in argv if a != "--no-memory"]
    out = {}
    for v in variants:
        cmd = [sys.executable, __file__, *base, "--layers", str(layers), "--child-memory", v]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            why = "killed (out of memory?)" if proc.returncode in (-9, 137) else proc.stderr.strip()[-500:]
            out[v] = {"error": f"exit {proc.returncode}: {why}"}
            continue
        out[v] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def run_phase(args, variants: list[str], layers: int, argv: list[str]) -> dict:
    """Measure ``variants``' memory (CPU: fresh subprocesses, first, while this process holds nothing),
    then load the model on ``layers`` blocks and time them interleaved."""
    phase_args = argparse.Namespace(**{**vars(args), "variants": variants, "layers": layers})
    memory = {}
    if not args.device.startswith("cuda") and not args.no_memory:
        memory = memory_cpu(variants, layers, argv)
    model = load(phase_args)
    blocks = model.config.num_hidden_layers
    steps, info = make_steps(model, phase_args)
    if args.device.startswith("cuda"):
        for name, fn in steps.items():
            torch.cuda.reset_peak_memory_stats()
            fn()
            memory[name] = {"peak_allocated_mb": round(torch.cuda.max_memory_allocated() / 1e6, 1)}
    times = time_steps(steps, phase_args)
    info.pop("supernet")
    del steps, model
    gc.collect()
    return {"blocks": blocks, "times": times, "memory": memory, "info": info}


def _step_table(times: dict) -> dict:
    return {k: {"median": round(statistics.median(v), 4), "all": [round(t, 4) for t in v]} for k, v in times.items()}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child_memory:
        child_memory(args)
        return {}
    torch.set_num_threads(args.threads)
    phases = {}
    main_variants = [v for v in args.variants if v != "naive"]
    if main_variants:
        phases["main"] = run_phase(args, main_variants, args.layers, argv)
    if "naive" in args.variants:
        full = phases["main"]["blocks"] if "main" in phases else args.layers
        depth = args.naive_layers if args.naive_layers and (not full or args.naive_layers < full) else full
        phases["naive"] = run_phase(args, ["vectorized", "naive"], depth, argv)

    med = {f"{ph}:{k}": statistics.median(v) for ph, r in phases.items() for k, v in r["times"].items()}
    ratios = {}
    if "main:dense" in med and "main:vectorized" in med:
        ratios["vectorized/dense"] = med["main:vectorized"] / med["main:dense"]
    if "main:dense" in med and "main:vectorized+weights" in med:
        ratios["vectorized+weights/dense"] = med["main:vectorized+weights"] / med["main:dense"]
    if "naive:naive" in med:
        ratios["naive/vectorized"] = med["naive:naive"] / med["naive:vectorized"]
    goals = {}
    for key, (op, bound) in GOALS.items():
        if key in ratios:
            goals[key] = {"goal": f"{op} {bound}", "value": round(ratios[key], 3),
                          "met": ratios[key] <= bound if op == "<=" else ratios[key] >= bound}
    first = next(iter(phases.values()))
    result = {
        "version": 2,
        "header": run_header(args.device, model=args.model if not args.random_weights else "smollm2-135m-shapes-random",
                             dtype="float32"),
        "command": "python scripts/bench_supernet.py " + " ".join(argv),
        "setup": {
            "batch": args.batch, "seq": args.seq, "threads": args.threads,
            "blocks": phases["main"]["blocks"] if "main" in phases else None,
            "naive_blocks": phases["naive"]["blocks"] if "naive" in phases else None,
            "steps": args.steps, "tau": args.tau, "hard": args.hard, "open_gates": first["info"]["open_gates"],
            "space": first["info"]["space"], "step": "forward + next-token cross-entropy + backward, fp32",
            "dense": "HF LlamaForCausalLM, weights trainable",
            "vectorized": "supernet, all gates open (Gumbel-Softmax sample), weights frozen, grads to gate logits",
            "naive": "one forward per branch: per linear one matmul per (act bits, weight bits); MLP per width; "
                     "attention per head-count choice; hidden size kept as a mask",
        },
        "step_s": _step_table(phases["main"]["times"]) if "main" in phases else {},
        "memory": phases["main"]["memory"] if "main" in phases else {},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "goals": goals,
    }
    if "naive" in phases:
        ph = phases["naive"]
        result["naive_phase"] = {"blocks": ph["blocks"], "step_s": _step_table(ph["times"]), "memory": ph["memory"]}

    print(f"{'phase':<12} {'variant':<20} {'median s/step':>14}   memory")
    for name, ph in phases.items():
        for k, v in ph["times"].items():
            mem = ph["memory"].get(k, {})
            mem_s = ", ".join(f"{a}={b}" for a, b in mem.items()) if mem else "-"
            print(f"{name + ' (' + str(ph['blocks']) + ')':<12} {k:<20} {statistics.median(v):>14.3f}   {mem_s}")
    for k, v in ratios.items():
        goal = goals.get(k)
        print(f"{k:<26} {v:6.2f}" + (f"   goal {goal['goal']}: {'met' if goal['met'] else 'NOT met'}" if goal else ""))
    default = "bench_supernet.quick.json" if args.quick else "bench_supernet.json"
    out = Path(args.out) if args.out else Path("results") / default
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
