"""Pure-torch reference of the weight-only quantised matmul (imports without Triton)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from archquant.quant.packing import unpack_int
from archquant.quant.reference import dequantize_weight


def wq_matmul_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """``x @ ((q - zero) * scale).T`` computed in fp32, returned in ``x.dtype``.

    Args:
        x: activations. Shape: ``[M, K]``.
        qweight: packed codes (``archquant.quant.packing``). Shape: ``[N, ceil(K / (32 // bits))]``.
        scales: fp16. Shape: ``[N, K // group_size]``.
        zeros: uint8. Shape: ``[N, K // group_size]``.
        bits: weight bits.
        group_size: inputs per group.

    Returns:
        Shape: ``[M, N]``.
    """
    k = x.shape[-1]
    if scales.shape[1] * group_size != k:
        raise ValueError(f"scales cover {scales.shape[1]} groups of {group_size}, but K={k}")
    w = dequantize_weight(unpack_int(qweight, bits, k), scales, zeros, dtype=torch.float32)
    return F.linear(x.float(), w).to(x.dtype)
