"""Evaluation: perplexity over fixed windows and the lm-eval-compatible zero-shot suite."""

from archquant.commands.eval import evaluate, format_table, load_for_eval, register_eval_loader
from archquant.evaluation.config import ALL_TASKS, EvalConfig
from archquant.evaluation.loglik import LoglikResult, encode_pair, loglikelihood
from archquant.evaluation.perplexity import perplexity
from archquant.evaluation.zero_shot import headline_mean, zero_shot

__all__ = [
    "ALL_TASKS",
    "EvalConfig",
    "LoglikResult",
    "encode_pair",
    "evaluate",
    "format_table",
    "headline_mean",
    "load_for_eval",
    "loglikelihood",
    "perplexity",
    "register_eval_loader",
    "zero_shot",
]
