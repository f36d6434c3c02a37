"""data.source=hub and ``archquant-data pull``, with ``datasets.load_dataset`` mocked (no network here).

The fake hub serves rows in the Hugging Face schema of each dataset, built from the shared local
files by the inverse of the documented mapping (ClassLabel ints, ARC's flat question, MMLU's integer
answer, WikiText's blank rows): mapping them back must give the shared files' rows, byte for byte
where the local file is a plain copy of the split.
"""

from __future__ import annotations

import json
import os

import datasets
import datasets.config
import pytest

from archquant.commands import data as data_cmd
from archquant.data import DataConfig, DataFileNotFoundError, data_root, hub, load_benchmark, resolve_data_path
from archquant.data.hub import HUB_FILES, HubFile, derived_hellaswag_text, hub_content, local_rows
from archquant.utils.errors import EXIT_USER_ERROR

SHARED = data_root(DataConfig())


def _local(rel: str) -> list[dict]:
    return [json.loads(line) for line in (SHARED / rel).read_text(encoding="utf-8").splitlines()]


def _hf_arc(r: dict) -> dict:
    q = r["question"]
    return {"id": r["id"], "question": q["stem"], "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}, "answerKey": r["answerKey"]}


def _hf_hellaswag(r: dict) -> dict:
    return {"ind": 0, "activity_label": r["activity_label"], "ctx_a": "", "ctx_b": "", "ctx": r["ctx"], "endings": r["endings"],
            "source_id": "x", "split": "val", "split_type": "indomain", "label": str(r["label"])}


# local row -> the row the hub gives (its schema), per task
TO_HUB = {
    "boolq": lambda r: {"question": r["question"], "passage": r["passage"], "idx": r["idx"], "label": int(r["label"])},
    "piqa": dict,
    "hellaswag": _hf_hellaswag,
    "winogrande": lambda r: {k: r[k] for k in ("sentence", "option1", "option2", "answer")},
    "arc_easy": _hf_arc,
    "arc_challenge": _hf_arc,
    "mmlu": lambda r: {"question": r["question"], "subject": r["subject"], "choices": r["choices"], "answer": "ABCD".index(r["answer"])},
}

# hub file -> the shared file its rows come from (the full splits of the sampled tasks are not shared)
SOURCE_OF = {rel: rel for rel in HUB_FILES if (SHARED / rel).is_file()}
SOURCE_OF.update({
    "hellaswag/validation.jsonl": "hellaswag/validation.sample50.jsonl",
    "winogrande/dev.jsonl": "winogrande/dev.sample50.jsonl",
    "mmlu/test.jsonl": "mmlu/test.sample50.jsonl",
    "wikitext2_raw/train.txt": "wikitext2_raw/test.txt",  # any WikiText text will do
    "wikitext2_raw/validation.txt": "wikitext2_raw/test.txt",
})


def _hub_rows(spec: HubFile, limit: int | None = None) -> list[dict]:
    rel = next(r for r, s in HUB_FILES.items() if s.sample is None and (s.dataset, s.config, s.split) == (spec.dataset, spec.config, spec.split))
    src = SOURCE_OF[rel]
    if spec.task is None:  # WikiText: each line keeps its "\n"; a blank row "" between paragraphs
        lines = (SHARED / src).read_text(encoding="utf-8").splitlines(keepends=True)[:limit]
        return [row for line in lines for row in ({"text": ""}, {"text": line})]
    rows = [TO_HUB[spec.task](r) for r in _local(src)[:limit]]
    if spec.task == "mmlu":  # the hub's "all" split need not list subjects alphabetically
        rows.sort(key=lambda r: r["subject"], reverse=True)
    return rows


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """``datasets.load_dataset`` answering hub ids from the shared files (the hub calls are recorded);
    local files (``json``) still go to the real loader."""
    monkeypatch.setenv("ARCHQUANT_CACHE", str(tmp_path / "cache"))
    calls: list[tuple] = []
    state = {"limit": None, "error": None}
    real = datasets.load_dataset

    def load_dataset(path, name=None, *, split, cache_dir=None, **kw):
        if "/" not in path:  # a packaged builder over local files
            return real(path, name, split=split, cache_dir=cache_dir, **kw)
        calls.append((path, name, split))
        if state["error"] is not None:
            raise state["error"]
        spec = next(s for s in HUB_FILES.values() if (s.dataset, s.config, s.split) == (path, name, split))
        return datasets.Dataset.from_list(_hub_rows(spec, state["limit"]))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return {"calls": calls, "state": state}


# ---------------------------------------------------------------- hub rows -> local rows


@pytest.mark.parametrize("rel", sorted(r for r, s in HUB_FILES.items() if s.sample is None))
def test_hub_rows_become_the_local_rows(rel, fake_hub):
    spec = HUB_FILES[rel]
    text = hub_content(rel)
    shared = (SHARED / SOURCE_OF[rel]).read_text(encoding="utf-8")
    if spec.task == "winogrande":  # the hub has no qID; every field the task reads is the same
        assert [json.loads(line) for line in text.splitlines()] == [{k: v for k, v in r.items() if k != "qID"} for r in _local(SOURCE_OF[rel])]
    else:  # the same bytes: rows, key order, spacing, escaping, final newline
        assert _first_difference(text, shared) is None


def _first_difference(a: str, b: str) -> tuple | None:
    """(line number, line of a, line of b) where two texts first differ (short, unlike pytest's diff of MBs)."""
    if a == b:
        return None
    la, lb = a.splitlines(keepends=True), b.splitlines(keepends=True)
    i = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), min(len(la), len(lb)))
    return i, la[i] if i < len(la) else None, lb[i] if i < len(lb) else None


