"""Data loaders: path resolution and its errors, cached disjoint calibration blocks, benchmark schemas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from archquant.data import (
    DataConfig,
    DataFileNotFoundError,
    DataFormatError,
    calibration_blocks,
    load_benchmark,
    resolve_data_path,
    token_stream,
)
from archquant.data import calibration as calib_mod
from archquant.data.calibration import split_block_indices, strip_gutenberg
from archquant.models.tokenizers import byte_tokenizer

GUTENBERG = (
    "The Project Gutenberg EBook of Something, licence blah\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\n"
    "{body}\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\n"
    "End of the Project Gutenberg licence text.\n"
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHQUANT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def book(tmp_path):
    # distinct, position-revealing text: every block of bytes is unique
    body = " ".join(f"w{i:05d}" for i in range(3000))
    path = tmp_path / "book.txt"
    path.write_text(GUTENBERG.format(body=body), encoding="utf-8")
    return path, body


# ---------------------------------------------------------------- paths


def test_default_files_resolve_under_the_shared_root():
    cfg = DataConfig()
    for key in ("calib_file", "ppl_file", *(f"task_files.{t}" for t in cfg.task_files)):
        assert resolve_data_path(cfg, key).is_file()


def test_missing_file_names_the_key_and_the_root(tmp_path):
    cfg = DataConfig(root=str(tmp_path))
    with pytest.raises(DataFileNotFoundError) as err:
        resolve_data_path(cfg, "task_files.piqa")
    msg = str(err.value)
    assert "data.task_files.piqa" in msg and "data.root" in msg and str(tmp_path / "piqa/validation.jsonl") in msg


def test_env_var_sets_the_root(tmp_path, monkeypatch):
    (tmp_path / "wikitext2_raw").mkdir()
    (tmp_path / "wikitext2_raw" / "test.txt").write_text("hello\n")
    monkeypatch.setenv("ARCHQUANT_DATA", str(tmp_path))
    assert resolve_data_path(DataConfig(), "ppl_file") == (tmp_path / "wikitext2_raw" / "test.txt").resolve()
    with pytest.raises(DataFileNotFoundError, match=r"\$ARCHQUANT_DATA"):
        resolve_data_path(DataConfig(), "calib_file")


def test_null_calib_file_takes_the_first_corpus_under_the_root(tmp_path):
    cfg = DataConfig(root=str(tmp_path))
    with pytest.raises(DataFileNotFoundError, match="gutenberg_war_and_peace/train.txt or wikitext2_raw/train.txt"):
        resolve_data_path(cfg, "calib_file")
    for rel in ("wikitext2_raw/train.txt", "gutenberg_war_and_peace/train.txt"):  # a pulled folder, then the novel too
        (tmp_path / rel).parent.mkdir()
        (tmp_path / rel).write_text("text\n")
        assert resolve_data_path(cfg, "calib_file") == (tmp_path / rel).resolve()
    assert resolve_data_path(DataConfig(), "calib_file").parent.name == "gutenberg_war_and_peace"  # the shared data


def test_absolute_override_and_partial_task_override(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text("{}\n")
    cfg = DataConfig(task_files={"piqa": str(f)})
    assert resolve_data_path(cfg, "task_files.piqa") == f.resolve()
    assert cfg.task_files["boolq"] == "boolq/validation.jsonl"  # the other defaults survive
    with pytest.raises(ValueError, match="data.task_files has unknown task"):
        DataConfig(task_files={"sqaud": "x"})


# ---------------------------------------------------------------- calibration blocks


def test_strip_gutenberg_keeps_only_the_book():
    text = strip_gutenberg(GUTENBERG.format(body="Well, Prince, so Genoa and Lucca"))
    assert text == "Well, Prince, so Genoa and Lucca\n"
    assert strip_gutenberg("no markers here") == "no markers here\n"


def test_blocks_are_disjoint_slices_of_the_book(cache, book):
    path, body = book
    tok = byte_tokenizer()
    cfg = DataConfig(calib_file=str(path), seq_len=64, num_calib_blocks=40, num_val_blocks=8, val_fraction=0.2)
    cal = calibration_blocks(tok, cfg, "calib")
    val = calibration_blocks(tok, cfg, "val")
    assert cal.shape == (40, 64) and val.shape == (8, 64) and cal.dtype == torch.long
    stream = token_stream(tok, path, gutenberg=True)
    assert tok.decode(stream.tolist()).strip() == body  # header and licence are gone
    blocks = stream[: stream.numel() // 64 * 64].view(-1, 64)

    def index_of(b):
        hits = (blocks == b).all(dim=1).nonzero().flatten().tolist()
        assert len(hits) == 1
        return hits[0]

    ci, vi = {index_of(b) for b in cal}, {index_of(b) for b in val}
    assert len(ci) == 40 and len(vi) == 8 and not ci & vi
    assert min(vi) > max(ci)  # validation comes from the held-out tail of the text
    assert max(ci) > 40  # the calibration draw spreads over the book, not its first 40 blocks


def test_blocks_are_cached_and_keyed_by_content(cache, book, monkeypatch):
    path, _ = book
    tok = byte_tokenizer()
    cfg = DataConfig(calib_file=str(path), seq_len=32, num_calib_blocks=10, num_val_blocks=4)
    first = calibration_blocks(tok, cfg)
    assert list((cache / "tokens").rglob("blocks-calib-L32-*.pt"))

    def boom(*a, **k):
        raise AssertionError("re-tokenised despite the cache")

    monkeypatch.setattr(calib_mod, "token_stream", boom)
    assert torch.equal(calibration_blocks(tok, cfg), first)
    monkeypatch.undo()
    monkeypatch.setenv("ARCHQUANT_CACHE", str(cache))
    path.write_text(GUTENBERG.format(body=" ".join(f"z{i:05d}" for i in range(3000))), encoding="utf-8")
    assert not torch.equal(calibration_blocks(tok, cfg), first)  # new file hash -> new cache entry


def test_too_many_blocks_names_the_key(cache, book):
    path, _ = book
    cfg = DataConfig(calib_file=str(path), seq_len=1024, num_calib_blocks=100)
    with pytest.raises(ValueError, match="data.num_calib_blocks=100"):
        calibration_blocks(byte_tokenizer(), cfg)


def test_split_indices_do_not_depend_on_the_other_split_count():
    a = split_block_indices(100, 20, "calib", val_fraction=0.1, seed=0)
    assert all(i < 90 for i in a) and len(set(a)) == 20 and a == sorted(a)
    assert split_block_indices(100, 5, "val", val_fraction=0.1, seed=0) != split_block_indices(100, 5, "val", val_fraction=0.1, seed=1)


# ---------------------------------------------------------------- benchmark files

EXPECTED_ROWS = {"boolq": 3270, "piqa": 1838, "hellaswag": 50, "winogrande": 50, "arc_easy": 2376, "arc_challenge": 1172, "mmlu": 50}


@pytest.mark.parametrize("task", sorted(EXPECTED_ROWS))
def test_every_default_benchmark_loads(task):
    ds = load_benchmark(task)
    assert len(ds) == EXPECTED_ROWS[task]
    assert len(load_benchmark(task, limit=7)) == 7


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_missing_field_names_file_row_and_field(tmp_path):
    rows = [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, {"goal": "g", "sol1": "a", "label": 1}]
    f = _write_jsonl(tmp_path / "piqa.jsonl", rows)
    with pytest.raises(DataFormatError) as err:
        load_benchmark("piqa", DataConfig(task_files={"piqa": str(f)}))
    msg = str(err.value)
    assert str(f) in msg and "row 1" in msg and "'sol2'" in msg and "data.task_files.piqa" in msg


def test_bad_arc_answer_key_and_bad_json(tmp_path):
    row = {"id": "x", "question": {"stem": "s", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]}, "answerKey": "C"}
    f = _write_jsonl(tmp_path / "arc.jsonl", [row])
    with pytest.raises(DataFormatError, match="answerKey 'C'"):
        load_benchmark("arc_easy", DataConfig(task_files={"arc_easy": str(f)}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"goal": "g", "sol1": \n')
    with pytest.raises(DataFormatError, match="JSON lines"):
        load_benchmark("piqa", DataConfig(task_files={"piqa": str(bad)}))


def test_bad_limit_and_task():
    with pytest.raises(ValueError, match="eval.limit must be > 0"):
        load_benchmark("piqa", limit=0)
    with pytest.raises(ValueError, match="unknown task 'piqaa'"):
        load_benchmark("piqaa")


def test_the_default_data_root_is_beside_the_checkout_whatever_the_working_folder(tmp_path, monkeypatch):
    import archquant
    from archquant.utils.paths import DATA_ENV, default_data_root

    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    checkout = Path(archquant.__file__).resolve().parents[1]
    beside, inside = checkout.parent / "shared" / "data", checkout / "shared" / "data"
    expected = beside if beside.is_dir() or not inside.is_dir() else inside
    assert default_data_root() == expected
