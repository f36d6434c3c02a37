"""The activation formats ggml-cpu's matmul converts its input to, and that matmul itself.

ggml-cpu converts a matmul's input to the weight type's ``vec_dot_type`` (``types.ACT_TYPE``) first.

* ``Q8_0`` / ``Q8_1`` (legacy weight types): on x86 (AVX2) ``quantize_row_q8_0/q8_1`` use
  ``d = amax / 127`` stored fp16, ``id = 127 / amax`` and round half to even; the matmul computes with
  ``fp16(d) * q``. Q8_1 also stores ``s = fp16(d * sum(q))`` for Q4_1 / Q5_1's offset term; ``linear``
  reproduces that term, the element-wise ``act_as_type`` differs from it by one fp16 rounding of ``s`` per
  block (relative ~5e-4 of the offset term only).
* ``Q8_K`` (K-quants, IQ4_XS): ``quantize_row_q8_K`` over blocks of 256: ``iscale = -127 / max`` with
  ``max`` the signed value of largest magnitude, ``q = min(127, nearest_int(iscale * x))`` (half to
  even), ``d = 1 / iscale`` kept in float32. The K dot products sum integer products per sub-block and
  use Q8_K's integer block sums for the min term, so ``F.linear(act_as_type(x), weight_as_type(w))`` is
  the same sum up to float summation order.
"""

from __future__ import annotations

import torch

from archquant.quant.gguf.fit import recip
from archquant.quant.gguf.types import ACT_TYPE, BLOCK, QK_K, GGUFTypeError, check_type


def _act_blocks(x: torch.Tensor, size: int, what: str) -> torch.Tensor:
    k = x.shape[-1]
    if k % size:
        raise GGUFTypeError(f"{what} needs a row length that is a multiple of {size}, got {k} (shape {tuple(x.shape)})")
    return x.detach().float().reshape(*x.shape[:-1], k // size, size)


def quantize_act_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's x86 ``quantize_row_q8_0`` / ``q8_1`` codes: per block of 32 along the last dimension.

    Shape: ``x [..., K]`` -> ``(q float [..., K] in [-127, 127], d fp16 [..., K // 32])``.
    """
    b = _act_blocks(x, BLOCK, "Q8_0 activation")
    amax = b.abs().amax(dim=-1, keepdim=True)
    d = amax / 127
    safe = torch.where(amax == 0, torch.ones_like(amax), amax)
    inv = 127.0 / safe
    # a block of (near-)subnormal values overflows 127 / amax; its fp16 scale is 0, so its values are 0 in
    # ggml whatever the codes: codes 0 keep that (and keep 0 * inf = NaN out of the supernet)
    inv = torch.where((amax == 0) | ~torch.isfinite(inv), torch.zeros_like(inv), inv)
    q = torch.round(b * inv)  # _mm256_round_ps(_MM_ROUND_NEAREST): half to even, as torch.round
    return q.reshape(x.shape), d.squeeze(-1).half()


def quantize_act_q8k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``quantize_row_q8_K`` codes: per block of 256 along the last dimension.

    Shape: ``x [..., K]`` -> ``(q float [..., K] in [-127, 127], d float32 [..., K // 256])``.
    """
    b = _act_blocks(x, QK_K, "Q8_K activation")
    mx = torch.gather(b, -1, b.abs().argmax(dim=-1, keepdim=True))
    # torch.div, not ``-127.0 / mx``: a scalar over a tensor is reciprocal-then-multiply, two roundings
    iscale = torch.where(mx == 0, torch.zeros_like(mx), torch.div(torch.full_like(mx, -127.0), torch.where(mx == 0, torch.ones_like(mx), mx)))
    iscale = torch.where(torch.isfinite(iscale), iscale, torch.zeros_like(iscale))  # subnormal blocks: as above
    q = torch.round(iscale * b).clamp(max=127)  # nearest_int: the 1.5 * 2^23 trick rounds half to even
    return q.reshape(x.shape), recip(iscale).squeeze(-1)


def act_as_type(x: torch.Tensor, weight_type: str) -> torch.Tensor:
    """The activation values a matmul with ``weight_type`` weights computes with (no gradient).

    Shape: ``[..., K]`` -> ``[..., K]`` float32.
    """
    act = ACT_TYPE[check_type(weight_type)]
    if act == "F32":
        return x.detach().float()
    if act == "F16":
        return x.detach().half().float()
    if act == "Q8_K":
        q, d = quantize_act_q8k(x)
        return (d.unsqueeze(-1) * q.reshape(*q.shape[:-1], -1, QK_K)).reshape(x.shape)
    q, d = quantize_act_q8(x)
    qb = q.reshape(*q.shape[:-1], q.shape[-1] // BLOCK, BLOCK)
    return (d.float().unsqueeze(-1) * qb).reshape(x.shape)


def q8_1_offset_term(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``sum_b s_b * m_b`` of ``ggml_vec_dot_q4_1_q8_1`` / ``q5_1``: ``s = fp16(d32 * sum(q))`` per block.

    Shape: ``x [..., K]``, ``m [N, K // 32]`` (the weight's fp16 mins) -> ``[..., N]``.
    """
    qa, _ = quantize_act_q8(x)
    blocks = qa.reshape(*qa.shape[:-1], -1, BLOCK)
    d32 = _act_blocks(x, BLOCK, "Q8_1").abs().amax(dim=-1) / 127  # s uses the unrounded fp32 scale
    s = (d32 * blocks.sum(dim=-1)).half().float()  # [..., K // 32]
    return s @ m.float().T
