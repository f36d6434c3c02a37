"""scripts/bench_llamacpp.py's choice of points: a front filtered by name, and kept exports named by their file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

SCRIPT = "bench_llamacpp"


@pytest.fixture(scope="module")
def bench(script):
    return script


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"pareto": None, "points": None, "archs": None, "exports": None, **kw})


def _pareto(tmp_path: Path) -> Path:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model.gguf").write_bytes(b"x")
    points = [{"name": "search@9ms", "export_dir": "a"},
              {"name": "uniform-w4", "export_dir": "a"},
              {"name": "full", "source": "full"}]
    path = tmp_path / "pareto.json"
    path.write_text(json.dumps({"points": points}))
    return path


def test_points_filter_keeps_only_the_named(bench, tmp_path):
    path = _pareto(tmp_path)
    assert [p["name"] for p in bench._load_points(_args(pareto=str(path)))] == ["search@9ms", "uniform-w4", "full"]
    picked = bench._load_points(_args(pareto=str(path), points=["full", "search@9ms"]))
    assert [p["name"] for p in picked] == ["search@9ms", "full"]
    assert picked[0]["gguf"] == tmp_path / "a" / "model.gguf" and picked[1]["arch"] == "full"


def test_unknown_point_name_fails_naming_it(bench, tmp_path):
    with pytest.raises(SystemExit, match=r"\['nope'\] are not in"):
        bench._load_points(_args(pareto=str(_pareto(tmp_path)), points=["nope", "full"]))


def test_kept_gguf_export_is_named_by_its_stem(bench, tmp_path):
    gguf = tmp_path / "search@9ms.gguf"
    gguf.write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "model.gguf").write_bytes(b"x")
    points = bench._load_points(_args(exports=[str(gguf), str(tmp_path / "folder")]))
    assert [(p["name"], p["gguf"]) for p in points] == [("search@9ms", gguf),
                                                        ("folder", tmp_path / "folder" / "model.gguf")]


def test_points_without_a_front_fail_naming_pareto(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--points", "full"])
    assert "pass the front with --pareto" in capsys.readouterr().err
