"""``FakeQuantLinear``: the linear of a materialised subnet, raw weights quantised in its forward.

``ArchQuantForCausalLM`` builds its linears through ``make_linear``; an export folder's generated
model code swaps this module for one over packed weights with the same ``make_linear`` signature
(``archquant.export.remote_code``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` whose forward runs the backend's weight and activation fake-quantisers.

    The stored weight is the unquantised one. In eval mode (or without gradient) the quantised weight is
    cached until the weight changes; in training mode it is recomputed every call with the
    straight-through estimator (QAT).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, wbits: int = 16, abits: int = 16,
                 group_size: int = 64, backend: str = "torch", backend_options: dict | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.wbits, self.abits, self.group_size, self.backend_name = int(wbits), int(abits), int(group_size), backend
        self.backend_options = dict(backend_options or {})
        self._backend = None
        self._qkey = None
        self._qweight = None

    @property
    def backend(self):
        if self._backend is None:
            from archquant.backends import get_backend

            self._backend = get_backend(self.backend_name, self.backend_options)
        return self._backend

    def quantized_weight(self) -> torch.Tensor:
        """The weight the engine computes with (dequantised). Shape: ``[out, in]``."""
        w = self.weight
        if self.wbits >= 16:
            q = self.backend.fake_quant_weight(w, self.wbits, self.group_size)
            if q is w:  # the reference backend keeps 16-bit weights as they are: no copy
                return w
        if self.training or (w.requires_grad and torch.is_grad_enabled()):
            return self.backend.fake_quant_weight(w, self.wbits, self.group_size)
        key = (w.data_ptr(), w._version, w.device, w.dtype)
        if key != self._qkey:
            with torch.no_grad():
                self._qweight = self.backend.fake_quant_weight(w, self.wbits, self.group_size)
            self._qkey = key
        return self._qweight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backend.fake_quant_act(x, self.abits, self.wbits)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, wbits={self.wbits}, abits={self.abits}, group_size={self.group_size}, "
            f"backend={self.backend_name}"
        )


def make_linear(config, name: str, n_in: int, n_out: int, *, wbits: int, abits: int) -> FakeQuantLinear:
    """Linear ``name`` (``q`` ... ``down``, ``lm_head``) of ``ArchQuantForCausalLM``, with ``config``'s backend."""
    return FakeQuantLinear(n_in, n_out, bias=bool(config.linear_bias.get(name, False)), wbits=wbits, abits=abits,
                           group_size=config.quant_group_size, backend=config.quant_backend,
                           backend_options=config.quant_backend_options)
