"""``Scenario``: the workload a latency table measures (decode at a context, or prefill of a prompt)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from archquant.latency.config import SCENARIOS, LatencyConfig


@dataclass(frozen=True)
class Scenario:
    """One workload.

    Attributes:
        name: ``decode`` (``batch`` sequences, 1 new token each, ``context`` cached tokens) or
            ``prefill`` (``batch`` x ``prefill_len`` tokens, empty cache).
        batch: sequences per forward.
        context: cached tokens before the new one (decode only).
        prefill_len: prompt length (prefill only).
    """

    name: str = "decode"
    batch: int = 1
    context: int = 256
    prefill_len: int = 128

    def __post_init__(self) -> None:
        if self.name not in SCENARIOS:
            raise ValueError(f"latency.scenario must be one of {SCENARIOS}, got {self.name!r}")

    @classmethod
    def from_config(cls, cfg: LatencyConfig) -> Scenario:
        return cls(cfg.scenario, cfg.batch, cfg.context, cfg.prefill_len)

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> Scenario:
        # A field that does not apply to the scenario is stored as 0: fall back to the default.
        return cls(
            header["scenario"],
            int(header.get("batch") or 1),
            int(header.get("context") or cls.context),
            int(header.get("prefill_len") or cls.prefill_len),
        )

    @property
    def seq(self) -> int:
        """New tokens per sequence in one forward."""
        return 1 if self.name == "decode" else self.prefill_len

    @property
    def tokens(self) -> int:
        """Rows M of every linear in one forward (batch x new tokens)."""
        return self.batch * self.seq

    @property
    def past(self) -> int:
        """Tokens already in the KV cache when the forward starts."""
        return self.context if self.name == "decode" else 0

    @property
    def lm_head_tokens(self) -> int:
        """Rows of the lm_head: serving needs logits of the last position only (``logits_to_keep=1``)."""
        return self.batch

    def header(self) -> dict[str, Any]:
        """The scenario fields of a table header (``context`` / ``prefill_len`` only where they apply)."""
        return {
            "scenario": self.name,
            "batch": self.batch,
            "context": self.context if self.name == "decode" else 0,
            "prefill_len": self.prefill_len if self.name == "prefill" else 0,
            "tokens": self.tokens,
            "lm_head_tokens": self.lm_head_tokens,
        }

    def same_workload(self, other: Scenario) -> bool:
        return self.header() == other.header()

    def slug(self) -> str:
        """File-name part: the scenario name, plus its sizes when they differ from the defaults."""
        default = Scenario(self.name)
        if self.same_workload(default):
            return self.name
        if self.name == "decode":
            return f"decode-b{self.batch}-c{self.context}"
        return f"prefill-b{self.batch}-s{self.prefill_len}"
