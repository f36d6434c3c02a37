"""Model loading: one registry from a name to a (model, tokenizer) pair."""

from archquant.models.registry import MODEL_NAMES, load_model, load_tokenizer, resolve_model_name
from archquant.models.tiny import tiny_llama_config

__all__ = ["MODEL_NAMES", "load_model", "load_tokenizer", "resolve_model_name", "tiny_llama_config"]
