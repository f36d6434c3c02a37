"""The data files as the Hugging Face Hub gives them: standard dataset ids, mapped to the local rows.

Every file the hub can produce has a name of the local layout (``piqa/validation.jsonl``); writing it
from the hub gives the rows the task code reads from the shared data folder (field names, types, row
order, even the JSON spacing), so that ``data.source`` changes where the bytes come from and not what
is measured. The ids are the ones lm-evaluation-harness loads. Two deliberate differences:

* the ``*.sample50.jsonl`` files are a seeded 50-row draw of the hub split (original order kept), as
  the shared samples are, but the shared samples' draw is not recorded: the rows differ;
* the calibration text is WikiText-2 raw *train* (the shared folder's War and Peace has no standard
  hub dataset; its SOURCE.md names WikiText-2 train as the corpus it stood in for).

Also here: the offline policy. ``data.source=local`` keeps ``datasets`` off the network
(``set_datasets_offline``); the hub reads lift that, and only that (``hub_online``): an
``HF_HUB_OFFLINE=1`` the user set stays in force.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from archquant.data.config import DataConfig
from archquant.data.errors import DataFormatError, HubUnavailableError
from archquant.utils.io import atomic_write_text
from archquant.utils.paths import cache_dir

SAMPLE_SEED = 0  # seed of the draw behind every *.sampleN.jsonl the hub writes


@dataclass(frozen=True)
class HubFile:
    """How one local file is made from a hub dataset split.

    Attributes:
        dataset: hub id, e.g. ``allenai/ai2_arc``.
        config: the dataset's config name (None = its only one).
        split: hub split name (WinoGrande's ``validation`` is the dev set).
        task: benchmark whose local row schema the rows are mapped to; None = a text file.
        sample: keep a seeded draw of this many rows, in the split's order (None = every row).
    """

    dataset: str
    config: str | None
    split: str
    task: str | None = None
    sample: int | None = None


def _arc(split: str, name: str) -> HubFile:
    return HubFile("allenai/ai2_arc", name, split, "arc_easy" if name == "ARC-Easy" else "arc_challenge")


_WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1")

HUB_FILES: dict[str, HubFile] = {
    "boolq/validation.jsonl": HubFile("aps/super_glue", "boolq", "validation", "boolq"),
    "piqa/validation.jsonl": HubFile("baber/piqa", None, "validation", "piqa"),
    "hellaswag/validation.jsonl": HubFile("Rowan/hellaswag", None, "validation", "hellaswag"),
    "hellaswag/validation.sample50.jsonl": HubFile("Rowan/hellaswag", None, "validation", "hellaswag", 50),
    "winogrande/dev.jsonl": HubFile("allenai/winogrande", "winogrande_xl", "validation", "winogrande"),
    "winogrande/dev.sample50.jsonl": HubFile("allenai/winogrande", "winogrande_xl", "validation", "winogrande", 50),
    "arc_easy/test.jsonl": _arc("test", "ARC-Easy"),
    "arc_easy/validation.jsonl": _arc("validation", "ARC-Easy"),
    "arc_challenge/test.jsonl": _arc("test", "ARC-Challenge"),
    "arc_challenge/validation.jsonl": _arc("validation", "ARC-Challenge"),
    "mmlu/test.jsonl": HubFile("cais/mmlu", "all", "test", "mmlu"),
    "mmlu/test.sample50.jsonl": HubFile("cais/mmlu", "all", "test", "mmlu", 50),
    "mmlu/validation.jsonl": HubFile("cais/mmlu", "all", "validation", "mmlu"),
    "mmlu/dev.jsonl": HubFile("cais/mmlu", "all", "dev", "mmlu"),
    "wikitext2_raw/test.txt": HubFile(*_WIKITEXT, "test"),
    "wikitext2_raw/validation.txt": HubFile(*_WIKITEXT, "validation"),
    "wikitext2_raw/train.txt": HubFile(*_WIKITEXT, "train"),
}


def full_file(rel: str) -> str | None:
    """The hub file a sample is drawn from (``hellaswag/validation.jsonl`` for its sample50), else None."""
    spec = HUB_FILES[rel]
    if spec.sample is None:
        return None
    return next(r for r, s in HUB_FILES.items() if s.sample is None and (s.dataset, s.config, s.split) == (spec.dataset, spec.config, spec.split))


# ---------------------------------------------------------------- hub rows -> local rows


def derived_hellaswag_text(text: str) -> str:
    """The text cleaning of the extractor behind the local HellaSwag file (see its SOURCE.md).

    Same replacements in the same order, each a left-to-right non-overlapping pass (as ``str.replace``),
    then one leading and one trailing space removed.
    """
    for old, new in (("[header]", ""), ("[step]", ""), ("[substeps]", ""), (" [title]", ". "), ("[title] ", ""), ("[title].", ""), ("  ", " ")):
        text = text.replace(old, new)
    if text.startswith(" "):
        text = text[1:]
    if text.endswith(" "):
        text = text[:-1]
    return text


def _hellaswag(row: dict) -> dict:
    # the extractor wrote "activity_label: ctx" on one line; the local file split it at the first ": "
    line = f"{derived_hellaswag_text(row['activity_label'])}: {derived_hellaswag_text(row['ctx'])}"
    activity_label, ctx = line.split(": ", 1)
    return {"activity_label": activity_label, "ctx": ctx, "label": int(row["label"]), "endings": [derived_hellaswag_text(e) for e in row["endings"]]}


def _arc_row(row: dict) -> dict:
    choices = [{"text": t, "label": lab} for t, lab in zip(row["choices"]["text"], row["choices"]["label"])]
    return {"id": row["id"], "question": {"stem": row["question"], "choices": choices}, "answerKey": row["answerKey"]}


def _mmlu(row: dict) -> dict:
    answer = row["answer"]
    return {"subject": row["subject"], "question": row["question"], "choices": list(row["choices"]), "answer": answer if isinstance(answer, str) else "ABCD"[int(answer)]}


# task -> hub row -> local row (the schema of the task's SOURCE.md in the shared data folder)
LOCAL_ROW: dict[str, Callable[[dict], dict]] = {
    "boolq": lambda r: {"question": r["question"], "passage": r["passage"], "idx": int(r["idx"]), "label": bool(r["label"])},
    "piqa": lambda r: {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(r["label"])},
    "hellaswag": _hellaswag,
    # the hub rows have no qID (the dev file's id); nothing reads it
    "winogrande": lambda r: {"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": str(r["answer"])},
    "arc_easy": _arc_row,
    "arc_challenge": _arc_row,
    "mmlu": _mmlu,
}

# json.dumps arguments that reproduce each local file's bytes: the AI2 ARC files are compact UTF-8,
# the others Python's defaults (ASCII-escaped)
JSON_STYLE: dict[str, dict[str, Any]] = {
    "arc_easy": {"separators": (",", ":"), "ensure_ascii": False},
    "arc_challenge": {"separators": (",", ":"), "ensure_ascii": False},
}


def local_rows(spec: HubFile, hub_rows) -> list[dict]:
    """Map hub rows to the local rows of ``spec.task`` (order as the local file; sample drawn).

    Raises:
        DataFormatError: a hub row lacks a field the mapping needs (the hub dataset changed).
    """
    out = []
    for i, row in enumerate(hub_rows):
        try:
            out.append(LOCAL_ROW[spec.task](row))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise DataFormatError(
                f"{spec.dataset} ({spec.config or 'default'}, {spec.split}) row {i}: cannot map it to the local "
                f"{spec.task} row ({type(err).__name__}: {err}); its fields: {sorted(row)}. The hub dataset may have "
                "changed: use local files instead (data.source=local, data.root=<dir>)"
            ) from err
    if spec.task == "mmlu":
        out.sort(key=lambda r: r["subject"])  # the local file: subjects alphabetical, then rows in file order
    if spec.sample is not None and spec.sample < len(out):
        keep = sorted(random.Random(SAMPLE_SEED).sample(range(len(out)), spec.sample))
        out = [out[i] for i in keep]
    return out


def local_text(hub_rows) -> str:
    """WikiText rows -> the local text: the non-blank rows, one per line (the hub's blank rows dropped)."""
    lines = (row["text"] for row in hub_rows)
    return "".join(t if t.endswith("\n") else t + "\n" for t in lines if t.strip())


def jsonl(task: str, rows: list[dict]) -> str:
    """Rows as the local JSON-lines file writes them."""
    style = JSON_STYLE.get(task, {})
    return "".join(json.dumps(r, **style) + "\n" for r in rows)


# ---------------------------------------------------------------- reading the hub

_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
_forced: set[str] = set()  # the variables set_datasets_offline set itself (not the user's)


def _truthy(value: str | None) -> bool:
    return value is not None and value.upper() in ("1", "ON", "YES", "TRUE")


def _offline_from_env() -> tuple[bool, bool]:
    """(datasets offline, hub client offline), by the rules the two libraries apply at import."""
    hub = _truthy(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))
    ds = os.environ.get("HF_DATASETS_OFFLINE")
    return (hub if ds is None else _truthy(ds)), hub


def _sync_datasets_config() -> None:
    # datasets reads the environment once, at import: mirror a later change into its config
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = _offline_from_env()[0]


def set_datasets_offline(data_cfg: DataConfig | None = None) -> None:
    """Keep ``datasets`` and the hub client off the network, for ``data.source=local`` (the default).

    Every file a local run reads is on disk, so a machine without network never waits on a timeout.
    A no-op for ``data.source=hub``. A user's own ``HF_*_OFFLINE`` value is kept.
    """
    if data_cfg is not None and data_cfg.source == "hub":
        return
    for var in _OFFLINE_VARS:
        if var not in os.environ:
            os.environ[var] = "1"
            _forced.add(var)
    _sync_datasets_config()


def user_offline() -> list[str]:
    """The offline variables the user (not archquant) set to a true value: they keep the hub away."""
    return [v for v in (*_OFFLINE_VARS, "TRANSFORMERS_OFFLINE") if v not in _forced and _truthy(os.environ.get(v))]


@contextlib.contextmanager
def hub_online() -> Iterator[None]:
    """Lift archquant's own offline default for the duration (a local run earlier in the process set it)."""
    saved_env = {v: os.environ.pop(v) for v in list(_forced) if v in os.environ}
    saved_attrs = []
    ds_off, hub_off = _offline_from_env()
    for module, names, value in (("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"), ds_off), ("huggingface_hub.constants", ("HF_HUB_OFFLINE",), hub_off)):
        mod = sys.modules.get(module)
        if saved_env and mod is not None:
            for name in names:
                saved_attrs.append((mod, name, getattr(mod, name)))
                setattr(mod, name, value)
    try:
        yield
    finally:
        os.environ.update(saved_env)
        for mod, name, value in saved_attrs:
            setattr(mod, name, value)


def read_hub(spec: HubFile):
    """The split's rows, as ``datasets.load_dataset`` gives them (downloaded once, then its cache).

    Raises:
        HubUnavailableError: the Hub could not be read (the reason is in the message).
    """
    import datasets

    with hub_online():
        try:
            return datasets.load_dataset(spec.dataset, spec.config, split=spec.split, cache_dir=str(cache_dir() / "datasets"))
        except Exception as err:  # no network, offline mode, a moved dataset: datasets raises many types
            raise HubUnavailableError(f"{spec.dataset} ({spec.config or 'default'}, split {spec.split}): {type(err).__name__}: {err}") from err


def hub_content(rel: str) -> str:
    """The text of the local file ``rel`` (a ``HUB_FILES`` name), made from the hub."""
    spec = HUB_FILES[rel]
    hub_rows = read_hub(spec)
    if spec.task is None:
        return local_text(hub_rows)
    return jsonl(spec.task, local_rows(spec, hub_rows))


def write_hub_file(rel: str, root: str | Path) -> Path:
    """Write ``root/rel`` from the hub (atomically: concurrent runs never read half a file)."""
    path = Path(root) / rel
    atomic_write_text(path, hub_content(rel))
    return path
