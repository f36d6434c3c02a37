"""W8A8 matmul: per-token int8 activations x group-wise 8/4-bit weights; Triton kernel beside its reference."""

from archquant.kernels.w8a8_matmul.reference import w8a8_matmul_ref

__all__ = ["w8a8_matmul_ref"]
