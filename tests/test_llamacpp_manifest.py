"""llama.cpp serves the GGUF of an export folder only when it matches the folder's manifest.

A flipped byte in tensor data loads and runs silently in llama.cpp (it reads no checksum), and a
truncated file fails deep inside it; the runner checks ``manifest.json`` first and names the file.
"""

from __future__ import annotations

import shutil

import pytest
from _tiny import tiny_space

from archquant.export.packed import save
from archquant.models.registry import load_model
from archquant.supernet import Arch, build, materialize
from archquant.utils.manifest import ManifestError, verify_file


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny model's export folder with ``model.gguf`` (mixed 4/8/16-bit linears) and its manifest."""
    model, tok = load_model("tiny-llama", tiny_overrides={"num_hidden_layers": 2})
    sn = build(model, tiny_space(), backend="llamacpp")
    arch = Arch.from_choices(sn.space, {"layers.0.wbits.qkv": 4, "layers.1.wbits.down": 8})
    path = tmp_path_factory.mktemp("exp") / "export"
    save(materialize(sn, arch), arch, path, tokenizer=tok, formats=("packed", "gguf"), paths=("dense",))
    return path


@pytest.fixture
def copy(folder, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


def _flip_last_byte(path):
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x01  # inside the last tensor's data: the header still parses
    path.write_bytes(bytes(blob))


def test_the_export_folder_lists_its_gguf(folder):
    assert verify_file(folder / "model.gguf") is True


def test_a_file_outside_an_export_folder_is_not_checked(copy):
    (copy / "manifest.json").unlink()
    _flip_last_byte(copy / "model.gguf")
    assert verify_file(copy / "model.gguf") is False


def test_a_modified_or_truncated_file_is_refused_by_name(copy):
    gguf = copy / "model.gguf"
    good = gguf.read_bytes()
    _flip_last_byte(gguf)
    with pytest.raises(ManifestError, match=r"model\.gguf: sha256 differs from the manifest"):
        verify_file(gguf)
    gguf.write_bytes(good[:-100])
    with pytest.raises(ManifestError, match=rf"model\.gguf: {len(good) - 100} bytes, manifest says {len(good)}"):
        verify_file(gguf)
    shutil.copyfile(copy / "model.gguf", copy / "other.gguf")
    with pytest.raises(ManifestError, match=r"other\.gguf: not in the manifest"):
        verify_file(copy / "other.gguf")


@pytest.mark.llamacpp
def test_runner_and_generate_refuse_a_modified_or_truncated_gguf(folder, copy):
    pytest.importorskip("llama_cpp")
    from archquant.engine.llamacpp import LlamaCppRunner, generate

    with LlamaCppRunner(folder / "model.gguf", n_ctx=32) as runner:  # untouched: it loads and runs
        assert runner.logits([1, 2, 3]).shape == (3, 259)
    gguf = copy / "model.gguf"
    good = gguf.read_bytes()
    _flip_last_byte(gguf)
    with pytest.raises(ManifestError, match=r"model\.gguf: sha256 differs"):
        LlamaCppRunner(gguf, n_ctx=32)
    with pytest.raises(ManifestError, match=r"model\.gguf: sha256 differs"):
        generate(gguf, "ab", max_new_tokens=2, n_ctx=32)
    with LlamaCppRunner(gguf, n_ctx=32, verify=False) as runner:  # llama.cpp itself would serve the changed bytes
        assert runner.logits([1, 2, 3]).shape == (3, 259)
    gguf.write_bytes(good[: len(good) // 2])
    with pytest.raises(ManifestError, match=r"model\.gguf: \d+ bytes, manifest says"):
        LlamaCppRunner(gguf, n_ctx=32)


def _command_error(capsys, verb: str, cfg) -> str:
    """Run a command's verb as ``archquant-<verb>`` does; return its one-line message (exit code 2)."""
    from archquant.cli import run_verb
    from archquant.utils.errors import EXIT_USER_ERROR

    with pytest.raises(SystemExit) as err:
        run_verb(verb, cfg)
    assert err.value.code == EXIT_USER_ERROR
    text = capsys.readouterr().err
    assert "Traceback" not in text
    return text.strip().splitlines()[-1]


@pytest.mark.llamacpp
@pytest.mark.parametrize("engine, damaged", [("llamacpp", "model.gguf"), ("auto", "model.gguf"),
                                             ("torch", "model.safetensors")])
def test_archquant_generate_refuses_a_damaged_export_with_every_engine(copy, capsys, engine, damaged):
    pytest.importorskip("llama_cpp")
    from archquant.config import Config
    from archquant.export.config import ExportConfig

    _flip_last_byte(copy / damaged)
    cfg = Config(export=ExportConfig(path=str(copy), engine=engine, prompt="ab", max_new_tokens=2))
    msg = _command_error(capsys, "generate", cfg)
    assert msg.startswith("archquant-generate: ") and f"{damaged}: sha256 differs from the manifest" in msg


def test_archquant_eval_refuses_a_damaged_export(copy, capsys, tmp_path):
    from archquant.config import Config
    from archquant.evaluation import EvalConfig
    from archquant.models.config import ModelConfig

    _flip_last_byte(copy / "model.safetensors")
    cfg = Config(model=ModelConfig(name=str(copy)), eval=EvalConfig(tasks=[], ppl_max_windows=1, progress=False),
                 out_dir=str(tmp_path / "eval"))
    msg = _command_error(capsys, "eval", cfg)
    assert msg.startswith("archquant-eval: ") and "model.safetensors: sha256 differs from the manifest" in msg
    assert not (tmp_path / "eval" / "eval.json").exists()