def test_every_task_and_text_has_a_hub_file():
    cfg = DataConfig()
    assert set(cfg.task_files.values()) | {cfg.ppl_file, "wikitext2_raw/train.txt"} <= set(HUB_FILES)
    assert {s.task for s in HUB_FILES.values()} - {None} == set(cfg.task_files)


def test_hellaswag_text_is_cleaned_as_the_derived_file():
    raw = {"activity_label": "Home and Garden", "label": "2",
           "ctx": "[header] How to clean a sink [title] Rinse the sink. [step] Use warm water.",
           "endings": ["[substeps] Then  dry it. ", "Scrub[title]. Then rinse.", "[title] Wipe it.", "a"]}
    row = local_rows(HUB_FILES["hellaswag/validation.jsonl"], [raw])[0]
    assert row == {"activity_label": "Home and Garden", "ctx": "How to clean a sink. Rinse the sink. Use warm water.", "label": 2,
                   "endings": ["Then dry it.", "Scrub Then rinse.", "Wipe it.", "a"]}
    assert derived_hellaswag_text(row["ctx"]) == row["ctx"]  # clean text is left alone


def test_sample_is_a_seeded_ordered_draw_of_the_split():
    spec = HubFile("d", None, "validation", "piqa", sample=50)
    rows = [{"goal": f"g{i}", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(200)]
    picked = local_rows(spec, rows)
    idx = [int(r["goal"][1:]) for r in picked]
    assert len(idx) == 50 == len(set(idx)) and idx == sorted(idx) and idx[-1] > 50
    assert local_rows(spec, rows) == picked
    assert len(local_rows(spec, rows[:30])) == 30  # a shorter split is kept whole


def test_a_changed_hub_schema_names_the_dataset_and_the_fields():
    with pytest.raises(ValueError, match=r"baber/piqa \(default, validation\) row 0.*'solution'"):
        local_rows(HUB_FILES["piqa/validation.jsonl"], [{"goal": "g", "solution": "x", "label": 0}])


# ---------------------------------------------------------------- data.source=hub


def test_source_hub_writes_the_file_once_and_the_loader_reads_it(fake_hub, tmp_path):
    cfg = DataConfig(source="hub")
    rows = load_benchmark("arc_challenge", cfg)
    assert data_root(cfg) == tmp_path / "cache" / "hub_data"
    assert list(rows) == _local("arc_challenge/test.jsonl")
    assert fake_hub["calls"] == [("allenai/ai2_arc", "ARC-Challenge", "test")]
    load_benchmark("arc_challenge", cfg, limit=3)
    assert len(fake_hub["calls"]) == 1  # the written file is the cache
    calib = resolve_data_path(cfg, "calib_file")  # null: the hub's corpus, WikiText-2 raw train
    assert calib == (tmp_path / "cache" / "hub_data" / "wikitext2_raw" / "train.txt").resolve()
    assert fake_hub["calls"][-1] == ("Salesforce/wikitext", "wikitext-2-raw-v1", "train")


def test_source_hub_refuses_a_name_it_does_not_provide(fake_hub):
    with pytest.raises(DataFileNotFoundError, match="data.task_files.piqa: piqa/mine.jsonl is not a file the Hub provides"):
        resolve_data_path(DataConfig(source="hub", task_files={"piqa": "piqa/mine.jsonl"}), "task_files.piqa")


def test_source_must_be_local_or_hub():
    with pytest.raises(ValueError, match=r"data\.source must be one of \['local', 'hub'\], got 'web'"):
        DataConfig(source="web")


# ---------------------------------------------------------------- neither local files nor the hub


def test_missing_local_file_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHQUANT_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataFileNotFoundError) as err:
        resolve_data_path(DataConfig(), "task_files.boolq")
    msg = str(err.value)
    for way in ("data.task_files.boolq", "data.root", "$ARCHQUANT_DATA", "data.source=hub", "archquant-data pull <dir>"):
        assert way in msg, way


