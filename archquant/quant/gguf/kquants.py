"""Super-blocks of 256 with quantised sub-block scales: Q6_K, Q5_K, Q4_K, Q3_K, IQ4_XS.

Dequantisation (gguf-py's ``dequantize_blocks`` order, all float32):

* ``Q6_K``: 16 sub-blocks of 16; ``(fp16(d) * sc) * (q - 32)``, ``sc`` int8, ``q`` in [0, 63].
* ``Q3_K``: 16 sub-blocks of 16; ``(fp16(d) * (sc - 32)) * (q - 4)``, ``sc`` 6-bit, ``q`` in [0, 7].
* ``Q4_K`` / ``Q5_K``: 8 sub-blocks of 32; ``(fp16(d) * sc) * q - fp16(dmin) * m``, ``sc, m`` 6-bit,
  ``q`` in [0, 15] / [0, 31].
* ``IQ4_XS``: 8 sub-blocks of 32; ``(fp16(d) * (sc - 32)) * kvalues[q]``, ``sc`` 6-bit.

gguf-py has no quantiser for these; round-to-nearest here is the plain one: each sub-block's scale from
its signed largest value (or its max - min), the sub-scales quantised against the largest of them, the
codes nearest for the stored values. The weighted quantiser searches each sub-block's scale (and min)
(``fit.search_*``, like llama.cpp's ``quantize_row_q4_K_impl`` & co.), then a few super-scales, each
sub-scale code +-1 around its rounding, and keeps the super-block's round-to-nearest encoding wherever
that is no worse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from archquant.quant.gguf.fit import (
    IQ4_VALUES,
    Grid,
    fp16,
    ident,
    recip,
    search_affine,
    search_sym,
    signed_absmax,
    snap_sym,
    werr,
)


@dataclass(frozen=True)
class KSpec:
    """Geometry of one super-block type."""

    sub: int  # weights per sub-block
    grid: Grid | None  # symmetric code grid (None: affine)
    nmax: int = 0  # affine: codes in [0, nmax]
    sc_lo: int = 0  # signed sub-scale range
    sc_hi: int = 63
    sc_offset: int = 0  # stored scale code - scale


SPECS = {
    "Q6_K": KSpec(16, Grid(-32, 31), sc_lo=-128, sc_hi=127),
    "Q3_K": KSpec(16, Grid(-4, 3), sc_lo=-32, sc_hi=31, sc_offset=32),
    "IQ4_XS": KSpec(32, Grid(values=IQ4_VALUES), sc_lo=-32, sc_hi=31, sc_offset=32),
    "Q5_K": KSpec(32, None, nmax=31),
    "Q4_K": KSpec(32, None, nmax=15),
}
QK_K = 256


def _sub(b: torch.Tensor, spec: KSpec) -> torch.Tensor:
    return b.reshape(*b.shape[:-1], QK_K // spec.sub, spec.sub)


def deq_blocks(p: dict[str, torch.Tensor], qtype: str) -> torch.Tensor:
    """Dequantised super-blocks ``[..., 256]`` float32, in gguf's operation order."""
    spec = SPECS[qtype]
    q = _sub(p["q"].float(), spec)
    dl = (p["d"].float() * (p["sc"].float() - spec.sc_offset)).unsqueeze(-1)  # [..., nsub, 1]
    if spec.grid is None:
        dm = (p["dmin"].float() * p["m"].float()).unsqueeze(-1)
        out = dl * q - dm
    elif spec.grid.uniform:
        out = dl * (q + spec.grid.lo)
    else:
        out = dl * spec.grid.values[q.long()]
    return out.reshape(p["q"].shape)


def _codes(xs: torch.Tensor, dl: torch.Tensor, dm: torch.Tensor | None, spec: KSpec) -> torch.Tensor:
    """Nearest stored codes of sub-blocks ``xs [..., nsub, sub]`` for sub-scales ``dl`` (, mins ``dm``)."""
    if spec.grid is None:
        return torch.round((xs + dm) * recip(dl)).clamp(0, spec.nmax)
    return snap_sym(xs, dl, spec.grid).float()


