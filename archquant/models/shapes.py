"""Random-weight models at real architectures' shapes (``random:<shape>``), for latency and mechanics.

Latency does not depend on the weight values, so profiling or benchmarking a GPU needs only a model's
shapes: ``random:llama-3.1-8b`` builds a Llama with Llama-3.1-8B's dimensions and random weights,
directly on the requested device and dtype, without downloading anything. The tokenizer is the
byte-level one of the tests (ids beyond it are still valid model inputs).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PREFIX = "random:"

# dimensions from each model's published config.json (RoPE scaling left out: it changes no shape or kernel)
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072),
}


def shape_names() -> list[str]:
    return [PREFIX + k for k in SHAPES]


def shape_config(name: str) -> LlamaConfig:
    """The ``LlamaConfig`` of ``random:<shape>`` (or of the bare shape name)."""
    key = name.removeprefix(PREFIX)
    if key not in SHAPES:
        raise KeyError(f"unknown model shape {name!r}; known: {', '.join(shape_names())}")
    return LlamaConfig(**SHAPES[key], hidden_act="silu", attention_bias=False, mlp_bias=False)


def random_model(name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 seed: int = 0) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` of shape ``name`` with random weights (std 0.02), built on ``device`` in ``dtype``."""
    config = shape_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()
