"""Group-wise weight quantisation and per-token activation quantisation (the one quantiser)."""

from archquant.quant.reference import (
    dequantize_weight,
    fake_quant_act,
    fake_quant_weight,
    quantize_act,
    quantize_weight,
)

__all__ = ["quantize_weight", "dequantize_weight", "fake_quant_weight", "quantize_act", "fake_quant_act"]
