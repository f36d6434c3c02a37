"""The reference quantiser (pure torch; imports without Triton).

Weights: group-wise asymmetric min-max along the input dimension. For ``bits`` b and a group of
``group_size`` inputs, ``scale = (max - min) / (2^b - 1)`` rounded to fp16 (the stored precision),
``zero = round(-min / scale)`` clamped to ``[0, 2^b - 1]`` and ``q = clamp(round(w / scale) + zero)``.
Dequantised: ``(q - zero) * scale``. The supernet's fake-quant, the packed checkpoint and the kernels
all use this function, so ``fake_quant_weight(w) == dequantize_weight(*quantize_weight(w))`` bit for bit.

Activations: per-token dynamic symmetric int8, ``s = max|x| / 127`` per row.
"""

from __future__ import annotations

import torch

_EPS = 1e-8


def quantize_weight(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise a weight matrix group-wise.

    Args:
        w: weight, any float dtype. Shape: ``[N, K]`` with ``K % group_size == 0``.
        bits: 2..8.
        group_size: inputs per group.

    Returns:
        ``(q, scale, zero)``: ``q`` uint8 ``[N, K]`` in ``[0, 2^bits - 1]``; ``scale`` fp16 and ``zero``
        uint8, both ``[N, K // group_size]``.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be in 2..8 for integer quantisation, got {bits}")
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"input width {k} is not a multiple of group_size {group_size}")
    qmax = (1 << bits) - 1
    wg = w.detach().float().reshape(n, k // group_size, group_size)
    wmin = wg.amin(dim=-1).clamp(max=0.0)  # include 0 so that zero lies in range and 0 is exact
    wmax = wg.amax(dim=-1).clamp(min=0.0)
    scale = ((wmax - wmin) / qmax).clamp(min=_EPS).half().float()
    zero = torch.round(-wmin / scale).clamp(0, qmax)
    q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, qmax)
    return q.reshape(n, k).to(torch.uint8), scale.half(), zero.to(torch.uint8)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Inverse of ``quantize_weight``. Shape: ``q [N, K]``, ``scale, zero [N, K // g]`` -> ``[N, K]``."""
    n, k = q.shape
    g = k // scale.shape[1]
    qg = q.float().reshape(n, -1, g)
    w = (qg - zero.float()[..., None]) * scale.float()[..., None]
    return w.reshape(n, k).to(dtype)


def fake_quant_weight(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Quantise-dequantise with a straight-through gradient; ``bits >= 16`` returns ``w`` unchanged."""
    if bits >= 16:
        return w
    wq = dequantize_weight(*quantize_weight(w, bits, group_size), dtype=w.dtype)
    return w + (wq - w).detach()


def quantize_act(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantisation. Shape: ``x [..., K]`` -> ``(q int8 [..., K], scale fp32 [..., 1])``."""
    qmax = (1 << (bits - 1)) - 1
    scale = (x.detach().float().abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=_EPS)
    q = torch.clamp(torch.round(x.detach().float() / scale), -qmax, qmax).to(torch.int8)
    return q, scale


def fake_quant_act(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token dynamic symmetric fake-quant with a straight-through gradient; 16 bits is identity."""
    if bits >= 16:
        return x
    q, scale = quantize_act(x, bits)
    return x + (q.float() * scale - x).to(x.dtype).detach()
