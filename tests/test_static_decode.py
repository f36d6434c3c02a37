"""StaticDecoder: the static KV cache and explicit mask give the logits of an ordinary cached decode.

Run eagerly here (no CUDA); on a GPU the same step is replayed from a CUDA graph (``tests/test_gpu.py``).
"""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_space

from archquant.engine.static_decode import StaticDecoder
from archquant.kernels.swap import to_runtime
from archquant.models.registry import load_model
from archquant.supernet import Arch, build, materialize


def _dynamic_decode(model, prompt, steps):
    """Last-position logits after the prompt and after each step, through HF's DynamicCache."""
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
        cache, logits = out.past_key_values, [out.logits[:, -1]]
        for t in range(steps.shape[1]):
            out = model(input_ids=steps[:, t : t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return logits


def _static_decode(model, prompt, steps, max_len=24):
    dec = StaticDecoder(model, batch=prompt.shape[0], max_len=max_len)
    logits = [dec.prefill(prompt)]
    logits += [dec.step(steps[:, t : t + 1]).clone() for t in range(steps.shape[1])]
    return dec, logits


def _hetero_model():
    """A materialised subnet whose blocks differ in heads, head size and MLP width, on QuantLinear."""
    model, _ = load_model("tiny-llama")
    sn = build(model, tiny_space(), backend="torch")
    gates = sn.space.gates()
    choice = {n: v[0] for n, v in gates.items()}
    choice.update({"layers.0.kv_groups": gates["layers.0.kv_groups"][-1], "layers.1.mlp": gates["layers.1.mlp"][-1],
                   "layers.0.wbits.qkv": 4, "layers.1.wbits.down": 8})
    return to_runtime(materialize(sn, Arch.from_choices(sn.space, choice)), paths=("dense",)).eval()


@pytest.mark.parametrize("which", ["llama", "hetero"])
def test_static_decode_matches_a_dynamic_cache_decode(which):
    model = load_model("tiny-llama")[0].eval() if which == "llama" else _hetero_model()
    gen = torch.Generator().manual_seed(1)
    prompt, steps = torch.randint(0, 200, (2, 9), generator=gen), torch.randint(0, 200, (2, 4), generator=gen)
    ref = _dynamic_decode(model, prompt, steps)
    dec, got = _static_decode(model, prompt, steps)
    assert dec.length == 13
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    # reset forgets the decoded tokens: stepping again from the prompt reproduces the first step
    dec.reset(9)
    torch.testing.assert_close(dec.step(steps[:, :1]), ref[1], rtol=1e-5, atol=1e-5)


def test_static_decoder_rejects_misuse():
    model = load_model("tiny-llama")[0].eval()
    dec = StaticDecoder(model, batch=1, max_len=8)
    with pytest.raises(RuntimeError, match="prefill before decoding"):
        dec.step(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="leaves no room"):
        dec.prefill(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="batch 2"):
        dec.prefill(torch.zeros(2, 4, dtype=torch.long))
    dec.prefill(torch.zeros(1, 6, dtype=torch.long))
    dec.step(torch.zeros(1, 1, dtype=torch.long))
    dec.step(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="cache is full"):
        dec.step(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="CUDA graphs need"):
        StaticDecoder(model, graph=True)