def _sub_err(xs, imp, d, sc, dmin, m, spec):
    """Weighted error per sub-block of one encoding, and its codes."""
    dl = (d * (sc - spec.sc_offset)).unsqueeze(-1)
    dm = (dmin * m).unsqueeze(-1) if spec.grid is None else None
    q = _codes(xs, dl, dm, spec)
    if spec.grid is None:
        deq = dl * q - dm
    else:
        deq = dl * spec.grid.value(q.long())
    return werr(xs, deq, imp), q


def _encode(xs, imp, s, mn, spec, d_steps, m_steps, nudge):
    """Quantise float sub-scales ``s`` (, mins ``-mn``) against each candidate super-scale; best per super-block."""
    best = None
    if spec.grid is None:
        s, mm = s.clamp(min=0), (-mn).clamp(min=0)
        smax, mmax = s.amax(-1, keepdim=True), mm.amax(-1, keepdim=True)
        cands = [(smax / (63 - t), mmax / (63 - u)) for t in d_steps for u in m_steps]
    else:
        smax = signed_absmax(s)
        cands = [(smax / (end - t if end > 0 else end + t), None) for end in (spec.sc_lo, spec.sc_hi) for t in d_steps]
        if not nudge:
            cands = cands[:1]
    for dc, mc in cands:
        d = fp16(dc)
        dmin = fp16(mc) if mc is not None else None
        sc0 = (torch.round(s * recip(d)) + spec.sc_offset).clamp(spec.sc_lo + spec.sc_offset, spec.sc_hi + spec.sc_offset)
        m0 = torch.round(mm * recip(dmin)).clamp(0, 63) if dmin is not None else None
        # sub-blocks are independent once the super-scale is fixed: try each code +-1 around its rounding
        moves = [(a, c) for a in ((-1, 0, 1) if nudge else (0,)) for c in ((-1, 0, 1) if nudge and dmin is not None else (0,))]
        sub_best = None
        for a, c in moves:
            sc = (sc0 + a).clamp(spec.sc_lo + spec.sc_offset, spec.sc_hi + spec.sc_offset)
            m = (m0 + c).clamp(0, 63) if m0 is not None else None
            e, q = _sub_err(xs, imp, d, sc, dmin, m, spec)
            if sub_best is None:
                sub_best = [e, sc, m, q]
                continue
            better = e < sub_best[0]
            sub_best[0] = torch.where(better, e, sub_best[0])
            sub_best[1] = torch.where(better, sc, sub_best[1])
            if m is not None:
                sub_best[2] = torch.where(better, m, sub_best[2])
            sub_best[3] = torch.where(better.unsqueeze(-1), q, sub_best[3])
        e_tot = sub_best[0].sum(-1, keepdim=True)  # [..., 1]
        enc = {"d": d, "sc": sub_best[1], "q": sub_best[3]}
        if dmin is not None:
            enc["dmin"], enc["m"] = dmin, sub_best[2]
        if best is None:
            best, best_e = enc, e_tot
            continue
        better = e_tot < best_e
        best_e = torch.where(better, e_tot, best_e)
        best = {k: torch.where(better.reshape(*better.shape, *([1] * (v.dim() - better.dim()))), v, best[k]) for k, v in enc.items()}
    return best, best_e


