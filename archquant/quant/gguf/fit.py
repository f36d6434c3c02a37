"""Numerics shared by every GGUF type: gguf-exact rounding, nearest codes, importance-weighted scale search.

The search follows llama.cpp's ``make_qx_quants`` / ``make_qkx2_quants`` / ``quantize_row_iq4_nl_impl``
idea: try a few scales around the round-to-nearest one, map every weight to its nearest code, refit the
scale (and min) by weighted least squares, round it to the precision it is stored in, re-snap the codes,
and keep whichever candidate has the smallest ``sum_j imp_j (x_j - deq_j)^2`` per block. Every candidate
runs on the whole tensor at once (a loop over ~20 candidates, not over blocks).
"""

from __future__ import annotations

from typing import Callable

import torch

Store = Callable[[torch.Tensor], torch.Tensor]
# llama.cpp's IQ4_NL / IQ4_XS codebook (kvalues_iq4nl), ascending
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def fp16(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to the nearest fp16 and back (how a scale is stored)."""
    return x.half().float()


def ident(x: torch.Tensor) -> torch.Tensor:
    """No storage rounding (a sub-block scale that a later stage quantises)."""
    return x


def recip(d: torch.Tensor) -> torch.Tensor:
    """``1 / d`` with 0 where ``d == 0`` (gguf: ``np.where(d == 0, 0, 1 / d)``)."""
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / safe)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` exactly as gguf's ``np_roundf``: ``sign(x) * (floor|x| + floor(2 (|x| - floor|x|)))``."""
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


def signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude per row (first one on ties, as numpy's argmax). Shape: ``[..., S] -> [..., 1]``."""
    return torch.gather(x, -1, x.abs().argmax(dim=-1, keepdim=True))


class Grid:
    """The values a code can take: a uniform integer range ``[lo, hi]`` or a sorted codebook."""

    def __init__(self, lo: int = 0, hi: int = 0, values: tuple[int, ...] | None = None) -> None:
        self.values = torch.tensor(values if values is not None else range(lo, hi + 1), dtype=torch.float32)
        self.uniform = values is None
        self.lo, self.hi = float(self.values[0]), float(self.values[-1])
        self.mid = (self.values[1:] + self.values[:-1]) / 2

    def index(self, y: torch.Tensor) -> torch.Tensor:
        """Index of the nearest grid value to ``y`` (long, same shape)."""
        if self.uniform:
            return (torch.round(y).clamp(self.lo, self.hi) - self.lo).long()
        return torch.bucketize(y.contiguous(), self.mid)

    def value(self, idx: torch.Tensor) -> torch.Tensor:
        """Grid value of ``idx`` (float32)."""
        return idx.float() + self.lo if self.uniform else self.values[idx]


def snap_sym(x: torch.Tensor, d: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Nearest code index of ``x`` on ``d * grid`` (``d == 0``: the code nearest 0)."""
    return grid.index(x * recip(d))


def snap_affine(x: torch.Tensor, d: torch.Tensor, m: torch.Tensor, nmax: int) -> torch.Tensor:
    """Nearest code ``q`` in ``[0, nmax]`` of ``x`` on ``d * q + m`` (``d == 0``: 0)."""
    return torch.round((x - m) * recip(d)).clamp(0, nmax)


def werr(x: torch.Tensor, deq: torch.Tensor, imp: torch.Tensor) -> torch.Tensor:
    """``sum_j imp_j (x_j - deq_j)^2`` over the last dimension."""
    return (imp * (x - deq) ** 2).sum(-1)


def search_sym(x: torch.Tensor, imp: torch.Tensor, grid: Grid, store: Store, steps: int = 9) -> torch.Tensor:
    """Best stored scale ``d`` per row for ``x ~ d * grid[q]`` under weights ``imp``.

    Candidates put the row's signed largest value at either end of the grid, nudged by ``0.1 * i`` codes
    for ``|i| <= steps`` (``make_qx_quants``); each is refit by weighted least squares and stored.

    Shape: ``x [..., S]``, ``imp`` broadcastable -> ``d [..., 1]``.
    """
    m = signed_absmax(x)
    best_d = torch.zeros_like(m)
    best_e = torch.full_like(m, float("inf"))
    span = max(abs(grid.lo), abs(grid.hi)) / 8  # nudges scale with the grid: 0.1 codes on a 4-bit grid
    for end in (grid.lo, grid.hi):
        for i in range(-steps, steps + 1):
            d0 = m / (end + 0.1 * span * i)
            v = grid.value(snap_sym(x, d0, grid))
            num, den = (imp * x * v).sum(-1, keepdim=True), (imp * v * v).sum(-1, keepdim=True)
            d = store(torch.where(den > 0, num * recip(den), d0))
            e = werr(x, d * grid.value(snap_sym(x, d, grid)), imp).unsqueeze(-1)
            better = e < best_e
            best_d, best_e = torch.where(better, d, best_d), torch.where(better, e, best_e)
    return best_d


def search_affine(
    x: torch.Tensor, imp: torch.Tensor, nmax: int, store: Store, nonpos_min: bool, steps: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best stored ``(d, m)`` per row for ``x ~ d * q + m``, ``q`` in ``[0, nmax]``, under weights ``imp``.

    Candidates ``iscale = (nmax - 1 + 0.1 i) / (max - min)`` for ``0 <= i <= steps`` (``make_qkx2_quants``);
    each refits ``(d, m)`` by weighted least squares. ``nonpos_min`` keeps ``m <= 0`` (K-quants store
    ``-m`` unsigned).

    Shape: ``x [..., S]`` -> ``(d [..., 1], m [..., 1])``.
    """
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if nonpos_min:
        lo = lo.clamp(max=0)
    imp = imp.expand_as(x)
    sw, sx = imp.sum(-1, keepdim=True), (imp * x).sum(-1, keepdim=True)
    best_d, best_m = store((hi - lo) / nmax), store(lo)
    best_e = werr(x, best_d * snap_affine(x, best_d, best_m, nmax) + best_m, imp).unsqueeze(-1)
    for i in range(steps + 1):
        iscale = (nmax - 1 + 0.1 * i) * recip(hi - lo)
        q = torch.round((x - lo) * iscale).clamp(0, nmax)
        sl, sl2, sxl = (imp * q).sum(-1, keepdim=True), (imp * q * q).sum(-1, keepdim=True), (imp * x * q).sum(-1, keepdim=True)
        det = sw * sl2 - sl * sl
        ok = det > 0
        d = torch.where(ok, (sw * sxl - sx * sl) * recip(det), best_d)
        m = torch.where(ok, (sl2 * sx - sl * sxl) * recip(det), best_m)
        if nonpos_min:
            pos = m > 0
            d = torch.where(pos, sxl * recip(sl2), d)
            m = torch.where(pos, torch.zeros_like(m), m)
        d, m = store(d.clamp(min=0)), store(m)
        e = werr(x, d * snap_affine(x, d, m, nmax) + m, imp).unsqueeze(-1)
        better = e < best_e
        best_d, best_m, best_e = torch.where(better, d, best_d), torch.where(better, m, best_m), torch.where(better, e, best_e)
    return best_d, best_m
