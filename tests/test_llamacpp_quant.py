"""llama.cpp backend quantiser: bit-exact against gguf's own quantiser, ggml's activation formats, space rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from archquant.backends import BackendError, get_backend
from archquant.backends.llamacpp import LlamaCppBackend
from archquant.core.space import SpaceConfig, resolve_space
from archquant.models.tiny import tiny_llama_config
from archquant.quant import gguf as quant


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random rows with edge-case blocks: all zero, constant, +/- ties of the largest magnitude, outliers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 2
    w[0, :32] = 0.0
    w[1, :32] = 0.75
    w[2, :32] = torch.tensor([0.5, -0.5] * 16)  # the largest magnitude occurs with both signs
    w[3, 5] = 40.0  # an outlier block
    w[4, :32] = -1e-3 * torch.arange(32)
    return w


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "F16", "F32"])
@pytest.mark.parametrize("shape", [(7, 32), (41, 96), (16, 576)])
def test_weights_bit_exact_against_gguf(qtype, shape):
    w = _weights(*shape, seed=shape[0])
    ref = gguf_quantize(w.numpy(), GGMLQuantizationType[qtype])
    packed = quant.pack(w, qtype)
    assert packed.dtype == ref.dtype and packed.shape == ref.shape
    assert np.array_equal(packed.view(np.uint8), ref.view(np.uint8))  # same bytes on disk
    deq = gguf_dequantize(ref, GGMLQuantizationType[qtype])
    assert torch.equal(quant.weight_as_type(w, qtype), torch.from_numpy(np.ascontiguousarray(deq)))


def test_quantised_codes_have_the_documented_ranges():
    w = _weights(8, 64)
    assert int(quant.quantize(w, "Q8_0")["q"].abs().max()) == 127
    for qtype in ("Q4_0", "Q4_1"):
        q = quant.quantize(w, qtype)["q"]
        assert int(q.min()) >= 0 and int(q.max()) == 15
    # Q4_0's scale is the signed largest-magnitude value / -8: that value maps to code 0 exactly
    parts = quant.quantize(w[5:6, :32], "Q4_0")
    i = int(w[5, :32].abs().argmax())
    assert int(parts["q"][0, i]) == 0


def test_row_length_must_be_a_multiple_of_the_block():
    with pytest.raises(quant.GGUFTypeError, match="multiple of 32"):
        quant.quantize(torch.randn(4, 48), "Q4_0")
    with pytest.raises(quant.GGUFTypeError, match="multiple of 256"):
        quant.weight_as_type(torch.randn(4, 64), "Q4_K")
    with pytest.raises(quant.GGUFTypeError, match="not supported"):
        quant.weight_as_type(torch.randn(4, 64), "Q7_X")


def test_activation_q8_matches_ggml_x86_formula():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 96, generator=g) * 3
    x[1, :32] = 0.0
    q, d = quant.quantize_act_q8(x)
    blocks = x.reshape(5, 3, 32)
    amax = blocks.abs().amax(-1)
    # d = amax / 127 stored fp16; codes use 127 / amax and round half to even (_mm256_round_ps)
    assert torch.equal(d, (amax / 127).half())
    inv = torch.where(amax == 0, torch.zeros_like(amax), 127.0 / amax.clamp_min(1e-30))
    expect = torch.round(blocks * inv[..., None]).reshape(5, 96)
    assert torch.equal(q, expect)
    assert torch.all(q[1, :32] == 0)
    # the matmul sees fp16(d) * q
    xq = quant.act_as_type(x, "Q4_0")
    assert torch.equal(xq.reshape(5, 3, 32), d.float()[..., None] * q.reshape(5, 3, 32))
    assert (xq - x).abs().max() <= (amax.max() / 127) * 0.51 + 1e-6


def test_activation_format_follows_the_weight_type():
    x = torch.randn(3, 64) * 5
    assert torch.equal(quant.act_as_type(x, "F32"), x)
    assert torch.equal(quant.act_as_type(x, "F16"), x.half().float())
    assert torch.equal(quant.act_as_type(x, "Q8_0"), quant.act_as_type(x, "Q4_0"))
    assert torch.equal(quant.act_as_type(x, "Q4_1"), quant.act_as_type(x, "Q4_0"))  # Q8_1 codes = Q8_0 codes


def test_q4_1_linear_uses_the_q8_1_block_sum():
    """``quant.linear`` for Q4_1 follows ggml_vec_dot_q4_1_q8_1 block by block (explicit loop here)."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 64, generator=g), torch.randn(3, 64, generator=g)
    parts = quant.quantize(w, "Q4_1")
    qa, da = quant.quantize_act_q8(x)
    out = torch.zeros(2, 3)
    for r in range(2):
        for n in range(3):
            acc = 0.0
            for b in range(2):
                sl = slice(32 * b, 32 * b + 32)
                isum = float((parts["q"][n, sl].float() * qa[r, sl]).sum())
                d32 = float(x[r, sl].abs().max()) / 127
                s = float(torch.tensor(d32 * float(qa[r, sl].sum())).half())
                acc += float(parts["d"][n, b]) * float(da[r, b]) * isum + float(parts["m"][n, b]) * s
            out[r, n] = acc
    torch.testing.assert_close(quant.linear(x, w, "Q4_1"), out, rtol=1e-5, atol=1e-5)
    # for Q4_0 / Q8_0 the element-wise simulation is the whole story
    torch.testing.assert_close(
        quant.linear(x, w, "Q4_0"), torch.nn.functional.linear(quant.act_as_type(x, "Q4_0"), quant.weight_as_type(w, "Q4_0"))
    )


