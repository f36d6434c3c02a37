"""Zero-shot multiple-choice suite: score each choice by log-likelihood, report acc / acc_norm + stderr.

Metrics follow lm-evaluation-harness: ``acc`` picks the choice with the highest summed log-prob,
``acc_norm`` the highest log-prob per character of the choice string; ties go to the first choice
(``numpy.argmax``); the standard error is the sample standard deviation (ddof=1) over sqrt(n).
MMLU is scored as one pool of questions (lm-eval's size-weighted group accuracy).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from archquant.data.benchmarks import load_benchmark
from archquant.data.config import DataConfig
from archquant.data.files import resolve_data_path
from archquant.evaluation.config import ALL_TASKS
from archquant.evaluation.loglik import loglikelihood
from archquant.evaluation.tasks import TASK_SPECS, MCExample, build_examples
from archquant.utils.errors import UserError


@dataclass(frozen=True)
class ExampleScore:
    """The scored choices of one question."""

    logprobs: tuple[float, ...]
    gold: int
    pred: int
    pred_norm: int

    @property
    def acc(self) -> float:
        return float(self.pred == self.gold)

    @property
    def acc_norm(self) -> float:
        return float(self.pred_norm == self.gold)


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of a mean: sample std (ddof=1) / sqrt(n); None for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return None
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1) / math.sqrt(n))


def score_examples(
    model,
    tokenizer,
    examples: Sequence[MCExample],
    *,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "zero-shot",
    max_length: int | None = None,
) -> list[ExampleScore]:
    """Score multiple-choice examples: one loglikelihood request per choice, all batched together."""
    flat = [req for ex in examples for req in ex.requests]
    lls = loglikelihood(model, tokenizer, flat, batch_size=batch_size, progress=progress, desc=desc, max_length=max_length)
    out, k = [], 0
    for ex in examples:
        lp = np.array([r.logprob for r in lls[k : k + len(ex.requests)]], dtype=np.float64)
        k += len(ex.requests)
        lengths = np.array([float(len(c)) for c in ex.choices])
        out.append(
            ExampleScore(
                logprobs=tuple(lp.tolist()),
                gold=ex.gold,
                pred=int(np.argmax(lp)),
                pred_norm=int(np.argmax(lp / lengths)),
            )
        )
    return out


def aggregate(task: str, scores: Sequence[ExampleScore]) -> dict:
    """Per-task metrics: acc, acc_norm (None where lm-eval does not report it), their stderr, n."""
    spec = TASK_SPECS[task]
    acc = [s.acc for s in scores]
    res = {"acc": float(np.mean(acc)) if acc else None, "acc_stderr": mean_stderr(acc), "acc_norm": None, "acc_norm_stderr": None}
    if spec.has_acc_norm:
        acc_norm = [s.acc_norm for s in scores]
        res.update(acc_norm=float(np.mean(acc_norm)) if acc_norm else None, acc_norm_stderr=mean_stderr(acc_norm))
    res["n"] = len(scores)
    res["metric"] = spec.headline
    res["stderr"] = res[f"{spec.headline}_stderr"]
    return res


class TaskError(UserError, ValueError):
    """A task name the suite does not know."""


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """Validate task names (fail fast, before any model time)."""
    if isinstance(tasks, str):
        tasks = [tasks]
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        raise TaskError(f"eval.tasks has unknown task(s) {unknown}; known: {list(ALL_TASKS)}")
    return list(tasks)


def zero_shot(
    model,
    tokenizer,
    tasks: Sequence[str] = ALL_TASKS,
    limit: int | None = None,
    batch_size: int = 16,
    data_root: str | Path | None = None,
    *,
    data_cfg: DataConfig | None = None,
    progress: bool = True,
    max_length: int | None = None,
) -> dict[str, dict]:
    """Run the zero-shot suite on a causal LM.

    Args:
        model: HF model, materialised subnet, or any module returning logits (``[B, S, V]``).
        tokenizer: its tokenizer.
        tasks: task names from ``ALL_TASKS``.
        limit: first ``limit`` rows per task (None = the whole file).
        batch_size: input rows per forward.
        data_root: benchmark folder (overrides ``data_cfg.root``).
        data_cfg: ``data`` config with per-task files (None = defaults).
        progress: a tqdm bar per task.
        max_length: model context length (None = from the model config / tokenizer).

    Returns:
        ``{task: {acc, acc_stderr, acc_norm, acc_norm_stderr, n, n_file, metric, stderr, file, wall_s}}``;
        ``acc_norm`` is None for BoolQ, WinoGrande and MMLU, where lm-eval reports ``acc`` only.
    """
    tasks = check_tasks(tasks)
    if limit is not None and limit <= 0:
        raise ValueError(f"eval.limit must be > 0 (or null for all examples), got {limit}")
    data_cfg = data_cfg or DataConfig()
    if data_root is not None:
        data_cfg = dataclasses.replace(data_cfg, root=str(data_root))
    # resolve and parse every file first: a bad path or row fails before minutes of scoring
    loaded = {}
    for task in tasks:
        rows = load_benchmark(task, data_cfg)
        n_file = len(rows)
        if limit is not None:
            rows = rows.select(range(min(limit, n_file)))
        loaded[task] = (rows, n_file, build_examples(task, rows))
    results = {}
    for task, (rows, n_file, examples) in loaded.items():
        t0 = time.perf_counter()
        scores = score_examples(model, tokenizer, examples, batch_size=batch_size, progress=progress, desc=task, max_length=max_length)
        res = aggregate(task, scores)
        res.update(n_file=n_file, file=str(resolve_data_path(data_cfg, f"task_files.{task}")), wall_s=round(time.perf_counter() - t0, 2))
        results[task] = res
    return results


def headline_mean(results: dict[str, dict]) -> float | None:
    """Unweighted mean over tasks of each task's headline metric (acc_norm where reported, else acc)."""
    vals = [r[r["metric"]] for r in results.values() if r.get(r.get("metric", ""), None) is not None]
    return float(np.mean(vals)) if vals else None
