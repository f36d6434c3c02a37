"""Supernet construction: importance, function-preserving permutation, cache, bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaForCausalLM

from archquant.backends import BackendError, get_backend
from archquant.core.space import resolve_space
from archquant.supernet import Arch, ArchError, GateError, SpaceError, UnsupportedModelError, build
from archquant.supernet import importance as importance_mod
from archquant.supernet.importance import compute_importance, depth_logits, load_or_compute
from archquant.supernet.permute import make_permutation, permute_state
from tests._tiny import tiny_model, tiny_space, token_ids

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture
def calib():
    return token_ids(rows=4, seq=32, seed=1)


@torch.no_grad()
def test_full_subnet_at_16_bits_equals_original(tmp_path, calib):
    model = tiny_model(layers=3)
    sn = build(model, tiny_space(), calib_ids=calib, cache_dir=tmp_path)
    ids = token_ids(seed=2)
    ref = model(ids).logits
    full = sn.arch_probs(Arch.full(sn.space))
    assert (sn(ids, full) - ref).abs().max() <= 1e-4
    assert (sn(ids) - ref).abs().max() <= 1e-4  # argmax of the initial logits is the full model


@torch.no_grad()
def test_permuted_weights_reproduce_original_in_plain_llama(calib):
    model = tiny_model(layers=2)
    space = resolve_space(tiny_space(kv_groups=[1.0, 0.5], q_per_group=[1.0, 0.5]), model.config)
    imp = compute_importance(model, calib)
    perm = make_permutation(imp, space)
    assert perm.hidden is not None and perm.mlp[0] is not None and perm.heads[0] is not None
    state = permute_state(model.state_dict(), perm, model.config)
    assert not torch.equal(state["model.layers.0.mlp.up_proj.weight"], model.state_dict()["model.layers.0.mlp.up_proj.weight"])
    twin = LlamaForCausalLM(model.config).eval()
    twin.load_state_dict(state)
    ids = token_ids(seed=3)
    assert (twin(ids).logits - model(ids).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_permutation_sorts_every_dimension_by_importance(calib):
    model = tiny_model(layers=2)
    space = resolve_space(tiny_space(kv_groups=[1.0, 0.5], q_per_group=[1.0, 0.5]), model.config)
    imp = compute_importance(model, calib)
    twin = LlamaForCausalLM(model.config).eval()
    twin.load_state_dict(permute_state(model.state_dict(), make_permutation(imp, space), model.config))
    after = compute_importance(twin, calib)

    def descending(x):
        return bool((x[:-1] >= x[1:] - 1e-6 * x.abs().max()).all())

    assert descending(after.hidden)
    for l in range(2):
        assert descending(after.neurons[l])
        groups = after.heads[l].reshape(4, 2)
        assert descending(groups.sum(1))
        assert all(descending(g) for g in groups)


def test_rope_pairs_permuted_when_head_size_is_searched(tmp_path, calib):
    model = tiny_model(layers=2)
    sn = build(model, tiny_space(kv_groups=[1.0, 0.5], head_dim=[1.0, 0.5]), calib_ids=calib, cache_dir=tmp_path)
    perm = sn.rope_perms[0]
    assert perm is not None and sorted(perm.tolist()) == list(range(16))
    assert torch.equal(perm[8:], perm[:8] + 8)  # pairs (i, i + hd/2) move together
    with torch.no_grad():
        ids = token_ids(seed=4)
        full = sn(ids, sn.arch_probs(Arch.full(sn.space)))
        assert (full - model(ids).logits).abs().max() <= 1e-4


def test_importance_is_cached_on_disk_and_keyed_by_calibration(tmp_path, calib, monkeypatch):
    model = tiny_model()
    first = load_or_compute(model, calib, tmp_path)
    files = list((tmp_path / "importance").glob("*.safetensors"))
    assert len(files) == 1

    def boom(*_a, **_k):
        raise AssertionError("importance recomputed although it is cached")

    monkeypatch.setattr(importance_mod, "compute_importance", boom)
    again = load_or_compute(model, calib, tmp_path)
    assert torch.equal(first.neurons, again.neurons)
    with pytest.raises(AssertionError, match="recomputed"):
        load_or_compute(model, token_ids(rows=4, seq=32, seed=9), tmp_path)
    with pytest.raises(AssertionError, match="recomputed"):
        load_or_compute(tiny_model(seed=1), calib, tmp_path)  # same dims, other weights


def test_depth_logits_follow_block_importance():
    logits = depth_logits(torch.tensor([0.0, 0.1, 0.3]), scale=2.0)
    p_keep = torch.softmax(logits, -1)[:, 0]
    assert p_keep[0] == pytest.approx(0.5)
    assert p_keep[0] < p_keep[1] < p_keep[2]


def test_build_initialises_depth_logits_and_leaves_model_untouched(tmp_path, calib):
    model = tiny_model(layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sn = build(model, tiny_space(), calib_ids=calib, cache_dir=tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    blocks = sn.importance.blocks
    keep = torch.stack([sn.probs()[f"layers.{l}.keep"][0] for l in range(3)]).detach()
    assert torch.equal(torch.argsort(keep), torch.argsort(blocks))
    assert sn.weight_parameters()[0] is not model.model.embed_tokens.weight


def test_without_calibration_the_original_order_is_kept():
    model = tiny_model()
    sn = build(model, tiny_space())
    assert torch.equal(sn.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    assert all(p.abs().sum() == 0 for p in sn.arch_parameters())


def test_gate_layout_matches_the_space():
    sn = build(tiny_model(layers=2), tiny_space())
    assert sn.gate_names == list(sn.space.gates())
    assert len(sn.arch_parameters()) == len(sn.gate_names)
    assert all(p.is_leaf and p.requires_grad for p in sn.arch_parameters())
    assert all(not p.requires_grad for p in sn.weight_parameters())
    # single-choice gates (q_per_group, head_dim by default) are fixed from the start
    assert set(sn.fixed) == {f"layers.{l}.{k}" for l in range(2) for k in ("q_per_group", "head_dim")}


# ---- bad input -----------------------------------------------------------------------------------
def test_unsupported_model_family_is_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises((UnsupportedModelError, SpaceError), match="not supported|Llama"):
        build(gpt2, tiny_space())


def test_space_whose_group_size_does_not_divide_a_width_names_it():
    with pytest.raises(SpaceError, match="group_size=64 does not divide.*96"):
        build(tiny_model(), tiny_space(group_size=64))


def test_backend_without_kernel_for_bits_fails_at_build():
    with pytest.raises(BackendError, match="3-bit"):
        build(tiny_model(), tiny_space(wbits=[16, 3]), backend=get_backend("triton"))


def test_arch_from_another_model_or_version_is_rejected():
    sn = build(tiny_model(layers=2), tiny_space())
    other = build(tiny_model(layers=3), tiny_space())
    with pytest.raises(ArchError, match="num_hidden_layers: arch has 3, model has 2"):
        sn.set_arch(Arch.full(other.space))
    old = Arch.full(sn.space).to_dict()
    old["version"] = 0
    with pytest.raises(ArchError, match="version 0 is not supported"):
        Arch.from_dict(old)


def test_probs_missing_a_gate_or_of_wrong_length_fail_fast():
    sn = build(tiny_model(layers=2), tiny_space())
    probs = sn.probs()
    ids = token_ids()
    bad = dict(probs)
    del bad["layers.1.mlp"]
    with pytest.raises(GateError, match="layers.1.mlp"):
        sn(ids, bad)
    bad = dict(probs)
    bad["hidden"] = torch.ones(2) / 2
    with pytest.raises(GateError, match="expected \\(3,\\)"):
        sn(ids, bad)


def test_calibration_ids_outside_the_vocabulary_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        build(tiny_model(), tiny_space(), calib_ids=torch.full((2, 8), 10_000), cache_dir=tmp_path)


def test_bits_granularities_build_and_tie_linears():
    for gran, n_groups in (("linear", 7), ("fused", 4), ("layer", 1)):
        sn = build(tiny_model(layers=1), dataclasses.replace(tiny_space(), bits_granularity=gran))
        assert len([n for n in sn.gate_names if ".wbits." in n]) == n_groups


@torch.no_grad()
def test_qwen2_with_qkv_bias_is_supported_and_exact(tmp_path, calib):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from archquant.supernet import materialize

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    for layer in model.model.layers:  # random init leaves biases at zero; make them matter
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            lin.bias.normal_(0, 0.5)
    sn = build(model, tiny_space(), calib_ids=calib, cache_dir=tmp_path)
    ids = token_ids(seed=13)
    assert (sn(ids, sn.arch_probs(Arch.full(sn.space))) - model(ids).logits).abs().max() <= 1e-4
    arch = Arch.random(sn.space, 3)
    sub = materialize(sn, arch)
    assert sub.config.linear_bias["q"] and not sub.config.linear_bias["o"]
    assert (sub(ids).logits - sn(ids, sn.arch_probs(arch))).abs().max() <= 1e-4


def test_sliding_window_attention_is_rejected():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=256, sliding_window=16)
    with pytest.raises(UnsupportedModelError, match="sliding_window=16"):
        build(MistralForCausalLM(cfg), tiny_space())


def test_block_quantised_backends_sort_whole_blocks_so_a_model_on_the_grid_requantises_losslessly(tmp_path, calib):
    """llama.cpp stores weights in blocks of 32 along the input: the importance sort moves whole blocks, so a model
    whose weights already lie on Q4_1's grid (as the embedded default does) materialises at Q4_1 unchanged."""
    from archquant.backends.llamacpp import LlamaCppBackend
    from archquant.quant import gguf as quant
    from archquant.supernet import materialize

    model = tiny_model(layers=2)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                mod.weight.copy_(quant.weight_as_type(mod.weight, "Q4_1"))
    backend = LlamaCppBackend({4: "Q4_1"})
    space_cfg = tiny_space(hidden=[1.0, 0.75, 0.5], mlp=[1.0, 0.5])
    imp = compute_importance(model, calib)
    space = resolve_space(backend.restrict_space(space_cfg, model.config), model.config)
    assert backend.permutation_block(space) == 32
    perm = make_permutation(imp, space, block=32)
    for p in [perm.hidden, *perm.mlp]:
        assert p is not None and not torch.equal(p, torch.arange(p.numel()))  # something was reordered...
        blocks = p.reshape(-1, 32)
        assert torch.equal(blocks - blocks[:, :1], torch.arange(32).expand_as(blocks))  # ...in whole blocks
        assert torch.equal(blocks[:, 0] % 32, torch.zeros(blocks.shape[0], dtype=blocks.dtype))
    sums = imp.hidden.reshape(-1, 32).sum(1)
    assert torch.all(sums[perm.hidden.reshape(-1, 32)[:, 0] // 32].diff() <= 0)  # most important block first

    sn = build(model, space_cfg, backend=backend, calib_ids=calib, cache_dir=tmp_path)
    sub = materialize(sn, Arch.full(sn.space, bits=4))
    for layer in sub.model.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            torch.testing.assert_close(lin.quantized_weight(), lin.weight, rtol=0, atol=0)
