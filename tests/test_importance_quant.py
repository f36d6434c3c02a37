"""Importance-weighted GGUF blocks along the whole path: cut from the supernet's, materialised, exported."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from archquant.backends.llamacpp import LlamaCppBackend
from archquant.engine.gguf_writer import export_gguf, permute_qk
from archquant.latency.config import LatencyConfig
from archquant.models.hetero import ArchQuantForCausalLM
from archquant.quant import gguf as quant
from archquant.quant.gguf import memo
from archquant.supernet import Arch, build, materialize
from archquant.utils.errors import InputError
from tests._tiny import tiny_space, token_ids

TOL = 1e-4  # supernet vs materialised logits in fp32 (test_supernet_exact's tolerance)


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def tiny():
    from archquant.models.registry import load_model

    return load_model("tiny-llama", tiny_overrides={"num_hidden_layers": 3})


@pytest.fixture(scope="module")
def sn(tiny, tmp_path_factory):
    model, _ = tiny
    return build(model, tiny_space(), backend="llamacpp", calib_ids=token_ids(rows=4, seq=32, seed=1, vocab=259),
                 cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def arch(sn):
    return Arch.from_choices(sn.space, {"hidden": 96, "lm_head.wbits": 8, "layers.1.keep": 0, "layers.0.mlp": 64,
                                        "layers.0.wbits.qkv": 4, "layers.0.wbits.down": 4, "layers.0.wbits.o": 8,
                                        "layers.2.kv_groups": 3, "layers.2.wbits.gate_up": 4})


@pytest.mark.parametrize("qtype", quant.QUANT_TYPES)
def test_blocks_of_a_cut_are_the_cut_of_the_blocks(qtype):
    """Rows and whole-block columns of ``quantize(W)`` are, bit for bit, ``quantize`` of that cut of ``W``."""
    g = torch.Generator().manual_seed(0)
    bs = quant.block_size(qtype)
    k = 4 * bs
    w = torch.randn(24, k, generator=g) * torch.linspace(0.2, 3.0, k)
    imp = torch.rand(k, generator=g) * torch.linspace(0.1, 5.0, k)
    rows, cols = torch.tensor([5, 0, 17, 3]), torch.cat([torch.arange(2 * bs, 3 * bs), torch.arange(bs)])
    memo.clear()
    cut = memo.slice_parts(quant.quantize(w, qtype, imp), qtype, rows, cols)
    memo.clear()
    direct = quant.quantize(w[rows][:, cols], qtype, imp[cols])
    assert set(cut) == set(direct)
    for name in direct:
        assert torch.equal(cut[name], direct[name]), name
    with pytest.raises(ValueError, match="not whole"):
        memo.slice_parts(quant.quantize(w, qtype, imp), qtype, None, torch.arange(1, bs + 1))


def test_searches_are_remembered_by_content(monkeypatch):
    calls = []
    real = quant.legacy.quantize_blocks
    monkeypatch.setattr(quant.legacy, "quantize_blocks", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(1)
    w, imp = torch.randn(8, 64, generator=g), torch.rand(64, generator=g)
    memo.clear()
    first = quant.quantize(w, "Q4_0", imp)
    assert len(calls) == 1
    again = quant.quantize(w.clone(), "Q4_0", imp.clone())  # same bytes, other tensors: remembered
    assert len(calls) == 1 and all(torch.equal(first[k], again[k]) for k in first)
    w2 = w.clone()
    w2[0, 0] += 1e-3
    quant.quantize(w2, "Q4_0", imp)  # one weight changed: searched again
    quant.quantize(w, "Q4_0", imp * 2)  # other importance: searched again
    quant.quantize(w, "Q4_0")  # round-to-nearest is never remembered
    assert len(calls) == 4
    monkeypatch.setenv(memo.MEMO_ENV, "0.0001")  # a budget below one entry: nothing is kept
    memo.clear()
    quant.quantize(w, "Q4_0", imp)
    quant.quantize(w, "Q4_0", imp)
    assert len(calls) == 6
    monkeypatch.setenv(memo.MEMO_ENV, "lots")
    with pytest.raises(InputError, match=r"ARCHQUANT_QUANT_MEMO_MB='lots' is not a number"):
        quant.quantize(w, "Q4_0", imp + 1)
    memo.clear()


@torch.no_grad()
def test_supernet_materialised_and_gguf_hold_the_same_importance_weighted_blocks(tiny, sn, arch, tmp_path):
    _, tok = tiny
    assert sn.backend.uses_importance and sn.lm_head.act_sq is not None
    memo.clear()
    ids = token_ids(rows=2, seq=16, seed=5, vocab=259)
    expect = sn(ids, sn.arch_probs(arch))
    sub = materialize(sn, arch)
    assert sub.config.quant["importance"] is True
    assert (sub(ids).logits - expect).abs().max() <= TOL
    layer = sub.model.layers[0]
    checks = {"blk.0.attn_v.weight": (layer.self_attn.v_proj, "Q4_0", None),
              "blk.0.attn_q.weight": (layer.self_attn.q_proj, "Q4_0", layer.self_attn.q_proj.out_features // 16),
              "blk.0.attn_output.weight": (layer.self_attn.o_proj, "Q8_0", None),
              "blk.0.ffn_down.weight": (layer.mlp.down_proj, "Q4_0", None),
              "output.weight": (sub.lm_head, "Q8_0", None)}
    got = {name: mod.quantized_weight().clone() for name, (mod, _, _) in checks.items()}
    path = export_gguf(sub, tmp_path / "imp.gguf", tokenizer=tok)
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    memo.clear()  # from here on every search runs afresh on the materialised layer's own weight
    for name, (mod, qtype, heads) in checks.items():
        t = tensors[name]
        assert t.tensor_type.name == qtype
        direct = quant.weight_as_type(mod.weight, qtype, mod.act_importance)
        assert torch.equal(got[name], direct), name  # cut from the supernet's blocks == searched on the cut
        stored = quant.dequantize_raw(np.asarray(t.data), qtype).reshape(mod.weight.shape)
        assert torch.equal(stored, direct if heads is None else permute_qk(direct, heads)), name  # GGUF bit for bit
        rtn = quant.weight_as_type(mod.weight, qtype)
        assert not torch.equal(direct, rtn), name
        assert (quant.weighted_error(mod.weight, direct, mod.act_importance)
                <= quant.weighted_error(mod.weight, rtn, mod.act_importance)), name


@torch.no_grad()
def test_importance_is_saved_with_the_subnet(sn, arch, tmp_path):
    sub = materialize(sn, arch)
    sub.save_pretrained(tmp_path)
    memo.clear()
    again = ArchQuantForCausalLM.from_pretrained(tmp_path)
    imp = again.model.layers[0].mlp.down_proj.act_importance
    assert imp is not None and torch.equal(imp, sub.model.layers[0].mlp.down_proj.act_importance)
    ids = token_ids(rows=1, seq=12, seed=6, vocab=259)
    assert torch.equal(again(ids).logits, sub(ids).logits)


@torch.no_grad()
def test_importance_off_is_round_to_nearest(tiny, arch, tmp_path):
    model, _ = tiny
    assert LatencyConfig(importance=False).backend_options() == {"importance": False}
    assert LatencyConfig().backend_options() is None
    be = LlamaCppBackend(importance=False)
    sn = build(model, tiny_space(), backend=be, calib_ids=token_ids(rows=4, seq=32, seed=1, vocab=259),
               cache_dir=tmp_path)
    assert sn.lm_head.act_sq is None
    sub = materialize(sn, Arch.from_dict(arch.to_dict()))
    assert "importance" not in sub.config.quant and sub.config.quant["backend_options"]["importance"] is False
    down = sub.model.layers[0].mlp.down_proj
    assert down.act_importance is None
    assert torch.equal(down.quantized_weight(), quant.weight_as_type(down.weight, "Q4_0"))
