"""``LatencyTable``: the versioned JSON LUT (op signature -> ms) of one device x backend x model x scenario.

Lookups between grid points interpolate: bilinear in (K, N) for linears and the lm_head (per
(wbits, abits) pair), linear in ``d`` for norms/embeddings/activations and in the KV-group count for
attention. A lookup outside the profiled range raises ``TableError`` naming the missing entry.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archquant.latency.signatures import KINDS, SIGNATURE_KEYS, signature_key
from archquant.utils.env import device_name, now, versions
from archquant.utils.errors import MissingFileError, UserError
from archquant.utils.io import atomic_write_json

TABLE_VERSION = 1
REQUIRED_KINDS = ("linear", "attention", "norm", "embedding", "lm_head")
# Kinds a table may leave out (a table made by another engine's profiler): they then cost 0 ms.
OPTIONAL_KINDS = ("act", "overhead")



def base_header(space, backend, scenario, device: str, method: str) -> dict[str, Any]:
    """What every table header records: device, backend, workload, model dimensions, software, date, method,
    threads (the profilers add what their measurement needs)."""
    import torch

    return {
        "device": device_name(device),
        "backend": backend.name,
        **scenario.header(),
        "model": dict(space.fingerprint),
        "versions": versions(),
        "date": now(),
        "method": method,
        "threads": torch.get_num_threads(),
    }

class TableError(UserError, ValueError):
    """A latency table that is malformed, of another version, or lacks an entry a lookup needs."""


@dataclass
class LatencyTable:
    """Op signature -> milliseconds for one scenario, with the header that says where it was measured.

    Attributes:
        header: device, backend, scenario, batch, context, prefill_len, tokens, model (the space
            fingerprint), versions, date, method, threads (see the module docstring of ``profiler``).
        ops: ``kind -> [{**signature, "ms": float}, ...]``.
        correction: ``{"scale": s, "offset_ms": o}``; predicted = s * (sum of ops) + o.
        version: format version (``TABLE_VERSION``).
    """

    header: dict[str, Any]
    ops: dict[str, list[dict[str, Any]]]
    correction: dict[str, float] = field(default_factory=lambda: {"scale": 1.0, "offset_ms": 0.0})
    version: int = TABLE_VERSION

    def __post_init__(self) -> None:
        unknown = set(self.ops) - set(KINDS)
        if unknown:
            raise TableError(f"latency table has unknown op kinds {sorted(unknown)} (known: {KINDS})")
        self._index: dict[str, dict[tuple, float]] = {}
        for kind, rows in self.ops.items():
            idx = {}
            for row in rows:
                if "ms" not in row:
                    raise TableError(f"latency table {kind} entry {row} has no 'ms'")
                idx[signature_key(kind, row)] = float(row["ms"])
            self._index[kind] = idx
        c = self.correction
        self.correction = {"scale": float(c.get("scale", 1.0)), "offset_ms": float(c.get("offset_ms", 0.0))}

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "header": self.header, "ops": self.ops, "correction": self.correction}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "latency table") -> LatencyTable:
        if d.get("version") != TABLE_VERSION:
            raise TableError(
                f"{source} has format version {d.get('version')!r}; this archquant reads version {TABLE_VERSION}. "
                "Re-profile with archquant-profile."
            )
        for key in ("header", "ops"):
            if key not in d:
                raise TableError(f"{source} has no {key!r} section")
        missing = [k for k in REQUIRED_KINDS if not d["ops"].get(k)]
        if missing:
            raise TableError(f"{source} has no entries for op kinds {missing}; re-profile with archquant-profile")
        return cls(header=dict(d["header"]), ops={k: list(v) for k, v in d["ops"].items()},
                   correction=dict(d.get("correction") or {}), version=d["version"])

    def save(self, path: str | Path) -> None:
        """Write atomically as indented JSON (one entry per op, sorted, for readable diffs)."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        path = Path(path)
        if not path.exists():
            raise MissingFileError(f"latency table {path} does not exist; make it with archquant-profile")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise TableError(f"{path} is not valid JSON ({err}); is it a partial file?") from err
        table = cls.from_dict(d, source=str(path))
        table.header.setdefault("path", str(path))
        return table

    # ---- lookups -----------------------------------------------------------------------------
    @property
    def is_estimate(self) -> bool:
        """True for a roofline estimate (no measurement behind it)."""
        return bool(self.header.get("estimate", False))

    def has(self, kind: str, sig: dict[str, Any]) -> bool:
        return signature_key(kind, sig) in self._index.get(kind, {})

    def lookup(self, kind: str, sig: dict[str, Any]) -> float:
        """Milliseconds of one op, interpolated between grid points where the exact entry is missing.

        Raises:
            TableError: the signature lies outside the table's grid (the message names it).
        """
        idx = self._index.get(kind)
        if not idx:
            if kind in OPTIONAL_KINDS:
                return 0.0
            raise TableError(f"latency table has no {kind!r} entries; re-profile with archquant-profile")
        key = signature_key(kind, sig)
        if key in idx:
            return idx[key]
        if kind == "overhead":
            return 0.0  # a table that did not measure an overhead term treats it as folded into the ops
        try:
            if kind in ("linear", "lm_head"):
                k, n, wb, ab = key
                return _interp_2d({(kk, nn): ms for (kk, nn, w, a), ms in idx.items() if (w, a) == (wb, ab)}, k, n)
            if kind == "attention":
                h, kv, hd = key
                pts = {kv_: ms for (h_, kv_, hd_), ms in idx.items() if hd_ == hd and h_ * kv == h * kv_}
                return _interp_1d(pts, kv)
            return _interp_1d({k[0]: ms for k, ms in idx.items()}, key[0])
        except LookupError:
            raise TableError(
                f"latency table ({self.header.get('device')}, {self.header.get('backend')}, "
                f"{self.header.get('scenario')}) has no {kind} entry {dict(zip(SIGNATURE_KEYS[kind], key))} and none "
                "around it to interpolate from. Profile this space: archquant-profile (with the same space.* overrides)."
            ) from None


