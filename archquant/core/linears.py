"""The one map of a Llama decoder block's linears: short name -> HF module path -> GGUF tensor name.

Short names (``q k v o gate up down``) are what ``Arch``, ``config.quant`` and the latency tables speak;
module paths are where Hugging Face Llama-family models keep the linears; GGUF names come from gguf's
own ``TENSOR_NAMES`` table, so they are llama.cpp's by construction.
"""

from __future__ import annotations

import gguf

LINEARS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
ATTN_LINEARS: tuple[str, ...] = ("q", "k", "v", "o")
MLP_LINEARS: tuple[str, ...] = ("gate", "up", "down")

# short name -> module path inside a decoder block
MODULE_PATHS: dict[str, str] = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
NORM_PATHS: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")

_T = gguf.MODEL_TENSOR
_GGUF: dict[str, gguf.MODEL_TENSOR] = {
    "q": _T.ATTN_Q, "k": _T.ATTN_K, "v": _T.ATTN_V, "o": _T.ATTN_OUT,
    "gate": _T.FFN_GATE, "up": _T.FFN_UP, "down": _T.FFN_DOWN,
    "attn_norm": _T.ATTN_NORM, "ffn_norm": _T.FFN_NORM,
    "embed": _T.TOKEN_EMBD, "output": _T.OUTPUT, "output_norm": _T.OUTPUT_NORM,
}


def gguf_name(part: str, layer: int | None = None) -> str:
    """The GGUF tensor name of ``part`` (a linear's short name, ``attn_norm``, ``ffn_norm``, ``embed``,
    ``output``, ``output_norm``), in block ``layer`` where it has one, with the ``.weight`` suffix."""
    return gguf.TENSOR_NAMES[_GGUF[part]].format(bid=layer) + ".weight"


def module_path(lin: str) -> str:
    """The module path of linear ``lin`` inside a decoder block (``q`` -> ``self_attn.q_proj``)."""
    return MODULE_PATHS[lin]
