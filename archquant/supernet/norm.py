"""RMSNorm over an elastic hidden size: divide by the expected number of kept channels.

With a residual mask ``m`` (channels beyond the kept width are zero), ``sum(x^2) / E[d]`` equals the
narrower model's ``mean(x_d^2)`` exactly when the mask is hard, so the masked full-width supernet and
the materialised narrow model compute the same normalisation.
"""

from __future__ import annotations

import torch
from torch import nn


class ElasticRMSNorm(nn.Module):
    """Llama RMSNorm on the active prefix of a shared weight.

    Args:
        weight: shared scale Parameter. Shape: ``[D]``.
        eps: variance epsilon of the base model.
    """

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.eps = eps

    def forward(self, x: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise ``x``.

        Args:
            x: residual stream; its width selects the prefix of the weight. Shape: ``[B, S, D_run]``.
            count: expected kept channel count (``sum_k pi_k d_k``) while the hidden gate is open;
                ``None`` normalises over the active width.
        """
        d = x.shape[-1]
        w = self.weight if d == self.weight.shape[0] else self.weight[:d]
        dtype = x.dtype
        x32 = x.float()
        if count is None:
            var = x32.pow(2).mean(-1, keepdim=True)
        else:
            var = x32.pow(2).sum(-1, keepdim=True) / count
        return w * (x32 * torch.rsqrt(var + self.eps)).to(dtype)
