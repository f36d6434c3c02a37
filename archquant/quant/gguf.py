"""Torch simulation of llama.cpp's number formats: Q8_0 / Q4_0 / Q4_1 weights, F16, and the Q8 activations.

Weights are quantised exactly as ``gguf.quants.quantize`` writes them (blocks of 32 inputs along a row):

* ``Q8_0``: ``d = amax / 127``, ``q = roundf(w / d)`` (half away from zero), ``d`` stored fp16;
  dequantised ``fp16(d) * q``.
* ``Q4_0``: ``d = m / -8`` with ``m`` the signed value of largest magnitude, ``q = trunc(w / d + 8.5)``
  clamped to [0, 15]; dequantised ``fp16(d) * (q - 8)``.
* ``Q4_1``: ``d = (max - min) / 15``, ``q = trunc((w - min) / d + 0.5)`` clamped to [0, 15]; dequantised
  ``fp16(d) * q + fp16(min)``.

Every intermediate is float32 in the same order as gguf's numpy code, so dequantised weights match
``gguf.quants.dequantize(gguf.quants.quantize(w))`` bit for bit (tested).

Activations: ggml's CPU matmul converts its input to the weight type's ``vec_dot_type`` first
(``ggml-cpu.c``: Q8_0 for Q8_0/Q4_0 weights, Q8_1 for Q4_1, F16 for F16, F32 for F32). On x86 (AVX2)
``quantize_row_q8_0/q8_1`` use ``d = amax / 127`` stored fp16, ``id = 127 / amax`` and round half to even;
the matmul then computes with ``fp16(d) * q``. Q8_1 also stores ``s = fp16(d * sum(q))`` for Q4_1's
offset term; simulating that term through ``fp16(d) * q`` differs by one fp16 rounding of ``s`` per
block (relative ~5e-4 of the offset term only), which the export tests bound.
"""

from __future__ import annotations

import numpy as np
import torch

from archquant.utils.errors import UserError

