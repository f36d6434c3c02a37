"""The materialised model: config record, Auto round trip, KV cache, plain-Llama export, FakeQuantLinear."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from archquant.models.fake_quant_linear import FakeQuantLinear
from archquant.models.hetero import ArchQuantConfig, ArchQuantForCausalLM
from archquant.quant.reference import fake_quant_act, fake_quant_weight
from archquant.supernet import Arch, ArchError, build, materialize
from tests._tiny import tiny_model, tiny_space, token_ids

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def sn(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return build(tiny_model(layers=3), tiny_space(), calib_ids=token_ids(rows=4, seq=32, seed=1), cache_dir=cache)


@pytest.fixture(scope="module")
def hetero_arch(sn):
    return Arch.from_choices(
        sn.space,
        {"hidden": 96, "layers.0.kv_groups": 1, "layers.0.mlp": 64, "layers.1.keep": 0, "layers.2.kv_groups": 3,
         "layers.2.wbits.qkv": 4, "layers.2.wbits.down": 8, "layers.2.abits": 8, "lm_head.wbits": 8},
    )


def test_config_records_every_decision(sn, hetero_arch):
    m = materialize(sn, hetero_arch)
    c = m.config
    assert isinstance(m, ArchQuantForCausalLM) and c.model_type == "archquant"
    assert c.hidden_size == 96 and c.num_hidden_layers == 2 and c.layer_source == [0, 2]
    assert c.layer_num_heads == [2, 6] and c.layer_num_kv_heads == [1, 3]
    assert c.layer_head_dim == [16, 16] and c.layer_intermediate_size == [64, 256] and c.head_dim == 16
    assert c.quant["backend"] == "torch" and c.quant["group_size"] == 32 and c.quant["lm_head_bits"] == 8
    assert c.quant["layers"][1] == {"wbits": {"q": 4, "k": 4, "v": 4, "o": 16, "gate": 16, "up": 16, "down": 8}, "abits": 8}
    assert c.base_model == sn.space.fingerprint
    # lm_head at 8 bits no longer shares the 16-bit embedding
    assert c.tie_word_embeddings is False
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    assert torch.equal(m.lm_head.weight, m.model.embed_tokens.weight)
    assert m.model.layers[1].self_attn.q_proj.weight.shape == (6 * 16, 96)
    assert m.model.layers[1].self_attn.q_proj.wbits == 4 and m.model.layers[1].mlp.up_proj.abits == 8


def test_save_and_auto_from_pretrained_round_trip(sn, hetero_arch, tmp_path):
    m = materialize(sn, hetero_arch)
    m.save_pretrained(tmp_path)
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    assert cfg_json["model_type"] == "archquant" and cfg_json["layer_num_heads"] == [2, 6]
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ArchQuantConfig)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again) is ArchQuantForCausalLM
    ids = token_ids(seed=2)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, m(ids).logits)


@torch.no_grad()
def test_kv_cache_decoding_matches_the_full_forward(sn, hetero_arch):
    m = materialize(sn, hetero_arch)
    ids = token_ids(rows=1, seq=12, seed=3)
    full = m(ids).logits
    out = m(ids[:, :8], use_cache=True)
    cache = out.past_key_values
    steps = [out.logits[:, -1]]
    for t in range(8, 12):
        out = m(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits[:, -1])
    assert (torch.stack(steps[:-1], 1) - full[:, 7:11]).abs().max() <= 1e-4
    gen = m.generate(ids[:, :4], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 8)


@torch.no_grad()
def test_left_padding_is_masked(sn, hetero_arch):
    m = materialize(sn, hetero_arch)
    ids = token_ids(rows=1, seq=6, seed=4)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    pos = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.arange(6)[None]], 1)
    ref = m(ids).logits
    got = m(padded, attention_mask=mask, position_ids=pos).logits[:, 3:]
    assert (got - ref).abs().max() <= 1e-4


@torch.no_grad()
def test_uniform_subnet_becomes_a_plain_llama(sn):
    choice = {"hidden": 96, "lm_head.wbits": 16}
    for l in range(3):
        choice |= {f"layers.{l}.kv_groups": 3, f"layers.{l}.mlp": 128, f"layers.{l}.wbits.gate_up": 4}
    m = materialize(sn, Arch.from_choices(sn.space, choice))
    llama_cfg = m.config.to_llama_config()
    assert llama_cfg.model_type == "llama" and llama_cfg.num_attention_heads == 6 and llama_cfg.hidden_size == 96
    plain = m.to_llama()
    ids = token_ids(seed=5)
    assert (plain(ids).logits - m(ids).logits).abs().max() <= 1e-4
    assert plain.lm_head.weight is plain.model.embed_tokens.weight


def test_non_uniform_or_invalid_shapes_say_why_no_plain_llama(sn, hetero_arch):
    m = materialize(sn, hetero_arch)
    with pytest.raises(ValueError, match="blocks differ in shape"):
        m.config.to_llama_config()
    with pytest.raises(ValueError, match="activation bits"):
        m.to_llama()
    fine = Arch.from_choices(sn.space, {"hidden": 96} | {f"layers.{l}.kv_groups": 1 for l in range(3)})
    assert materialize(sn, fine).config.uniform_reason() is None  # 96 % 2 heads
    bad = Arch.from_choices(sn.space, {"hidden": 64} | {f"layers.{l}.kv_groups": 3 for l in range(3)})
    assert "hidden_size % num_attention_heads == 0 (64 % 6)" in materialize(sn, bad).config.uniform_reason()


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="layer_head_dim must list 2 values"):
        ArchQuantConfig(layer_num_heads=[2, 2], layer_num_kv_heads=[1, 1], layer_head_dim=[16],
                        layer_intermediate_size=[64, 64], head_dim=16)
    with pytest.raises(ValueError, match="not a multiple of 2 KV heads"):
        ArchQuantConfig(layer_num_heads=[3], layer_num_kv_heads=[2], layer_head_dim=[16],
                        layer_intermediate_size=[64], head_dim=16)


def test_fake_quant_linear_matches_the_reference_and_caches():
    torch.manual_seed(0)
    lin = FakeQuantLinear(64, 8, wbits=4, abits=8, group_size=32).eval()
    x = torch.randn(3, 64)
    ref = F.linear(fake_quant_act(x, 8), fake_quant_weight(lin.weight, 4, 32))
    with torch.no_grad():
        assert torch.equal(lin(x), ref)
        w1 = lin.quantized_weight()
        assert lin.quantized_weight() is w1  # cached in eval mode
        lin.weight.mul_(2.0)
        assert lin.quantized_weight() is not w1
        assert torch.equal(lin.quantized_weight(), fake_quant_weight(lin.weight, 4, 32))
    lin.train()
    lin(x).sum().backward()  # QAT: straight-through gradient reaches the raw weight
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_arch_from_another_model_is_refused(sn):
    other = build(tiny_model(layers=2), tiny_space())
    with pytest.raises(ArchError, match="another model"):
        materialize(sn, Arch.full(other.space))


@torch.no_grad()
def test_cut_head_size_records_rope_pairs_and_round_trips(tmp_path):
    model = tiny_model(layers=2)
    net = build(model, tiny_space(kv_groups=[1.0, 0.5], head_dim=[1.0, 0.5]), calib_ids=token_ids(rows=4, seq=32, seed=1),
                cache_dir=tmp_path / "cache")
    arch = Arch.from_choices(net.space, {"layers.0.head_dim": 8, "layers.1.kv_groups": 2})
    m = materialize(net, arch)
    pairs = m.config.layer_rope_index[0]
    assert len(pairs) == 4 and pairs == net.rope_perms[0][:4].tolist()
    # layer 1 keeps its full head size, in the importance order of its RoPE pairs
    assert sorted(m.config.layer_rope_index[1]) == list(range(8)) and m.config.layer_head_dim == [8, 16]
    assert "head size was cut" in m.config.uniform_reason() or "differ" in m.config.uniform_reason()
    ids = token_ids(seed=6)
    assert (m(ids).logits - net(ids, net.arch_probs(arch))).abs().max() <= 1e-4
    m.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(again(ids).logits, m(ids).logits)


def test_saved_subnet_loads_by_path_in_a_fresh_interpreter(sn, hetero_arch, tmp_path):
    # the registry must register model_type "archquant" itself: a new process has not imported it
    import subprocess
    import sys

    m = materialize(sn, hetero_arch)
    m.save_pretrained(tmp_path / "sub")
    from archquant.models.tokenizers import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path / "sub")
    ids = token_ids(seed=3)
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import sys, torch; from archquant.models import load_model; "
        f"m, _ = load_model({str(tmp_path / 'sub')!r}); "
        f"torch.save(m(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'out.pt')!r}); "
        "print(type(m).__name__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ArchQuantForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "out.pt"), m(ids).logits, rtol=0, atol=1e-5)


def test_importing_the_model_code_registers_nothing_until_asked():
    import subprocess
    import sys

    code = (
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "import archquant.models.hetero\n"
        "assert 'archquant' not in CONFIG_MAPPING, 'registered on import'\n"
        "from archquant.models.auto import register_auto_classes\n"
        "register_auto_classes(); register_auto_classes()  # idempotent\n"
        "assert CONFIG_MAPPING['archquant'] is archquant.models.hetero.ArchQuantConfig\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