def quantize_blocks(b: torch.Tensor, qtype: str, imp: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Super-blocks ``[..., 256]`` -> ``{"q" [..., 256], "d" [..., 1] fp16, "sc" [..., nsub] (, "dmin", "m")}``.

    ``imp`` (broadcastable to ``b``) switches on the weighted search; a super-block keeps round-to-nearest's
    encoding wherever that has no larger weighted error.
    """
    spec = SPECS[qtype]
    xs = _sub(b, spec)
    w = torch.ones_like(xs) if imp is None else _sub(imp.expand_as(b), spec)
    if spec.grid is None:
        lo = xs.amin(-1, keepdim=True).clamp(max=0)
        s, mn = (xs.amax(-1, keepdim=True) - lo) / spec.nmax, lo
    else:
        s, mn = signed_absmax(xs) / spec.grid.lo, None
    rtn, rtn_e = _encode(xs, w, s.squeeze(-1), None if mn is None else mn.squeeze(-1), spec, (0,), (0,), nudge=False)
    out = rtn
    if imp is not None:
        if spec.grid is None:
            s, mn = search_affine(xs, w, spec.nmax, ident, nonpos_min=True)
        else:
            s, mn = search_sym(xs, w, spec.grid, ident), None
        steps = (0, 1, 2, 4) if spec.grid is None else (0, 0.5, 1, 2, 3)
        srch, srch_e = _encode(xs, w, s.squeeze(-1), None if mn is None else mn.squeeze(-1), spec, steps, (0, 2), nudge=True)
        keep = rtn_e <= srch_e
        out = {k: torch.where(keep.reshape(*keep.shape, *([1] * (v.dim() - keep.dim()))), rtn[k], v) for k, v in srch.items()}
    out = dict(out)
    out["q"] = out["q"].reshape(b.shape)  # stored codes: the grid index
    out["d"] = out["d"].half()
    if "dmin" in out:
        out["dmin"] = out["dmin"].half()
    return out


# ---- bytes --------------------------------------------------------------------------------------


def _pack_scale_min_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> ggml's 12-byte ``get_scale_min_k4`` layout. Shape: ``[B, 8]`` -> ``[B, 12]``."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return out


def _unpack_scale_min_k4(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.concatenate([b[:, 0:4] & 63, (b[:, 8:12] & 15) | ((b[:, 0:4] >> 6) << 4)], axis=-1)
    m = np.concatenate([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], axis=-1)
    return sc, m


def _nibbles(q: np.ndarray, run: int) -> np.ndarray:
    """Codes ``[B, n]`` in chunks of ``2 * run``: first ``run`` in low nibbles, next ``run`` in high ones."""
    c = q.reshape(q.shape[0], -1, 2, run)
    return ((c[:, :, 0] & 15) | ((c[:, :, 1] & 15) << 4)).reshape(q.shape[0], -1)


def _unnibble(b: np.ndarray, run: int) -> np.ndarray:
    c = b.reshape(b.shape[0], -1, 1, run)
    return np.concatenate([c & 15, c >> 4], axis=2).reshape(b.shape[0], -1)


def _crumbs(q: np.ndarray, half: int) -> np.ndarray:
    """2-bit fields: per ``half`` weights, byte ``i`` holds weights ``i + 32 s`` at bits ``2 s``."""
    c = q.reshape(q.shape[0], -1, half // 32, 32) & 3
    return np.bitwise_or.reduce(c << (2 * np.arange(half // 32, dtype=np.uint8))[None, None, :, None], axis=2).reshape(q.shape[0], -1)


def _uncrumb(b: np.ndarray, half: int) -> np.ndarray:
    c = b.reshape(b.shape[0], -1, 1, 32) >> (2 * np.arange(half // 32, dtype=np.uint8))[None, None, :, None]
    return (c & 3).reshape(b.shape[0], -1)


def _bitplane(bits: np.ndarray) -> np.ndarray:
    """One bit per weight of ``[B, 256]``: byte ``i`` bit ``j`` is weight ``32 j + i``."""
    c = bits.reshape(bits.shape[0], 8, 32) & 1
    return np.bitwise_or.reduce(c << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)


def _unbitplane(b: np.ndarray) -> np.ndarray:
    return ((b[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).reshape(b.shape[0], 256)


def pack_blocks(p: dict[str, torch.Tensor], qtype: str) -> np.ndarray:
    """Parts of ``B`` super-blocks -> uint8 ``[B, type_size]`` exactly as gguf / ggml lay them out."""
    q = p["q"].cpu().numpy().reshape(-1, QK_K).astype(np.uint8)
    nb = q.shape[0]
    d = p["d"].cpu().numpy().astype(np.float16).view(np.uint8).reshape(nb, 2)
    if qtype == "Q6_K":
        sc = p["sc"].cpu().numpy().reshape(nb, 16).astype(np.int8).view(np.uint8)
        return np.concatenate([_nibbles(q, 64), _crumbs(q >> 4, 128), sc, d], axis=-1)
    sc = p["sc"].cpu().numpy().reshape(nb, -1).astype(np.uint8)
    if qtype == "Q3_K":
        packed = np.empty((nb, 12), dtype=np.uint8)
        packed[:, :8] = (sc[:, :8] & 15) | ((sc[:, 8:] & 15) << 4)
        hi = (sc >> 4).reshape(nb, 4, 4)  # scale 4 s + i -> byte 8 + i, bits 2 s
        packed[:, 8:] = np.bitwise_or.reduce(hi << (2 * np.arange(4, dtype=np.uint8))[None, :, None], axis=1)
        return np.concatenate([_bitplane(q >> 2), _crumbs(q, 128), packed, d], axis=-1)
    if qtype == "IQ4_XS":
        sh = np.bitwise_or.reduce((sc >> 4).astype(np.uint16) << (2 * np.arange(8, dtype=np.uint16)), axis=-1)
        sl = (sc[:, 0::2] & 15) | ((sc[:, 1::2] & 15) << 4)
        return np.concatenate([d, sh.astype(np.uint16).reshape(nb, 1).view(np.uint8), sl, _nibbles(q, 16)], axis=-1)
    dmin = p["dmin"].cpu().numpy().astype(np.float16).view(np.uint8).reshape(nb, 2)
    scales = _pack_scale_min_k4(sc, p["m"].cpu().numpy().reshape(nb, 8).astype(np.uint8))
    if qtype == "Q4_K":
        return np.concatenate([d, dmin, scales, _nibbles(q, 32)], axis=-1)
    return np.concatenate([d, dmin, scales, _bitplane(q >> 4), _nibbles(q, 32)], axis=-1)


def unpack_blocks(raw: np.ndarray, qtype: str) -> dict[str, torch.Tensor]:
    """uint8 ``[B, type_size]`` -> parts (inverse of ``pack_blocks``)."""
    raw = np.ascontiguousarray(raw.reshape(raw.shape[0], -1))
    nb = raw.shape[0]

    def f16(a):
        return torch.from_numpy(a.copy().view(np.float16).reshape(nb, 1))

    def t(a):
        return torch.from_numpy(a.astype(np.float32))

    if qtype == "Q6_K":
        q = _unnibble(raw[:, :128], 64) | (_uncrumb(raw[:, 128:192], 128) << 4)
        return {"q": t(q), "sc": t(raw[:, 192:208].view(np.int8)), "d": f16(raw[:, 208:210])}
    if qtype == "Q3_K":
        q = _uncrumb(raw[:, 32:96], 128) | (_unbitplane(raw[:, :32]) << 2)
        s = raw[:, 96:108]
        lo = np.concatenate([s[:, :8] & 15, s[:, :8] >> 4], axis=-1)
        hi = ((s[:, None, 8:12] >> (2 * np.arange(4, dtype=np.uint8))[None, :, None]) & 3).reshape(nb, 16)
        return {"q": t(q), "sc": t(lo | (hi << 4)), "d": f16(raw[:, 108:110])}
    if qtype == "IQ4_XS":
        sh = raw[:, 2:4].copy().view(np.uint16).reshape(nb, 1) >> (2 * np.arange(8, dtype=np.uint16))
        sl = np.stack([raw[:, 4:8] & 15, raw[:, 4:8] >> 4], axis=-1).reshape(nb, 8)
        return {"q": t(_unnibble(raw[:, 8:], 16)), "sc": t(sl | ((sh & 3).astype(np.uint8) << 4)), "d": f16(raw[:, 0:2])}
    sc, m = _unpack_scale_min_k4(raw[:, 4:16])
    q = _unnibble(raw[:, -128:], 32)
    if qtype == "Q5_K":
        q = q | (_unbitplane(raw[:, 16:48]) << 4)
    return {"q": t(q), "sc": t(sc), "m": t(m), "d": f16(raw[:, 0:2]), "dmin": f16(raw[:, 2:4])}
