"""The reference quantiser against closed forms: grid, range, STE, activation scaling."""

from __future__ import annotations

import pytest
import torch

from archquant.quant.reference import (
    dequantize_weight,
    fake_quant_act,
    fake_quant_weight,
    quantize_act,
    quantize_weight,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_quantiser_error_is_bounded_by_half_a_step(bits):
    torch.manual_seed(0)
    w = torch.randn(40, 192)
    q, scale, zero = quantize_weight(w, bits, 64)
    assert q.dtype == torch.uint8 and int(q.max()) <= (1 << bits) - 1
    assert scale.shape == (40, 3) and scale.dtype == torch.float16
    deq = dequantize_weight(q, scale, zero)
    step = scale.float().repeat_interleave(64, dim=1)
    err = (deq - w).abs() / step
    # Inside the range the grid is within half a step; the integer zero point shifts the grid by up to
    # half a step, so the extreme of a group can be clamped and be off by up to one step.
    assert err.max() <= 1.0 + 1e-3
    assert (err > 0.5 + 1e-3).float().mean() < 0.01


def test_fake_quant_is_dequant_of_quant_and_straight_through():
    torch.manual_seed(1)
    w = torch.randn(16, 128, requires_grad=True)
    fq = fake_quant_weight(w, 4, 64)
    assert torch.equal(fq.detach(), dequantize_weight(*quantize_weight(w, 4, 64)))
    fq.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through
    assert fake_quant_weight(w, 16, 64) is w


def test_quantiser_rejects_bad_shapes_and_bits():
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_weight(torch.randn(4, 100), 4, 64)
    with pytest.raises(ValueError, match="2..8"):
        quantize_weight(torch.randn(4, 64), 16, 64)


def test_activation_quant_is_per_token_symmetric():
    x = torch.tensor([[1.0, -2.0, 0.5], [100.0, 0.0, -50.0]])
    q, s = quantize_act(x, 8)
    torch.testing.assert_close(s.squeeze(1), torch.tensor([2.0 / 127, 100.0 / 127]))
    assert q[0, 1] == -127 and q[1, 0] == 127
    y = fake_quant_act(x, 8)
    assert (y - x).abs().max() <= 100.0 / 127 / 2 + 1e-6
    assert fake_quant_act(x, 16) is x
