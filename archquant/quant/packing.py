"""Packed storage of group-wise quantised weights: integers packed along K into int32 words.

Layout (one row per output channel, K contiguous; the Triton kernels read it directly, and its words
are laid out like compressed-tensors' ``pack-quantized`` int32 words, LSB first along K):

* ``qweight`` int32 ``[N, ceil(K / vpw)]`` with ``vpw = 32 // bits`` values per word (8 for 4 bits,
  4 for 8 bits, 16 for 2 bits, 10 for 3 bits with the top two bits unused). Value ``k`` of a row sits in
  word ``k // vpw`` at bit offset ``(k % vpw) * bits``, least significant first; on a little-endian
  machine the 4-bit words are therefore "two int4 per byte, low nibble first" when viewed as bytes.
  A K that is not a multiple of ``vpw`` (3 bits) is padded with zeros, which ``unpack_int`` drops.
* ``scales`` fp16 ``[N, K // group_size]`` and ``zeros`` uint8 ``[N, K // group_size]``, exactly as
  ``reference.quantize_weight`` returns them: ``w = (q - zero) * scale``.

``dequantize(pack_weight(w))`` equals ``reference.fake_quant_weight(w)`` bit for bit (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from archquant.quant import reference as ref

PACKED_BITS = (8, 4, 3, 2)


def values_per_word(bits: int) -> int:
    """How many ``bits``-bit integers one int32 word holds (10 for 3 bits: 30 of 32 bits used)."""
    if bits not in PACKED_BITS:
        raise ValueError(f"packing supports weight bits {PACKED_BITS}, got {bits}")
    return 32 // bits


def packed_words(k: int, bits: int) -> int:
    """Number of int32 words per row for ``k`` inputs."""
    vpw = values_per_word(bits)
    return -(-k // vpw)


def pack_int(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers along the last dimension into int32 words.

    Args:
        q: integers in ``[0, 2^bits - 1]`` (any integer dtype). Shape: ``[N, K]``.
        bits: 8, 4, 3 or 2.

    Returns:
        int32 words. Shape: ``[N, ceil(K / (32 // bits))]``.
    """
    vpw = values_per_word(bits)
    if q.dim() != 2:
        raise ValueError(f"pack_int expects a 2-D [N, K] tensor, got shape {tuple(q.shape)}")
    n, k = q.shape
    words = packed_words(k, bits)
    qi = q.to(torch.int64)
    if qi.numel() and (int(qi.min()) < 0 or int(qi.max()) >= (1 << bits)):
        raise ValueError(f"values out of range for {bits}-bit packing: [{int(qi.min())}, {int(qi.max())}]")
    pad = words * vpw - k
    if pad:
        qi = torch.nn.functional.pad(qi, (0, pad))
    qi = qi.reshape(n, words, vpw)
    shifts = torch.arange(vpw, device=q.device, dtype=torch.int64) * bits
    # int64 sum avoids sign trouble at bit 31; the wrap to int32 keeps the bit pattern
    packed = (qi << shifts).sum(dim=-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_int(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of ``pack_int``. Shape: ``[N, W]`` int32 -> ``[N, k]`` uint8."""
    vpw = values_per_word(bits)
    n, words = packed.shape
    if words != packed_words(k, bits):
        raise ValueError(f"{words} packed words per row cannot hold K={k} at {bits} bits")
    shifts = torch.arange(vpw, device=packed.device, dtype=torch.int64) * bits
    vals = (packed.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)
    return vals.reshape(n, words * vpw)[:, :k].to(torch.uint8)


@dataclass
class PackedWeight:
    """A quantised weight in its packed form.

    Attributes:
        qweight: int32 words. Shape: ``[N, ceil(K / (32 // bits))]``.
        scales: fp16. Shape: ``[N, K // group_size]``.
        zeros: uint8. Shape: ``[N, K // group_size]``.
        bits: weight bits (8, 4, 3, 2).
        group_size: inputs per scale/zero group.
        in_features: K (needed because 3-bit rows are padded).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def unpack(self) -> torch.Tensor:
        """Unsigned integer codes. Shape: ``[N, K]`` uint8."""
        return unpack_int(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(q - zero) * scale`` through the reference dequantiser. Shape: ``[N, K]``."""
        return ref.dequantize_weight(self.unpack(), self.scales, self.zeros, dtype=dtype)

    def to(self, device) -> PackedWeight:
        return PackedWeight(
            self.qweight.to(device), self.scales.to(device), self.zeros.to(device),
            self.bits, self.group_size, self.in_features,
        )


def pack_weight(w: torch.Tensor, bits: int, group_size: int) -> PackedWeight:
    """Quantise ``w`` with the reference quantiser and pack it.

    Args:
        w: float weight. Shape: ``[N, K]``, ``K % group_size == 0``.
        bits: 8, 4, 3 or 2.
        group_size: inputs per group (the configured group size, default 64).
    """
    values_per_word(bits)  # validates bits before quantising
    q, scale, zero = ref.quantize_weight(w, bits, group_size)
    return PackedWeight(pack_int(q, bits), scale, zero, bits, group_size, w.shape[1])
