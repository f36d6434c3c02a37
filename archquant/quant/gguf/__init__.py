"""Torch simulation of llama.cpp's GGUF weight types (the whole CPU palette) and its matmul activations.

``quantize(w, qtype)`` returns a type's codes and block parameters, ``pack`` the raw bytes a GGUF holds
(``gguf.quants.dequantize`` reads them back to exactly ``weight_as_type(w)``, tested per type), and
``dequantize_raw`` reads raw blocks back. Round-to-nearest (no ``importance``) is ``gguf.quants.quantize``
bit for bit where gguf-py has a quantiser (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0). ``importance`` (per input
channel, e.g. the mean of ``x^2`` over calibration tokens, llama.cpp's imatrix) switches to a per-block
search of scales / mins minimising ``sum_j importance_j (w_j - deq_j)^2``; it never does worse than
round-to-nearest on that measure. ``legacy.py`` holds the 32-blocks, ``kquants.py`` the 256-super-blocks,
``fit.py`` the shared search, ``activations.py`` the Q8 activation formats.
"""

from __future__ import annotations

import numpy as np
import torch

from archquant.quant.gguf import kquants, legacy, memo
from archquant.quant.gguf.activations import act_as_type, q8_1_offset_term, quantize_act_q8, quantize_act_q8k
from archquant.quant.gguf.fit import werr
from archquant.quant.gguf.types import (
    ACT_TYPE,
    BLOCK,
    FLOAT_TYPES,
    K_TYPES,
    LEGACY_TYPES,
    PALETTE,
    QK_K,
    QUANT_TYPES,
    SUPPORTED_TYPES,
    TYPE_SIZES,
    GGUFTypeError,
    bits_per_weight,
    block_size,
    check_row,
    check_type,
    type_nbytes,
    types_for_row,
)

__all__ = [
    "ACT_TYPE", "BLOCK", "FLOAT_TYPES", "K_TYPES", "LEGACY_TYPES", "PALETTE", "QK_K", "QUANT_TYPES",
    "SUPPORTED_TYPES", "TYPE_SIZES", "GGUFTypeError", "bits_per_weight", "block_size", "check_row", "check_type", "type_nbytes",
    "types_for_row", "quantize", "dequantize", "pack", "pack_parts", "dequantize_raw", "weight_as_type",
    "fake_quant_weight", "weighted_error", "quantize_act_q8", "quantize_act_q8k", "act_as_type",
    "fake_quant_act", "linear", "memo",
]


_CHUNK = 1 << 16  # weights per chunk of the importance-weighted search


def _impl(qtype: str):
    return legacy if qtype in LEGACY_TYPES else kquants


