"""Profiler, runtime swap, overhead fit, roofline formulas and the archquant-profile verb on the tiny model."""

from __future__ import annotations

import pytest
import torch

from archquant.backends import Backend, BackendError, get_backend
from archquant.commands.profile import profile
from archquant.config import Config
from archquant.core.arch import Arch
from archquant.core.space import SpaceConfig, resolve_space
from archquant.kernels.swap import to_runtime
from archquant.latency import LatencyModel, LatencyTable
from archquant.latency import profiler as prof
from archquant.latency.build import _space_config_of, profile_table
from archquant.latency.config import LatencyConfig
from archquant.latency.roofline import RooflineParams, roofline_ms
from archquant.latency.runtime import time_model_ms
from archquant.latency.scenario import Scenario
from archquant.latency.signatures import enumerate_signatures, signature_key
from archquant.models.config import ModelConfig
from archquant.models.tiny import tiny_llama, tiny_llama_config

SMALL = SpaceConfig(hidden=[1.0], kv_groups=[1.0, 0.5], mlp=[1.0, 0.5], wbits=[16, 4], abits=[16, 8],
                    lm_head_bits=[16, 8], width_multiple=32, group_size=32)  # few shapes: QuantLinear times each once


def test_fit_overheads_recovers_a_line():
    # ms = 3.0 + 1.5 * depth; a block's ops sum to 1.2 ms, the model ops to 2.0 ms
    depth_ms = {d: 3.0 + 1.5 * d for d in (7, 15, 30)}
    over = prof.fit_overheads(depth_ms, block_ops_ms=1.2, model_ops_ms=2.0)
    assert over["per_layer"] == pytest.approx(0.3) and over["per_token"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two or more depths"):
        prof.fit_overheads({30: 1.0}, 1.0, 1.0)


def test_runtime_swap_keeps_logits_and_decode_timer_runs():
    model = tiny_llama(vocab_size=259)
    ids = torch.randint(0, 259, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        got = to_runtime(model)(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    ms = time_model_ms(model, Scenario("decode", batch=1, context=16), repeats=2, steps=2)
    assert ms > 0
    assert time_model_ms(model, Scenario("prefill", batch=2, prefill_len=8), repeats=2) > 0
    depth_ms = prof.time_depths(model, Scenario("decode", context=8), [1, 2], repeats=1)
    assert set(depth_ms) == {1, 2} and len(model.model.layers) == 2  # layers restored after truncation
    fresh = tiny_llama(vocab_size=259)
    swapped = to_runtime(fresh, copy=True)
    assert type(fresh.lm_head) is torch.nn.Linear and type(swapped.lm_head) is not torch.nn.Linear


def test_profile_ops_times_every_signature():
    space = resolve_space(SMALL, tiny_llama_config())
    for sc in (Scenario("decode", context=32), Scenario("prefill", prefill_len=16)):
        runners = prof.OpRunners(sc, get_backend("torch"), space.group_size, vocab=259, attn_implementation="eager",
                                 cold=False, linear_paths=("dense",))  # the profile-verb test runs the real paths
        ops = prof.profile_ops(space, runners, min_run_time=0.001, log=lambda _: None)
        for kind, sigs in enumerate_signatures(space).items():
            if kind == "overhead":
                continue
            got = {signature_key(kind, r): r["ms"] for r in ops[kind]}
            assert set(got) == {signature_key(kind, s) for s in sigs}, kind
            assert all(v > 0 for v in got.values()), kind


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("past,seq", [(7, 1), (0, 5)])
def test_attention_op_matches_hf_attention(impl, past, seq):
    """The timed attention op computes what LlamaAttention computes between its projections (GQA, with a cache)."""
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    torch.manual_seed(0)
    cfg = tiny_llama_config()
    cfg._attn_implementation = impl
    attn = LlamaAttention(cfg, layer_idx=0).eval()
    x = torch.randn(2, seq, cfg.hidden_size)
    cos, sin = LlamaRotaryEmbedding(cfg)(x, torch.arange(past, past + seq)[None].expand(2, -1))
    pk, pv = torch.randn(2, 4, past, 16), torch.randn(2, 4, past, 16)
    cache = DynamicCache()
    if past:
        cache.update(pk, pv, 0)
    mask = None
    if impl == "eager" and seq > 1:
        mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        want, _ = attn(x, position_embeddings=(cos, sin), attention_mask=mask, past_key_values=cache)
        core = prof.attention_core(attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), cos, sin, pk, pv, head_dim=16,
                                   attn_implementation=impl, mask=mask)
        got = attn.o_proj(core)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_roofline_formulas():
    p = RooflineParams(bandwidth_gbs=20.0, peak_gflops=100.0, op_overhead_ms=0.0, dense_bytes=4)
    be = get_backend("torch")
    dec = Scenario("decode")
    sig = {"K": 576, "N": 1536, "wbits": 16, "abits": 16}
    # decode is bandwidth bound: fp32 weight bytes + activations over 20 GB/s
    assert roofline_ms("linear", sig, dec, p, be, 64) == pytest.approx((576 * 1536 * 4 + (576 + 1536) * 4) / 20e9 * 1e3)
    q4 = roofline_ms("linear", {**sig, "wbits": 4}, dec, p, be, 64)
    assert q4 == pytest.approx((be.weight_bytes(576 * 1536, 4, 64) + (576 + 1536) * 4) / 20e9 * 1e3)
    # prefill of 128 tokens is compute bound: 2*M*K*N / 100 GFLOP/s
    pre = Scenario("prefill", prefill_len=128)
    assert roofline_ms("linear", sig, pre, p, be, 64) == pytest.approx(2 * 128 * 576 * 1536 / 100e9 * 1e3)


def test_a_backend_with_its_own_format_is_not_timed_on_the_reference_runtime():
    class OwnFormat(Backend):
        name = "own"

        def fake_quant_weight(self, w, bits, group_size):
            return w

    model = tiny_llama()
    space = resolve_space(SMALL, model.config)
    with pytest.raises(BackendError, match="own weight format"):
        profile_table(model, space, OwnFormat(), Scenario("decode", context=8), LatencyConfig(backend="torch"))


def test_space_config_round_trip():
    space = resolve_space(SMALL, tiny_llama_config())
    space = resolve_space(SpaceConfig(hidden=[1.0, 0.5], q_per_group=[1.0, 0.5], head_dim=[1.0, 0.5], width_multiple=32,
                                      group_size=8), tiny_llama_config())
    again = resolve_space(_space_config_of(space), tiny_llama_config())
    assert again.gates() == space.gates()


def test_profile_verb_writes_a_usable_table(tmp_path):
    out = tmp_path / "tiny-torch-decode.json"
    cfg = Config(model=ModelConfig(name="tiny-llama"), space=SMALL,
                 latency=LatencyConfig(backend="torch", context=32, min_run_time=0.001, e2e_repeats=1, out=str(out)))
    profile(cfg)
    table = LatencyTable.load(out)
    h = table.header
    keys = ("device", "backend", "scenario", "batch", "context", "tokens", "model", "versions", "date", "method", "threads")
    for key in keys:
        assert key in h, key
    assert h["context"] == 32 and h["backend"] == "torch" and not table.is_estimate
    assert {r["name"] for r in table.ops["overhead"]} == {"per_layer", "per_token"}
    assert (tmp_path / "roofline.json").exists()
    space = resolve_space(SMALL, tiny_llama_config(vocab_size=259))
    lm = LatencyModel(space, table, "torch")
    lo, hi = lm.range_ms()
    assert lo < lm.predict_ms(Arch.full(space)) <= hi + 1e-9
