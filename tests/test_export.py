"""Export folder: bit-exact round trip, manifest tamper detection, atomic writes, clear errors, remote code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _tiny import tiny_space, token_ids
from safetensors import safe_open

from archquant.core.arch import ArchError
from archquant.export.packed import ExportFormatError, load, load_tokenizer, pack_model, read_record, save
from archquant.models.registry import load_model
from archquant.supernet import Arch, build, materialize
from archquant.utils.manifest import ManifestError, write_manifest

VOCAB = 259  # the registry's tiny-llama (byte tokenizer)


@pytest.fixture(scope="module")
def base():
    model, tok = load_model("tiny-llama")
    sn = build(model, tiny_space(), backend="torch")
    return sn, tok


def _hetero_arch(sn) -> Arch:
    """Layers of different shapes and bits, 8-bit activations in one layer, a 4-bit untied lm_head."""
    gates = sn.space.gates()
    choice = {n: v[0] for n, v in gates.items()}
    choice.update({"layers.0.kv_groups": gates["layers.0.kv_groups"][-1], "layers.1.mlp": gates["layers.1.mlp"][-1],
                   "layers.0.wbits.qkv": 4, "layers.0.wbits.down": 8, "layers.1.wbits.gate_up": 4,
                   "layers.1.abits": 8, "lm_head.wbits": 4})
    return Arch.from_choices(sn.space, choice)


def _uniform_arch(sn, abits: int = 16) -> Arch:
    """Every block at full shape (a stock Llama), mixed per-layer bits, tied 16-bit lm_head."""
    gates = sn.space.gates()
    choice = {n: v[0] for n, v in gates.items()}
    choice.update({"layers.0.wbits.qkv": 4, "layers.0.wbits.o": 8, "layers.1.wbits.gate_up": 4,
                   "layers.1.wbits.down": 4, "layers.1.abits": abits})
    return Arch.from_choices(sn.space, choice)


@pytest.fixture(scope="module")
def exported(base, tmp_path_factory):
    sn, tok = base
    arch = _hetero_arch(sn)
    sub = materialize(sn, arch)
    path = tmp_path_factory.mktemp("exp") / "export"
    res = save(sub, arch, path, tokenizer=tok, record={"predicted_ms": 1.5}, paths=("dense",),
               formats=("packed", "compressed_tensors"))
    return sub, arch, res, path


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("which", ["hetero", "uniform_tied"])
def test_round_trip_is_bit_exact(base, tmp_path, which):
    sn, tok = base
    arch = _hetero_arch(sn) if which == "hetero" else _uniform_arch(sn)
    sub = materialize(sn, arch)
    res = save(sub, arch, tmp_path / "out", tokenizer=tok, paths=("dense",))
    loaded = load(tmp_path / "out", paths=("dense",))
    ids = token_ids(2, 24, vocab=VOCAB)
    assert torch.equal(_logits(res.packed_model, ids), _logits(loaded, ids))
    if which == "uniform_tied":  # the 16-bit head keeps reading the embedding, stored once
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert not any(k.startswith("lm_head.") for k in safe_open(str(tmp_path / "out" / "model.safetensors"), "pt").keys())
    else:
        assert int(loaded.lm_head.qmeta[1]) == 4


def test_packed_model_computes_what_the_fake_quant_subnet_computes(base):
    sn, _ = base
    sub = materialize(sn, _hetero_arch(sn))
    packed = pack_model(sub, float_dtype="float32", paths=("dense",))
    ids = token_ids(2, 24, vocab=VOCAB)
    ref = _logits(sub, ids)
    # same quantiser, same integers; fake-quant adds (Q(w) - w) to w, which can differ from Q(w) by 1 ulp
    assert (_logits(packed, ids) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_folder_holds_the_design_files_and_record(exported):
    _, arch, res, path = exported
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "archquant.json", "manifest.json", "modeling_archquant.py",
            "tokenizer.json"} <= names
    rec = read_record(path)
    assert rec["arch"] == arch.to_dict() and rec["record"]["predicted_ms"] == 1.5
    assert rec["formats"]["compressed_tensors"]["written"] is False
    assert "blocks differ in shape" in rec["stacks"]["vLLM / compressed-tensors"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quant"]["layers"][1]["abits"] == 8 and cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_archquant.")
    head = open(path / "model.safetensors", "rb").read(8)
    assert int.from_bytes(head, "little") > 0  # a safetensors header, not a pickle


@pytest.fixture
def copy(exported, tmp_path) -> Path:
    """A copy of the exported folder, to damage."""
    shutil.copytree(exported[3], tmp_path / "copy")
    return tmp_path / "copy"


def test_tampered_file_is_detected(copy):
    blob = bytearray((copy / "model.safetensors").read_bytes())
    blob[-1] ^= 0x01
    (copy / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ManifestError, match="model.safetensors: sha256 differs"):
        load(copy)


def test_missing_file_is_named(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(ExportFormatError, match="missing model.safetensors"):
        load(copy)
    (copy / "config.json").write_text("{}")
    with pytest.raises(ExportFormatError, match="missing model.safetensors"):
        load(copy)


def test_newer_format_version_is_refused(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["archquant_export"]["format_version"] = 99
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ManifestError, match="config.json"):
        load(copy)  # an edited file fails the manifest first
    write_manifest(copy)  # as a newer archquant would have written it
    with pytest.raises(ExportFormatError, match="format version 99, newer than this archquant reads"):
        load(copy)


def test_failed_export_leaves_no_folder(base, tmp_path, monkeypatch):
    from archquant.export import packed

    sn, tok = base
    arch = _hetero_arch(sn)
    sub = materialize(sn, arch)

    def boom(folder):
        raise RuntimeError("disk full")

    monkeypatch.setattr(packed, "write_manifest", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save(sub, arch, tmp_path / "out", tokenizer=tok)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one


def test_existing_folder_and_foreign_arch_are_refused(exported, base, tmp_path):
    sub, arch, _, path = exported
    with pytest.raises(FileExistsError, match="export.overwrite=true"):
        save(sub, arch, path)
    other = Arch.from_dict(arch.to_dict())
    other.fingerprint["hidden_size"] = 576
    with pytest.raises(ArchError, match="hidden_size: arch has 576, model has 128"):
        save(sub, other, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("abits", [16, 8])
def test_compressed_tensors_uniform_export_loads_back_through_the_library(base, tmp_path, abits):
    from archquant.export.compressed import load_compressed_tensors
    from archquant.quant.reference import fake_quant_weight

    sn, tok = base
    arch = _uniform_arch(sn, abits=abits)
    sub = materialize(sn, arch)
    res = save(sub, arch, tmp_path / "out", tokenizer=tok, formats=("packed", "compressed_tensors"),
               float_dtype="float32", paths=("dense",))
    ct = tmp_path / "out" / "compressed-tensors"
    assert res.formats["compressed_tensors"]["written"]
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    # 8-bit activations on 16-bit weights form an activation-only (dense) group: the config is mixed
    assert qc["format"] == ("pack-quantized" if abits == 16 else "mixed-precision")
    bits = sorted({g["weights"]["num_bits"] for g in qc["config_groups"].values() if g["weights"]})
    assert bits == [4, 8]
    model = load_compressed_tensors(ct)
    # the library's dequantised weights are the reference quantiser's, bit for bit
    for i, la in enumerate(arch.layers):
        for lin, sub_path in (("q", "self_attn.q_proj"), ("o", "self_attn.o_proj"), ("down", "mlp.down_proj")):
            w = sub.model.layers[i].get_submodule(sub_path).weight
            assert torch.equal(model.model.layers[i].get_submodule(sub_path).weight,
                               fake_quant_weight(w, la.wbits[lin], arch.group_size))
    ids = token_ids(2, 24, vocab=VOCAB)
    ref = _logits(res.packed_model, ids)
    err = (_logits(model, ids) - ref).abs().max() / ref.abs().max()
    # 16-bit activations: only fp32 summation order differs. 8-bit: compressed-tensors' per-token scale is
    # max|x| / 127.5 (the reference: / 127), which moves some codes by one step.
    assert err < (1e-5 if abits == 16 else 2e-2), err


_REMOTE = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "archquant" or name.startswith("archquant."):
                raise ImportError("archquant is blocked in this process")
    sys.meta_path.insert(0, _Block())
    import torch
    from transformers import AutoModelForCausalLM
    ids = torch.load(sys.argv[1])
    for folder, out in zip(sys.argv[2::2], sys.argv[3::2]):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, out)
    assert not [m for m in sys.modules if m.split(".")[0] == "archquant"], "archquant was imported"
    """
)


