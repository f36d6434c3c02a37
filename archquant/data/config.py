"""Config of the ``data`` group."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Where text comes from and how it is cut into blocks.

    Attributes:
        root: folder of the benchmark files (``$ARCHQUANT_DATA``; default ``../shared/data``).
        calib_file: calibration text, relative to ``root`` (or absolute).
        ppl_file: held-out perplexity text, relative to ``root`` (or absolute).
        seq_len: tokens per calibration block.
        num_calib_blocks: calibration blocks used for importance / search / distillation.
        num_val_blocks: held-out blocks for validation during search.
    """

    root: str | None = None
    calib_file: str = "gutenberg_war_and_peace/train.txt"
    ppl_file: str = "wikitext2_raw/test.txt"
    seq_len: int = 256
    num_calib_blocks: int = 128
    num_val_blocks: int = 16

    def __post_init__(self) -> None:
        for key in ("seq_len", "num_calib_blocks", "num_val_blocks"):
            if getattr(self, key) <= 0:
                raise ValueError(f"data.{key} must be > 0, got {getattr(self, key)}")
