"""Rebuild the llama.cpp latency tables of this CPU (decode and prefill) in one command.

    python scripts/profile_llamacpp.py                      # both scenarios, ~8 min each, 2 threads
    python scripts/profile_llamacpp.py --quick              # smoke: ~1 min each, written under results/
    python scripts/profile_llamacpp.py --scenario decode --budget 300

Equivalent per scenario: ``archquant-profile latency.backend=llamacpp latency.scenario=decode``.
Tables go to ``latency_tables/<device>/<model>-llamacpp-<scenario>.json``; a summary (fit errors,
machine load) to ``results/profile_llamacpp.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from archquant.config import Config
from archquant.latency.config import LatencyConfig
from archquant.models.config import ModelConfig
from archquant.utils.env import run_header
from archquant.utils.io import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--scenario", choices=["decode", "prefill", "both"], default="both")
    ap.add_argument("--context", type=int, default=LatencyConfig.context, help="decode: tokens in the KV cache")
    ap.add_argument("--prefill-len", type=int, default=LatencyConfig.prefill_len)
    ap.add_argument("--budget", type=float, default=480.0, help="seconds of timing per scenario")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="60 s per scenario, tables written under results/ only")
    ap.add_argument("--refit", action="store_true",
                    help="rebuild the tables from the timings the last profile dumped under results/ (no timing)")
    args = ap.parse_args(argv)

    from archquant.latency.llamacpp_profiler import profile_llamacpp, refit_llamacpp

    torch.set_num_threads(args.threads)  # the device name and the tables record this thread count
    budget = 60.0 if args.quick else args.budget
    scenarios = ["decode", "prefill"] if args.scenario == "both" else [args.scenario]
    summary = {"header": run_header(), "budget_s": budget, "quick": args.quick, "tables": {}}
    for name in scenarios:
        out = ROOT / "results" / f"profile_llamacpp-{name}.quick.json" if args.quick else None
        cfg = Config(model=ModelConfig(name=args.model),
                     latency=LatencyConfig(backend="llamacpp", scenario=name, context=args.context,
                                           prefill_len=args.prefill_len, out=str(out) if out else None))
        cfg.trainer.num_threads = args.threads
        stem = f"profile_llamacpp-{name}.timings" + (".quick" if args.quick else "")
        if args.refit:
            path = refit_llamacpp(cfg, ROOT / "results" / f"{stem}.json", out=out)
        else:
            path = profile_llamacpp(cfg, budget_s=budget, dump=ROOT / "results" / f"{stem}.json")
        table = json.loads(Path(path).read_text())
        resolved = Path(path).resolve()
        summary["tables"][name] = {"path": str(resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved),
                                   "fit": table["header"]["fit"], "machine_load": table["header"]["machine_load"],
                                   "profile_seconds": table["header"]["profile_seconds"]}
    result_path = ROOT / "results" / ("profile_llamacpp.quick.json" if args.quick else "profile_llamacpp.json")
    if result_path.exists() and args.scenario != "both":  # keep the other scenario's entry from its own run
        previous = json.loads(result_path.read_text()).get("tables", {})
        summary["tables"] = {**{k: v for k, v in previous.items() if k not in summary["tables"]}, **summary["tables"]}
    atomic_write_json(result_path, summary)
    for name, t in summary["tables"].items():
        fit = {k: v for k, v in t["fit"].items() if k != "params"}
        print(f"{name}: {t['path']} ({t['profile_seconds']} s, load {t['machine_load']}): fit {json.dumps(fit)}")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
