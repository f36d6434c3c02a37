"""Exactness: supernet at a hard architecture == the materialised subnet; entanglement asserts."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from archquant.backends import Backend, register_backend
from archquant.models.fake_quant_linear import FakeQuantLinear
from archquant.quant.reference import fake_quant_act as ref_fake_quant_act
from archquant.supernet import Arch, build, materialize
from archquant.supernet.linear import ElasticLinear
from tests._tiny import CountLinear, tiny_model, tiny_space, token_ids

TOL = 1e-4  # fp32; observed differences are 0 (sliced path) to ~1e-6 (masked path)


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def sn3(tmp_path_factory):
    """A 3-block tiny supernet over the default space (permuted by importance)."""
    model = tiny_model(layers=3)
    cache = tmp_path_factory.mktemp("cache")
    return build(model, tiny_space(), calib_ids=token_ids(rows=4, seq=32, seed=1), cache_dir=cache), model


def straight_through(probs: dict[str, torch.Tensor], seed: int = 0):
    """Hard one-hot forward values with a soft gradient path (what ``sample_probs(hard=True)`` returns).

    Returns:
        ``(probs, leaves)``: the straight-through vectors and the soft leaves that receive gradients.
    """
    g = torch.Generator().manual_seed(seed)
    out, leaves = {}, []
    for name, p in probs.items():
        soft = torch.softmax(torch.randn(p.shape[0], generator=g), 0).requires_grad_()
        leaves.append(soft)
        out[name] = p + soft - soft.detach()
    return out, leaves


def random_archs(space, n: int, seed: int = 0, abits16: bool = False):
    rng = random.Random(seed)
    for _ in range(n):
        arch = Arch.random(space, rng)
        if abits16:
            for la in arch.layers:
                la.abits = 16
        yield arch


@torch.no_grad()
def test_random_archs_materialised_equal_supernet_with_hard_gates(sn3):
    sn, _ = sn3
    ids = token_ids(seed=5)
    for arch in random_archs(sn.space, 6, seed=1):
        sub = materialize(sn, arch)
        diff = (sub(ids).logits - sn(ids, sn.arch_probs(arch))).abs().max()
        assert diff <= TOL, (arch.summary(), float(diff))


def test_masked_path_with_straight_through_gates_equals_materialised(sn3):
    """Hard ST gates carry gradients, so they take the masked (training) path; 16-bit activations
    avoid int8 rounding flips that 1-ulp differences of the masked sums can trigger."""
    sn, _ = sn3
    ids = token_ids(seed=6)
    for i, arch in enumerate(random_archs(sn.space, 4, seed=2, abits16=True)):
        sub = materialize(sn, arch)
        probs, leaves = straight_through(sn.arch_probs(arch), seed=i)
        out = sn(ids, probs)
        with torch.no_grad():
            diff = (sub(ids).logits - out).abs().max()
        assert diff <= TOL, (arch.summary(), float(diff))
        out.square().mean().backward()  # and the gates receive gradients through the masks
        grads = dict(zip(probs, leaves))
        for name in ["hidden", "lm_head.wbits"] + [f"layers.{l}.keep" for l in range(3)]:
            assert grads[name].grad is not None and grads[name].grad.abs().sum() > 0, name


@torch.no_grad()
def test_full_space_subnet_equals_original_model(sn3):
    sn, model = sn3
    ids = token_ids(seed=7)
    sub = materialize(sn, Arch.full(sn.space))
    assert (sub(ids).logits - model(ids).logits).abs().max() <= TOL
    assert sub.config.tie_word_embeddings and sub.lm_head.weight is sub.model.embed_tokens.weight


@torch.no_grad()
def test_naive_mode_equals_vectorised(sn3):
    sn, _ = sn3
    ids = token_ids(seed=8)
    arch = next(random_archs(sn.space, 1, seed=3, abits16=True))
    probs = sn.arch_probs(arch)
    try:
        vec = sn(ids, probs)
        sn.mode = "naive"
        assert (sn(ids, probs) - vec).abs().max() <= TOL
        # Gates that enter linearly (masked widths before a linear, bits of o/down) mix identically.
        soft = sn.sample_probs(1.0, generator=torch.Generator().manual_seed(0))
        for name in probs:
            if name.endswith(("kv_groups", ".mlp", "wbits.o", "wbits.down")):
                probs[name] = soft[name]
        naive = sn(ids, probs)
        sn.mode = "vectorized"
        assert (sn(ids, probs) - naive).abs().max() <= TOL
    finally:
        sn.mode = "vectorized"


@pytest.mark.parametrize(
    "overrides",
    [
        # group 16 makes the gathered o_proj columns straddle quantisation groups of the full layout
        {"kv_groups": [1.0, 0.5], "q_per_group": [1.0, 0.5], "head_dim": [1.0, 0.5], "group_size": 16},
        {"bits_granularity": "linear", "hidden": [1.0, 0.5]},
    ],
    ids=["opt-in-heads-and-head-size", "per-linear-bits"],
)
def test_opt_in_spaces_are_exact(overrides, tmp_path):
    model = tiny_model(layers=2)
    ids = token_ids(seed=9)
    space_cfg = tiny_space(**overrides)
    sn = build(model, space_cfg, calib_ids=token_ids(rows=4, seq=32, seed=1), cache_dir=tmp_path)
    with torch.no_grad():
        assert (sn(ids, sn.arch_probs(Arch.full(sn.space))) - model(ids).logits).abs().max() <= TOL
        for arch in random_archs(sn.space, 4, seed=4):
            ref = materialize(sn, arch)(ids).logits
            assert (sn(ids, sn.arch_probs(arch)) - ref).abs().max() <= TOL, arch.summary()
            fixed = build(model, space_cfg, calib_ids=token_ids(rows=4, seq=32, seed=1), cache_dir=tmp_path)
            fixed.set_arch(arch)
            assert not fixed.open_gates()
            assert (fixed(ids) - ref).abs().max() <= TOL, arch.summary()


@torch.no_grad()
def test_set_arch_slices_weights_and_stays_exact(tmp_path):
    model = tiny_model(layers=3)
    sn = build(model, tiny_space(), calib_ids=token_ids(rows=4, seq=32, seed=1), cache_dir=tmp_path)
    arch = Arch.from_choices(
        sn.space, {"hidden": 64, "layers.0.kv_groups": 1, "layers.0.mlp": 64, "layers.1.keep": 0,
                   "layers.2.wbits.qkv": 4, "layers.2.abits": 8, "lm_head.wbits": 8}
    )
    ref = materialize(sn, arch)
    sn.set_arch(arch)
    attn0, mlp0 = sn.layers[0].self_attn, sn.layers[0].mlp
    assert attn0.q_proj.active_weight().shape == (2 * 16, 64)  # 1 KV group x 2 query heads of 16
    assert mlp0.down_proj.active_weight().shape == (64, 64)
    assert sn.layers[1].skipped
    ids = token_ids(seed=10)
    assert (sn(ids) - ref(ids).logits).abs().max() <= TOL
    assert sn.argmax_arch().to_dict() == arch.to_dict()


# ---- entanglement: the three asserts for every elastic layer -------------------------------------
def _elastic_linears(sn):
    for l, blk in enumerate(sn.layers):
        for name in ("q", "k", "v", "o"):
            yield f"layers.{l}.{name}", getattr(blk.self_attn, f"{name}_proj")
        for name in ("gate", "up", "down"):
            yield f"layers.{l}.{name}", getattr(blk.mlp, f"{name}_proj")
    yield "lm_head", sn.lm_head


def test_full_choice_uses_the_same_parameter(sn3):
    sn, _ = sn3
    for name, lin in _elastic_linears(sn):
        assert lin.active_weight() is lin.weight, name
        assert lin.qweight(0) is lin.weight, name  # 16 bits: the Parameter itself, no copy
    assert sn.lm_head.weight is sn.embed_tokens.weight  # tied embedding stays one Parameter
    w = sn.layers[0].mlp.up_proj.weight
    assert any(p is w for p in sn.weight_parameters())


def test_gradients_are_zero_outside_the_active_slice(tmp_path):
    model = tiny_model(layers=2)
    sn = build(model, tiny_space(), calib_ids=token_ids(rows=4, seq=32, seed=1), cache_dir=tmp_path, train_weights=True)
    arch = Arch.from_choices(sn.space, {"hidden": 96, "layers.0.kv_groups": 3, "layers.0.mlp": 128, "layers.1.mlp": 192,
                                        "layers.1.wbits.gate_up": 4})
    sn.set_arch(arch)
    sn(token_ids(seed=11)).square().mean().backward()
    a0, m0, m1 = sn.layers[0].self_attn, sn.layers[0].mlp, sn.layers[1].mlp

    def split(grad, rows, cols):
        inside = grad[:rows, :cols]
        outside = grad.clone()
        outside[:rows, :cols] = 0
        return inside, outside

    for lin, rows, cols in ((a0.q_proj, 3 * 2 * 16, 96), (a0.k_proj, 3 * 16, 96), (a0.o_proj, 96, 3 * 2 * 16),
                            (m0.up_proj, 128, 96), (m0.down_proj, 96, 128), (m1.gate_proj, 192, 96)):
        inside, outside = split(lin.weight.grad, rows, cols)
        assert inside.abs().sum() > 0
        assert outside.abs().sum() == 0
    norm_grad = sn.layers[0].input_layernorm.weight.grad
    assert norm_grad[:96].abs().sum() > 0 and norm_grad[96:].abs().sum() == 0
    emb_grad = sn.embed_tokens.weight.grad
    assert emb_grad[:, 96:].abs().sum() == 0


@torch.no_grad()
def test_materialised_layers_are_plain_modules_with_identical_output(sn3):
    sn, _ = sn3
    arch = Arch.from_choices(sn.space, {"hidden": 96, "layers.0.kv_groups": 3, "layers.0.mlp": 192,
                                        "layers.0.wbits.qkv": 8, "layers.0.wbits.down": 4, "layers.0.abits": 8})
    sub = materialize(sn, arch)
    probs = sn.arch_probs(arch)
    lp = sn._layer_probs(probs, 0)
    x = torch.randn(2, 5, 96)
    blk, mblk = sn.layers[0], sub.model.layers[0]
    for name in ("q", "k", "v", "o", "gate", "up", "down"):
        assert type(getattr(mblk.self_attn if name in "qkvo" else mblk.mlp, f"{name}_proj")) is FakeQuantLinear
    assert isinstance(mblk.mlp.up_proj, torch.nn.Linear)
    # MLP: elastic module at the one-hot arch vs the materialised module on the same input
    assert (blk.mlp(x, lp, 96) - mblk.mlp(x)).abs().max() <= TOL
    # attention, with the same RoPE tables
    pos = torch.arange(5)[None]
    cos, sin = sn.rotary_emb(x, pos)
    assert (blk.self_attn(x, cos, sin, lp, 96) - mblk.self_attn(x, (cos, sin))[0]).abs().max() <= TOL
    # single linears: elastic slice vs plain FakeQuantLinear
    lin: ElasticLinear = blk.mlp.down_proj
    h = torch.randn(2, 5, 192)
    xs = {0: sn.backend.fake_quant_act(h, 8, 4)}
    assert torch.equal(lin(xs, lp["w.down"], 96, 192), mblk.mlp.down_proj(h))
    assert torch.equal(sub.model.norm(x), sn.norm(x))
    ids = token_ids(seed=12)
    assert torch.equal(sub.model.embed_tokens(ids), sn.embed_tokens(ids, 96))


def test_weight_quantisation_is_cached_and_refreshed_when_weights_change(sn3):
    sn, _ = sn3
    lin = sn.layers[0].mlp.up_proj
    with torch.no_grad():
        q1 = lin.qweight(2)
        assert lin.qweight(2) is q1  # cached
        ref = sn.backend.fake_quant_weight(lin.weight, 4, sn.space.group_size)
        assert torch.equal(q1, ref)
        old = lin.weight.clone()
        lin.weight.mul_(1.5)
        try:
            q2 = lin.qweight(2)
            assert q2 is not q1
            assert torch.equal(q2, sn.backend.fake_quant_weight(lin.weight, 4, sn.space.group_size))
        finally:
            lin.weight.copy_(old)


def test_mixed_weights_equal_the_weighted_sum_of_quantisers(sn3):
    sn, _ = sn3
    lin = sn.layers[1].self_attn.o_proj
    pi = torch.tensor([0.2, 0.5, 0.3], requires_grad=True)
    x = torch.randn(3, lin.weight.shape[1])
    y = lin({0: x}, pi)
    w_eff = sum(p * sn.backend.fake_quant_weight(lin.weight, b, sn.space.group_size) for p, b in zip(pi, lin.bits))
    assert (y - F.linear(x, w_eff)).abs().max() <= 1e-5
    y.sum().backward()
    expect = torch.stack([F.linear(x, sn.backend.fake_quant_weight(lin.weight, b, 32)).sum() for b in lin.bits])
    assert torch.allclose(pi.grad, expect.detach(), rtol=1e-4, atol=1e-4)


class _QuantisedMatmulActBackend(Backend):
    """Like llama.cpp: int8 activations only for matmuls with quantised weights (abits ignored)."""

    name = "test-wq-act"

    def fake_quant_act(self, x, abits, wbits):
        return ref_fake_quant_act(x, 8) if wbits < 16 else x


register_backend(_QuantisedMatmulActBackend)


def test_activation_quantiser_that_depends_on_weight_bits(tmp_path):
    model = tiny_model(layers=2)
    sn = build(model, tiny_space(abits=[16]), backend=_QuantisedMatmulActBackend(), calib_ids=token_ids(rows=4, seq=32),
               cache_dir=tmp_path)
    lin = sn.layers[0].mlp.down_proj
    assert lin.classes == [0, 1, 1]  # 16-bit weights see float inputs, 8/4-bit weights int8 inputs
    ids = token_ids(seed=14)
    with torch.no_grad():
        for arch in random_archs(sn.space, 4, seed=5):
            sub = materialize(sn, arch)
            assert sub.config.quant["backend"] == "test-wq-act"
            assert (sub(ids).logits - sn(ids, sn.arch_probs(arch))).abs().max() <= TOL, arch.summary()
    # one mixed linear = sum over bits of pi_b * linear(act_quant(x, b), Q_b(W)), in two matmuls
    pi = torch.tensor([0.5, 0.3, 0.2])
    h = torch.randn(4, lin.weight.shape[1])
    xs = {0: h, 1: ref_fake_quant_act(h, 8)}
    expect = sum(p * F.linear(sn.backend.fake_quant_act(h, 16, b), sn.backend.fake_quant_weight(lin.weight, b, 32))
                 for p, b in zip(pi, lin.bits))
    with CountLinear() as count:
        got = lin(xs, pi)
    assert count.calls == 2
    assert (got - expect).abs().max() <= 1e-5
