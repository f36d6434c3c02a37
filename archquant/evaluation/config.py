"""Config of the ``eval`` group."""

from __future__ import annotations

from dataclasses import dataclass, field

ALL_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "mmlu")
ENGINES = ("native", "lm_eval")


@dataclass
class EvalConfig:
    """Perplexity and zero-shot evaluation.

    Attributes:
        tasks: zero-shot tasks to run (subset of ``ALL_TASKS``; empty = perplexity only).
        limit: first ``limit`` examples per task (None = the whole file).
        batch_size: loglikelihood input rows per forward.
        perplexity: whether to measure perplexity on ``data.ppl_file``.
        ppl_seq_len: window length of the non-overlapping perplexity windows.
        ppl_max_windows: cap on perplexity windows (None = the whole text).
        ppl_batch_size: perplexity windows per forward (a window's logits are seq_len x vocab floats).
        engine: ``native`` (archquant's scorer; any module returning logits) or ``lm_eval`` (the
            harness itself through ``HFLM``, for HF models only; same numbers, a cross-check).
        progress: show progress bars.
        output: where to write ``eval.json`` (relative to the run folder).
    """

    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))
    limit: int | None = None
    batch_size: int = 16
    perplexity: bool = True
    ppl_seq_len: int = 512
    ppl_max_windows: int | None = None
    ppl_batch_size: int = 4
    engine: str = "native"
    progress: bool = True
    output: str = "eval.json"

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):  # eval.tasks=piqa on the command line
            self.tasks = [self.tasks]
        unknown = [t for t in self.tasks if t not in ALL_TASKS]
        if unknown:
            raise ValueError(f"eval.tasks has unknown task(s) {unknown}; known: {list(ALL_TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"eval.tasks lists a task twice: {list(self.tasks)}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"eval.limit must be > 0 (or null for all examples), got {self.limit}")
        for key in ("batch_size", "ppl_seq_len", "ppl_batch_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"eval.{key} must be > 0, got {getattr(self, key)}")
        if self.ppl_seq_len < 2:
            raise ValueError(f"eval.ppl_seq_len must be >= 2, got {self.ppl_seq_len}")
        if self.ppl_max_windows is not None and self.ppl_max_windows <= 0:
            raise ValueError(f"eval.ppl_max_windows must be > 0 or null, got {self.ppl_max_windows}")
        if self.engine not in ENGINES:
            raise ValueError(f"eval.engine must be one of {list(ENGINES)}, got {self.engine!r}")
        if not self.output:
            raise ValueError("eval.output must name a file, e.g. eval.output=eval.json")
