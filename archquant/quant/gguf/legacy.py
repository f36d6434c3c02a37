"""Blocks of 32 with one fp16 scale (and min): Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, IQ4_NL.

Round-to-nearest is gguf's numpy quantiser bit for bit (``gguf.quants.quantize``; IQ4_NL, which gguf-py
does not quantise, takes ``d = fp16(max / -127)`` and the nearest codebook entry). Every intermediate is
float32 in the same order as gguf's code:

* ``Q8_0``: ``d = amax / 127``, ``q = roundf(w / d)`` (half away from zero); deq ``fp16(d) * q``.
* ``Q4_0`` / ``Q5_0``: ``d = m / -8`` (``-16``) with ``m`` the signed value of largest magnitude,
  ``q = trunc(w / d + 8.5)`` (``16.5``) clamped to [0, 15] ([0, 31]); deq ``fp16(d) * (q - 8)`` (``- 16``).
* ``Q4_1`` / ``Q5_1``: ``d = (max - min) / 15`` (``31``), ``q = trunc((w - min) / d + 0.5)``; deq
  ``fp16(d) * q + fp16(min)``.
* ``IQ4_NL``: deq ``fp16(d) * kvalues[q]``.

With ``importance`` the scale (and min) come from ``fit.search_*``, the codes are the nearest ones for the
stored fp16 values, and a block keeps its round-to-nearest encoding wherever that is no worse.
"""

from __future__ import annotations

import numpy as np
import torch

from archquant.quant.gguf.fit import (
    IQ4_VALUES,
    Grid,
    fp16,
    recip,
    round_half_away,
    search_affine,
    search_sym,
    snap_affine,
    werr,
)

# symmetric types: code grid (stored code = index into it)
SYM_GRIDS = {"Q8_0": Grid(-127, 127), "Q5_0": Grid(-16, 15), "Q4_0": Grid(-8, 7), "IQ4_NL": Grid(values=IQ4_VALUES)}
AFFINE_NMAX = {"Q5_1": 31, "Q4_1": 15}
_OFFSET = {"Q8_0": 0, "Q5_0": 16, "Q4_0": 8}  # stored code - signed code


def _rtn(b: torch.Tensor, qtype: str) -> dict[str, torch.Tensor]:
    """gguf's own quantiser on blocks ``[..., 32]`` (float32)."""
    if qtype == "Q8_0":
        d = b.abs().amax(dim=-1, keepdim=True) / 127
        return {"q": round_half_away(b * recip(d)), "d": d.half()}
    if qtype in ("Q4_0", "Q5_0"):
        half = 8 if qtype == "Q4_0" else 16
        d = torch.gather(b, -1, b.abs().argmax(dim=-1, keepdim=True)) / -half
        q = torch.trunc(b * recip(d) + (half + 0.5)).clamp(0, 2 * half - 1)
        return {"q": q, "d": d.half()}
    if qtype == "IQ4_NL":
        grid = SYM_GRIDS[qtype]
        d = fp16(torch.gather(b, -1, b.abs().argmax(dim=-1, keepdim=True)) / -127)
        return {"q": grid.index(b * recip(d)).float(), "d": d.half()}
    nmax = AFFINE_NMAX[qtype]
    lo, hi = b.amin(dim=-1, keepdim=True), b.amax(dim=-1, keepdim=True)
    d = (hi - lo) / nmax
    q = torch.trunc((b - lo) * recip(d) + 0.5).clamp(0, nmax)
    return {"q": q, "d": d.half(), "m": lo.half()}


def _weighted(b: torch.Tensor, imp: torch.Tensor, qtype: str) -> dict[str, torch.Tensor]:
    """Importance-weighted search on blocks ``[..., 32]``; codes nearest for the stored fp16 values."""
    if qtype in SYM_GRIDS:
        grid = SYM_GRIDS[qtype]
        d = search_sym(b, imp, grid, fp16)
        idx = grid.index(b * recip(d))
        q = idx.float() if qtype == "IQ4_NL" else grid.value(idx) + _OFFSET[qtype]
        return {"q": q, "d": d.half()}
    nmax = AFFINE_NMAX[qtype]
    d, m = search_affine(b, imp, nmax, fp16, nonpos_min=False)
    return {"q": snap_affine(b, d, m, nmax), "d": d.half(), "m": m.half()}


