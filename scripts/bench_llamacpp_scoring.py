"""Zero-shot scoring through llama.cpp: whole rows vs the prefix-reusing scorer (``LlamaCppLM`` with ``logits_to_keep``).

Whole rows (the scorer before): every padded row of 4 from an empty KV cache, logits at every position. Prefix
reuse: rows one at a time in token order, each reusing the cache of the context it shares with the previous one
(the choices of one question), logits only at the continuation's positions. Both score the same rows of each task
on the embedded default's own GGUF in interleaved rounds; the script checks they agree (log-likelihoods within
1e-3, the same accuracy) and reports seconds per question and the speed-up (median and range over rounds).

    python scripts/bench_llamacpp_scoring.py                      # 3 rounds, 10 questions of 3 tasks
    python scripts/bench_llamacpp_scoring.py --rounds 5 --limit 20 --tasks hellaswag piqa arc_easy boolq

Writes ``results/bench_llamacpp_scoring.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from archquant.utils.env import run_header
from archquant.utils.io import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent


class WholeRows(torch.nn.Module):
    """The scorer before: a GGUF module without ``logits_to_keep`` or ``reuses_prefix``."""

    def __init__(self, lm) -> None:
        super().__init__()
        self.lm, self.config = lm, lm.config

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["hellaswag", "piqa", "arc_easy"])
    ap.add_argument("--limit", type=int, default=10, help="questions per task")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args(argv)

    from archquant.engine.llamacpp import open_gguf_lm
    from archquant.evaluation.zero_shot import zero_shot
    from archquant.models.embedded import ensure_embedded_gguf
    from archquant.models.registry import load_model

    _, tok = load_model("smollm2-135m")
    path = ensure_embedded_gguf()
    lm = open_gguf_lm(path, seq_len=args.seq_len, n_threads=args.threads)
    ways = {"whole_rows": (WholeRows(lm), 4), "prefix_reuse": (lm, 1)}
    seconds: dict[str, dict[str, list[float]]] = {t: {w: [] for w in ways} for t in args.tasks}
    results: dict[str, dict[str, dict]] = {t: {} for t in args.tasks}
    try:
        for r in range(args.rounds):
            for task in args.tasks:
                order = list(ways) if r % 2 == 0 else list(reversed(ways))
                for way in order:
                    model, batch = ways[way]
                    t0 = time.perf_counter()
                    res = zero_shot(model, tok, tasks=[task], limit=args.limit, batch_size=batch, progress=False,
                                    max_length=args.seq_len)[task]
                    seconds[task][way].append((time.perf_counter() - t0) / res["n"])
                    results[task][way] = res
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{t} {seconds[t]['whole_rows'][-1]:.2f} -> {seconds[t]['prefix_reuse'][-1]:.2f} s/question"
                for t in args.tasks), flush=True)
    finally:
        lm.runner.close()
    rows = []
    for task in args.tasks:
        a, b = results[task]["whole_rows"], results[task]["prefix_reuse"]
        metric = a["metric"]
        if abs(a[metric] - b[metric]) > 1e-9:
            raise SystemExit(f"{task}: the two scorers disagree ({metric} {a[metric]} vs {b[metric]})")
        ratios = [x / y for x, y in zip(seconds[task]["whole_rows"], seconds[task]["prefix_reuse"])]
        rows.append({"task": task, "questions": a["n"], metric: a[metric],
                     "whole_rows_s_per_question": round(statistics.median(seconds[task]["whole_rows"]), 3),
                     "prefix_reuse_s_per_question": round(statistics.median(seconds[task]["prefix_reuse"]), 3),
                     "speedup_median": round(statistics.median(ratios), 2),
                     "speedup_range": [round(min(ratios), 2), round(max(ratios), 2)]})
        print(f"{task}: {rows[-1]['whole_rows_s_per_question']} -> {rows[-1]['prefix_reuse_s_per_question']} s/question, "
              f"{rows[-1]['speedup_median']}x [{rows[-1]['speedup_range'][0]}, {rows[-1]['speedup_range'][1]}]")
    out = {"header": {**run_header("cpu"), "file": str(path), "threads": args.threads, "rounds": args.rounds,
                      "seq_len": args.seq_len, "whole_rows_batch": 4}, "rows": rows}
    atomic_write_json(ROOT / "results" / "bench_llamacpp_scoring.json", out)
    print("wrote results/bench_llamacpp_scoring.json")
    return out


if __name__ == "__main__":
    main()
