"""Load the zero-shot benchmark files (JSONL, local or written from the Hub) through ``datasets``; check their schema.

Each task's schema is the one its ``SOURCE.md`` describes in the shared data folder. A missing or
null field fails here, naming the file, the row and the field, before any model time is spent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from archquant.data.config import DEFAULT_TASK_FILES, DataConfig
from archquant.data.errors import DataFormatError
from archquant.data.files import resolve_data_path
from archquant.data.hub import set_datasets_offline
from archquant.utils.errors import InputError, MissingFileError
from archquant.utils.paths import cache_dir

TASKS = tuple(DEFAULT_TASK_FILES)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _str_list(n: int | None = None) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v) and (n is None or len(v) == n)

    return check


def _arc_question(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and isinstance(v.get("stem"), str)
        and isinstance(v.get("choices"), list)
        and len(v["choices"]) >= 2
        and all(isinstance(c, dict) and isinstance(c.get("text"), str) and isinstance(c.get("label"), str) for c in v["choices"])
    )


# task -> field -> (check, what the field must be); the schemas of the SOURCE.md files
SCHEMAS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "boolq": {
        "question": (_is_str, "a string"),
        "passage": (_is_str, "a string"),
        "label": (lambda v: isinstance(v, bool) or v in (0, 1), "a boolean"),
    },
    "piqa": {
        "goal": (_is_str, "a string"),
        "sol1": (_is_str, "a string"),
        "sol2": (_is_str, "a string"),
        "label": (lambda v: v in (0, 1) and not isinstance(v, bool), "0 or 1"),
    },
    "hellaswag": {
        "activity_label": (_is_str, "a string"),
        "ctx": (_is_str, "a string"),
        "endings": (_str_list(4), "a list of 4 strings"),
        "label": (lambda v: str(v) in ("0", "1", "2", "3"), "0..3"),
    },
    "winogrande": {
        "sentence": (lambda v: isinstance(v, str) and "_" in v, "a string with a '_' blank"),
        "option1": (_is_str, "a string"),
        "option2": (_is_str, "a string"),
        "answer": (lambda v: str(v) in ("1", "2"), '"1" or "2"'),
    },
    "arc_easy": {
        "question": (_arc_question, "{stem, choices: [{text, label}, ...]}"),
        "answerKey": (_is_str, "a choice label"),
    },
    "mmlu": {
        "subject": (_is_str, "a string"),
        "question": (_is_str, "a string"),
        "choices": (_str_list(4), "a list of 4 strings"),
        "answer": (lambda v: v in ("A", "B", "C", "D") or v in (0, 1, 2, 3), 'one of "A".."D"'),
    },
}
SCHEMAS["arc_challenge"] = SCHEMAS["arc_easy"]


def _row_error(task: str, path: Path, row: dict) -> str | None:
    for name, (check, what) in SCHEMAS[task].items():
        if name not in row or row[name] is None:
            return f"missing field {name!r}"
        if not check(row[name]):
            return f"field {name!r} must be {what}, got {row[name]!r:.80}"
    if task.startswith("arc_"):
        labels = [c["label"] for c in row["question"]["choices"]]
        if row["answerKey"] not in labels:
            return f"answerKey {row['answerKey']!r} is not one of the choice labels {labels}"
    return None


def validate_rows(task: str, path: Path, rows) -> None:
    """Check every row against the task's schema.

    Raises:
        DataFormatError: naming the file, the 0-based row and the field.
    """
    for i, row in enumerate(rows):
        err = _row_error(task, path, row)
        if err:
            raise DataFormatError(
                f"{path}: row {i} ({task}): {err}. The {task} file must follow the schema of its SOURCE.md "
                f"(fields {sorted(SCHEMAS[task])}); fix the file or point data.task_files.{task} at a valid one."
            )


def load_benchmark(task: str, data_cfg: DataConfig | None = None, *, limit: int | None = None, path: str | Path | None = None):
    """Rows of one task's benchmark file, schema-checked.

    Args:
        task: one of ``TASKS``.
        data_cfg: ``data`` config giving the root and ``task_files`` (None = defaults).
        limit: keep the first ``limit`` rows (lm-eval's ``--limit`` semantics); None = all.
        path: read this file instead of the configured one.

    Returns:
        A ``datasets.Dataset`` (row order of the file).
    """
    if task not in SCHEMAS:
        raise InputError(f"unknown task {task!r}; known: {list(TASKS)}")
    if limit is not None and limit <= 0:
        raise InputError(f"eval.limit must be > 0 (or null for all examples), got {limit}")
    file = Path(path) if path is not None else resolve_data_path(data_cfg, f"task_files.{task}")
    if path is not None and not file.is_file():
        raise MissingFileError(f"{task}: benchmark file {file} not found; set data.task_files.{task}=/path/to/file")
    set_datasets_offline(data_cfg)
    import datasets

    datasets.disable_progress_bars()  # one bar per evaluation is enough; file loads take milliseconds
    try:
        ds = datasets.load_dataset(
            "json", data_files={"eval": str(file)}, split="eval", cache_dir=str(cache_dir() / "datasets")
        )
    except Exception as err:  # the builder wraps JSON errors in several exception types
        raise DataFormatError(
            f"{file}: could not read it as JSON lines ({type(err).__name__}: {err}); "
            f"point data.task_files.{task} at a valid .jsonl file"
        ) from err
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    validate_rows(task, file, ds)
    return ds
