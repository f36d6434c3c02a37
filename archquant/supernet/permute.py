"""Function-preserving permutations that sort every searchable dimension by importance.

After the permutation, "keep the first k" keeps the k most important units of a dimension: hidden
channels, KV groups (with their query heads), query heads inside a group, RoPE pairs and value dims
(only when head size is searchable) and MLP neurons. Only dimensions with more than one choice are
permuted, so unsearched dimensions keep the original layout. RoPE pairs move with their frequency
(``rope_perm``), which is what keeps the permuted model's logits equal to the original's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from archquant.core.space import Space
from archquant.supernet.importance import Importance


@dataclass
class Permutation:
    """``new index -> old index`` per dimension (``None`` = identity). Per-layer lists have length L."""

    hidden: torch.Tensor | None
    kv: list[torch.Tensor | None]
    heads: list[torch.Tensor | None]
    pairs: list[torch.Tensor | None]
    vdims: list[torch.Tensor | None]
    mlp: list[torch.Tensor | None]

    def rope_perm(self, l: int, head_dim: int) -> torch.Tensor | None:
        """Permuted q/k dim -> original dim of layer ``l`` (``[P, P + hd/2]``), or ``None``."""
        p = self.pairs[l]
        return None if p is None else torch.cat([p, p + head_dim // 2])


def _desc(scores: torch.Tensor) -> torch.Tensor:
    return torch.argsort(scores.float(), descending=True, stable=True)


def _desc_blocks(scores: torch.Tensor, block: int) -> torch.Tensor:
    """Sort whole blocks of ``block`` consecutive units by their summed score, keeping the order inside a block
    (blocks of ``gcd(block, units)`` where ``block`` does not divide the units: 64 for 576 hidden channels under
    256-blocks, which keeps every 32-block of a fallback type whole)."""
    block = math.gcd(int(block), scores.numel())
    if block <= 1:
        return _desc(scores)
    order = _desc(scores.float().reshape(-1, block).sum(1))
    return (order[:, None] * block + torch.arange(block)[None, :]).reshape(-1)


def make_permutation(imp: Importance, space: Space, block: int = 1) -> Permutation:
    """Sort each searchable dimension by its importance score, most important first.

    ``block`` > 1 (a backend whose weights are stored in blocks along the input dimension, llama.cpp's
    32 / 256): hidden channels and MLP neurons move in whole blocks, so a block of the original weight
    stays one block of the permuted one. A model that arrives quantised (the embedded Q4_1 file) then
    re-quantises losslessly to its own type; sorting channel by channel scattered every block (measured:
    uniform Q4_1 of SmolLM2 at ppl 62.6 importance-sorted, 44.6 unpermuted). Widths are multiples of the
    block on that backend, so pruning a prefix of blocks is all the search can do anyway.
    """
    fp = space.fingerprint
    n_layers, n_kv = fp["num_hidden_layers"], fp["num_key_value_heads"]
    qpg = fp["num_attention_heads"] // n_kv
    kv, heads, pairs, vdims, mlp = [], [], [], [], []
    for l in range(n_layers):
        h = imp.heads[l].reshape(n_kv, qpg)
        g = _desc(h.sum(1)) if len(space.kv_groups) > 1 else torch.arange(n_kv)
        within = [_desc(h[gi]) if len(space.q_per_group) > 1 else torch.arange(qpg) for gi in g.tolist()]
        order = torch.cat([gi * qpg + w for gi, w in zip(g.tolist(), within)])
        identity = torch.equal(order, torch.arange(n_kv * qpg))
        kv.append(None if identity else g)
        heads.append(None if identity else order)
        search_hd = len(space.head_dim) > 1
        pairs.append(_desc(imp.pairs[l]) if search_hd else None)
        vdims.append(_desc(imp.vdims[l]) if search_hd else None)
        mlp.append(_desc_blocks(imp.neurons[l], block) if len(space.mlp) > 1 else None)
    hidden = _desc_blocks(imp.hidden, block) if len(space.hidden) > 1 else None
    return Permutation(hidden=hidden, kv=kv, heads=heads, pairs=pairs, vdims=vdims, mlp=mlp)


def _rows(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return t if idx is None else t.index_select(0, idx)


def _cols(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return t if idx is None else t.index_select(1, idx)


def _unit_index(units: torch.Tensor | None, n_units: int, inner: torch.Tensor | None, size: int) -> torch.Tensor | None:
    """Flat index of ``units`` blocks of ``size`` rows, each permuted by ``inner``."""
    if units is None and inner is None:
        return None
    u = torch.arange(n_units) if units is None else units
    i = torch.arange(size) if inner is None else inner
    return (u[:, None] * size + i[None, :]).reshape(-1)


def _heads(config) -> tuple[int, int, int]:
    n_q = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_q
    return n_q, n_kv, getattr(config, "head_dim", None) or config.hidden_size // n_q


def _layer_index(perm: Permutation, l: int, config) -> dict[str, torch.Tensor | None]:
    """Old index of every new row of q / k / v and of every new o input column (``o``), MLP neuron (``m``)."""
    n_q, n_kv, hd = _heads(config)
    rope = perm.rope_perm(l, hd)
    return {"q": _unit_index(perm.heads[l], n_q, rope, hd), "k": _unit_index(perm.kv[l], n_kv, rope, hd),
            "v": _unit_index(perm.kv[l], n_kv, perm.vdims[l], hd), "o": _unit_index(perm.heads[l], n_q, perm.vdims[l], hd),
            "m": perm.mlp[l]}


def permute_state(state: dict[str, torch.Tensor], perm: Permutation, config) -> dict[str, torch.Tensor]:
    """Apply ``perm`` to a Llama-layout state dict (HF names); returns new tensors, input untouched."""
    d_perm = perm.hidden
    out = dict(state)

    def put(name, fn):
        if name in out:
            out[name] = fn(out[name])

    put("model.embed_tokens.weight", lambda t: _cols(t, d_perm))
    put("lm_head.weight", lambda t: _cols(t, d_perm))
    put("model.norm.weight", lambda t: _rows(t, d_perm))
    for l in range(config.num_hidden_layers):
        p = f"model.layers.{l}."
        idx = _layer_index(perm, l, config)
        o_idx, m_idx = idx["o"], idx["m"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            put(p + f"{norm}.weight", lambda t: _rows(t, d_perm))
        for lin in ("q", "k", "v"):
            put(p + f"self_attn.{lin}_proj.weight", lambda t, i=idx[lin]: _cols(_rows(t, i), d_perm))
            put(p + f"self_attn.{lin}_proj.bias", lambda t, i=idx[lin]: _rows(t, i))
        put(p + "self_attn.o_proj.weight", lambda t: _cols(_rows(t, d_perm), o_idx))
        put(p + "self_attn.o_proj.bias", lambda t: _rows(t, d_perm))
        for lin in ("gate", "up"):
            put(p + f"mlp.{lin}_proj.weight", lambda t: _cols(_rows(t, m_idx), d_perm))
            put(p + f"mlp.{lin}_proj.bias", lambda t: _rows(t, m_idx))
        put(p + "mlp.down_proj.weight", lambda t: _cols(_rows(t, d_perm), m_idx))
        put(p + "mlp.down_proj.bias", lambda t: _rows(t, d_perm))
    return out


def input_moments(imp: Importance, perm: Permutation | None, config) -> dict[str, torch.Tensor]:
    """Mean ``x^2`` of each linear's input channels in the permuted layout: ``HF weight name -> [K]`` (the
    importance of the GGUF quantiser's block search; columns move exactly as ``permute_state`` moves the
    weight's)."""
    d_perm = None if perm is None else perm.hidden
    out = {"lm_head.weight": _rows(imp.x2_head, d_perm)}
    for l in range(config.num_hidden_layers):
        p = f"model.layers.{l}."
        idx = {"o": None, "m": None} if perm is None else _layer_index(perm, l, config)
        for lin in ("q", "k", "v"):
            out[p + f"self_attn.{lin}_proj.weight"] = _rows(imp.x2_attn[l], d_perm)
        out[p + "self_attn.o_proj.weight"] = _rows(imp.x2_o[l], idx["o"])
        for lin in ("gate", "up"):
            out[p + f"mlp.{lin}_proj.weight"] = _rows(imp.x2_mlp[l], d_perm)
        out[p + "mlp.down_proj.weight"] = _rows(imp.x2_down[l], idx["m"])
    return {k: v.contiguous() for k, v in out.items()}
