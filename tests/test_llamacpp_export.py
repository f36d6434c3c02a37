"""GGUF export: plan validation (errors before writing), llama/deci metadata, tensor bytes, RoPE row order."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from archquant.core.space import SpaceConfig
from archquant.engine.gguf_reader import check_gguf, read_header
from archquant.engine.gguf_writer import (
    GGUFExportError,
    export_gguf,
    permute_qk,
    plan_gguf,
    tokenizer_kv_from_hf,
    unpermute_rope_pairs,
)
from archquant.models.registry import load_model
from archquant.quant import gguf as quant
from archquant.supernet import Arch, build, materialize


@pytest.fixture(scope="module")
def tiny():
    """The registry's tiny-llama (byte tokenizer, vocab 259) with 3 blocks."""
    return load_model("tiny-llama", tiny_overrides={"num_hidden_layers": 3})


@pytest.fixture(scope="module")
def hetero(tiny):
    """A materialised subnet with a skipped block, per-layer head counts and MLP widths, mixed bits."""
    model, _ = tiny
    sn = build(model, SpaceConfig(width_multiple=32, group_size=32), backend="llamacpp")
    choice = {"hidden": 96, "lm_head.wbits": 8, "layers.1.keep": 0,
              "layers.0.kv_groups": 1, "layers.0.mlp": 64, "layers.0.wbits.qkv": 4, "layers.0.wbits.down": 8,
              "layers.2.kv_groups": 3, "layers.2.mlp": 192, "layers.2.wbits.gate_up": 4, "layers.2.wbits.o": 8}
    return materialize(sn, Arch.from_choices(sn.space, choice))


def test_uniform_model_is_llama_and_hetero_subnet_is_deci(tiny, hetero):
    model, _ = tiny
    plan = plan_gguf(model)
    assert plan.arch == "llama" and plan.output_type is None  # tied 16-bit lm_head reuses token_embd
    assert [lp.n_head for lp in plan.layers] == [8, 8, 8] and plan.head_dim == 16
    hp = plan_gguf(hetero)
    assert hp.arch == "deci" and hp.hidden == 96
    assert [(lp.source, lp.n_head, lp.n_head_kv, lp.n_ff) for lp in hp.layers] == [(0, 2, 1, 64), (2, 6, 3, 192)]
    assert hp.layers[0].types == {"q": "Q4_0", "k": "Q4_0", "v": "Q4_0", "o": "F16", "gate": "F16", "up": "F16", "down": "Q8_0"}
    assert hp.output_type == "Q8_0" and hp.embd_type == "F16"
    assert plan_gguf(hetero, types={16: "F32", 4: "Q4_1"}).layers[0].types["q"] == "Q4_1"


def test_deci_file_round_trips_shapes_and_types(tiny, hetero, tmp_path):
    _, tok = tiny
    path = export_gguf(hetero, tmp_path / "sub.gguf", tokenizer=tok)
    info = check_gguf(path)
    assert info["arch"] == "deci" and info["block_count"] == 2
    assert info["head_count"] == [2, 6] and info["head_count_kv"] == [1, 3] and info["feed_forward_length"] == [64, 192]
    assert info["embedding_length"] == 96 and info["head_dim"] == 16 and info["vocab"] == 259
    assert info["types"]["blk.1.ffn_up.weight"] == "Q4_0" and info["types"]["output.weight"] == "Q8_0"
    assert info["types"]["blk.0.attn_norm.weight"] == "F32"
    fields, tensors = read_header(path)
    assert fields["archquant.layer_source"].value == [0, 2]
    shapes = {t.name: t.shape for t in tensors}
    assert shapes["blk.1.attn_q.weight"] == (96, 96) and shapes["blk.0.ffn_down.weight"] == (64, 96)
    assert shapes["token_embd.weight"] == (96, 259)


