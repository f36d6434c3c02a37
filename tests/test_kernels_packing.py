"""Packed weight storage: layout, round trips, and bit-exact agreement with the supernet's fake-quant."""

from __future__ import annotations

import pytest
import torch

from archquant.backends import get_backend
from archquant.quant import reference as ref
from archquant.quant.packing import pack_int, pack_weight, packed_words, unpack_int, values_per_word


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("k", [64, 70, 192])
def test_pack_unpack_round_trip(bits, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    q = torch.randint(0, 1 << bits, (5, k), generator=g, dtype=torch.uint8)
    packed = pack_int(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, packed_words(k, bits))
    assert torch.equal(unpack_int(packed, bits, k), q)


def test_layout_is_lsb_first_along_k():
    # 4 bits: eight values per int32, value j at bits 4j; as little-endian bytes: low nibble first
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    word = pack_int(q, 4)
    assert word.item() == sum(int(v) << (4 * j) for j, v in enumerate(q[0].tolist())) - (1 << 32)
    assert word.view(torch.uint8).flatten().tolist() == [0x21, 0x43, 0x65, 0xF7]
    # 8 bits: four bytes per word in K order
    q8 = torch.tensor([[1, 2, 254, 255]], dtype=torch.uint8)
    assert pack_int(q8, 8).view(torch.uint8).flatten().tolist() == [1, 2, 254, 255]
    # 3 bits: ten values per word, top two bits unused
    assert values_per_word(3) == 10 and packed_words(64, 3) == 7


def test_packing_rejects_bad_input():
    with pytest.raises(ValueError, match="out of range"):
        pack_int(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="packing supports"):
        pack_int(torch.zeros(2, 8, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_int(torch.zeros(2, 3, dtype=torch.int32), 4, 64)


def _weights():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(48, 192, generator=g)
    w_shifted = base.abs() + 0.5  # all-positive groups: the zero point clamps at its end
    w_sparse = base.clone()
    w_sparse[:, :64] = 0.0  # an all-zero group
    return {"normal": base * 0.02, "large": base * 30.0, "positive": w_shifted, "zero_group": w_sparse}


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequant_of_pack_equals_supernet_fake_quant_bit_for_bit(bits, dtype):
    for backend in ("torch", "triton"):
        b = get_backend(backend)
        if bits not in b.weight_bits:
            continue
        for name, w in _weights().items():
            w = w.to(dtype)
            pw = pack_weight(w, bits, 64)
            fq = b.fake_quant_weight(w, bits, 64)
            assert torch.equal(pw.dequantize(dtype), fq), (backend, name)
            # and the stored tensors are the reference quantiser's, unchanged
            q, s, z = ref.quantize_weight(w, bits, 64)
            assert torch.equal(pw.unpack(), q) and torch.equal(pw.scales, s) and torch.equal(pw.zeros, z)
