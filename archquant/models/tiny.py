"""Tiny random Llama configs for fast tests (hidden 64, 2-4 layers, GQA)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(
    *,
    vocab_size: int = 256,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 8,
    num_key_value_heads: int = 4,
    head_dim: int = 16,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 256,
) -> LlamaConfig:
    """A small Llama config with GQA (2 query heads per KV head), like SmolLM2 in miniature.

    Widths are multiples of 32 so that spaces with ``width_multiple=32`` resolve to several choices.
    """
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings,
        attn_implementation="eager",
    )


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama in fp32 eval mode (deterministic for a seed)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    # Random init has tiny norms weights = 1; perturb them so tests see non-trivial norm scales.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()
