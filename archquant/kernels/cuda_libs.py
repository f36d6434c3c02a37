"""CUDA weight-only matmuls from kept libraries, fed our packed group-wise format.

Our packed weight dequantises as ``w = (q - zero) * scale`` (``archquant.quant.packing``). Two kept
kernels compute that product without materialising ``w``:

* ``gemlite`` (PyPI ``gemlite``, Triton): its ``A16Wn`` layers take unsigned codes ``[N, K]``, scales
  and zeros ``[N, K // g]`` with exactly our convention (HQQ's ``(W_q - zero) * scale``), for 8/4/2-bit
  weights, fp16/bf16 activations, ``K % 32 == 0``. Scales and zeros are held in the activation dtype:
  in bf16 that rounds each fp16 scale to 8 mantissa bits (relative error <= 2^-9, as in the bf16 dense
  path's weight itself). It picks GEMV / split-K / GEMM kernels by batch size.
* ``tinygemm`` (``torch.ops.aten._weight_int4pack_mm``, built into torch's CUDA build): 4-bit codes,
  bf16 activations, ``group_size in (32, 64, 128, 256)``, ``N % 8 == 0``. It computes
  ``(q - 8) * S + Z`` per group, so ``S = scale`` and ``Z = (8 - zero) * scale`` (bf16).

Neither library is imported on CPU (gemlite reads the CUDA device's name at import); both are
optional: a missing library removes its path from the candidates. ``QuantLinear`` checks every
candidate's output against the dequantised reference before it may be chosen, so a layout change in
either library shows as a rejected path and a warning, never as wrong outputs.
"""

from __future__ import annotations

import functools

import torch

from archquant.quant.packing import PackedWeight

TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
GEMLITE_BITS = (8, 4, 2)


@functools.cache
def gemlite_module():
    """The imported ``gemlite`` package, or None where it is not installed or there is no CUDA device."""
    if not torch.cuda.is_available():
        return None
    try:
        import gemlite
    except ImportError:
        return None
    _load_gemlite_configs(gemlite)
    return gemlite


def _load_gemlite_configs(gemlite) -> None:
    """gemlite ships tuned kernel configs per GPU and picks one by device-name fragment. An H200 is an H100
    chip with more memory (same SMs, same kernels' best tiles), but its name matches no file: load the
    H100's so that first calls do not autotune every shape."""
    import os

    name = torch.cuda.get_device_properties(0).name.lower()
    root = os.path.join(os.path.dirname(gemlite.__file__), "configs")
    if "h200" in name and os.path.exists(os.path.join(root, "h100.json")):
        gemlite.load_config(os.path.join(root, "h100.json"), print_error=False)


def gemlite_unsupported_reason(n: int, k: int, bits: int, group_size: int, dtype: torch.dtype) -> str | None:
    """Why gemlite cannot run this layer (None when it can)."""
    if gemlite_module() is None:
        return "gemlite is not installed (pip install gemlite) or no CUDA device"
    if bits not in GEMLITE_BITS:
        return f"gemlite has no {bits}-bit grouped kernel (has {GEMLITE_BITS})"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"gemlite runs fp16/bf16 activations, got {dtype}"
    if k % 32 or group_size < 16 or k % group_size:
        return f"gemlite needs K % 32 == 0 and a group size >= 16 dividing K (K={k}, group {group_size})"
    return None


def prepare_gemlite(pw: PackedWeight, dtype: torch.dtype):
    """A gemlite layer holding ``pw`` (its own packing), computing in ``dtype``; the bias stays QuantLinear's."""
    codes = pw.unpack()  # [N, K] uint8
    return gemlite_module().helper.A16Wn(device=str(codes.device), dtype=dtype).from_weights(
        codes, pw.scales.to(dtype), pw.zeros.to(dtype), pw.bits, pw.group_size, bias=None
    )


def gemlite_linear(x2: torch.Tensor, layer) -> torch.Tensor:
    """``x2 [M, K]`` -> ``[M, N]`` in ``x2.dtype``."""
    return layer(x2)


def tinygemm_unsupported_reason(n: int, k: int, bits: int, group_size: int, dtype: torch.dtype) -> str | None:
    """Why torch's CUDA int4 kernel cannot run this layer (None when it can)."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm") or not torch.cuda.is_available():
        return "this torch build has no CUDA aten._weight_int4pack_mm"
    if bits != 4:
        return f"tinygemm runs 4-bit weights, got {bits}"
    if dtype != torch.bfloat16:
        return f"tinygemm runs bf16 activations, got {dtype}"
    if n % 8 or group_size not in TINYGEMM_GROUP_SIZES or k % group_size or _inner_k_tiles(k) is None:
        return f"tinygemm needs N % 8 == 0, K % 32 == 0 and group_size in {TINYGEMM_GROUP_SIZES} (N={n}, K={k})"
    return None


def _inner_k_tiles(k: int) -> int | None:
    """The largest of torch's inner-K tilings (8, 4, 2) that divides K into 16-wide tiles."""
    return next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)


def prepare_tinygemm(pw: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(packed int4 weight, bf16 scales-and-zeros ``[K // g, N, 2]``, group size) for ``_weight_int4pack_mm``."""
    q = pw.unpack().to(torch.int32)  # [N, K]
    k = q.shape[1]
    # two codes per byte, the even K index in the high nibble (the order the CUDA packer expects)
    pairs = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), _inner_k_tiles(k))
    scale = pw.scales.float()
    zero = (8.0 - pw.zeros.float()) * scale
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/g, N, 2]
    return packed, sz, pw.group_size


def tinygemm_linear(x2: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
    """``x2 [M, K]`` (bf16) -> ``[M, N]`` bf16."""
    packed, sz, g = prepared
    return torch.ops.aten._weight_int4pack_mm(x2.contiguous(), packed, g, sz)
