"""``archquant-eval``: perplexity + zero-shot suite on a model name, HF folder or export folder -> ``eval.json``."""

from __future__ import annotations

from pathlib import Path

import torch

from archquant.commands.session import load_by_name
from archquant.evaluation import check_inputs, evaluate, format_table


def evaluate_cli(cfg) -> dict:
    """``archquant-eval``: check the data, load ``model.name``, evaluate, write ``<out_dir>/<eval.output>``.

    The data files are checked before the model is loaded: both errors are cheap to find, one of them is not
    cheap to reach.
    """
    if cfg.trainer.num_threads > 0:
        torch.set_num_threads(cfg.trainer.num_threads)
    out_path = Path(cfg.out_dir) / cfg.eval.output
    check_inputs(cfg.eval, cfg.data)
    model, tokenizer = load_by_name(cfg.model.name, dtype=cfg.model.dtype, seed=cfg.model.seed)
    result = evaluate(model, tokenizer, cfg.eval, cfg.data, out_path=out_path, model_name=cfg.model.name)
    print(format_table(result))
    print(f"wrote {out_path}")
    return result
