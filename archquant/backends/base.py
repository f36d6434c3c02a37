"""The backend interface. Backend-independent code asks a ``Backend`` object; it never branches on names.

A backend is the weight format of the engine that will serve the compressed model (``torch``, ``triton``,
``llamacpp``): (1) the quantiser semantics the supernet must simulate, (2) the space rules the engine
imposes, (3) the bytes a weight takes. It is a plain object: it loads no model and times nothing (the
profilers in ``archquant.latency`` do).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from archquant.quant import reference as ref
from archquant.utils.errors import UserError


class BackendError(UserError, ValueError):
    """A request the backend cannot serve (unknown name, unsupported bits, shape it cannot run)."""


class Backend:
    """Base backend: the reference group-wise quantiser of ``archquant.quant``.

    Subclasses override the quantisers and ``restrict_space`` to match their engine.
    """

    name: ClassVar[str] = "torch"
    weight_bits: ClassVar[tuple[int, ...]] = (16, 8, 4, 3, 2)
    act_bits: ClassVar[tuple[int, ...]] = (16, 8)

    def fake_quant_weight(self, w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
        """What the engine's weight at ``bits`` computes with (dequantised), straight-through gradient."""
        if bits not in self.weight_bits:
            raise BackendError(f"backend {self.name!r} has no kernel for {bits}-bit weights (has {self.weight_bits})")
        return ref.fake_quant_weight(w, bits, group_size)

    def fake_quant_act(self, x: torch.Tensor, abits: int, wbits: int) -> torch.Tensor:
        """What the engine feeds a linear whose weight has ``wbits`` when the layer's act bits are ``abits``."""
        if abits not in self.act_bits:
            raise BackendError(f"backend {self.name!r} has no kernel for {abits}-bit activations (has {self.act_bits})")
        return ref.fake_quant_act(x, abits)

    def weight_bytes(self, num_weights: int, bits: int, group_size: int) -> float:
        """Bytes that ``num_weights`` weights take in this engine at ``bits`` (scales/zeros included).

        Reference format: packed integers + one fp16 scale and one uint8 zero per group.
        """
        if bits >= 16:
            return num_weights * 2.0
        return num_weights * bits / 8.0 + num_weights / group_size * 3.0

    def permutation_block(self, space) -> int:
        """Units the supernet's importance sort must keep together along an input dimension (1: any order; a
        block-quantised format returns its block, so that each stored block stays whole)."""
        return 1

    def restrict_space(self, space_config, model_config):
        """Return the space config with choices the engine cannot run removed (default: unchanged)."""
        return space_config

    def options(self) -> dict:
        """JSON-serialisable constructor arguments that rebuild this backend (``get_backend(name, options)``);
        a materialised model records them so that its reloaded layers quantise the same way."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
