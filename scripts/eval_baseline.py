"""Baseline numbers of the original (fp32) model: WikiText-2 perplexity + the zero-shot suite.

Full run (about 1.5-2 h on 2 shared CPU cores with one torch thread):
    python scripts/eval_baseline.py
Smoke check (a few minutes):
    python scripts/eval_baseline.py --quick
README table from the saved JSON (no model run):
    python scripts/eval_baseline.py --markdown results/baseline_smollm2-135m.json

Writes ``results/baseline_<model>.json`` (``.quick.json`` with --quick) after every task, so a long
run can be watched and a killed one keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="registry name, HF folder or hub id")
    p.add_argument("--tasks", default="boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,mmlu")
    p.add_argument("--limit", type=int, default=500, help="first N rows per task (all rows where a file has fewer)")
    p.add_argument("--full", default="piqa", help="comma list of tasks scored on every row, ignoring --limit")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ppl-seq-len", type=int, default=512)
    p.add_argument("--ppl-max-windows", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves a core to others)")
    p.add_argument("--data-root", default=None, help="benchmark folder (default: $ARCHQUANT_DATA or ../shared/data)")
    p.add_argument("--out", default=None, help="output JSON (default results/baseline_<model>[.quick].json)")
    p.add_argument("--quick", action="store_true", help="smoke check: 8 rows per task, 4 perplexity windows")
    p.add_argument("--markdown", metavar="JSON", default=None, help="print the README table of a saved result and exit")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the perplexity and the tasks already in --out when their protocol matches; run the rest",
    )
    return p.parse_args(argv)


def markdown_table(result: dict) -> str:
    """The README table of a baseline result (percent, +- one standard error)."""

    def cell(v, se):
        return "-" if v is None else f"{100 * v:.1f} ± {100 * se:.1f}" if se is not None else f"{100 * v:.1f}"

    rows = ["| task | file | n (of rows) | acc | acc_norm | wall (s) |", "|---|---|---|---|---|---|"]
    for task, r in result["tasks"].items():
        rows.append(
            f"| {task} | `{Path(r['file']).parent.name}/{Path(r['file']).name}` | {r['n']} ({r['n_file']}) "
            f"| {cell(r['acc'], r['acc_stderr'])} | {cell(r['acc_norm'], r['acc_norm_stderr'])} | {r['wall_s']:.0f} |"
        )
    ppl = result.get("perplexity")
    if ppl:
        rows.append(
            f"| WikiText-2 raw test ppl | `{Path(ppl['source']).parent.name}/{Path(ppl['source']).name}` "
            f"| {ppl['windows']} x {ppl['seq_len']} tok | {ppl['ppl']:.2f} | | {ppl['wall_s']:.0f} |"
        )
    return "\n".join(rows)


def _resumable(out: Path, fresh: dict) -> dict | None:
    """The saved result at ``out`` when it was made with the same model and protocol, else None."""
    if not out.exists():
        return None
    saved = json.loads(out.read_text())
    same = saved.get("header", {}).get("model") == fresh["header"]["model"] and all(
        saved.get("protocol", {}).get(k) == fresh["protocol"][k] for k in ("perplexity", "zero_shot", "limit", "full_tasks")
    )
    if not same:
        sys.exit(f"--resume: {out} was made with another model or protocol; pass --out to start a new file")
    return saved


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.markdown:
        print(markdown_table(json.loads(Path(args.markdown).read_text())))
        return 0
    from archquant.commands.session import load_by_name
    from archquant.data import DataConfig, resolve_data_path
    from archquant.evaluation import perplexity, zero_shot
    from archquant.evaluation.zero_shot import check_tasks, headline_mean
    from archquant.utils.env import run_header
    from archquant.utils.io import atomic_write_json

    torch.set_num_threads(args.threads)
    tasks = check_tasks([t for t in args.tasks.split(",") if t])
    full = set(check_tasks([t for t in args.full.split(",") if t]))
    limit = 8 if args.quick else args.limit
    if limit <= 0:
        sys.exit(f"--limit must be > 0, got {limit}")
    max_windows = 4 if args.quick else args.ppl_max_windows
    data_cfg = DataConfig(root=args.data_root)
    ppl_path = resolve_data_path(data_cfg, "ppl_file")
    for task in tasks:  # fail on a missing file now, not after an hour
        resolve_data_path(data_cfg, f"task_files.{task}")
    name = args.model.replace("/", "_")
    out = Path(args.out) if args.out else REPO / "results" / f"baseline_{name}{'.quick' if args.quick else ''}.json"

    t_start = time.perf_counter()
    model, tokenizer = load_by_name(args.model, dtype="float32")
    result = {
        "version": 1,
        "header": run_header(model=args.model, dtype="float32"),
        "command": " ".join(["python", *sys.argv]),
        "protocol": {
            "perplexity": f"non-overlapping {args.ppl_seq_len}-token windows, no special tokens, trailing partial window dropped",
            "zero_shot": "0-shot, lm-evaluation-harness prompts and scoring (archquant native scorer), first N rows of each file",
            "limit": limit,
            "full_tasks": sorted(full),
            "batch_size": args.batch_size,
            "threads": args.threads,
        },
        "load_s": round(time.perf_counter() - t_start, 2),
        "perplexity": None,
        "tasks": {},
    }
    progress = not args.no_progress
    previous = _resumable(out, result) if args.resume else None
    if previous is not None:
        result["perplexity"] = previous["perplexity"]
        result["tasks"] = {t: r for t, r in previous["tasks"].items() if t in tasks}
        result["resumed_from"] = previous["header"]["date"]
        print(f"resuming {out}: perplexity and {sorted(result['tasks'])} kept", flush=True)
    if result["perplexity"] is None or result["perplexity"].get("seq_len") != args.ppl_seq_len:
        result["perplexity"] = perplexity(
            model, tokenizer, ppl_path, seq_len=args.ppl_seq_len, max_windows=max_windows, batch_size=4, progress=progress
        )
    print(f"perplexity {result['perplexity']['ppl']:.3f} ({result['perplexity']['wall_s']:.0f} s)", flush=True)
    atomic_write_json(out, result)
    for task in tasks:
        if task in result["tasks"]:
            continue
        task_limit = None if (task in full and not args.quick) else limit
        r = zero_shot(model, tokenizer, [task], task_limit, args.batch_size, data_cfg=data_cfg, progress=progress)[task]
        result["tasks"][task] = r
        result["summary"] = {"mean_headline_acc": headline_mean(result["tasks"]), "wall_s_total": round(time.perf_counter() - t_start, 1)}
        atomic_write_json(out, result)
        shown = r[r["metric"]]
        print(f"{task}: n={r['n']} {r['metric']}={100 * shown:.1f} ± {100 * (r['stderr'] or 0):.1f} ({r['wall_s']:.0f} s)", flush=True)
    print(markdown_table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