def test_tensor_bytes_are_the_backend_quantiser_of_the_raw_weights(tiny, hetero, tmp_path):
    _, tok = tiny
    path = export_gguf(hetero, tmp_path / "sub.gguf", tokenizer=tok)
    data = {t.name: np.asarray(t.data) for t in GGUFReader(str(path)).tensors}
    attn = hetero.model.layers[1].self_attn
    down = hetero.model.layers[0].mlp.down_proj.weight
    assert np.array_equal(data["blk.0.ffn_down.weight"], quant.pack(down, "Q8_0"))
    assert np.array_equal(data["blk.1.attn_output.weight"], quant.pack(attn.o_proj.weight, "Q8_0"))
    # q/k rows are permuted per head before quantising (rows are quantised independently)
    assert np.array_equal(data["blk.1.attn_k.weight"], quant.pack(permute_qk(attn.k_proj.weight, 3), "F16"))
    q0 = hetero.model.layers[0].self_attn.q_proj.weight
    assert np.array_equal(data["blk.0.attn_q.weight"], quant.pack(permute_qk(q0, 2), "Q4_0"))


def _rope_hf(x: torch.Tensor, pos: int, theta: float = 10000.0) -> torch.Tensor:
    """HF rotate-half RoPE on one head vector. Shape: ``[hd]``."""
    hd = x.shape[0]
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.cat([pos * inv, pos * inv])
    rot = torch.cat([-x[hd // 2:], x[: hd // 2]])
    return x * torch.cos(ang) + rot * torch.sin(ang)


def _rope_interleaved(x: torch.Tensor, pos: int, theta: float = 10000.0) -> torch.Tensor:
    """llama.cpp's normal RoPE: pairs (2i, 2i+1) rotate with frequency i. Shape: ``[hd]``."""
    hd = x.shape[0]
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    a, b = x[0::2], x[1::2]
    c, s = torch.cos(pos * inv), torch.sin(pos * inv)
    out = torch.empty_like(x)
    out[0::2], out[1::2] = a * c - b * s, a * s + b * c
    return out


def test_qk_permutation_turns_hf_rope_into_llamacpp_rope():
    g = torch.Generator().manual_seed(0)
    n_head, hd, k = 3, 8, 5
    w = torch.randn(n_head * hd, k, generator=g, dtype=torch.float64)
    x = torch.randn(k, generator=g, dtype=torch.float64)
    wp = permute_qk(w, n_head)
    for pos in (0, 3, 17):
        hf = (w @ x).reshape(n_head, hd)
        lc = (wp @ x).reshape(n_head, hd)
        for h in range(n_head):
            a, b = _rope_hf(hf[h], pos), _rope_interleaved(lc[h], pos)
            # same rotated vector, in llama.cpp's row order: q.k dot products agree
            assert torch.allclose(permute_qk(a[:, None], 1)[:, 0], b, atol=1e-12)


def test_reordered_rope_pairs_are_put_back_in_order():
    g = torch.Generator().manual_seed(1)
    n_head, hd = 2, 8
    w = torch.randn(n_head * hd, 4, generator=g)
    pairs = [2, 0, 3, 1]  # stored pair j holds original pair pairs[j]
    stored = w.reshape(n_head, hd, 4)[:, pairs + [p + hd // 2 for p in pairs]].reshape(w.shape)
    assert torch.equal(unpermute_rope_pairs(stored, n_head, pairs), w)


def _expect_refused(model, tmp_path, match, **kw):
    path = tmp_path / "bad.gguf"
    with pytest.raises(GGUFExportError, match=match):
        export_gguf(model, path, **kw)
    assert not path.exists() and not list(tmp_path.glob("bad.gguf.*"))  # nothing written, no temp left


def test_shapes_gguf_cannot_hold_are_refused_before_writing(tiny, tmp_path):
    model, tok = tiny
    # query heads not divisible by the layer's KV heads (8 q / 3 kv): aborts llama.cpp, so refused
    bad = copy.deepcopy(model)
    attn = bad.model.layers[1].self_attn
    for name in ("k_proj", "v_proj"):
        lin = getattr(attn, name)
        setattr(attn, name, torch.nn.Linear(128, 48, bias=False))
        getattr(attn, name).weight.data = lin.weight.data[:48].clone()
    msg = r"layer 1 \(source block 1\): 8 query heads are not a multiple of its 3 KV heads.*layers\.1\.kv_groups"
    _expect_refused(bad, tmp_path, msg, tokenizer=tok)
    # a quantised row length that is not a multiple of 32 names the layer, the linear and the decision
    bad = copy.deepcopy(model)
    mlp = bad.model.layers[2].mlp
    for name, rows, cols in (("gate_proj", 48, None), ("up_proj", 48, None), ("down_proj", None, 48)):
        lin = getattr(mlp, name)
        w = lin.weight.data[:rows] if rows else lin.weight.data[:, :cols]
        setattr(mlp, name, torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
        getattr(mlp, name).weight.data = w.clone()
    bad.config.quant = {"backend": "llamacpp", "lm_head_bits": 16,
                        "layers": [{"wbits": {n: 16 for n in "q k v o gate up".split()} | {"down": 4}, "abits": 16}] * 3}
    msg = r"layer 2.*down row length 48 is not a multiple of Q4_0's block of 32 \(decision mlp"
    _expect_refused(bad, tmp_path, msg, tokenizer=tok)
    # per-layer head sizes
    bad = copy.deepcopy(model)
    bad.config.layer_head_dim = [16, 8, 16]
    _expect_refused(bad, tmp_path, r"layer 1.*head_dim 8.*layers\.1\.head_dim", tokenizer=tok)
    # bits without a GGUF type
    bad = copy.deepcopy(model)
    bad.config.quant = {"backend": "llamacpp", "lm_head_bits": 3, "layers": [{"wbits": {}, "abits": 16}] * 3}
    _expect_refused(bad, tmp_path, "lm_head.wbits", tokenizer=tok)


def test_tokenizer_is_required_and_must_match_the_vocabulary(tiny, tmp_path):
    model, tok = tiny
    _expect_refused(model, tmp_path, "source_gguf= .* or tokenizer=")
    small = copy.deepcopy(model)
    small.model.embed_tokens = torch.nn.Embedding(200, 128)
    small.lm_head = torch.nn.Linear(128, 200, bias=False)
    _expect_refused(small, tmp_path, "ids up to 258 but the model's vocabulary has 200", tokenizer=tok)


def test_byte_tokenizer_converts_to_gguf_bpe(tiny):
    _, tok = tiny
    kv = {k: v for k, v, *_ in tokenizer_kv_from_hf(tok, 259)}
    assert kv["tokenizer.ggml.model"] == "gpt2" and len(kv["tokenizer.ggml.tokens"]) == 259
    assert kv["tokenizer.ggml.tokens"][tok.eos_token_id] == "</s>"
    assert kv["tokenizer.ggml.token_type"][tok.eos_token_id] == 3  # control
    assert kv["tokenizer.ggml.eos_token_id"] == tok.eos_token_id


def test_header_reader_agrees_with_gguf_reader(tiny, hetero, tmp_path):
    _, tok = tiny
    path = export_gguf(hetero, tmp_path / "sub.gguf", tokenizer=tok)
    fields, tensors = read_header(path)
    ref = GGUFReader(str(path))
    for key, fld in ref.fields.items():
        if not key.startswith("GGUF."):
            assert fields[key].value == fld.contents(), key
    assert [(t.name, t.shape, t.type) for t in tensors] == [
        (t.name, tuple(int(s) for s in t.shape), t.tensor_type.name) for t in ref.tensors
    ]


def test_missing_llama_cpp_names_the_install_command(monkeypatch):
    from archquant.engine import llamacpp as runtime

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(runtime.LlamaCppMissingError, match=r"pip install llama-cpp-python==0\.3\.36"):
        runtime.require_llama_cpp()


def test_materialised_gguf_types_survive_export_and_reload(tiny, tmp_path):
    """A subnet materialised with Q4_1 for 4 bits exports Q4_1 and reloads with the Q4_1 quantiser."""
    from transformers import AutoModelForCausalLM

    from archquant.backends.llamacpp import LlamaCppBackend

    model, tok = tiny
    cfg = SpaceConfig(width_multiple=32, group_size=32)
    sn = build(model, cfg, backend=LlamaCppBackend({4: "Q4_1"}))
    sub = materialize(sn, Arch.full(sn.space, bits=4))
    assert sub.config.quant["backend_options"]["types"]["4"] == "Q4_1"
    q = sub.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q.quantized_weight(), quant.weight_as_type(q.weight, "Q4_1"), rtol=0, atol=0)

    assert plan_gguf(sub).layers[0].types["q"] == "Q4_1"
    assert plan_gguf(sub, types={4: "Q4_0"}).layers[0].types["q"] == "Q4_0"  # an explicit map still wins
    info = check_gguf(export_gguf(sub, tmp_path / "q41.gguf", tokenizer=tok))
    assert info["types"]["blk.0.attn_q.weight"] == "Q4_1" and info["types"]["blk.2.ffn_down.weight"] == "Q4_1"

    sub.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 259, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, sub(ids).logits, rtol=0, atol=1e-6)
        default = materialize(build(model, cfg, backend="llamacpp"), Arch.full(sn.space, bits=4))
        assert "types" in default.config.quant["backend_options"]
        assert (default(ids).logits - sub(ids).logits).abs().max() > 1e-3  # Q4_0 != Q4_1: the record matters


def test_backend_options_that_do_not_fit_fail_clearly():
    from archquant.backends import BackendError, get_backend

    assert get_backend("llamacpp", {"types": {"4": "Q4_1"}}).types[4] == "Q4_1"
    with pytest.raises(BackendError, match="does not take the options"):
        get_backend("torch", {"types": {"4": "Q4_1"}})
    with pytest.raises(BackendError, match="4-bit weights can be"):
        get_backend("llamacpp", {"types": {"4": "Q5_0"}})


def assert_blocks_as_simulated(tensors, sub):
    """attn_v and the MLP of blocks 0/1 hold, bit for bit, the blocks the materialised subnet computes with (they are
    stored as they are; q and k rows are permuted for llama.cpp's RoPE)."""
    from archquant.quant.gguf import dequantize_raw

    for name, mod in (("blk.0.attn_v.weight", sub.model.layers[0].self_attn.v_proj),
                      ("blk.1.ffn_up.weight", sub.model.layers[1].mlp.up_proj),
                      ("blk.0.ffn_down.weight", sub.model.layers[0].mlp.down_proj)):
        raw = np.asarray(tensors[name].data)
        got = dequantize_raw(raw, tensors[name].tensor_type.name).reshape(mod.weight.shape)
        torch.testing.assert_close(got, mod.quantized_weight().float(), rtol=0, atol=0)


def test_two_four_bit_types_in_one_subnet_are_exported_bit_for_bit(tmp_path):
    """``latency.types=[Q4_1,Q4_0]``: Q4_1 as the 5-bit choice, Q4_0 as the 4-bit one, both in one GGUF as simulated."""
    from _tiny import TINY_OVERRIDES, compose_config
    from gguf import GGUFReader

    from archquant.commands.session import Session

    cfg = compose_config(TINY_OVERRIDES + ["latency.backend=llamacpp", "space.wbits=[16,8,5,4]",
                                           "space.lm_head_bits=[16,8,5,4]", "latency.types=[Q4_1,Q4_0]"], tmp_path)
    session = Session.load(cfg)
    assert session.backend.types == {16: "F16", 8: "Q8_0", 5: "Q4_1", 4: "Q4_0"}
    sn = session.search_supernet()
    choice = {n: v[0] for n, v in sn.space.gates().items()}
    choice.update({"layers.0.wbits.qkv": 5, "layers.0.wbits.down": 4, "layers.1.wbits.gate_up": 4,
                   "lm_head.wbits": 5})
    sub = materialize(sn, Arch.from_choices(sn.space, choice))
    path = export_gguf(sub, tmp_path / "mix.gguf", tokenizer=session.tokenizer)
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    assert tensors["blk.0.attn_v.weight"].tensor_type.name == "Q4_1"
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q4_0"
    assert_blocks_as_simulated(tensors, sub)


def test_palette_types_from_the_config_reach_the_space_the_supernet_and_the_gguf(tmp_path):
    """``latency.types`` puts more of llama.cpp's palette in the search: a 5-bit Q5_0 slot, Q4_1 for 4 bits, read
    back from the export bit for bit as the supernet simulates them."""
    from _tiny import TINY_OVERRIDES, compose_config

    from archquant.commands.session import Session
    from archquant.engine.gguf_reader import read_header

    cfg = compose_config(TINY_OVERRIDES + ["latency.backend=llamacpp", "space.wbits=[16,8,5,4]",
                                           "space.lm_head_bits=[16,8]", "latency.types=[Q4_1,Q5_0]"], tmp_path)
    session = Session.load(cfg)
    assert session.backend.types == {16: "F16", 8: "Q8_0", 5: "Q5_0", 4: "Q4_1"}
    assert 5 in session.space.wbits
    sn = session.search_supernet()
    choice = {n: v[0] for n, v in sn.space.gates().items()}
    choice.update({"layers.0.wbits.qkv": 5, "layers.0.wbits.down": 4, "layers.1.wbits.gate_up": 5})
    arch = Arch.from_choices(sn.space, choice)
    sub = materialize(sn, arch)
    path = export_gguf(sub, tmp_path / "mix.gguf", tokenizer=session.tokenizer)
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q5_0"
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q4_1"
    assert_blocks_as_simulated(tensors, sub)
    assert read_header(path)[0]  # a readable header


def test_palette_types_that_llama_cpp_would_change_or_does_not_have_are_refused(tiny):
    from archquant.backends import BackendError, get_backend

    model, _ = tiny
    space = SpaceConfig(width_multiple=32, group_size=32, wbits=[16, 8, 6])
    # without llama.cpp's fallback a K-quant is refused where a row can miss a multiple of 256, naming the tensors
    with pytest.raises(BackendError, match=r"Q6_K \(6-bit\) needs rows that are multiples of 256.*q/k/v/gate/up rows"
                                           r".*latency.fallback=true stores Q8_0"):
        get_backend("llamacpp", {"types": {6: "Q6_K"}, "fallback": False}).restrict_space(space, model.config)
    get_backend("llamacpp", {"types": {6: "Q6_K"}}).restrict_space(space, model.config)  # with it: Q8_0 there
    with pytest.raises(BackendError, match="Q8_0 is a 8-bit type"):
        get_backend("llamacpp", {"types": {4: "Q8_0"}})
    with pytest.raises(BackendError, match=r"'Q4_X' is not a type.*IQ4_NL"):
        get_backend("llamacpp", {"types": {4: "Q4_X"}})
    from archquant.latency.config import LatencyConfig

    with pytest.raises(ValueError, match="only latency.backend=llamacpp"):
        LatencyConfig(backend="torch", types=["Q4_1"])
    with pytest.raises(BackendError, match="no bit-width slot is left for Q4_1"):
        LatencyConfig(backend="llamacpp", types=["Q4_0", "IQ4_NL", "Q4_1"])
    with pytest.raises(BackendError, match="Q5_0 is a 5-bit type"):
        get_backend("llamacpp", {"types": {4: "Q5_0"}})
    with pytest.raises(BackendError, match="more bits per weight"):  # slots must order the types by precision
        get_backend("llamacpp", {"types": {5: "Q4_0", 4: "Q4_1"}})


def test_two_types_of_one_nominal_width_take_slots_in_precision_order():
    """Q4_1 (5.0 bits per weight) moves to the 5-bit slot beside Q4_0 (4.5) instead of being refused."""
    from archquant.backends.llamacpp import LlamaCppBackend, types_from_names
    from archquant.latency.loader import _types_override, types_tag

    assert types_from_names(["Q8_0", "Q4_1", "Q4_0"]) == {8: "Q8_0", 5: "Q4_1", 4: "Q4_0"}
    assert types_from_names(["Q4_1", "Q4_K"]) == {5: "Q4_1", 4: "Q4_K"}
    assert types_from_names(["Q5_0", "Q4_1", "Q4_0"]) == {6: "Q5_0", 5: "Q4_1", 4: "Q4_0"}
    assert types_from_names(["Q6_K", "Q5_0", "Q4_1"]) == {6: "Q6_K", 5: "Q5_0", 4: "Q4_1"}  # nominal slots kept
    backend = LlamaCppBackend(types_from_names(["Q4_1", "Q4_0"]))
    # a table of this map gets a name and a suggested override of its own (not the {4: Q4_1} table's)
    assert types_tag(backend) == "-q8_0-q4_1-q4_0" and types_tag(LlamaCppBackend({4: "Q4_1"})) == "-q4_1"
    assert types_from_names(_types_override(backend).split("[")[1].rstrip("]").split(",")) == {
        b: t for b, t in backend.types.items() if b < 16}


@pytest.mark.parametrize("qtype", ["IQ4_NL", "Q5_1"])
def test_a_file_mostly_of_any_palette_type_is_labelled_and_runs(tiny, tmp_path, qtype):
    """``general.file_type`` follows the main type for the whole palette (it once knew five types only), and
    llama.cpp runs the file: its logits agree with the torch simulation of the same blocks."""
    from gguf import LlamaFileType

    from archquant.backends.llamacpp import LlamaCppBackend, types_from_names
    from archquant.engine.llamacpp import LlamaCppRunner

    model, tok = tiny
    slot = next(iter(types_from_names([qtype])))
    sn = build(model, SpaceConfig(width_multiple=32, group_size=32, wbits=[16, 8, slot], lm_head_bits=[16, 8, slot]),
               backend=LlamaCppBackend({slot: qtype}))
    sub = materialize(sn, Arch.full(sn.space, bits=slot))
    path = export_gguf(sub, tmp_path / f"{qtype}.gguf", tokenizer=tok)
    field = GGUFReader(str(path)).fields["general.file_type"]
    assert int(field.parts[field.data[0]][0]) == int(LlamaFileType[f"MOSTLY_{qtype}"])
    ids = list(range(5, 37))
    with LlamaCppRunner(path, n_ctx=64, n_batch=64, n_threads=1) as runner:
        got = runner.logits(ids)
    with torch.no_grad():
        ref = sub(torch.tensor([ids])).logits[0]
    assert torch.isfinite(got).all()
    assert torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1] > 0.99


def test_types_named_in_space_wbits_become_latency_types_and_slots(tmp_path):
    """``space.wbits=[F16,Q8_0,Q4_1,Q4_0]`` is the same search as ``latency.types=[Q8_0,Q4_1,Q4_0]`` with
    ``space.wbits=[16,8,5,4]``; a name the palette lacks or another backend fails at composition."""
    from _tiny import TINY_OVERRIDES, compose_config

    from archquant.backends import BackendError

    named = compose_config(TINY_OVERRIDES + ["latency.backend=llamacpp", "space.wbits=[F16,Q8_0,Q4_1,Q4_0]",
                                             "space.lm_head_bits=[F16,q8_0]"], tmp_path)
    assert named.space.wbits == [16, 8, 5, 4] and named.space.lm_head_bits == [16, 8]
    assert named.latency.types == ["Q8_0", "Q4_1", "Q4_0"]
    assert named.latency.backend_options() == {"types": {8: "Q8_0", 5: "Q4_1", 4: "Q4_0"}}
    with pytest.raises(BackendError, match=r"name \['Q4_X'\]: not a bit-width nor a type"):
        compose_config(TINY_OVERRIDES + ["latency.backend=llamacpp", "space.wbits=[F16,Q4_X]"], tmp_path)
    with pytest.raises(ValueError, match="only latency.backend=llamacpp stores"):
        compose_config(TINY_OVERRIDES + ["space.wbits=[F16,Q4_0]"], tmp_path)
    # the Python API: a backend gives names its own slots, and refuses one it does not store
    from archquant.backends.llamacpp import LlamaCppBackend

    cfg = SpaceConfig(width_multiple=32, group_size=32, wbits=["F16", "Q4_1"], lm_head_bits=[16])
    assert LlamaCppBackend({4: "Q4_1"}).name_slots(cfg).wbits == [16, 4]
    with pytest.raises(BackendError, match=r"space.wbits names \['Q4_1'\].*latency.types"):
        LlamaCppBackend().name_slots(cfg)


def test_arch_records_its_gguf_types_and_another_backend_is_refused(tiny):
    from archquant.backends.llamacpp import LlamaCppBackend
    from archquant.core.arch import ArchError

    model, _ = tiny
    sn = build(model, SpaceConfig(width_multiple=32, group_size=32), backend=LlamaCppBackend({4: "Q4_1"}))
    arch = Arch.full(sn.space, bits=4)
    arch.weight_types = sn.backend.options()["types"]
    assert Arch.from_dict(json.loads(json.dumps(arch.to_dict()))).weight_types == {"16": "F16", "8": "Q8_0", "4": "Q4_1"}
    materialize(sn, arch)  # same types: fine
    other = build(model, SpaceConfig(width_multiple=32, group_size=32), backend=LlamaCppBackend())
    with pytest.raises(ArchError, match=r"4-bit: record Q4_1, backend Q4_0\); set latency.types=\[Q8_0,Q4_1\]"):
        materialize(other, arch)
    arch.weight_types = {"16": "F16", "8": "Q8_0", "4": "Q4_1"}  # a record whose used bits agree is accepted
    for la in arch.layers:
        la.wbits = {k: 8 for k in la.wbits}
    arch.lm_head_bits = 8
    materialize(other, arch)
