"""Triton helpers shared by the quantised matmuls: reading packed codes (see ``packing.py``)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_codes(qw_ptr, offs_n, offs_k, stride_qn, N, K, BITS: tl.constexpr):
    """Unsigned codes of a ``[BN, BK]`` tile of a packed weight (int32, 0 outside ``N x K``).

    Value ``k`` of row ``n`` lives in word ``k // (32 // BITS)`` at bit ``(k % (32 // BITS)) * BITS``.
    Each word is loaded once per value it holds; the repeats hit L1, and the gather keeps the
    code valid for any tile shape.
    """
    VPW: tl.constexpr = 32 // BITS
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    words = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_k[None, :] // VPW, mask=mask, other=0)
    # arithmetic shift of the signed word is harmless: the mask drops the sign-extended bits
    return (words >> ((offs_k[None, :] % VPW) * BITS)) & ((1 << BITS) - 1)
