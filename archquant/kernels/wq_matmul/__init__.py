"""Weight-only quantised matmul (W8A16 / W4A16): ``x @ dequant(Wq).T``; Triton kernel beside its reference."""

from archquant.kernels.wq_matmul.reference import wq_matmul_ref

__all__ = ["wq_matmul_ref"]