def _bracket(xs: list, x) -> tuple[Any, Any]:
    """Nearest grid values ``lo <= x <= hi`` in sorted ``xs`` (``lo == hi`` on a grid point)."""
    i = bisect.bisect_left(xs, x)
    if i < len(xs) and xs[i] == x:
        return x, x
    if i == 0 or i == len(xs):
        raise LookupError(x)
    return xs[i - 1], xs[i]


def _interp_1d(points: dict, x) -> float:
    """Piecewise-linear interpolation of ``{x: y}`` at ``x`` (exact on grid points, no extrapolation)."""
    lo, hi = _bracket(sorted(points), x)
    if lo == hi:
        return points[lo]
    t = (x - lo) / (hi - lo)
    return points[lo] * (1 - t) + points[hi] * t


def _interp_2d(points: dict[tuple, float], k, n) -> float:
    """Bilinear interpolation on a possibly ragged grid ``{(K, N): y}``.

    Interpolates along N within the two nearest K rows that bracket ``n``, then along K; if the rows
    do not bracket, tries the transposed order. On a full rectilinear grid this is exactly bilinear.
    """
    for swap in (False, True):
        pts = {(b, a): y for (a, b), y in points.items()} if swap else points
        x, y = (n, k) if swap else (k, n)
        rows: dict[Any, dict] = {}
        for (a, b), v in pts.items():
            rows.setdefault(a, {})[b] = v
        usable = sorted(a for a, row in rows.items() if _brackets(row, y))
        try:
            lo, hi = _bracket(usable, x)
        except LookupError:
            continue
        return _interp_1d({a: _interp_1d(rows[a], y) for a in {lo, hi}}, x)
    raise LookupError((k, n))


def _brackets(row: dict, y) -> bool:
    try:
        _bracket(sorted(row), y)
        return True
    except LookupError:
        return False
