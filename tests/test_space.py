"""Search-space resolution: snapping, dedup, group-size checks, gate layout, arch records."""

from __future__ import annotations

import json
import random

import pytest

from archquant.core.arch import Arch, ArchError
from archquant.core.space import SpaceConfig, SpaceError, resolve_space
from archquant.models.tiny import tiny_llama_config


class _SmolConfig:
    """SmolLM2-135M's dimensions, without loading it."""

    model_type = "llama"
    hidden_size = 576
    intermediate_size = 1536
    num_hidden_layers = 30
    num_attention_heads = 9
    num_key_value_heads = 3
    head_dim = 64
    vocab_size = 49152
    tie_word_embeddings = True


def test_design_default_resolves_on_smollm2():
    space = resolve_space(SpaceConfig(), _SmolConfig())
    assert space.hidden == [576, 512, 448, 384, 320]
    assert [kv * space.q_per_group[0] for kv in space.kv_groups] == [9, 6, 3]
    assert space.mlp == [1536, 1152, 768, 384]
    assert space.group_size == 64


def test_group_size_128_is_rejected_with_the_width():
    with pytest.raises(SpaceError, match="576"):
        resolve_space(SpaceConfig(group_size=128), _SmolConfig())


def test_opt_in_head_size_rejects_o_proj_width():
    with pytest.raises(SpaceError, match="o_proj input = 9 heads x head_dim 48 = 432"):
        resolve_space(SpaceConfig(head_dim=[1.0, 0.75]), _SmolConfig())


def test_16_bit_only_space_needs_no_group_check():
    space = resolve_space(SpaceConfig(group_size=128, wbits=[16], lm_head_bits=[16]), _SmolConfig())
    assert space.wbits == [16]


@pytest.mark.parametrize("key,value", [("hidden", [1.5]), ("mlp", []), ("wbits", [9]), ("abits", [4])])
def test_invalid_space_config_names_the_key(key, value):
    with pytest.raises(SpaceError, match=f"space.{key}"):
        SpaceConfig(**{key: value})


def test_unsupported_family_is_named():
    cfg = tiny_llama_config()
    cfg.model_type = "gpt2"
    with pytest.raises(SpaceError, match="gpt2"):
        resolve_space(SpaceConfig(), cfg)


def test_gate_layout_and_granularity():
    cfg = tiny_llama_config(num_hidden_layers=3)
    fused = resolve_space(SpaceConfig(width_multiple=32, group_size=32), cfg)
    per_linear = resolve_space(SpaceConfig(width_multiple=32, group_size=32, bits_granularity="linear"), cfg)
    assert "layers.2.wbits.qkv" in fused.gates() and "layers.2.wbits.q" not in fused.gates()
    assert len(per_linear.gates()) - len(fused.gates()) == 3 * (7 - 4)
    assert fused.gates()["layers.0.keep"] == [1, 0]


def test_arch_round_trips_and_rejects_other_models(tmp_path):
    space = resolve_space(SpaceConfig(width_multiple=32, group_size=32), tiny_llama_config(num_hidden_layers=4))
    rng = random.Random(0)
    for _ in range(20):
        arch = Arch.random(space, rng)
        arch.check(space)
        assert Arch.from_choices(space, arch.to_choices(space)) == arch
        assert any(la.keep for la in arch.layers)
    arch.save(tmp_path / "arch.json")
    assert Arch.load(tmp_path / "arch.json") == arch
    other = resolve_space(SpaceConfig(width_multiple=32, group_size=32), tiny_llama_config(num_hidden_layers=3))
    with pytest.raises(ArchError, match="num_hidden_layers"):
        arch.check(other)


def test_arch_bad_records_fail_clearly(tmp_path):
    space = resolve_space(SpaceConfig(width_multiple=32, group_size=32), tiny_llama_config())
    d = Arch.full(space).to_dict()
    d["version"] = 99
    with pytest.raises(ArchError, match="version 99"):
        Arch.from_dict(d)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ArchError, match="not valid JSON"):
        Arch.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="archquant-search"):
        Arch.load(tmp_path / "missing.json")
    with pytest.raises(ArchError, match="not among"):
        Arch.from_choices(space, {"hidden": 100})
    assert json.loads(json.dumps(Arch.full(space).to_dict()))["hidden"] == 128
