"""Triton weight-only quantised matmul (W8A16 / W4A16) with a split-K GEMV and a tiled GEMM path.

Both compute ``y = x @ ((q - zero) * scale).T`` exactly as ``reference.wq_matmul_ref`` (group-wise
asymmetric codes, fp16 scales, uint8 zeros, packed along K). Within a group the integer offsets
``q - zero`` (|.| <= 255) are exact in fp16/bf16/fp32, so the tiled path multiplies them with ``x`` on
the tensor cores and applies the fp32 scale once per group and column; no weight precision is lost to
the activation dtype.

* ``gemv`` (decode, M <= 8): grid over (N blocks, K splits, rows); each program reduces its K slice in
  fp32 registers and writes a partial sum; the splits are added in torch (deterministic, no atomics).
  Decode is bound by reading the weights, so split-K keeps every SM streaming even when N / BN is small.
* ``tiled`` (prefill): a classic [BM, BN] tile loop over K with ``tl.dot``; BK divides the group size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from archquant.kernels.codes import load_codes
from archquant.quant.packing import packed_words

KERNEL_BITS = (8, 4)
GEMV_MAX_M = 8


@triton.jit
def _wq_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, part_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_qn, stride_sn, stride_zn,
    BITS: tl.constexpr, G: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros([BN], dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    for kk in range(0, K_PER_SPLIT, BK):
        offs_k = k_begin + kk + tl.arange(0, BK)
        x = tl.load(x_ptr + m * stride_xm + offs_k * stride_xk, mask=offs_k < K, other=0.0).to(tl.float32)
        q = load_codes(qw_ptr, offs_n, offs_k, stride_qn, N, K, BITS).to(tl.float32)  # [BN, BK]
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        grp = offs_k[None, :] // G
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + grp, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n[:, None] * stride_zn + grp, mask=mask, other=0).to(tl.float32)
        acc += tl.sum((q - z) * s * x[None, :], axis=1)
    tl.store(part_ptr + (pid_k * M + m) * N + offs_n, acc, mask=offs_n < N)


@triton.jit
def _wq_tiled_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_qn, stride_sn, stride_zn, stride_ym, stride_yn,
    BITS: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0,
        )
        q = load_codes(qw_ptr, offs_n, offs_k, stride_qn, N, K, BITS)  # [BN, BK]
        grp = k0 // G  # BK divides G: one group per step
        s = tl.load(s_ptr + offs_n * stride_sn + grp, mask=offs_n < N, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n * stride_zn + grp, mask=offs_n < N, other=0).to(tl.int32)
        qz = tl.trans((q - z[:, None]).to(a.dtype))  # [BK, BN], exact integers
        if IEEE:
            part = tl.dot(a, qz, input_precision="ieee")
        else:
            part = tl.dot(a, qz)
        acc += part * s[None, :]
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, y,
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


def check_operands(x, qweight, scales, zeros, bits: int, group_size: int) -> tuple[int, int, int]:
    """Validate shapes/dtypes shared by the quantised-matmul launchers; returns ``(M, K, N)``."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"Triton kernels exist for {KERNEL_BITS}-bit weights, got {bits}")
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got shape {tuple(x.shape)}")
    m, k = x.shape
    n = qweight.shape[0]
    if qweight.dtype != torch.int32 or qweight.shape[1] != packed_words(k, bits):
        raise ValueError(
            f"qweight must be int32 [N, {packed_words(k, bits)}] for K={k}, got {qweight.dtype} {tuple(qweight.shape)}"
        )
    if k % group_size or tuple(scales.shape) != (n, k // group_size) or scales.shape != zeros.shape:
        raise ValueError(f"scales/zeros must be [{n}, {k // max(group_size, 1)}] for K={k}, group_size={group_size}")
    if not (x.device == qweight.device == scales.device == zeros.device):
        raise ValueError("x, qweight, scales and zeros must be on one device")
    return m, k, n


def _block_k(group_size: int, cap: int = 64) -> int:
    bk = min(group_size, cap)
    if group_size % bk or bk < 16 or bk & (bk - 1):
        raise ValueError(f"group_size {group_size} needs a power-of-two block >= 16 dividing it")
    return bk


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: a couple of splits exercise the split-K reduction


_GEMV_BN = 64


def gemv_split(m: int, k: int, n: int, bk: int, num_sms: int) -> tuple[int, int]:
    """``(splits, K per split)`` for the GEMV: enough programs for ~4 waves of SMs, splits of whole
    BK blocks (the last split may be shorter)."""
    k_blocks = triton.cdiv(k, bk)
    n_blocks = triton.cdiv(n, _GEMV_BN)
    split = max(1, min(k_blocks, (4 * num_sms) // max(1, n_blocks * m)))
    k_per_split = triton.cdiv(k_blocks, split) * bk
    return triton.cdiv(k, k_per_split), k_per_split


def wq_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    mode: str = "auto",
) -> torch.Tensor:
    """``x @ dequant(Wq).T`` with a Triton kernel.

    Args:
        x: fp16/bf16/fp32 activations. Shape: ``[M, K]``.
        qweight, scales, zeros: packed weight (``packing.PackedWeight`` fields).
        bits: 8 or 4.
        group_size: inputs per group (a power of two >= 16).
        mode: ``"gemv"``, ``"tiled"`` or ``"auto"`` (gemv for M <= 8).

    Returns:
        ``x.dtype``. Shape: ``[M, N]``.
    """
    m, k, n = check_operands(x, qweight, scales, zeros, bits, group_size)
    if mode == "auto":
        mode = "gemv" if m <= GEMV_MAX_M else "tiled"
    if mode == "gemv":
        bn, bk = _GEMV_BN, _block_k(group_size, cap=128)
        n_blocks = triton.cdiv(n, bn)
        split, k_per_split = gemv_split(m, k, n, bk, _num_sms(x.device))
        part = torch.empty(split, m, n, device=x.device, dtype=torch.float32)
        _wq_gemv_kernel[(n_blocks, split, m)](
            x, qweight, scales, zeros, part, m, n, k, k_per_split,
            x.stride(0), x.stride(1), qweight.stride(0), scales.stride(0), zeros.stride(0),
            BITS=bits, G=group_size, BN=bn, BK=bk,
        )
        return part.sum(0).to(x.dtype)
    if mode != "tiled":
        raise ValueError(f"mode must be 'auto', 'gemv' or 'tiled', got {mode!r}")
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    bn, bk = 64, _block_k(group_size)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _wq_tiled_kernel[grid](
        x, qweight, scales, zeros, y, m, n, k,
        x.stride(0), x.stride(1), qweight.stride(0), scales.stride(0), zeros.stride(0), y.stride(0), y.stride(1),
        BITS=bits, G=group_size, BM=bm, BN=bn, BK=bk, IEEE=x.dtype == torch.float32,
        num_warps=4, num_stages=3,
    )
    return y
