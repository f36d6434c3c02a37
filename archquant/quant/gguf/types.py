"""The GGUF weight-type palette: block geometry, bytes per block, matmul activation format, row checks."""

from __future__ import annotations

from archquant.utils.errors import UserError

BLOCK = 32  # QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0 = QK4_NL = 32 in ggml
QK_K = 256  # super-block of the K-quants and IQ4_XS
FLOAT_TYPES = ("F32", "F16")
LEGACY_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL")
K_TYPES = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "IQ4_XS")
QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_1", "Q5_0", "Q5_K", "Q4_1", "Q4_0", "Q4_K", "IQ4_NL", "IQ4_XS", "Q3_K")
# every type llama.cpp's CPU backend runs and archquant writes as raw blocks, widest first
PALETTE = FLOAT_TYPES + QUANT_TYPES
SUPPORTED_TYPES = PALETTE
# (weights per block, bytes per block) as in ggml's type traits (gguf.constants.GGML_QUANT_SIZES)
TYPE_SIZES = {
    "F32": (1, 4), "F16": (1, 2),
    "Q8_0": (32, 34), "Q5_1": (32, 24), "Q5_0": (32, 22), "Q4_1": (32, 20), "Q4_0": (32, 18), "IQ4_NL": (32, 18),
    "Q6_K": (256, 210), "Q5_K": (256, 176), "Q4_K": (256, 144), "IQ4_XS": (256, 136), "Q3_K": (256, 110),
}
# the format ggml-cpu converts a matmul's activations to (type_traits_cpu[type].vec_dot_type)
ACT_TYPE = {
    "F32": "F32", "F16": "F16",
    "Q8_0": "Q8_0", "Q5_0": "Q8_0", "Q4_0": "Q8_0", "IQ4_NL": "Q8_0", "Q5_1": "Q8_1", "Q4_1": "Q8_1",
    "Q6_K": "Q8_K", "Q5_K": "Q8_K", "Q4_K": "Q8_K", "IQ4_XS": "Q8_K", "Q3_K": "Q8_K",
}


def bits_per_weight(qtype: str) -> float:
    """Storage bits per weight, scales included (Q8_0 8.5, Q4_1 5.0, Q4_0 4.5, Q6_K 6.5625, F16 16)."""
    per_block, nbytes = TYPE_SIZES[check_type(qtype)]
    return 8 * nbytes / per_block


class GGUFTypeError(UserError, ValueError):
    """A GGUF type outside the palette, or a row length the type's block does not divide."""


def check_type(qtype: str) -> str:
    """Return ``qtype`` if it is in the palette, else raise naming the choices."""
    if qtype not in PALETTE:
        raise GGUFTypeError(f"GGUF type {qtype!r} is not supported here (choose one of {PALETTE})")
    return qtype


def block_size(qtype: str) -> int:
    """Weights per block along a row: 1 for float types, 32 for legacy types, 256 for K-quants / IQ4_XS."""
    return TYPE_SIZES[check_type(qtype)][0]


def types_for_row(k: int) -> tuple[str, ...]:
    """The palette types whose block divides a row length of ``k``."""
    return tuple(t for t in PALETTE if k % TYPE_SIZES[t][0] == 0)


def check_row(k: int, qtype: str, name: str = "tensor") -> None:
    """Raise unless ``qtype`` can store rows of ``k`` weights; the message names ``name`` and the choices."""
    bs = block_size(qtype)
    if k % bs:
        raise GGUFTypeError(
            f"{name}: {qtype} needs a row length that is a multiple of {bs}, got {k}; "
            f"types allowed for this row length: {types_for_row(k)}"
        )


def type_nbytes(num_weights: int, qtype: str) -> float:
    """Bytes that ``num_weights`` weights take in GGUF type ``qtype`` (Q8_0: 34 B per 32 weights, ...)."""
    per_block, nbytes = TYPE_SIZES[check_type(qtype)]
    return num_weights / per_block * nbytes