def test_unreachable_hub_names_both_ways(fake_hub):
    fake_hub["state"]["error"] = ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub")
    with pytest.raises(DataFileNotFoundError) as err:
        resolve_data_path(DataConfig(source="hub"), "task_files.arc_easy")
    msg = str(err.value)
    for part in ("data.task_files.arc_easy", "Couldn't reach", "data.source=local", "data.root=<dir>", "$ARCHQUANT_DATA", "archquant-data pull <dir>"):
        assert part in msg, part
    assert "HF_HUB_OFFLINE" in msg  # set by the user (here: conftest), it is named as the likely cause


# ---------------------------------------------------------------- offline policy


@pytest.fixture
def clean_offline(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "_forced", set())
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)


def test_offline_applies_to_local_only_and_hub_reads_lift_it(clean_offline, monkeypatch):
    hub.set_datasets_offline(DataConfig(source="hub"))
    assert "HF_HUB_OFFLINE" not in os.environ and not datasets.config.HF_HUB_OFFLINE
    hub.set_datasets_offline(DataConfig())
    assert os.environ["HF_HUB_OFFLINE"] == "1" and datasets.config.HF_HUB_OFFLINE  # the imported module too
    with hub.hub_online():
        assert "HF_HUB_OFFLINE" not in os.environ and not datasets.config.HF_HUB_OFFLINE
    assert os.environ["HF_HUB_OFFLINE"] == "1" and datasets.config.HF_HUB_OFFLINE
    assert hub.user_offline() == []


def test_a_users_offline_setting_stays(clean_offline, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.set_datasets_offline()
    with hub.hub_online():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and datasets.config.HF_DATASETS_OFFLINE
    assert hub.user_offline() == ["HF_HUB_OFFLINE"]


# ---------------------------------------------------------------- archquant-data pull


def test_pull_writes_the_local_layout_that_reads_back_offline(fake_hub, tmp_path):
    fake_hub["state"]["limit"] = 120  # rows per split: a quick test
    out = tmp_path / "pulled"
    manifest = data_cmd.pull(out, log=lambda _: None)
    cfg = DataConfig(root=str(out))
    for task, rel in cfg.task_files.items():  # the default names, read by the local loader
        spec = HUB_FILES[rel]
        assert list(load_benchmark(task, cfg)) == local_rows(spec, _hub_rows(spec, 120)), task
        assert manifest["files"][rel]["dataset"] == spec.dataset and manifest["files"][rel]["sha256"]
    assert len(load_benchmark("hellaswag", cfg)) == 50 and (out / "hellaswag" / "validation.jsonl").is_file()
    assert resolve_data_path(cfg, "calib_file") == (out / "wikitext2_raw" / "train.txt").resolve()
    assert resolve_data_path(cfg, "ppl_file").read_text() == hub_content("wikitext2_raw/test.txt")
    assert json.loads((out / data_cmd.MANIFEST).read_text())["files"].keys() == set(data_cmd.pull_files())
    fake_hub["state"]["error"] = ConnectionError("offline")
    calls = len(fake_hub["calls"])
    data_cmd.pull(out, log=lambda _: None)  # files already there are kept: no hub call
    assert len(fake_hub["calls"]) == calls


def test_pull_cli(fake_hub, tmp_path, capsys):
    assert data_cmd.main(["pull", str(tmp_path / "d"), "--tasks", "piqa"]) == 0
    assert sorted(p.relative_to(tmp_path / "d").as_posix() for p in (tmp_path / "d").rglob("*.*")) == [
        "hub_sources.json", "piqa/validation.jsonl", "wikitext2_raw/test.txt", "wikitext2_raw/train.txt"]
    assert f"data.root={tmp_path / 'd'}" in capsys.readouterr().out
    fake_hub["state"]["error"] = ConnectionError("Couldn't reach the Hub")
    assert data_cmd.main(["pull", str(tmp_path / "e"), "--tasks", "boolq"]) == EXIT_USER_ERROR
    assert "Couldn't reach the Hub" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        data_cmd.main(["pull", str(tmp_path / "e"), "--tasks", "squad"])


def test_pull_files_cover_each_task_its_full_split_and_the_texts():
    files = data_cmd.pull_files(["mmlu"])
    assert files == ["mmlu/test.jsonl", "mmlu/test.sample50.jsonl", "wikitext2_raw/test.txt", "wikitext2_raw/train.txt"]
    with pytest.raises(ValueError, match="--tasks has unknown task"):
        data_cmd.pull_files(["squad"])
