"""The reference backends: this package's own group-wise quantiser, run by torch (any device) or Triton (CUDA)."""

from __future__ import annotations

from archquant.backends.base import Backend


class TorchBackend(Backend):
    """The reference runtime (any device): group-wise asymmetric weights, per-token int8 activations."""

    name = "torch"


class TritonBackend(Backend):
    """This package's Triton kernels on CUDA: same quantiser as torch; kernels exist for 8 and 4 bits."""

    name = "triton"
    weight_bits = (16, 8, 4)
