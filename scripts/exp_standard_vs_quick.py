"""What longer searches buy: the picks of a finished ``preset=standard`` run against the quick run's picks at the
same budgets, in llama.cpp perplexity on the same WikiText-2 windows (paired-bootstrap 95% interval).

    archquant-run preset=standard 'run.budgets_ms=[8.19,8.22,8.25]' 'pareto.presets=[]' 'pareto.baselines=[]' \\
        run.distill=false run.export=false run.evaluate=false pareto.measure=false hydra.run.dir=outputs/standard
    python scripts/exp_standard_vs_quick.py --run outputs/standard \\
        --versus results/exp_joint_vs_sequential.intel.run.json --versus-gguf outputs/exp_jvs_intel2/gguf

Reads each search's ``arch.json`` and ``search.json`` (the run need not have reached its front), exports the picks
to GGUF beside it, and writes ``results/exp_standard_vs_quick.json``. The quick picks are the experiment's files
(rebuilt from its run record by ``exp_joint_vs_sequential.py --run <record>``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import exp_joint_vs_sequential as exp  # noqa: E402

from archquant.utils.env import run_header  # noqa: E402
from archquant.utils.io import atomic_write_json  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the preset=standard run folder")
    ap.add_argument("--versus", required=True, help="the quick experiment's run record (results/<output>.run.json)")
    ap.add_argument("--versus-gguf", required=True, help="the folder of the quick experiment's GGUF files")
    ap.add_argument("--stride", type=int, default=16, help="score every k-th 512-token window")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(exp.ROOT / "results" / "exp_standard_vs_quick.json"))
    args = ap.parse_args(argv)
    from archquant.evaluation.bootstrap import paired_ppl_difference

    run = Path(args.run)
    searches = sorted((run / "searches").glob("latency_*ms"))
    if not searches:
        raise SystemExit(f"{run} has no searches/latency_*ms folders: pass a folder written by archquant-run")
    points = [{"name": f"search@{d.name.removeprefix('latency_')}", "source": "search",
               "arch": json.loads((d / "arch.json").read_text()),
               "result": json.loads((d / "search.json").read_text())["result"]} for d in searches]
    quick = {p["name"]: p for p in json.loads(Path(args.versus).read_text())["points"] if p["source"] == "search"}
    # what the comparison needs from the quick run, checked before the (slow) exports
    for p in points:
        if p["name"] not in quick:
            raise SystemExit(f"{args.versus} has no {p['name']}: compare runs searched at the same budgets")
        q_file = exp.gguf_path(Path(args.versus_gguf), p["name"])
        if not q_file.is_file():
            raise SystemExit(f"{q_file} is missing: rebuild the quick experiment's files with "
                             f"exp_joint_vs_sequential.py --run {args.versus} --out <folder> and pass <folder>/gguf")
    _, session = exp.session_of(exp.run_overrides(run), run)
    files = exp.point_files(points, session, run / "gguf")
    ns = argparse.Namespace(seq_len=512, ppl_stride=args.stride, threads=args.threads, chunk=8)
    rows = []
    for p in points:
        q, q_file = quick[p["name"]], exp.gguf_path(Path(args.versus_gguf), p["name"])
        s, b = (exp.score_ppl(f, session.tokenizer, ns) for f in (files[p["name"]], q_file))
        ref = p["result"].get("reference") or {}
        rows.append({"name": p["name"], "standard_ppl": s["ppl"], "quick_ppl": b["ppl"], "windows": s["windows"],
                     "standard_minus_quick": paired_ppl_difference(s["window_nll"], b["window_nll"], 511),
                     "same_arch": json.dumps(p["arch"], sort_keys=True) == json.dumps(q["arch"], sort_keys=True),
                     "standard_result": ref.get("name"), "standard_val_kd": p["result"].get("val_kd"),
                     "standard_searched_val_kd": ref.get("searched_val_kd"), "quick_result": q.get("reference"),
                     "quick_val_kd": q.get("val_kd"), "standard_mb": round(files[p["name"]].stat().st_size / 1e6, 2),
                     "quick_mb": round(q_file.stat().st_size / 1e6, 2)})
        print(rows[-1], flush=True)
    result = {"header": run_header(run=str(run), versus=args.versus, stride=args.stride, threads=args.threads),
              "rows": rows}
    atomic_write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
