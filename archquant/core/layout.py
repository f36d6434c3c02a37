"""The per-layer shape and bits of a materialised subnet, read from its config (one reader for every exporter)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from archquant.core.linears import LINEARS


@dataclass
class LayerLayout:
    """One kept decoder block: absolute widths and bits."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    abits: int = 16
    wbits: dict[str, int] = field(default_factory=lambda: {n: 16 for n in LINEARS})


@dataclass
class ModelLayout:
    """Every kept block's layout plus the global settings an exporter needs."""

    hidden_size: int
    vocab_size: int
    layers: list[LayerLayout]
    lm_head_bits: int = 16
    group_size: int = 64
    backend: str = "torch"
    tie_word_embeddings: bool = False

    @property
    def tied_lm_head(self) -> bool:
        """The lm_head shares the embedding's tensor (tied in the config and not quantised)."""
        return self.tie_word_embeddings and self.lm_head_bits >= 16

    def quant_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "group_size": self.group_size,
            "layers": [{"wbits": dict(l.wbits), "abits": l.abits} for l in self.layers],
            "lm_head_bits": self.lm_head_bits,
        }


def _per_layer(config, name: str, fallback: Any, n: int) -> list:
    vals = getattr(config, name, None)
    if vals is None:
        return [fallback] * n
    if len(vals) != n:
        raise ValueError(f"config.{name} has {len(vals)} entries for {n} layers")
    return list(vals)


def model_layout(config) -> ModelLayout:
    """Read a subnet's layout from an ``ArchQuantConfig`` (per-layer lists + ``quant``) or a plain Llama config.

    A plain config (no per-layer lists, no ``quant``) describes a uniform, unquantised model.
    """
    n = int(config.num_hidden_layers)
    n_q = int(config.num_attention_heads) if getattr(config, "num_attention_heads", None) else 0
    head_dim = int(getattr(config, "head_dim", None) or (config.hidden_size // max(n_q, 1)))
    heads = _per_layer(config, "layer_num_heads", n_q, n)
    kv = _per_layer(config, "layer_num_kv_heads", getattr(config, "num_key_value_heads", None) or n_q, n)
    hdim = _per_layer(config, "layer_head_dim", head_dim, n)
    mlp = _per_layer(config, "layer_intermediate_size", getattr(config, "intermediate_size", 0), n)
    quant = getattr(config, "quant", None) or {}
    qlayers = quant.get("layers") or [{} for _ in range(n)]
    if len(qlayers) != n:
        raise ValueError(f"config.quant has {len(qlayers)} layer entries for {n} layers")
    layers = []
    for i in range(n):
        wb = {lin: int(qlayers[i].get("wbits", {}).get(lin, 16)) for lin in LINEARS}
        layers.append(LayerLayout(int(heads[i]), int(kv[i]), int(hdim[i]), int(mlp[i]), int(qlayers[i].get("abits", 16)), wb))
    return ModelLayout(
        hidden_size=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        layers=layers,
        lm_head_bits=int(quant.get("lm_head_bits", 16)),
        group_size=int(quant.get("group_size", 64)),
        backend=str(quant.get("backend", "torch")),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )
