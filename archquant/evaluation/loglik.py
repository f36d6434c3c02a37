"""Batched log-likelihood of continuations, with lm-evaluation-harness's tokenisation and truncation.

Works for any causal LM module: an HF model, a materialised subnet, or a supernet whose forward
returns a logits tensor. The semantics copy lm-eval's ``HFLM.loglikelihood``: trailing spaces of the
context move into the continuation, the pair is encoded whole and split at the context's length,
an empty context is replaced by the BOS (else EOS) token, over-long inputs lose tokens on the left,
and inputs are right-padded (a causal model never looks at the padding after a row's last token).
Requests with identical inputs share one forward: a one-token answer set (MMLU's letters, BoolQ's
no/yes) costs one row instead of four or two.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no limit" model_max_length
DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer gives a length


@dataclass(frozen=True)
class LoglikResult:
    """Sum of continuation token log-probs and whether greedy decoding would produce them."""

    logprob: float
    greedy: bool
    num_tokens: int


def model_config(model):
    """The HF config of a model, a materialised subnet or a supernet (``base_config``), else None."""
    cfg = getattr(model, "config", None)
    return cfg if cfg is not None else getattr(model, "base_config", None)


def model_max_length(model, tokenizer) -> int:
    """Longest input the model takes, resolved as lm-eval does (config, then tokenizer, then 2048)."""
    cfg = model_config(model)
    for c in (getattr(cfg, "text_config", None), cfg):
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(c, attr, None) if c is not None else None
            if isinstance(value, int) and value > 0:
                return value
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < TOKENIZER_INFINITY:
        return tok_max
    return DEFAULT_MAX_LENGTH


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def forward_logits(model, input_ids: torch.Tensor, last: int | None = None) -> torch.Tensor:
    """Logits of a causal LM for a batch of token ids, whatever the module returns.

    Args:
        model: HF model (``.logits``), or any module returning a logits tensor or a tuple.
        input_ids: token ids.
        last: only the last ``last`` positions are needed. HF models then project only those
            through ``lm_head`` (``logits_to_keep``): the vocabulary projection is a fifth of a small
            model's FLOPs and its output the largest tensor of the forward.

    Shape:
        input_ids: ``[B, S]``; returns ``[B, S, V]``, or ``[B, last, V]`` when ``last`` is given.
    """
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        kwargs = {"use_cache": False}  # no KV cache: one pass, less memory
        if last is not None and _accepts_logits_to_keep(model):
            kwargs["logits_to_keep"] = last
        out = model(input_ids=input_ids, **kwargs)
    elif last is not None and _accepts_logits_to_keep(model):
        out = model(input_ids, logits_to_keep=last)
    else:
        out = model(input_ids)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{type(model).__name__} returned {type(out).__name__}; expected a logits tensor or an output with .logits")
    if last is not None and logits.shape[1] != last:
        logits = logits[:, -last:]
    return logits


@contextmanager
def scoring_mode(model):
    """Eval mode and no autograd while scoring; the caller's train/eval mode is restored afterwards."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def _tok_encode(tokenizer, text: str, prefix: str | None) -> list[int]:
    # lm-eval's tok_encode: the tokenizer's own special-token default, unless the text already starts
    # with the BOS/prefix string (then no second BOS is added).
    if prefix and text.startswith(prefix):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def prefix_token_id(tokenizer) -> int | None:
    """The token an empty context is replaced by: BOS if the tokenizer has one, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pair(
    tokenizer, context: str, continuation: str, *, prefix: str | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of a (context, continuation) pair, split the way lm-eval splits them.

    Encoding the concatenation (not the parts) keeps the tokens a real text would have at the
    boundary; the context's trailing whitespace moves to the continuation so that it becomes part of
    the scored word (" yes"), not a dangling context token.

    Args:
        prefix: the decoded prefix token (computed here when None; pass it when encoding many pairs).
    """
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        if prefix is None:
            raise ValueError("an empty context needs a BOS or EOS token; the tokenizer has neither")
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if prefix is None:
        prefix_id = prefix_token_id(tokenizer)
        prefix = tokenizer.decode(prefix_id) if prefix_id is not None else ""
    whole = _tok_encode(tokenizer, context + continuation, prefix)
    ctx = _tok_encode(tokenizer, context, prefix)
    return ctx, whole[len(ctx) :]


