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


def cut(t: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None = None) -> torch.Tensor:
    """``t[rows][:, cols]`` by index lists (None: all), on ``t``'s device."""
    t = t if rows is None else t.index_select(0, rows.to(t.device))
    return t if cols is None else t.index_select(1, cols.to(t.device))


class BackendError(UserError, ValueError):
    """A request the backend cannot serve (unknown name, unsupported bits, shape it cannot run)."""


class Backend:
    """Base backend: the reference group-wise quantiser of ``archquant.quant``.

    Subclasses override the quantisers and ``restrict_space`` to match their engine.
    """

    name: ClassVar[str] = "torch"
    uses_importance: bool = False  # whether fake_quant_weight's importance changes the stored blocks
    weight_bits: ClassVar[tuple[int, ...]] = (16, 8, 4, 3, 2)
    act_bits: ClassVar[tuple[int, ...]] = (16, 8)

    def fake_quant_weight(self, w: torch.Tensor, bits: int, group_size: int,
                          importance: torch.Tensor | None = None) -> torch.Tensor:
        """What the engine's weight at ``bits`` computes with (dequantised), straight-through gradient.

        ``importance`` (per input channel, mean ``x^2``) is used by backends whose ``uses_importance`` is
        true; the reference quantiser rounds to nearest and ignores it."""
        if bits not in self.weight_bits:
            raise BackendError(f"backend {self.name!r} has no kernel for {bits}-bit weights (has {self.weight_bits})")
        return ref.fake_quant_weight(w, bits, group_size)

    def fake_quant_slice(self, w: torch.Tensor, bits: int, group_size: int, importance: torch.Tensor | None,
                         rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
        """``fake_quant_weight(w[rows][:, cols], bits, group_size, importance[cols])`` (no gradient; None: all).

        A block-local format computes it from the whole tensor's blocks (``LlamaCppBackend``), so that one
        search of the shared weight serves every subnet cut from it."""
        imp = None if importance is None else cut(importance, cols)
        return self.fake_quant_weight(cut(w, rows, cols).detach(), bits, group_size, importance=imp)

    def fake_quant_act(self, x: torch.Tensor, abits: int, wbits: int) -> torch.Tensor:
        """What the engine feeds a linear whose weight has ``wbits`` when the layer's act bits are ``abits``."""
        if abits not in self.act_bits:
            raise BackendError(f"backend {self.name!r} has no kernel for {abits}-bit activations (has {self.act_bits})")
        return ref.fake_quant_act(x, abits)

    def weight_bytes(self, num_weights: int, bits: int, group_size: int, row: int | None = None) -> float:
        """Bytes that ``num_weights`` weights take in this engine at ``bits`` (scales/zeros included); ``row``: the
        tensor's input length, for a format whose choice of type depends on it (``weight_format``).

        Reference format: packed integers + one fp16 scale and one uint8 zero per group.
        """
        if bits >= 16:
            return num_weights * 2.0
        return num_weights * bits / 8.0 + num_weights / group_size * 3.0

    def weight_format(self, bits: int, row: int | None = None):
        """What a ``bits`` choice stores for a tensor of input length ``row`` (here: the bits themselves). A format
        whose type depends on the row length (llama.cpp's K-quants) returns the stored type, so that a caller can
        tell whether a slice of a quantised weight is stored like the whole."""
        return int(bits)

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
