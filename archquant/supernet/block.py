"""One decoder block of the supernet: elastic attention + MLP, a residual mask, and a depth gate.

Depth is ``h <- h + pi_keep * f(h)`` where ``f(h)`` is the whole block's residual update (attention
output plus MLP output), so ``pi_keep = 0`` is exactly a skipped block and ``1`` the block itself.
Sub-layer outputs are multiplied by the hidden-size mask before they enter the residual stream, which
keeps the channels beyond the kept width at zero (or at their expected weight, with soft gates).
"""

from __future__ import annotations

import torch
from torch import nn

from archquant.supernet.attention import ElasticAttention
from archquant.supernet.mlp import ElasticMLP
from archquant.supernet.norm import ElasticRMSNorm


class SuperBlock(nn.Module):
    """A Llama decoder block over shared weights (module names follow ``LlamaDecoderLayer``)."""

    def __init__(
        self,
        input_layernorm: ElasticRMSNorm,
        self_attn: ElasticAttention,
        post_attention_layernorm: ElasticRMSNorm,
        mlp: ElasticMLP,
    ) -> None:
        super().__init__()
        self.input_layernorm = input_layernorm
        self.self_attn = self_attn
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp = mlp
        self.keep_fixed: int | None = None  # index into keep choices [1, 0]: 0 keep, 1 skip
        self.naive = False

    @property
    def skipped(self) -> bool:
        return self.keep_fixed == 1

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        hidden_mask: torch.Tensor | None,
        count: torch.Tensor | None,
        lp: dict,
        d_sub: int | None = None,
    ) -> torch.Tensor:
        """Shape: ``x [B, S, D_run]`` -> ``[B, S, D_run]``.

        ``hidden_mask [D]`` and ``count`` are given while the hidden gate is soft; ``d_sub`` is the
        hidden width of a one-hot hidden gate; ``lp`` maps this block's gates to ``None`` (fixed), an
        ``int`` (one-hot this call) or a probability ``Tensor``.
        """
        p_keep = lp["keep"]
        if isinstance(p_keep, int) and p_keep == 1:
            return x  # one-hot skip: the block is not run
        if self.naive:
            from archquant.supernet.naive import naive_attention, naive_mlp

            a = naive_attention(self.self_attn, self.input_layernorm(x, count), cos, sin, lp, d_sub)
        else:
            a = self.self_attn(self.input_layernorm(x, count), cos, sin, lp, d_sub)
        if hidden_mask is not None:
            a = a * hidden_mask
        h = self.post_attention_layernorm(x + a, count)
        f = naive_mlp(self.mlp, h, lp, d_sub) if self.naive else self.mlp(h, lp, d_sub)
        if hidden_mask is not None:
            f = f * hidden_mask
        if not isinstance(p_keep, torch.Tensor):
            return x + a + f
        return x + p_keep[0] * (a + f)