BLOCK = 32  # QK8_0 = QK4_0 = QK4_1 = 32 in ggml
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1")
FLOAT_TYPES = ("F32", "F16")
SUPPORTED_TYPES = FLOAT_TYPES + QUANT_TYPES
# (weights per block, bytes per block) as in ggml's type traits
TYPE_SIZES = {"F32": (1, 4), "F16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20)}
# which format ggml converts a matmul's activations to, per weight type (ggml-cpu.c type_traits_cpu)
ACT_TYPE = {"F32": "F32", "F16": "F16", "Q8_0": "Q8_0", "Q4_0": "Q8_0", "Q4_1": "Q8_1"}


class GGUFTypeError(UserError, ValueError):
    """A GGUF type this simulation does not cover, or a row length the type's block does not divide."""


def check_type(qtype: str) -> str:
    """Return ``qtype`` if supported, else raise naming the choices."""
    if qtype not in SUPPORTED_TYPES:
        raise GGUFTypeError(
            f"GGUF type {qtype!r} is not supported here (choose one of {SUPPORTED_TYPES}; K-quants need rows "
            "that are multiples of 256, which the search space's widths are not)"
        )
    return qtype


def type_nbytes(num_weights: int, qtype: str) -> float:
    """Bytes that ``num_weights`` weights take in GGUF type ``qtype`` (Q8_0: 34 B per 32 weights, ...)."""
    per_block, nbytes = TYPE_SIZES[check_type(qtype)]
    return num_weights / per_block * nbytes


def _blocks(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """``[..., K]`` float32 -> ``[..., K // 32, 32]``, refusing a row length the block does not divide."""
    k = w.shape[-1]
    if k % BLOCK:
        raise GGUFTypeError(f"{qtype} needs a row length that is a multiple of {BLOCK}, got {k} (shape {tuple(w.shape)})")
    return w.detach().float().reshape(*w.shape[:-1], k // BLOCK, BLOCK)


def _recip(d: torch.Tensor) -> torch.Tensor:
    """``1 / d`` with 0 where ``d == 0`` (gguf: ``np.where(d == 0, 0, 1 / d)``)."""
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / safe)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` exactly as gguf's ``np_roundf``: ``sign(x) * (floor|x| + floor(2 (|x| - floor|x|)))``."""
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


def _ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Value exactly ``xq`` (``x - x.detach()`` is exactly 0), gradient of the identity in ``x``."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return xq
    return xq.detach() + (x - x.detach())


# ---- weights ------------------------------------------------------------------------------------


def quantize(w: torch.Tensor, qtype: str) -> dict[str, torch.Tensor]:
    """Quantise a weight matrix into ``qtype``'s integer codes and fp16 block parameters.

    Args:
        w: weight. Shape: ``[N, K]`` (any float dtype), ``K % 32 == 0`` for quantised types.
        qtype: ``Q8_0``, ``Q4_0`` or ``Q4_1``.

    Returns:
        ``{"q": codes, "d": fp16 scales}`` (+ ``"m"`` fp16 minima for Q4_1). Shape: ``q [N, K]``
        (int8 for Q8_0, uint8 in [0, 15] for Q4_*), ``d, m [N, K // 32]``.
    """
    check_type(qtype)
    if qtype not in QUANT_TYPES:
        raise GGUFTypeError(f"quantize() covers {QUANT_TYPES}; {qtype} is a float type")
    b = _blocks(w, qtype)
    shape = w.shape
    if qtype == "Q8_0":
        d = b.abs().amax(dim=-1, keepdim=True) / 127
        q = _round_half_away(b * _recip(d))
        return {"q": q.reshape(shape).to(torch.int8), "d": d.squeeze(-1).half()}
    if qtype == "Q4_0":
        imax = b.abs().argmax(dim=-1, keepdim=True)  # first index of the largest magnitude, as numpy's argmax
        d = torch.gather(b, -1, imax) / -8
        q = torch.trunc(b * _recip(d) + 8.5).clamp(0, 15)
        return {"q": q.reshape(shape).to(torch.uint8), "d": d.squeeze(-1).half()}
    wmax = b.amax(dim=-1, keepdim=True)
    wmin = b.amin(dim=-1, keepdim=True)
    d = (wmax - wmin) / 15
    q = torch.trunc((b - wmin) * _recip(d) + 0.5).clamp(0, 15)
    return {"q": q.reshape(shape).to(torch.uint8), "d": d.squeeze(-1).half(), "m": wmin.squeeze(-1).half()}


def dequantize(parts: dict[str, torch.Tensor], qtype: str) -> torch.Tensor:
    """Inverse of ``quantize`` (float32), computed as ggml/gguf do. Shape: ``q [N, K]`` -> ``[N, K]``."""
    q = parts["q"]
    qb = q.float().reshape(*q.shape[:-1], q.shape[-1] // BLOCK, BLOCK)
    d = parts["d"].float().unsqueeze(-1)
    if qtype == "Q8_0":
        w = d * qb
    elif qtype == "Q4_0":
        w = d * (qb - 8)
    elif qtype == "Q4_1":
        w = d * qb + parts["m"].float().unsqueeze(-1)
    else:
        raise GGUFTypeError(f"dequantize() covers {QUANT_TYPES}, got {qtype!r}")
    return w.reshape(q.shape)


def weight_as_type(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """The weight values llama.cpp computes with when ``w`` is stored as ``qtype`` (no gradient).

    Shape: ``[N, K]`` -> ``[N, K]`` float32.
    """
    check_type(qtype)
    if qtype == "F32":
        return w.detach().float()
    if qtype == "F16":
        return w.detach().half().float()
    return dequantize(quantize(w, qtype), qtype)


def fake_quant_weight(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """``weight_as_type`` with a straight-through gradient, in ``w``'s dtype. Shape: ``[N, K]``."""
    if qtype == "F32" and w.dtype == torch.float32:
        return w
    wq = weight_as_type(w, qtype).to(w.dtype)
    return _ste(w, wq)


def pack(w: torch.Tensor, qtype: str) -> np.ndarray:
    """GGUF bytes of ``w`` in ``qtype`` (the layout ``gguf.quants.quantize`` returns).

    Shape: ``[N, K]`` -> uint8 ``[N, K // 32 * type_size]`` for quantised types; float arrays otherwise.
    """
    check_type(qtype)
    if qtype == "F32":
        return w.detach().float().cpu().numpy()
    if qtype == "F16":
        return w.detach().half().cpu().numpy()
    parts = quantize(w, qtype)
    n, k = w.shape
    nb = k // BLOCK
    d = parts["d"].cpu().numpy().view(np.uint8).reshape(n, nb, 2)
    q = parts["q"].cpu().numpy().reshape(n, nb, BLOCK)
    if qtype == "Q8_0":
        body = q.view(np.uint8)
        out = np.concatenate([d, body], axis=-1)
    else:
        nib = q.astype(np.uint8)
        body = nib[..., : BLOCK // 2] | (nib[..., BLOCK // 2 :] << np.uint8(4))  # low nibbles first half
        head = [d] if qtype == "Q4_0" else [d, parts["m"].cpu().numpy().view(np.uint8).reshape(n, nb, 2)]
        out = np.concatenate([*head, body], axis=-1)
    return np.ascontiguousarray(out.reshape(n, -1))


# ---- activations --------------------------------------------------------------------------------


def quantize_act_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's x86 ``quantize_row_q8_0`` / ``q8_1`` codes: per block of 32 along the last dimension.

    Shape: ``x [..., K]`` -> ``(q float [..., K] in [-127, 127], d fp16 [..., K // 32])``.
    """
    b = _blocks(x, "Q8_0 activation")
    amax = b.abs().amax(dim=-1, keepdim=True)
    d = amax / 127
    safe = torch.where(amax == 0, torch.ones_like(amax), amax)
    inv = torch.where(amax == 0, torch.zeros_like(amax), 127.0 / safe)
    q = torch.round(b * inv)  # _mm256_round_ps(_MM_ROUND_NEAREST): half to even, as torch.round
    return q.reshape(x.shape), d.squeeze(-1).half()


def act_as_type(x: torch.Tensor, weight_type: str) -> torch.Tensor:
    """The activation values a matmul with ``weight_type`` weights computes with (no gradient).

    Shape: ``[..., K]`` -> ``[..., K]`` float32.
    """
    act = ACT_TYPE[check_type(weight_type)]
    if act == "F32":
        return x.detach().float()
    if act == "F16":
        return x.detach().half().float()
    q, d = quantize_act_q8(x)
    qb = q.reshape(*q.shape[:-1], q.shape[-1] // BLOCK, BLOCK)
    return (d.float().unsqueeze(-1) * qb).reshape(x.shape)


def fake_quant_act(x: torch.Tensor, weight_type: str) -> torch.Tensor:
    """``act_as_type`` with a straight-through gradient, in ``x``'s dtype. Shape: ``[..., K]``."""
    if ACT_TYPE[check_type(weight_type)] == "F32" and x.dtype == torch.float32:
        return x
    xq = act_as_type(x, weight_type).to(x.dtype)
    return _ste(x, xq)


def linear(x: torch.Tensor, w: torch.Tensor, weight_type: str) -> torch.Tensor:
    """What ggml's CPU matmul returns for ``x @ w.T`` with ``w`` stored as ``weight_type`` (no gradient).

    Unlike ``F.linear(act_as_type(x), weight_as_type(w))`` this is exact for Q4_1 too: its offset term
    uses Q8_1's stored block sum ``s = fp16(d * sum(q))`` (``ggml_vec_dot_q4_1_q8_1``), which no
    element-wise activation simulation reproduces.

    Shape: ``x [..., K]``, ``w [N, K]`` -> ``[..., N]``.
    """
    if weight_type != "Q4_1":
        return torch.nn.functional.linear(act_as_type(x, weight_type), weight_as_type(w, weight_type))
    parts = quantize(w, "Q4_1")
    n, k = w.shape
    scaled = (parts["d"].float().unsqueeze(-1) * parts["q"].float().reshape(n, k // BLOCK, BLOCK)).reshape(n, k)
    qa, da = quantize_act_q8(x)
    blocks = qa.reshape(*qa.shape[:-1], k // BLOCK, BLOCK)
    d32 = _blocks(x, "Q8_1").abs().amax(dim=-1) / 127  # s uses the unrounded fp32 scale
    s = (d32 * blocks.sum(dim=-1)).half().float()  # [..., K // 32]
    xa = (da.float().unsqueeze(-1) * blocks).reshape(x.shape)
    return torch.nn.functional.linear(xa, scaled) + s @ parts["m"].float().T
