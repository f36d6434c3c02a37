"""Triton W8A8 matmul: per-token int8 activations times group-wise 8/4-bit weights, int32 dot products.

``y[m, n] = sx[m] * sum_g scale[n, g] * sum_{k in g} xq[m, k] * (q[n, k] - zero[n, g])``.
The weight offset ``q - zero`` spans [-255, 255] at 8 bits, too wide for int8, so the dot runs on
``q - 2^(bits-1)`` (always int8) and a per-group correction ``(2^(bits-1) - zero) * sum_k xq`` restores
it; both are exact int32, so the only rounding is the fp32 scaling per group. Activations are
quantised with the reference ``quantize_act`` (what the supernet's ``fake_quant_act`` does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from archquant.kernels.codes import load_codes
from archquant.kernels.wq_matmul.kernel import _block_k, check_operands
from archquant.quant.reference import quantize_act


@triton.jit
def _w8a8_kernel(
    xq_ptr, xs_ptr, qw_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_qn, stride_sn, stride_zn, stride_ym, stride_yn,
    BITS: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    HALF: tl.constexpr = 1 << (BITS - 1)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        a = tl.load(
            xq_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0,
        )  # [BM, BK] int8
        q = load_codes(qw_ptr, offs_n, offs_k, stride_qn, N, K, BITS)  # [BN, BK] int32
        grp = k0 // G  # BK divides G
        s = tl.load(s_ptr + offs_n * stride_sn + grp, mask=offs_n < N, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n * stride_zn + grp, mask=offs_n < N, other=0).to(tl.int32)
        w8 = tl.trans((q - HALF).to(tl.int8))  # [BK, BN]
        dot = tl.dot(a, w8, out_dtype=tl.int32)
        rowsum = tl.sum(a.to(tl.int32), axis=1)  # [BM]
        exact = dot + rowsum[:, None] * (HALF - z)[None, :]
        acc += exact.to(tl.float32) * s[None, :]
    xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
    y = (acc * xs[:, None]).to(y_ptr.dtype.element_ty)
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, y,
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


def w8a8_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """``fake_quant_act(x, 8) @ dequant(Wq).T`` with int8 tensor-core dot products.

    Args:
        x: float activations. Shape: ``[M, K]``.
        qweight, scales, zeros: packed weight (``packing.PackedWeight`` fields).
        bits: weight bits, 8 or 4.
        group_size: inputs per group (a power of two >= 32: an int8 dot needs K blocks of >= 32).

    Returns:
        ``x.dtype``. Shape: ``[M, N]``.
    """
    m, k, n = check_operands(x, qweight, scales, zeros, bits, group_size)
    if group_size < 32:
        raise ValueError(f"the W8A8 kernel needs group_size >= 32 (int8 dot blocks), got {group_size}")
    xq, xs = quantize_act(x, 8)  # xq: [M, K] int8, xs: [M, 1] fp32
    xs = xs.reshape(m).contiguous()
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    bn, bk = 64, _block_k(group_size)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _w8a8_kernel[grid](
        xq, xs, qweight, scales, zeros, y, m, n, k,
        xq.stride(0), xq.stride(1), qweight.stride(0), scales.stride(0), zeros.stride(0), y.stride(0), y.stride(1),
        BITS=bits, G=group_size, BM=bm, BN=bn, BK=bk, num_warps=4, num_stages=3,
    )
    return y
