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

    With ``importance=True`` the layer holds ``act_importance`` (``[in_features]``, the mean ``x^2`` of its
    calibration inputs, saved with the weights): a backend that ``uses_importance`` (llama.cpp) searches its
    blocks under it, exactly as the supernet and the GGUF export do. QAT steps use round-to-nearest's
    straight-through estimate instead (the search on every step would cost ~100x the step).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, wbits: int = 16, abits: int = 16,
                 group_size: int = 64, backend: str = "torch", backend_options: dict | None = None,
                 importance: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.wbits, self.abits, self.group_size, self.backend_name = int(wbits), int(abits), int(group_size), backend
        self.backend_options = dict(backend_options or {})
        if importance:
            self.register_buffer("act_importance", torch.ones(in_features))
        else:
            self.act_importance = None
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
        grad = w.requires_grad and torch.is_grad_enabled()
        if grad and (self.training or self.act_importance is None):
            return self.backend.fake_quant_weight(w, self.wbits, self.group_size)  # QAT: recomputed every step
        imp = self.act_importance
        key = (w.data_ptr(), w._version, w.device, w.dtype) + (() if imp is None else (imp.data_ptr(), imp._version))
        if key != self._qkey:
            with torch.no_grad():
                self._qweight = self.backend.fake_quant_weight(w, self.wbits, self.group_size, importance=imp)
            self._qkey = key
        if grad:  # the cached blocks, with the straight-through gradient
            return self._qweight.detach() + (w - w.detach())
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
                           backend_options=config.quant_backend_options,
                           importance=config.quant_importance and wbits < 16)
