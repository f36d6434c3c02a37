"""Stability of the main job across search seeds: the pick per budget, its perplexity and measured latency.

Runs ``archquant-run`` once per seed (``search.seed``; everything else as given) or reads finished run folders,
then reports per budget: the result's architecture (identical across seeds?), its perplexity and measured
latency (mean and standard deviation over seeds), and what the 30-step search itself reached before the
reference check (held-out KD of the searched arch, and which reference replaced it).

    python scripts/exp_stability.py --seeds 0 1 2 -- preset=quick           # three main jobs, then the table
    python scripts/exp_stability.py --runs runs/s0 runs/s1 runs/s2           # finished run folders

Writes ``results/exp_stability.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(seed: int, overrides: list[str], out: Path) -> Path:
    folder = out / f"seed{seed}"
    if not (folder / "pareto.json").exists():
        cmd = [sys.executable, "-m", "archquant", "run", *overrides, f"search.seed={seed}", f"hydra.run.dir={folder}"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return folder


def _budgets(folder: Path) -> dict[str, dict]:
    """``budget -> {arch, ppl, measured_ms, searched_val_kd, replaced_by}`` of one run's searches."""
    points = {p["name"]: p for p in json.loads((folder / "pareto.json").read_text())["points"]}
    out = {}
    for search in sorted((folder / "searches").glob("latency_*ms")):
        rec = json.loads((search / "search.json").read_text())["result"]
        budget = search.name.removeprefix("latency_").removesuffix("ms")
        p = points.get(f"search@{budget}ms", {})
        ref = rec.get("reference") or {}
        out[budget] = {"arch": json.loads((search / "arch.json").read_text()), "summary": rec["arch"],
                       "ppl": p.get("ppl"), "measured_ms": p.get("measured_ms"), "val_kd": rec.get("val_kd"),
                       "searched_val_kd": ref.get("searched_val_kd", rec.get("val_kd")),
                       "searched_arch": ref.get("searched_arch", rec["arch"]), "replaced_by": ref.get("name")}
    return out


def _stats(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="*", default=None, help="run the main job once per search seed")
    ap.add_argument("--runs", nargs="*", default=None, help="finished main-job run folders instead")
    ap.add_argument("--out-dir", default="runs/stability", help="where --seeds runs go")
    ap.add_argument("--out", default=str(ROOT / "results" / "exp_stability.json"))
    ap.add_argument("overrides", nargs="*", help="archquant-run overrides (after --)")
    args = ap.parse_args(argv)
    if not args.seeds and not args.runs:
        ap.error("give --seeds (to run) or --runs (finished run folders)")
    folders = [Path(r) for r in args.runs or []]
    folders += [_run(s, args.overrides or ["preset=quick"], Path(args.out_dir)) for s in args.seeds or []]
    runs = {str(f): _budgets(f) for f in folders}
    budgets = sorted({b for r in runs.values() for b in r}, key=float)
    table = {}
    for b in budgets:
        rows = [r[b] for r in runs.values() if b in r]
        archs = {json.dumps(x["arch"], sort_keys=True) for x in rows}
        table[b] = {"same_arch": len(archs) == 1, "distinct_archs": len(archs),
                    "ppl": _stats([x["ppl"] for x in rows]), "measured_ms": _stats([x["measured_ms"] for x in rows]),
                    "val_kd": _stats([x["val_kd"] for x in rows]),
                    "searched_val_kd": _stats([x["searched_val_kd"] for x in rows]),
                    "searched_archs_distinct": len({x["searched_arch"] for x in rows}),
                    "replaced_by": [x["replaced_by"] for x in rows]}
        t = table[b]
        fmt = lambda s, d=2: "-" if s["mean"] is None else f"{s['mean']:.{d}f} +- {s['std']:.{d}f}"  # noqa: E731
        print(f"budget {b} ms: result arch identical over {len(rows)} seeds: {t['same_arch']}; ppl {fmt(t['ppl'])}; "
              f"measured {fmt(t['measured_ms'])} ms; searched-arch KD {fmt(t['searched_val_kd'], 4)} "
              f"({t['searched_archs_distinct']} distinct); replaced by {t['replaced_by']}")
    result = {"runs": list(runs), "budgets": table, "per_run": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