def _blocks(w: torch.Tensor, qtype: str, name: str) -> torch.Tensor:
    """``[..., K]`` float32 -> ``[..., K // bs, bs]``, refusing a row length the block does not divide."""
    check_row(w.shape[-1], qtype, name)
    bs = block_size(qtype)
    return w.detach().float().reshape(*w.shape[:-1], w.shape[-1] // bs, bs)


def quantize(w: torch.Tensor, qtype: str, importance: torch.Tensor | None = None, name: str = "tensor") -> dict[str, torch.Tensor]:
    """Quantise a weight matrix into ``qtype``'s stored codes and block parameters.

    Args:
        w: weight. Shape: ``[..., K]``, ``K`` a multiple of the type's block (32, or 256 for K-quants).
        qtype: a quantised palette type (``QUANT_TYPES``).
        importance: per-input-channel weights (llama.cpp's imatrix: mean of ``x^2``); None for
            round-to-nearest. Shape: ``[K]``.
        name: the tensor's name, for error messages.

    Returns:
        Legacy types: ``{"q" [..., K], "d" [..., K // 32]}`` (+ ``"m"`` for Q4_1 / Q5_1), ``d, m`` fp16,
        ``q`` the stored code as float (Q8_0 signed, others unsigned). K-types:
        ``{"q" [..., K], "d" [..., K // 256], "sc" [..., K // 256, nsub]}`` (+ ``"dmin"``, ``"m"`` for
        Q4_K / Q5_K).
    """
    check_type(qtype)
    if qtype not in QUANT_TYPES:
        raise GGUFTypeError(f"quantize() covers {QUANT_TYPES}; {qtype} is a float type")
    b = _blocks(w, qtype, name)
    if importance is None:
        parts = _impl(qtype).quantize_blocks(b, qtype, None)
        return _shaped(parts, w.shape)
    # the search is ~100x round-to-nearest's cost: results are remembered by content (``memo``)
    k = memo.key(w, qtype, importance)
    hit = memo.lookup(k)
    if hit is not None:
        return {n: v.to(w.device) for n, v in hit.items()}
    imp = importance.detach().float().to(b.device).reshape(b.shape[-2:]).clamp(min=0)
    impl = _impl(qtype)
    # the search makes ~100 passes: rows in cache-sized chunks are several times faster on big tensors
    rows = b.reshape(-1, *b.shape[-2:])
    step = max(1, _CHUNK // b.shape[-2:].numel())
    chunks = [impl.quantize_blocks(rows[i : i + step], qtype, imp) for i in range(0, rows.shape[0], step)]
    parts = {k2: torch.cat([c[k2] for c in chunks]).reshape(*b.shape[:-2], *chunks[0][k2].shape[1:]) for k2 in chunks[0]}
    out = _shaped(parts, w.shape)
    memo.store(k, out)
    return out


def _shaped(parts: dict[str, torch.Tensor], shape) -> dict[str, torch.Tensor]:
    """Block-shaped parts -> ``q`` in the weight's shape, one-element block parameters squeezed."""
    return {k: (v.reshape(shape) if k == "q" else v.squeeze(-1) if v.shape[-1] == 1 else v) for k, v in parts.items()}


def dequantize(parts: dict[str, torch.Tensor], qtype: str) -> torch.Tensor:
    """Inverse of ``quantize`` (float32), computed as gguf-py does. Shape: ``q [..., K]`` -> ``[..., K]``."""
    check_type(qtype)
    if qtype not in QUANT_TYPES:
        raise GGUFTypeError(f"dequantize() covers {QUANT_TYPES}, got {qtype!r}")
    q = parts["q"]
    bs = block_size(qtype)
    b = {"q": q.reshape(*q.shape[:-1], q.shape[-1] // bs, bs)}
    for k, v in parts.items():
        if k != "q":
            b[k] = v.unsqueeze(-1) if k in ("d", "m", "dmin") and (qtype in LEGACY_TYPES or k != "m") else v
    return _impl(qtype).deq_blocks(b, qtype).reshape(q.shape)


def pack_parts(parts: dict[str, torch.Tensor], qtype: str) -> np.ndarray:
    """Raw GGUF bytes of quantised parts. Shape: ``q [..., K]`` -> uint8 ``[..., K // bs * type_size]``."""
    q = parts["q"]
    bs, nbytes = TYPE_SIZES[qtype]
    nb = q.numel() // bs
    flat = {k: v.reshape(nb, -1) for k, v in parts.items()}
    raw = _impl(qtype).pack_blocks(flat, qtype)
    return np.ascontiguousarray(raw.reshape(*q.shape[:-1], q.shape[-1] // bs * nbytes))


def pack(w: torch.Tensor, qtype: str, importance: torch.Tensor | None = None, name: str = "tensor") -> np.ndarray:
    """GGUF bytes of ``w`` in ``qtype`` (the layout ``gguf.quants.quantize`` returns).

    Shape: ``[..., K]`` -> uint8 ``[..., K // bs * type_size]`` for quantised types; float arrays otherwise.
    """
    check_type(qtype)
    if qtype == "F32":
        return w.detach().float().cpu().numpy()
    if qtype == "F16":
        return w.detach().half().cpu().numpy()
    return pack_parts(quantize(w, qtype, importance, name), qtype)


def dequantize_raw(raw: np.ndarray, qtype: str) -> torch.Tensor:
    """Float32 values of raw GGUF blocks (what ``gguf.quants.dequantize`` returns, bit for bit).

    Shape: uint8 ``[..., K // bs * type_size]`` -> ``[..., K]``.
    """
    check_type(qtype)
    if qtype == "F32":
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.float32).copy())
    if qtype == "F16":
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16).astype(np.float32))
    bs, nbytes = TYPE_SIZES[qtype]
    raw = np.ascontiguousarray(raw).view(np.uint8)
    rows = raw.reshape(-1, nbytes)
    impl = _impl(qtype)
    deq = impl.deq_blocks({k: (v if k == "q" else v.reshape(rows.shape[0], -1)) for k, v in impl.unpack_blocks(rows, qtype).items()}, qtype)
    return deq.reshape(*raw.shape[:-1], raw.shape[-1] // nbytes * bs)


def weight_as_type(w: torch.Tensor, qtype: str, importance: torch.Tensor | None = None, name: str = "tensor") -> torch.Tensor:
    """The weight values llama.cpp computes with when ``w`` is stored as ``qtype`` (no gradient).

    Equal bit for bit to ``dequantize_raw(pack(w, qtype, importance))``. Shape: ``[N, K]`` -> ``[N, K]`` float32.
    """
    check_type(qtype)
    if qtype == "F32":
        return w.detach().float()
    if qtype == "F16":
        return w.detach().half().float()
    return dequantize(quantize(w, qtype, importance, name), qtype)


def weighted_error(w: torch.Tensor, wq: torch.Tensor, importance: torch.Tensor | None = None) -> float:
    """``sum_ij importance_j (w_ij - wq_ij)^2`` (importance 1 when None), in float64."""
    imp = torch.ones(w.shape[-1]) if importance is None else importance
    return float(werr(w.double(), wq.double(), imp.double()).sum())


def _ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Value exactly ``xq`` (``x - x.detach()`` is exactly 0), gradient of the identity in ``x``."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return xq
    return xq.detach() + (x - x.detach())


def fake_quant_weight(w: torch.Tensor, qtype: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """``weight_as_type`` with a straight-through gradient, in ``w``'s dtype. Shape: ``[N, K]``."""
    if qtype == "F32" and w.dtype == torch.float32:
        return w
    wq = weight_as_type(w, qtype, importance).to(w.dtype)
    return _ste(w, wq)


def fake_quant_act(x: torch.Tensor, weight_type: str) -> torch.Tensor:
    """``act_as_type`` with a straight-through gradient, in ``x``'s dtype. Shape: ``[..., K]``."""
    if ACT_TYPE[check_type(weight_type)] == "F32" and x.dtype == torch.float32:
        return x
    xq = act_as_type(x, weight_type).to(x.dtype)
    return _ste(x, xq)


def linear(x: torch.Tensor, w: torch.Tensor, weight_type: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """What ggml's CPU matmul returns for ``x @ w.T`` with ``w`` stored as ``weight_type`` (no gradient).

    Unlike ``F.linear(act_as_type(x), weight_as_type(w))`` this is exact for Q4_1 / Q5_1 too: their
    offset term uses Q8_1's stored block sum ``s = fp16(d * sum(q))`` (``ggml_vec_dot_q4_1_q8_1``).

    Shape: ``x [..., K]``, ``w [N, K]`` -> ``[..., N]``.
    """
    if weight_type not in ("Q4_1", "Q5_1"):
        return torch.nn.functional.linear(act_as_type(x, weight_type), weight_as_type(w, weight_type, importance))
    parts = quantize(w, weight_type, importance)
    scaled = dequantize({**parts, "m": torch.zeros_like(parts["m"])}, weight_type)  # fp16(d) * q
    return torch.nn.functional.linear(act_as_type(x, weight_type), scaled) + q8_1_offset_term(x, parts["m"])