def loglikelihood(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = False,
    desc: str = "loglikelihood",
) -> list[LoglikResult]:
    """Log-likelihood of each continuation given its context.

    Args:
        model: a causal LM (HF model, materialised subnet, or supernet returning logits).
        tokenizer: its tokenizer.
        requests: ``(context, continuation)`` pairs.
        batch_size: input rows per forward.
        max_length: model context length (None = resolved from the model config / tokenizer).
        progress: show a tqdm bar over forwards.
        desc: the bar's label.

    Returns:
        One ``LoglikResult`` per request, in request order.
    """
    if batch_size <= 0:
        raise ValueError(f"eval.batch_size must be > 0, got {batch_size}")
    max_length = max_length or model_max_length(model, tokenizer)
    prefix_id = prefix_token_id(tokenizer)
    prefix = tokenizer.decode(prefix_id) if prefix_id is not None else ""
    encoded = [encode_pair(tokenizer, ctx, cont, prefix=prefix) for ctx, cont in requests]
    # inputs: the last max_length+1 tokens of context+continuation, minus the last (it is only a target)
    keyed: dict[tuple[int, ...], list[int]] = {}
    fulls: list[list[int]] = []
    for i, (ctx, cont) in enumerate(encoded):
        if not cont or len(cont) > max_length:
            raise ValueError(
                f"request {i} has a continuation of {len(cont)} tokens (must be 1..{max_length}): {requests[i]!r:.200}"
            )
        full = (ctx + cont)[-(max_length + 1) :]
        fulls.append(full)
        keyed.setdefault(tuple(full[:-1]), []).append(i)
    # longest first: the first batch fails fast on memory, and similar lengths share padding; a model that reuses
    # the previous row's cache (``reuses_prefix``: a GGUF in llama.cpp) gets rows one at a time in token order,
    # so the choices of one question, which share its context, follow each other
    if getattr(model, "reuses_prefix", False):
        inputs, batch_size = sorted(keyed), 1
    else:
        inputs = sorted(keyed, key=lambda k: (-len(k), k))
    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[LoglikResult | None] = [None] * len(requests)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(inputs), desc=desc, disable=not progress, unit="seq", leave=False)
    with scoring_mode(model):
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            width = len(chunk[0])
            batch = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            for r, inp in enumerate(chunk):
                batch[r, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            n_pos = {inp: max(len(encoded[i][1]) for i in keyed[inp]) for inp in chunk}
            # only positions from the earliest scored one onwards need logits (rows have similar lengths)
            first = min(len(inp) - n_pos[inp] for inp in chunk)
            logits = forward_logits(model, batch.to(device), last=width - first)  # [B, width - first, V]
            for r, inp in enumerate(chunk):
                # logits at input position j predict token j+1: the last n input positions score the continuation
                lo, hi = len(inp) - n_pos[inp] - first, len(inp) - first
                logp = F.log_softmax(logits[r, lo:hi].float(), dim=-1)  # [n_pos, V]
                greedy = logp.argmax(dim=-1)
                for i in keyed[inp]:
                    cont = torch.tensor(fulls[i][-len(encoded[i][1]) :], device=logp.device)
                    lp = logp[-len(cont) :]
                    results[i] = LoglikResult(
                        logprob=float(lp.gather(1, cont[:, None]).sum()),
                        greedy=bool((greedy[-len(cont) :] == cont).all()),
                        num_tokens=len(cont),
                    )
            bar.update(len(chunk))
    bar.close()
    return results  # type: ignore[return-value]
