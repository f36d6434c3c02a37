"""Pure-torch reference of the W8A8 matmul (imports without Triton)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from archquant.quant.packing import unpack_int
from archquant.quant.reference import dequantize_weight, quantize_act


def w8a8_matmul_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """``fake_quant_act(x, 8) @ dequant(Wq).T`` in fp32, returned in ``x.dtype``.

    Activations are quantised per token (symmetric int8, the reference ``quantize_act``), exactly as
    the supernet's ``fake_quant_act`` does, so this is the fake-quant forward of a W{bits}A8 linear.

    Args:
        x: float activations. Shape: ``[M, K]``.
        qweight: packed codes. Shape: ``[N, ceil(K / (32 // bits))]``.
        scales: fp16. Shape: ``[N, K // group_size]``.
        zeros: uint8. Shape: ``[N, K // group_size]``.
        bits: weight bits (8 or 4 for the kernel).
        group_size: inputs per group.

    Returns:
        Shape: ``[M, N]``.
    """
    k = x.shape[-1]
    xq, xs = quantize_act(x, 8)  # xq: [M, K] int8, xs: [M, 1] fp32
    w = dequantize_weight(unpack_int(qweight, bits, k), scales, zeros, dtype=torch.float32)
    return F.linear(xq.float() * xs, w).to(x.dtype)
