"""The one evaluation: perplexity on ``data.ppl_file`` and the zero-shot suite, as one ``eval.json`` entry.

The main job (picked and original model), the Pareto stage (each point's quality) and ``archquant-eval`` all
call ``evaluate``, so every figure of a run is computed the same way and recorded in the same schema.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from archquant.data.config import DataConfig
from archquant.data.files import resolve_data_path
from archquant.evaluation.config import EvalConfig
from archquant.evaluation.perplexity import perplexity
from archquant.evaluation.zero_shot import check_tasks, headline_mean, zero_shot
from archquant.utils.env import run_header
from archquant.utils.io import atomic_write_json

EVAL_JSON_VERSION = 1


def check_inputs(eval_cfg: EvalConfig, data_cfg: DataConfig) -> None:
    """Resolve every input file before the first forward: a typo fails in a second, not an hour in.

    Raises:
        DataFileNotFoundError: a file is missing (the message names the ``data.*`` key).
        ValueError: an unknown task.
    """
    check_tasks(eval_cfg.tasks)
    if eval_cfg.perplexity:
        resolve_data_path(data_cfg, "ppl_file")
    for task in eval_cfg.tasks:
        resolve_data_path(data_cfg, f"task_files.{task}")


def evaluate(
    model,
    tokenizer,
    eval_cfg: EvalConfig | None = None,
    data_cfg: DataConfig | None = None,
    *,
    out_path: str | Path | None = None,
    model_name: str | None = None,
) -> dict:
    """Perplexity on ``data.ppl_file`` and the zero-shot suite; optionally write ``eval.json``.

    Args:
        model: HF model, materialised subnet, or any module returning logits.
        tokenizer: its tokenizer.
        eval_cfg: ``eval`` config (tasks, limit, batch sizes, engine); None = defaults.
        data_cfg: ``data`` config (root, ppl file, task files); None = defaults.
        out_path: write the result there as JSON (atomically).
        model_name: recorded in the result.

    Returns:
        ``{version, header, model, perplexity, tasks, summary, config, wall_s}``; ``tasks[task]`` holds
        acc, acc_stderr, acc_norm, acc_norm_stderr, n, n_file, metric, stderr, file, wall_s.
    """
    eval_cfg = eval_cfg or EvalConfig()
    data_cfg = data_cfg or DataConfig()
    check_inputs(eval_cfg, data_cfg)
    ppl_path = resolve_data_path(data_cfg, "ppl_file") if eval_cfg.perplexity else None
    t0 = time.perf_counter()
    ppl = None
    if ppl_path is not None:
        ppl = perplexity(
            model,
            tokenizer,
            ppl_path,
            seq_len=eval_cfg.ppl_seq_len,
            max_windows=eval_cfg.ppl_max_windows,
            batch_size=eval_cfg.ppl_batch_size,
            progress=eval_cfg.progress,
        )
    tasks: dict = {}
    if eval_cfg.tasks:
        if eval_cfg.engine == "lm_eval":
            from archquant.evaluation.lm_eval_bridge import run_lm_eval

            tasks = run_lm_eval(model, tokenizer, eval_cfg.tasks, eval_cfg.limit, eval_cfg.batch_size, data_cfg)
        else:
            tasks = zero_shot(
                model, tokenizer, eval_cfg.tasks, eval_cfg.limit, eval_cfg.batch_size, data_cfg=data_cfg, progress=eval_cfg.progress
            )
    result = {
        "version": EVAL_JSON_VERSION,
        "header": run_header(),
        "model": model_name,
        "perplexity": ppl,
        "tasks": tasks,
        "summary": {"mean_headline_acc": headline_mean(tasks), "headline": {t: r["metric"] for t, r in tasks.items()}},
        "config": {"eval": dataclasses.asdict(eval_cfg), "data": dataclasses.asdict(data_cfg)},
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    if out_path is not None:
        atomic_write_json(out_path, result)
    return result


def format_table(result: dict) -> str:
    """A plain-text table of an ``evaluate`` result (percentages, stderr in parentheses)."""

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    lines = []
    ppl = result.get("perplexity")
    if ppl:
        lines.append(f"perplexity {ppl['ppl']:.3f}  ({ppl['windows']} windows x {ppl['seq_len']} tokens, {ppl['source']})")
    if result.get("tasks"):
        lines.append(f"{'task':<14} {'n':>6} {'acc':>6} {'(se)':>6} {'acc_norm':>9} {'(se)':>6}")
        for task, r in result["tasks"].items():
            cells = [pct(r["acc"]), pct(r["acc_stderr"]), pct(r["acc_norm"]), pct(r["acc_norm_stderr"])]
            lines.append(f"{task:<14} {r['n']:>6} {cells[0]:>6} {cells[1]:>6} {cells[2]:>9} {cells[3]:>6}")
        mean = result["summary"]["mean_headline_acc"]
        lines.append(f"mean of headline metrics (acc_norm where reported, else acc): {pct(mean)}")
    return "\n".join(lines)
