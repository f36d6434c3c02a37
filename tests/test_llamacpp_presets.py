"""llama-quantize presets: made by llama.cpp's own quantiser, cached, checked names, per-tensor mixes kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("llama_cpp")

from archquant.engine.gguf_reader import read_header  # noqa: E402
from archquant.engine.presets import DEFAULT_PRESETS, PresetError, check_presets, preset_files  # noqa: E402
from archquant.models.registry import load_model  # noqa: E402

pytestmark = pytest.mark.llamacpp


def _types(path):
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def tiny():
    # hidden 256: rows of 256 let the K-quants store the attention / MLP inputs
    return load_model("tiny-llama", tiny_overrides={"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512,
                                                     "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32})


def test_presets_are_llama_quantize_files_and_are_reused(tiny, tmp_path):
    model, tok = tiny
    logs = []
    files = preset_files(model, tmp_path, ["Q8_0", "q4_k_m", "Q4_0"], tokenizer=tok, log=logs.append)
    assert set(files) == {"Q8_0", "Q4_K_M", "Q4_0"} and len(logs) == 3
    t8, t4 = _types(files["Q8_0"]), _types(files["Q4_0"])
    assert t8["blk.0.attn_q.weight"] == "Q8_0" and t4["blk.0.ffn_up.weight"] == "Q4_0"
    tkm = _types(files["Q4_K_M"])
    assert tkm["blk.0.attn_q.weight"] == "Q4_K"
    assert "Q6_K" in set(tkm.values())  # the preset's mix: some tensors one step up, as llama-quantize does
    fields, tensors = read_header(files["Q4_0"])
    assert "general.architecture" in fields and len(tensors) == len(t4)
    mtimes = {k: p.stat().st_mtime_ns for k, p in files.items()}
    again = preset_files(model, tmp_path, ["Q8_0", "Q4_K_M", "Q4_0"], tokenizer=tok, log=logs.append)
    assert len(logs) == 3 and {k: p.stat().st_mtime_ns for k, p in again.items()} == mtimes
    # other weights under the same folder (a model of the same name, changed): made afresh, not reused
    other = load_model("tiny-llama", seed=1, tiny_overrides={"num_hidden_layers": 2, "hidden_size": 256,
                                                             "intermediate_size": 512, "num_attention_heads": 8,
                                                             "num_key_value_heads": 4, "head_dim": 32})[0]
    preset_files(other, tmp_path, ["Q4_0"], tokenizer=tok, log=logs.append)
    assert len(logs) == 4 and not files["Q8_0"].exists()  # the old source's presets are gone


def test_preset_names_are_checked_before_any_work(tiny, tmp_path):
    assert check_presets(["Original", "q5_k_m", "Q5_K_M"]) == ["original", "Q5_K_M"]
    assert check_presets(DEFAULT_PRESETS) == list(DEFAULT_PRESETS)
    with pytest.raises(PresetError, match=r"'Q4_K_X'.*not a llama-quantize preset.*Q4_K_M"):
        check_presets(["Q4_K_X"])
    with pytest.raises(PresetError, match="drop 'original'"):
        preset_files(tiny[0], tmp_path, ["original"], tokenizer=tiny[1])
    assert not any(tmp_path.iterdir()) or not list(tmp_path.glob("*.gguf"))


def test_presets_join_the_front_evaluated_and_timed_and_a_picked_one_exports_as_written(tmp_path):
    import json

    from _tiny import TINY_OVERRIDES, compose_config

    from archquant.commands.pareto import pareto_job
    from archquant.commands.run import distill_and_export
    from archquant.commands.session import Session

    baseline = tmp_path / "baseline.json"  # a front needs a source of points; this one adds no model
    baseline.write_text(json.dumps({"points": [{"name": "elsewhere", "measured_ms": 1.0, "ppl": 1e9}]}))
    cfg = compose_config(TINY_OVERRIDES + ["latency.backend=llamacpp", "pareto.presets=[Q8_0,Q4_0]",
                                           f"pareto.baselines=[{baseline}]", "pareto.timing_rounds=1",
                                           "pareto.timing_max_rounds=1"], tmp_path)
    session = Session.load(cfg)
    points, front = pareto_job(cfg, session=session)
    by = {p.name: p for p in points}
    for name in ("preset-Q8_0", "preset-Q4_0"):
        p = by[name]
        assert p.source == "preset" and p.measured_ms > 0 and 1 < p.ppl < 1e6
        assert p.memory_mb == Path(p.extra["gguf"]).stat().st_size / 1e6
    assert by["preset-Q4_0"].memory_mb < by["preset-Q8_0"].memory_mb
    saved = json.loads((tmp_path / "pareto.json").read_text())
    assert {"preset-Q8_0", "preset-Q4_0"} <= {p["name"] for p in saved["points"]}
    assert (tmp_path / "pareto.png").stat().st_size > 0
    # quality is cached beside the file: a second front re-times but does not re-score
    cached = Path(by["preset-Q4_0"].extra["gguf"]).with_suffix(".point.json")
    assert json.loads(cached.read_text())["values"]["ppl"] == by["preset-Q4_0"].ppl

    notes, model = distill_and_export(cfg, session, tmp_path / "run", by["preset-Q4_0"])
    exported = tmp_path / "run" / cfg.export.out / "model.gguf"
    assert notes["export"].startswith("done") and notes["distill"].startswith("skipped")
    assert exported.read_bytes() == Path(by["preset-Q4_0"].extra["gguf"]).read_bytes()
    assert (exported.parent / "manifest.json").exists()
    logits = model(torch.randint(0, 200, (1, 8)))
    assert logits.shape[-1] == 259 and torch.isfinite(logits).all()
    model.runner.close()
