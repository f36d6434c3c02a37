"""``archquant-eval``: perplexity + zero-shot suite on a model name, HF folder or export folder -> eval.json."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from archquant.data.config import DataConfig
from archquant.data.files import DataFileNotFoundError, DataFormatError, resolve_data_path
from archquant.evaluation.config import EvalConfig
from archquant.evaluation.perplexity import perplexity
from archquant.evaluation.zero_shot import check_tasks, headline_mean, zero_shot
from archquant.utils.env import run_header
from archquant.utils.io import atomic_write_json

EVAL_JSON_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# name, dtype -> (model, tokenizer), or None when the loader does not handle that name
EvalLoader = Callable[[str, torch.dtype], "tuple | None"]
_LOADERS: list[EvalLoader] = []


def register_eval_loader(loader: EvalLoader) -> EvalLoader:
    """Teach ``load_for_eval`` a new kind of model name (e.g. an export folder); tried before the registry."""
    _LOADERS.insert(0, loader)
    return loader


def load_for_eval(name: str, *, dtype: str | torch.dtype = "float32", seed: int = 0):
    """Load ``(model, tokenizer)`` for evaluation from a registry name, HF folder / hub id, or a
    folder a registered loader claims (export folders).

    Raises:
        ModelNotFoundError: the name is none of these (the message lists what ``model.name`` accepts).
    """
    from archquant.models.registry import load_model

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if (Path(name).expanduser() / "archquant.json").is_file():
        import archquant.export.eval_hook  # noqa: F401  (registers the export-folder loader)
    for loader in _LOADERS:
        out = loader(name, torch_dtype)
        if out is not None:
            return out
    path = Path(name).expanduser()
    if path.is_dir() and (path / "archquant.json").exists() and not (path / "config.json").exists():
        raise ValueError(
            f"model.name={name} is an archquant export folder, but no export loader is registered; "
            "import archquant.export (it registers one with archquant.evaluation.register_eval_loader)"
        )
    model, tokenizer = load_model(name, dtype=torch_dtype, seed=seed)
    return model.eval(), tokenizer


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
    check_tasks(eval_cfg.tasks)
    # every input file is resolved before the first forward: a typo fails in a second, not an hour in
    ppl_path = resolve_data_path(data_cfg, "ppl_file") if eval_cfg.perplexity else None
    for task in eval_cfg.tasks:
        resolve_data_path(data_cfg, f"task_files.{task}")
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


def evaluate_cli(cfg) -> dict:
    """The ``archquant-eval`` verb: load ``model.name``, evaluate, write ``<out_dir>/<eval.output>``.

    Bad input (unknown model, missing data file, malformed benchmark row) ends the process with a
    one-line message naming the key to fix, not a traceback.
    """
    from archquant.models.embedded import EmbeddedModelError
    from archquant.models.registry import ModelNotFoundError

    if cfg.trainer.num_threads > 0:
        torch.set_num_threads(cfg.trainer.num_threads)
    out_path = Path(cfg.out_dir) / cfg.eval.output
    try:
        # check the data before loading a model: both errors are cheap to find, one of them is not cheap to reach
        check_tasks(cfg.eval.tasks)
        if cfg.eval.perplexity:
            resolve_data_path(cfg.data, "ppl_file")
        for task in cfg.eval.tasks:
            resolve_data_path(cfg.data, f"task_files.{task}")
        model, tokenizer = load_for_eval(cfg.model.name, dtype=cfg.model.dtype, seed=cfg.model.seed)
        result = evaluate(model, tokenizer, cfg.eval, cfg.data, out_path=out_path, model_name=cfg.model.name)
    except (ModelNotFoundError, EmbeddedModelError, DataFileNotFoundError, DataFormatError, ValueError) as err:
        sys.exit(f"archquant-eval: {err}")
    print(format_table(result))
    print(f"wrote {out_path}")
    return result
