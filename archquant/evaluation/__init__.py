"""Evaluation: perplexity over fixed windows and the lm-eval-compatible zero-shot suite, one ``evaluate``."""

from archquant.evaluation.config import ALL_TASKS, EvalConfig
from archquant.evaluation.loglik import LoglikResult, encode_pair, loglikelihood
from archquant.evaluation.perplexity import perplexity
from archquant.evaluation.suite import EVAL_JSON_VERSION, check_inputs, evaluate, format_table
from archquant.evaluation.zero_shot import headline_mean, zero_shot

__all__ = [
    "ALL_TASKS",
    "EVAL_JSON_VERSION",
    "EvalConfig",
    "LoglikResult",
    "check_inputs",
    "encode_pair",
    "evaluate",
    "format_table",
    "headline_mean",
    "loglikelihood",
    "perplexity",
    "zero_shot",
]
