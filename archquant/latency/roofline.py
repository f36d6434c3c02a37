"""Roofline estimate for a device with no profiled table: max(bytes / bandwidth, FLOPs / peak) + dispatch per op.

The three numbers (read bandwidth, matmul peak, per-op dispatch cost) are measured on the device in a
few seconds and cached; the resulting ``LatencyTable`` carries ``header.estimate = true`` and a method
string that says it is an estimate, so nobody mistakes it for a measurement.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from archquant.backends import Backend
from archquant.core.space import Space
from archquant.latency.runtime import time_op_ms
from archquant.latency.scenario import Scenario
from archquant.latency.signatures import enumerate_signatures
from archquant.latency.table import LatencyTable, base_header
from archquant.utils.env import device_name, now, versions
from archquant.utils.io import atomic_write_json

ROOFLINE_VERSION = 1


@dataclass
class RooflineParams:
    """Measured machine limits.

    Attributes:
        bandwidth_gbs: streaming read bandwidth (GB/s, 1e9 bytes) of a tensor far larger than the caches.
        peak_gflops: dense matmul throughput in the runtime dtype (GFLOP/s).
        op_overhead_ms: cost of launching one tiny op (Python dispatch on CPU, launch on CUDA).
        dense_bytes: bytes per unquantised (16-bit choice) weight element in the runtime dtype.
    """

    bandwidth_gbs: float
    peak_gflops: float
    op_overhead_ms: float
    dense_bytes: int = 4

    def to_dict(self) -> dict:
        return asdict(self)


def measure_roofline(device: str = "cpu", dtype: torch.dtype = torch.float32) -> RooflineParams:
    """Measure bandwidth, peak and dispatch cost on ``device`` (about 2-5 s)."""
    dev = torch.device(device)
    elt = torch.empty((), dtype=dtype).element_size()
    with torch.inference_mode():
        big = torch.ones(64 << 20, device=dev, dtype=dtype)  # 256 MB fp32: 8x a 32 MB LLC
        bw = big.numel() * elt / (time_op_ms(big.sum, dev, 0.3) * 1e-3) / 1e9
        del big
        n = 2048 if dev.type == "cuda" else 1024
        a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        peak = 2 * n**3 / (time_op_ms(lambda: a @ b, dev, 0.3) * 1e-3) / 1e9
        x, w = torch.randn(1, 16, device=dev, dtype=dtype), torch.randn(16, 16, device=dev, dtype=dtype)
        overhead = time_op_ms(lambda: F.linear(x, w), dev, 0.2)
    return RooflineParams(round(bw, 3), round(peak, 3), round(overhead, 6), elt)


def save_roofline(path: str | Path, params: RooflineParams, device: str = "cpu") -> None:
    atomic_write_json(path, {"version": ROOFLINE_VERSION, "device": device_name(device), "date": now(),
                             "versions": versions(), "params": params.to_dict()})


def load_roofline(path: str | Path) -> RooflineParams | None:
    """Read cached roofline parameters (None when missing or of another format version)."""
    path = Path(path)
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    return RooflineParams(**d["params"]) if d.get("version") == ROOFLINE_VERSION else None


def runtime_weight_bytes(backend: Backend, n: int, bits: int, group_size: int, p: RooflineParams,
                         row: int | None = None) -> float:
    """Bytes the engine reads for ``n`` weights: its own answer (``backend.runtime_weight_bytes``) where it
    gives one, else the stored format below 16 bits and the runtime dtype (``p.dense_bytes``) at 16."""
    own = getattr(backend, "runtime_weight_bytes", None)
    if own is not None:
        return float(own(n, bits, group_size))
    return float(n * p.dense_bytes) if bits >= 16 else float(backend.weight_bytes(n, bits, group_size, row=row))


def roofline_ms(kind: str, sig: dict, sc: Scenario, p: RooflineParams, backend: Backend, group_size: int) -> float:
    """Estimated ms of one op signature in scenario ``sc``."""
    bw, peak = p.bandwidth_gbs * 1e9, p.peak_gflops * 1e9
    act = p.dense_bytes
    m = sc.tokens
    if kind in ("linear", "lm_head"):
        k, n, wb = sig["K"], sig["N"], sig["wbits"]
        rows = sc.lm_head_tokens if kind == "lm_head" else m
        wbytes = runtime_weight_bytes(backend, k * n, wb, group_size, p, row=k)
        nbytes, flops = wbytes + rows * (k + n) * act, 2.0 * rows * k * n
        ops = 2 if sig.get("abits", 16) < 16 else 1  # an activation quantiser is one more launch
        return max(nbytes / bw, flops / peak) * 1e3 + ops * p.op_overhead_ms
    if kind == "attention":
        h, kv, hd = sig["heads"], sig["kv_heads"], sig["head_dim"]
        s, total = sc.seq, sc.past + sc.seq
        # KV cache read (and, in decode, re-written by the concatenating cache append) + q/out
        nbytes = sc.batch * (kv * total * hd * 2 * (2 if sc.past else 1) + 2 * h * s * hd) * act
        pairs = s * total - (s * (s - 1)) // 2  # causal query-key pairs
        flops = 4.0 * sc.batch * h * pairs * hd
        return max(nbytes / bw, flops / peak) * 1e3 + 6 * p.op_overhead_ms  # rope, cat, sdpa, reshapes
    if kind in ("norm", "act"):
        d = sig["d"]
        return 3 * m * d * act / bw * 1e3 + (4 if kind == "norm" else 2) * p.op_overhead_ms
    if kind == "embedding":
        return m * sig["d"] * act * 2 / bw * 1e3 + p.op_overhead_ms
    if kind == "overhead":  # two residual adds per block; the model's rope table, mask and slicing per token
        return (2 if sig["name"] == "per_layer" else 6) * p.op_overhead_ms
    raise ValueError(f"no roofline formula for op kind {kind!r}")


def roofline_table(space: Space, backend: Backend, scenario: Scenario, params: RooflineParams,
                   device: str = "cpu") -> LatencyTable:
    """An estimated table over exactly the signatures of ``space``, labelled ``estimate``."""
    ops: dict[str, list[dict]] = {}
    for kind, sigs in enumerate_signatures(space).items():
        ops[kind] = [{**s, "ms": roofline_ms(kind, s, scenario, params, backend, space.group_size)} for s in sigs]
    header = {
        **base_header(space, backend, scenario, device, (
            f"ROOFLINE ESTIMATE, not measured: max(bytes/{params.bandwidth_gbs} GB/s, FLOPs/{params.peak_gflops} "
            f"GFLOP/s) + {params.op_overhead_ms} ms per op launch"
        )),
        "estimate": True,
        "roofline": params.to_dict(),
    }
    return LatencyTable(header=header, ops=ops)