def deq_blocks(p: dict[str, torch.Tensor], qtype: str) -> torch.Tensor:
    """Dequantised blocks ``[..., 32]`` float32, in gguf's operation order."""
    d, q = p["d"].float(), p["q"].float()
    if qtype in _OFFSET:
        return d * (q - _OFFSET[qtype])
    if qtype == "IQ4_NL":
        return d * SYM_GRIDS[qtype].values[q.long()]
    return d * q + p["m"].float()


def quantize_blocks(b: torch.Tensor, qtype: str, imp: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Blocks ``[..., 32]`` -> ``{"q" [..., 32], "d" [..., 1] fp16 (, "m" [..., 1] fp16)}``.

    ``imp`` (broadcastable to ``b``) switches on the weighted search; a block keeps round-to-nearest's
    encoding wherever that has no larger weighted error, so the search never loses to it.
    """
    rtn = _rtn(b, qtype)
    if imp is None:
        return rtn
    srch = _weighted(b, imp, qtype)
    keep = werr(b, deq_blocks(rtn, qtype), imp) <= werr(b, deq_blocks(srch, qtype), imp)  # [...]
    return {k: torch.where(keep.unsqueeze(-1), rtn[k], srch[k]) for k in rtn}


# ---- bytes --------------------------------------------------------------------------------------


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.cpu().numpy().astype(np.float16).view(np.uint8)


def pack_blocks(p: dict[str, torch.Tensor], qtype: str) -> np.ndarray:
    """Parts of ``B`` blocks -> uint8 ``[B, type_size]`` exactly as gguf lays them out."""
    q = p["q"].cpu().numpy().reshape(-1, 32)
    head = [_f16_bytes(p["d"]).reshape(-1, 2)]
    if "m" in p:
        head.append(_f16_bytes(p["m"]).reshape(-1, 2))
    if qtype == "Q8_0":
        return np.concatenate([*head, q.astype(np.int8).view(np.uint8)], axis=-1)
    q = q.astype(np.uint8)
    lo = (q[:, :16] & 0x0F) | (q[:, 16:] << np.uint8(4))  # uint8 shift drops a 5-bit code's high bit
    if qtype in ("Q5_0", "Q5_1"):
        qh = np.packbits(q >> np.uint8(4), axis=-1, bitorder="little")  # bit i = high bit of weight i
        return np.concatenate([*head, qh, lo], axis=-1)
    return np.concatenate([*head, lo], axis=-1)


def unpack_blocks(raw: np.ndarray, qtype: str) -> dict[str, torch.Tensor]:
    """uint8 ``[B, type_size]`` -> parts (inverse of ``pack_blocks``)."""
    raw = np.ascontiguousarray(raw.reshape(raw.shape[0], -1))
    p = {"d": torch.from_numpy(raw[:, 0:2].copy().view(np.float16))}
    at = 2
    if qtype in AFFINE_NMAX:
        p["m"] = torch.from_numpy(raw[:, 2:4].copy().view(np.float16))
        at = 4
    if qtype == "Q8_0":
        p["q"] = torch.from_numpy(raw[:, at:].copy().view(np.int8).astype(np.float32))
        return p
    qh = None
    if qtype in ("Q5_0", "Q5_1"):
        qh = np.unpackbits(raw[:, at : at + 4], axis=-1, bitorder="little")
        at += 4
    body = raw[:, at:]
    q = np.concatenate([body & 0x0F, body >> 4], axis=-1)
    if qh is not None:
        q = q | (qh << 4)
    p["q"] = torch.from_numpy(q.astype(np.float32))
    return p
