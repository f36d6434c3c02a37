"""Config of the ``latency`` group."""

from __future__ import annotations

from dataclasses import dataclass, field

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
        types: ``latency.backend=llamacpp``: GGUF types out of llama.cpp's CPU palette, each filling the
            weight bit-width it is (``backends.llamacpp.ALLOWED_TYPES``: Q6_K is 6-bit, Q5_0 / Q5_1 / Q5_K
            5-bit, Q4_0 / Q4_1 / Q4_K / IQ4_NL / IQ4_XS 4-bit, Q3_K 3-bit), e.g. ``[Q6_K,Q5_0,Q4_1]`` with
            ``space.wbits=[16,8,6,5,4]``; bit-widths not named keep ``F16 / Q8_0 / Q4_0``. The tables, the
            supernet, materialised subnets and exports all use these types.
        fallback: ``latency.backend=llamacpp``: a block-256 type (Q6_K, Q5_K, Q4_K, Q3_K, IQ4_XS) stores llama.cpp's
            fallback type (Q8_0, Q5_1, Q5_0, Q4_0, IQ4_NL) in the tensors whose row length the subnet makes a
            non-multiple of 256, so the choice is joint with the widths (``backends.llamacpp``); false: such a type
            is refused wherever a reachable row is not a multiple of 256.
        importance: ``latency.backend=llamacpp``: write every quantised block with the importance-weighted
            search (per-channel mean ``x^2`` of the calibration inputs, llama.cpp's imatrix idea) instead of
            round-to-nearest; the supernet simulates those very blocks.
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
    types: list[str] = field(default_factory=list)
    fallback: bool = True
    importance: bool = True

    def backend_options(self) -> dict | None:
        """The backend constructor's options this config sets (``get_backend(backend, options)``)."""
        out: dict = {}
        if self.types:
            from archquant.backends.llamacpp import types_from_names

            out["types"] = types_from_names(self.types)
        if not self.importance and self.backend == "llamacpp":
            out["importance"] = False
        if not self.fallback and self.backend == "llamacpp":
            out["fallback"] = False
        return out or None

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"latency.scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        if self.backend not in ("llamacpp", "torch", "triton"):
            raise ValueError(f"latency.backend must be llamacpp, torch or triton, got {self.backend!r}")
        if not self.min_run_time > 0:
            raise ValueError(f"latency.min_run_time must be > 0 seconds, got {self.min_run_time}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"latency.device must be cpu or cuda, got {self.device!r}")
        if self.types and self.backend != "llamacpp":
            raise ValueError(f"latency.types sets GGUF types, which only latency.backend=llamacpp has (got {self.backend!r})")
        if self.types:
            self.backend_options()  # names checked now: a bad type fails before any work
        for key in ("batch", "context", "prefill_len", "e2e_repeats"):
            if getattr(self, key) <= 0:
                raise ValueError(f"latency.{key} must be > 0, got {getattr(self, key)}")
