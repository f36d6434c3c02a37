"""CPU weight-only matmul through torch's ``_weight_int4pack_mm_for_cpu`` (bf16 activations).

torch's CPU int4 kernel computes ``x @ ((q4 - 8) * S + Z).T`` with per-group bf16 "scale and zero"
tensors ``[K // g, N, 2]``. Our reference dequantisation is ``(q - zero) * scale``, so:

* bits <= 4: one plane of codes shifted by ``c = 8 - 2^(bits-1)`` (0 for 4 bits), ``S = scale``,
  ``Z = (2^(bits-1) - zero) * scale``. The shift centres ``q4 - 8`` on the code range: unshifted 2-bit
  codes sit at -8..-5 and ``Z`` near +8 scales would cancel them, turning Z's bf16 rounding into a
  ~2% error (measured) instead of ~0.2%.
* bits 5..8: two 4-bit planes ``q = 16 * hi + lo``; ``hi`` with ``S = 16 * scale``,
  ``Z = (8 - zero_hi) * 16 * scale`` and ``lo`` with ``S = scale``, ``Z = (8 - zero_lo) * scale``, where
  ``zero = 16 * zero_hi + zero_lo``; the two products are summed (two kernel calls, one byte per weight).

Why bf16: measured here (torch 2.13, AVX2), the kernel with fp32 activations falls back to a path
10-100x slower than fp32 ``F.linear``, and fp16 is 2-40x slower than bf16. bf16 costs precision:
activations, S, Z and the output are rounded to 8 mantissa bits (relative 2^-9 each). With 8-bit
activations the codes (|q| <= 127) are exact in bf16 and the per-token scale is applied in fp32 after
the call, so only S, Z and the output rounding remain. Tolerances are measured in the tests.

Constraints of the torch kernel: ``N % 16 == 0`` and ``group_size in (32, 64, 128, 256)``.

Not used for our format: torch's ``_weight_int8pack_mm`` and fbgemm's dynamic W8A8 take one scale per
output channel and no zero point, so they cannot run group-wise asymmetric weights;
``scripts/bench_kernels.py`` times them as per-channel baselines only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from archquant.quant.packing import PackedWeight

INT4PACK_GROUP_SIZES = (32, 64, 128, 256)
_INNER_K_TILES = 2  # any of 1/2/4/8 gives the same CPU layout (checked), 2 is torch's default


def int4pack_unsupported_reason(n: int, k: int, bits: int, group_size: int) -> str | None:
    """Why torch's CPU int4 kernel cannot run this shape (None when it can)."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return "this torch build has no aten._weight_int4pack_mm_for_cpu"
    if not 2 <= bits <= 8:
        return f"{bits}-bit weights are not integer-quantised"
    if n % 16:
        return f"out_features {n} is not a multiple of 16"
    if group_size not in INT4PACK_GROUP_SIZES or k % group_size:
        return f"group_size {group_size} is not one of {INT4PACK_GROUP_SIZES} dividing K={k}"
    return None


@dataclass
class Int4PackCPU:
    """Weights converted for torch's CPU int4 kernel: one plane (<= 4 bits) or two (5..8 bits).

    Attributes:
        planes: per plane, ``(packed uint8 [N, K // 2], scale_and_zero bf16 [K // g, N, 2])``.
        group_size: inputs per group.
    """

    planes: list[tuple[torch.Tensor, torch.Tensor]]
    group_size: int

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() + sz.numel() * sz.element_size() for p, sz in self.planes)


def _plane(
    q4: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shift: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One 4-bit plane of ``(q4 - zero) * scale``: ``q4`` int [N, K] with ``q4 + shift`` in [0, 15];
    ``scale``/``zero`` fp32 [N, G] (zero in codes)."""
    codes = (q4 + shift).to(torch.int32).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, _INNER_K_TILES)
    # Z computed in fp32 (exact: <= 5-bit integer times an fp16 value) before the single bf16 rounding
    sz = torch.stack([scale, (8.0 - shift - zero) * scale], dim=-1)  # [N, G, 2]
    return packed, sz.transpose(0, 1).contiguous().to(torch.bfloat16)


def prepare_int4pack(pw: PackedWeight) -> Int4PackCPU:
    """Convert a packed weight to torch's CPU int4 layout (CPU tensors)."""
    reason = int4pack_unsupported_reason(pw.out_features, pw.in_features, pw.bits, pw.group_size)
    if reason:
        raise ValueError(f"int4pack path cannot run this weight: {reason}")
    q = pw.unpack().cpu().to(torch.int32)  # [N, K]
    scale = pw.scales.cpu().float()
    zero = pw.zeros.cpu().float()
    if pw.bits <= 4:
        return Int4PackCPU([_plane(q, scale, zero, shift=8 - (1 << (pw.bits - 1)))], pw.group_size)
    zero_hi = torch.floor(zero / 16)
    zero_lo = zero - 16 * zero_hi
    planes = [_plane(q >> 4, 16 * scale, zero_hi), _plane(q & 15, scale, zero_lo)]
    return Int4PackCPU(planes, pw.group_size)


def int4pack_linear(x: torch.Tensor, w: Int4PackCPU, act_bits: int = 16) -> torch.Tensor:
    """``x @ W.T`` in fp32 output through the int4 kernel.

    Args:
        x: activations (any float dtype). Shape: ``[M, K]``.
        w: converted weight.
        act_bits: 16 (bf16 activations) or 8 (per-token symmetric int8 codes, exact in bf16).

    Returns:
        fp32. Shape: ``[M, N]``.
    """
    if act_bits == 8:
        from archquant.quant.reference import quantize_act

        xq, xs = quantize_act(x, 8)  # xq: [M, K] int8, xs: [M, 1]
        xb = xq.to(torch.bfloat16)
    else:
        xb, xs = x.to(torch.bfloat16), None
    y = None
    for packed, sz in w.planes:
        part = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, w.group_size, sz).float()
        y = part if y is None else y + part
    return y if xs is None else y * xs
