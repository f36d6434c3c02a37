"""The GGUF palette: raw blocks bit-exact with gguf-py, importance-weighted search never worse than
round-to-nearest, ggml's Q8_K activations, clear errors for bad types and row lengths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from archquant.quant import gguf as quant

GGUF_QUANTISERS = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")  # the types gguf-py can quantise
# byte offsets of fp16 fields per block (random bytes elsewhere are valid codes / scales)
FP16_FIELDS = {"Q8_0": (0,), "Q5_1": (0, 2), "Q5_0": (0,), "Q4_1": (0, 2), "Q4_0": (0,), "IQ4_NL": (0,),
               "Q6_K": (208,), "Q5_K": (0, 2), "Q4_K": (0, 2), "IQ4_XS": (0,), "Q3_K": (108,)}


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random rows with edge cases: an all-zero block, a constant block, +/- ties, an outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 2
    w[0, :32] = 0.0
    w[1, :32] = 0.75
    w[2, :32] = torch.tensor([0.5, -0.5] * 16)
    w[3, 5] = 40.0
    return w


def _importance(k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(k, generator=g) ** 4 * 10  # heavy-tailed, like mean x^2 of real activations


def _shape(qtype: str) -> tuple[int, int]:
    return (6, 512) if quant.block_size(qtype) == 256 else (5, 96)


@pytest.mark.parametrize("qtype", quant.QUANT_TYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_raw_blocks_read_back_by_gguf_bit_exactly(qtype, weighted):
    n, k = _shape(qtype)
    w = _weights(n, k, seed=k)
    imp = _importance(k) if weighted else None
    raw = quant.pack(w, qtype, imp)
    assert raw.dtype == np.uint8 and raw.shape == (n, k // quant.TYPE_SIZES[qtype][0] * quant.TYPE_SIZES[qtype][1])
    ref = torch.from_numpy(np.ascontiguousarray(gguf_dequantize(raw, GGMLQuantizationType[qtype])))
    # the supernet's fake-quant, the torch read-back and gguf's reader agree bit for bit
    assert torch.equal(quant.weight_as_type(w, qtype, imp), ref)
    assert torch.equal(quant.fake_quant_weight(w, qtype, imp), ref)
    assert torch.equal(quant.dequantize_raw(raw, qtype), ref)
    if qtype in GGUF_QUANTISERS and not weighted:
        assert np.array_equal(raw, gguf_quantize(w.numpy(), GGMLQuantizationType[qtype]))


@pytest.mark.parametrize("qtype", quant.QUANT_TYPES)
def test_dequantize_raw_matches_gguf_on_arbitrary_blocks(qtype):
    per_block, nbytes = quant.TYPE_SIZES[qtype]
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, size=(4, 3 * nbytes), dtype=np.uint8)
    blocks = raw.reshape(-1, nbytes)
    for off in FP16_FIELDS[qtype]:
        blocks[:, off : off + 2] = rng.normal(0, 0.05, size=(blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
    ref = torch.from_numpy(np.ascontiguousarray(gguf_dequantize(raw, GGMLQuantizationType[qtype])))
    assert ref.shape == (4, 3 * per_block)
    assert torch.equal(quant.dequantize_raw(raw, qtype), ref)


@pytest.mark.parametrize("qtype", quant.QUANT_TYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_importance_weighted_is_never_worse_than_round_to_nearest(qtype, seed):
    n, k = _shape(qtype)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(1, k, generator=g) * 3
    imp = _importance(k, seed + 10)
    rtn = quant.weighted_error(w, quant.weight_as_type(w, qtype), imp)
    mine = quant.weighted_error(w, quant.weight_as_type(w, qtype, imp), imp)
    assert mine <= rtn
    if qtype != "Q8_0":
        assert mine < 0.97 * rtn  # the search buys something on 6 bits and fewer


def test_bad_type_names_the_palette():
    with pytest.raises(quant.GGUFTypeError, match=r"not supported.*Q4_K.*IQ4_NL"):
        quant.pack(torch.randn(2, 256), "Q4_Z")
    with pytest.raises(quant.GGUFTypeError, match="float type"):
        quant.quantize(torch.randn(2, 64), "F16")


@pytest.mark.parametrize("qtype", quant.K_TYPES)
def test_block_256_types_refuse_other_row_lengths_naming_the_tensor(qtype):
    with pytest.raises(quant.GGUFTypeError, match=r"blk\.3\.attn_q\.weight: .*multiple of 256, got 576.*'Q4_0'") as e:
        quant.quantize(torch.randn(2, 576), qtype, name="blk.3.attn_q.weight")
    assert "Q4_K" not in str(e.value).split("allowed")[1]
    assert quant.types_for_row(576) == ("F32", "F16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL")
    assert "Q3_K" in quant.types_for_row(1536)


def test_activation_types_follow_ggml_cpu():
    assert {quant.ACT_TYPE[t] for t in quant.K_TYPES} == {"Q8_K"}
    assert quant.ACT_TYPE["IQ4_NL"] == quant.ACT_TYPE["Q5_0"] == "Q8_0" and quant.ACT_TYPE["Q5_1"] == "Q8_1"


def test_q8_k_activation_matches_quantize_row_q8_k():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 512, generator=g) * 2
    x[1, :256] = 0.0
    x[2, 7] = -9.0  # a negative largest value: iscale > 0
    q, d = quant.quantize_act_q8k(x)
    for r in range(3):
        for b in range(2):
            blk = x[r, 256 * b : 256 * b + 256]
            i = int(blk.abs().argmax())
            if float(blk[i]) == 0:
                assert float(d[r, b]) == 0 and not q[r, 256 * b : 256 * b + 256].any()
                continue
            iscale = torch.div(torch.tensor(-127.0), blk[i])  # C's -127.f / max
            assert torch.equal(q[r, 256 * b : 256 * b + 256], torch.round(iscale * blk).clamp(max=127))
            assert float(d[r, b]) == float(torch.div(torch.tensor(1.0), iscale))
    xa = quant.act_as_type(x, "Q4_K")
    assert torch.equal(xa, (d[..., None] * q.reshape(3, 2, 256)).reshape(3, 512))
    assert (xa - x).abs().max() <= x.abs().max() / 127 * 0.51


@pytest.mark.parametrize("qtype", ["Q5_1", "Q4_1"])
def test_affine_legacy_linear_uses_the_q8_1_block_sum(qtype):
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 64, generator=g), torch.randn(3, 64, generator=g)
    parts = quant.quantize(w, qtype)
    qa, da = quant.quantize_act_q8(x)
    scaled = quant.dequantize({**parts, "m": torch.zeros_like(parts["m"])}, qtype)
    out = torch.zeros(2, 3)
    for r in range(2):
        for n in range(3):
            for b in range(2):
                sl = slice(32 * b, 32 * b + 32)
                s = float(torch.tensor(float(x[r, sl].abs().max()) / 127 * float(qa[r, sl].sum())).half())
                out[r, n] += float((scaled[n, sl] * float(da[r, b]) * qa[r, sl]).sum()) + float(parts["m"][n, b]) * s
    torch.testing.assert_close(quant.linear(x, w, qtype), out, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_q4_1_of_the_embedded_q4_1_weights_reproduces_its_blocks():
    from gguf import GGUFReader

    from archquant.models.embedded import ensure_embedded_gguf

    reader = GGUFReader(ensure_embedded_gguf())
    names = {"blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.15.attn_v.weight", "blk.29.ffn_gate.weight"}
    seen = 0
    for t in reader.tensors:
        if t.name not in names:
            continue
        assert t.tensor_type.name == "Q4_1"
        raw = np.asarray(t.data)
        w = quant.dequantize_raw(raw, "Q4_1")
        assert np.array_equal(quant.pack(w, "Q4_1"), raw)
        assert np.array_equal(quant.pack(w, "Q4_1", torch.rand(w.shape[1]) + 0.1), raw)  # the search finds the grid too
        seen += 1
    assert seen == len(names)


@pytest.mark.parametrize("weight_type", ["Q8_0", "Q4_1", "Q6_K"])
def test_activation_blocks_of_subnormal_values_quantise_to_zero_not_nan(weight_type):
    """127 / amax overflows for a block of subnormals; its fp16 (or fp32) scale is 0 in ggml, so its values are 0.
    (A search on the llama.cpp backend once stopped on a NaN loss from such a block after a narrow MLP choice.)"""
    from archquant.quant.gguf.activations import act_as_type

    x = torch.randn(2, 256)
    x[0] = 0.0
    x[0, :32] = 1e-40
    x[0, 7] = -3e-40
    y = act_as_type(x, weight_type)
    assert torch.isfinite(y).all() and y[0].abs().max() == 0
    assert (y[1] - x[1]).abs().max() < 0.02 * x[1].abs().max()  # ordinary rows are untouched by the guard