def test_trust_remote_code_loads_from_the_folder_alone(exported, base, tmp_path):
    """The generated model code runs in a process where archquant cannot be imported (hetero and tied exports)."""
    _, _, res, path = exported
    sn, tok = base
    tied = tmp_path / "tied"
    save(materialize(sn, _uniform_arch(sn)), _uniform_arch(sn), tied, tokenizer=tok, paths=("dense",))
    folders = [tmp_path / "moved", tmp_path / "tied_moved"]
    for src, dst in zip((path, tied), folders):
        shutil.copytree(src, dst)  # only the folder: no archquant, no source tree beside it
    script = tmp_path / "remote.py"
    script.write_text(_REMOTE)
    ids = token_ids(2, 24, vocab=VOCAB)
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    args = [str(a) for f in folders for a in (f, f.with_suffix(".pt"))]
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ids.pt"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MISSING" not in proc.stderr and "UNEXPECTED" not in proc.stderr, proc.stderr[-3000:]  # every key fits
    for src, dst in zip((path, tied), folders):
        assert torch.equal(torch.load(dst.with_suffix(".pt")), _logits(load(src, paths=("dense",)), ids)), src.name


def test_generate_and_eval_accept_an_export_folder(exported):
    from archquant.commands.generate import generate_text
    from archquant.commands.session import load_by_name

    _, _, res, path = exported
    model, tok = load_by_name(str(path))
    text = generate_text(model, tok, "Hello", 6)
    assert text == generate_text(load(path), load_tokenizer(path), "Hello", 6)
    m2, t2 = load_by_name(str(path), dtype="bfloat16")
    assert type(m2).__name__ == "ArchQuantForCausalLM" and t2 is not None