def test_fake_quant_has_a_straight_through_gradient():
    w = torch.randn(4, 64, requires_grad=True)
    x = torch.randn(2, 64, requires_grad=True)
    out = (quant.fake_quant_act(x, "Q4_0") @ quant.fake_quant_weight(w, "Q4_0").T).sum()
    out.backward()
    assert torch.allclose(w.grad, quant.fake_quant_act(x, "Q4_0").detach().sum(0).expand(4, 64))
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_backend_registers_and_simulates_gguf_types():
    be = get_backend("llamacpp")
    assert isinstance(be, LlamaCppBackend) and be.name == "llamacpp"
    assert be.types == {16: "F16", 8: "Q8_0", 4: "Q4_0"}
    w = torch.randn(8, 64)
    assert torch.equal(be.fake_quant_weight(w, 4, 64), quant.weight_as_type(w, "Q4_0"))  # group size does not apply
    assert torch.equal(be.fake_quant_act(w, 16, 8), quant.act_as_type(w, "Q8_0"))  # abits ignored
    q41 = LlamaCppBackend(types={4: "Q4_1", 16: "F32"})
    assert torch.equal(q41.fake_quant_weight(w, 4, 32), quant.weight_as_type(w, "Q4_1"))
    assert torch.equal(q41.fake_quant_act(w, 16, 16), w)
    with pytest.raises(BackendError, match="no GGUF type for 3-bit"):
        be.fake_quant_weight(w, 3, 32)
    with pytest.raises(BackendError, match="can be"):
        LlamaCppBackend(types={4: "Q8_0"})


def test_weight_bytes_are_gguf_sizes():
    be = LlamaCppBackend()
    n = 576 * 1536
    assert be.weight_bytes(n, 8, 64) == n / 32 * 34
    assert be.weight_bytes(n, 4, 64) == n / 32 * 18
    assert LlamaCppBackend(types={4: "Q4_1"}).weight_bytes(n, 4, 64) == n / 32 * 20
    assert be.weight_bytes(n, 16, 64) == 2 * n
    assert LlamaCppBackend(types={16: "F32"}).weight_bytes(n, 16, 64) == 4 * n


def test_restrict_space_keeps_only_what_gguf_can_hold():
    be = LlamaCppBackend()
    mc = tiny_llama_config()  # hidden 128, 8 q / 4 kv heads of 16, MLP 256
    cfg = be.restrict_space(
        SpaceConfig(head_dim=[1.0, 0.5], kv_groups=[1.0, 0.25], abits=[16, 8], wbits=[16, 8, 4, 2],
                    lm_head_bits=[16, 3], width_multiple=16, group_size=64),
        mc,
    )
    assert cfg.head_dim == [1.0] and cfg.abits == [16] and cfg.group_size == 32
    assert cfg.wbits == [16, 8, 4] and cfg.lm_head_bits == [16]
    assert cfg.width_multiple == 32
    # 0.25 of 4 KV groups = 1 group x 2 heads x 16 = 32 wide: kept; every reachable width is a multiple of 32
    space = resolve_space(cfg, mc)
    widths = space.hidden + space.mlp + [kv * q * 16 for kv in space.kv_groups for q in space.q_per_group]
    assert all(w % 32 == 0 for w in widths)
    # q_per_group 0.5 -> 1 query head per group: 1 group x 1 x 16 = 16, not a multiple of 32 -> 0.25 dropped
    cfg2 = be.restrict_space(SpaceConfig(kv_groups=[1.0, 0.25], q_per_group=[1.0, 0.5], width_multiple=32, group_size=32), mc)
    assert cfg2.kv_groups == [1.0]
    with pytest.raises(BackendError, match="space.wbits"):
        be.restrict_space(SpaceConfig(wbits=[3, 2]), mc)
