"""Config of the ``latency`` group."""

from __future__ import annotations

from dataclasses import dataclass

SCENARIOS = ("decode", "prefill")


@dataclass
class LatencyConfig:
    """Which engine's latency the search optimises, in which workload.

    Attributes:
        backend: serving engine: ``llamacpp`` (CPU default), ``torch``, ``triton`` (CUDA).
        scenario: ``decode`` (batch x 1 new token at context ``context``) or ``prefill`` (batch x ``prefill_len``).
        batch: batch size of the scenario.
        context: KV-cache length for ``decode``.
        prefill_len: tokens per sequence for ``prefill``.
        table: path of a latency table (None = the committed table for this device, else roofline).
        strict: refuse a table profiled on another device / software version instead of warning.
        device: ``cpu`` or ``cuda``.
        min_run_time: seconds of timing per op signature when profiling (CPU ``blocked_autorange``).
        e2e_repeats: whole-model timings per depth when fitting the per-block / per-token overheads.
        out: where ``archquant-profile`` writes the table (None:
            ``latency_tables/<device>/<model>-<backend>-<scenario>.json``).
    """

    backend: str = "llamacpp"
    scenario: str = "decode"
    batch: int = 1
    context: int = 256
    prefill_len: int = 128
    table: str | None = None
    strict: bool = False
    device: str = "cpu"
    min_run_time: float = 0.1
    e2e_repeats: int = 5
    out: str | None = None

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"latency.scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        if self.backend not in ("llamacpp", "torch", "triton"):
            raise ValueError(f"latency.backend must be llamacpp, torch or triton, got {self.backend!r}")
        if not self.min_run_time > 0:
            raise ValueError(f"latency.min_run_time must be > 0 seconds, got {self.min_run_time}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"latency.device must be cpu or cuda, got {self.device!r}")
        for key in ("batch", "context", "prefill_len", "e2e_repeats"):
            if getattr(self, key) <= 0:
                raise ValueError(f"latency.{key} must be > 0, got {getattr(self, key)}")
