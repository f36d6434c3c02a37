"""Config of the ``data`` group."""

from __future__ import annotations

from dataclasses import dataclass, field

# Benchmark file of each zero-shot task, relative to ``data.root`` (override with data.task_files.<task>=...).
# Splits follow lm-evaluation-harness: ARC and MMLU are scored on test, the others on validation/dev.
# HellaSwag, WinoGrande and MMLU-test are 50-row samples in the shared data; point a key at a full file
# to score the whole split. The same names are what data.source=hub writes (see archquant/data/hub.py).
DEFAULT_TASK_FILES: dict[str, str] = {
    "boolq": "boolq/validation.jsonl",
    "piqa": "piqa/validation.jsonl",
    "hellaswag": "hellaswag/validation.sample50.jsonl",
    "winogrande": "winogrande/dev.sample50.jsonl",
    "arc_easy": "arc_easy/test.jsonl",
    "arc_challenge": "arc_challenge/test.jsonl",
    "mmlu": "mmlu/test.sample50.jsonl",
}

DATA_SOURCES = ("local", "hub")

# Calibration corpora, in order of preference, when data.calib_file is null: the shared data's novel,
# else WikiText-2 raw train (the corpus data.source=hub and archquant-data pull provide: the hub has no
# standard dataset of that one book).
CALIB_FILES = ("gutenberg_war_and_peace/train.txt", "wikitext2_raw/train.txt")


@dataclass
class DataConfig:
    """Where text comes from and how it is cut into blocks.

    Attributes:
        source: ``local`` reads the files under ``root`` and keeps ``datasets`` offline; ``hub``
            reads the same files from the Hugging Face Hub on first use (standard dataset ids,
            mapped to the local row schema) and keeps them under ``root`` as a cache.
        root: folder of the files. Null = ``$ARCHQUANT_DATA``, else ``../shared/data`` (local);
            ``$ARCHQUANT_CACHE/hub_data`` (hub).
        calib_file: calibration text, relative to ``root`` (or absolute); null = the first of
            ``CALIB_FILES`` under ``root`` (the hub provides the second, WikiText-2 raw train).
        ppl_file: held-out perplexity text, relative to ``root`` (or absolute).
        task_files: zero-shot benchmark file per task, relative to ``root`` (or absolute).
        seq_len: tokens per calibration block.
        num_calib_blocks: calibration blocks used for importance / search / distillation.
        num_val_blocks: held-out blocks for validation during search.
        val_fraction: tail fraction of the calibration text reserved for validation blocks, so that
            calibration and validation blocks never overlap whatever their counts.
        seed: seed of the block draw inside each part.
        strip_gutenberg: keep only the text between Project Gutenberg's START/END markers (no-op
            on files without them), so that licence boilerplate is not calibration data.
    """

    source: str = "local"
    root: str | None = None
    calib_file: str | None = None
    ppl_file: str = "wikitext2_raw/test.txt"
    task_files: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TASK_FILES))
    seq_len: int = 256
    num_calib_blocks: int = 128
    num_val_blocks: int = 16
    val_fraction: float = 0.1
    seed: int = 0
    strip_gutenberg: bool = True

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ValueError(f"data.source must be one of {list(DATA_SOURCES)}, got {self.source!r}")
        for key in ("seq_len", "num_calib_blocks", "num_val_blocks"):
            if getattr(self, key) <= 0:
                raise ValueError(f"data.{key} must be > 0, got {getattr(self, key)}")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2 (one token to predict), got {self.seq_len}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        unknown = sorted(set(self.task_files) - set(DEFAULT_TASK_FILES))
        if unknown:
            raise ValueError(
                f"data.task_files has unknown task(s) {unknown}; known: {sorted(DEFAULT_TASK_FILES)}"
            )
        # A user override of one task keeps the defaults of the others.
        self.task_files = {**DEFAULT_TASK_FILES, **dict(self.task_files)}
