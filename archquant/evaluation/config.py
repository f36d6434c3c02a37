"""Config of the ``eval`` group."""

from __future__ import annotations

from dataclasses import dataclass, field

ALL_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "mmlu")


@dataclass
class EvalConfig:
    """Perplexity and zero-shot evaluation.

    Attributes:
        tasks: zero-shot tasks to run (subset of ``ALL_TASKS``; empty = perplexity only).
        limit: examples per task (None = the whole file).
        batch_size: loglikelihood requests per forward.
        ppl_seq_len: window length of the non-overlapping perplexity windows.
        ppl_max_windows: cap on perplexity windows (None = the whole text).
        output: where to write ``eval.json`` (relative to the run folder).
    """

    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))
    limit: int | None = None
    batch_size: int = 16
    ppl_seq_len: int = 512
    ppl_max_windows: int | None = None
    output: str = "eval.json"

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in ALL_TASKS]
        if unknown:
            raise ValueError(f"eval.tasks has unknown task(s) {unknown}; known: {list(ALL_TASKS)}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"eval.limit must be > 0 (or null for all examples), got {self.limit}")
        if self.batch_size <= 0 or self.ppl_seq_len <= 0:
            raise ValueError("eval.batch_size and eval.ppl_seq_len must be > 0")
        if self.ppl_max_windows is not None and self.ppl_max_windows <= 0:
            raise ValueError(f"eval.ppl_max_windows must be > 0 or null, got {self.ppl_max_windows}")
