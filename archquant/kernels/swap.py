"""``to_runtime``: put a model's linears on the packed runtime ``QuantLinear`` (the export and the latency timers).

Bits come from the model's config through ``core.layout.model_layout``: a materialised subnet's
``config.quant``, or 16 everywhere for a plain Hugging Face Llama. Each linear is quantised once, from
the raw weight it stores, by the reference quantiser that every exporter uses, so the swapped model
computes what the fake-quant subnet simulates (bit for bit on QuantLinear's ``dense`` path) at the speed
the packed weights run. A materialised subnet on its own runs fake-quantised fp32 weights: fp32 speed
whatever its bits, which is why latency measurements of the ``torch``/``triton`` backends time this.
"""

from __future__ import annotations

import copy as _copy
from typing import Sequence

import torch
from torch import nn

from archquant.backends import Backend, get_backend
from archquant.core.layout import model_layout
from archquant.core.linears import LINEARS, MODULE_PATHS
from archquant.kernels.qlinear import QuantLinear


def linear_module_names(num_layers: int) -> list[str]:
    """Module names of every decoder linear of a ``num_layers``-block Llama, then ``lm_head``."""
    return [f"model.layers.{i}.{MODULE_PATHS[lin]}" for i in range(num_layers) for lin in LINEARS] + ["lm_head"]


@torch.no_grad()
def to_runtime(
    model: nn.Module,
    *,
    backend: str | Backend | None = None,
    paths: Sequence[str] | None = None,
    float_dtype: torch.dtype | None = None,
    keep_tied_head: bool = False,
    copy: bool = False,
) -> nn.Module:
    """Swap every decoder linear and the ``lm_head`` for a ``QuantLinear`` at the config's bits.

    Linears that already are ``QuantLinear`` stay as they are, so a second call changes nothing.

    Args:
        model: a materialised ``ArchQuantForCausalLM`` or a Llama-family Hugging Face model.
        backend: whose bit-widths QuantLinear accepts (its quantiser must be the reference one);
            None: the config's ``quant.backend`` with its ``backend_options`` (``torch`` for a plain model).
        paths: QuantLinear execution paths (``("dense",)``: fp32, bit-exact with fake-quant; None: measured).
        float_dtype: storage dtype of the 16-bit linears' weights (None: as the model holds them).
        keep_tied_head: leave a tied 16-bit ``lm_head`` sharing the embedding's tensor (a file stores it
            once); False gives it its own QuantLinear, as the profiler times the ``lm_head`` op.
        copy: swap in a deep copy and leave ``model`` untouched (default: in place).

    Returns:
        The swapped model (``model`` itself unless ``copy``).

    Raises:
        BackendError: bits the backend has no kernel for, or a backend with its own quantiser.
    """
    if copy:
        model = _copy.deepcopy(model)
    layout = model_layout(model.config)
    if backend is None:
        quant = getattr(model.config, "quant", None) or {}
        backend = get_backend(layout.backend, quant.get("backend_options"))
    names = linear_module_names(len(layout.layers))
    bits = [(ll.wbits[lin], ll.abits) for ll in layout.layers for lin in LINEARS] + [(layout.lm_head_bits, 16)]
    if keep_tied_head and layout.tied_lm_head:
        names, bits = names[:-1], bits[:-1]
    for name, (wbits, abits) in zip(names, bits):
        mod = model.get_submodule(name)
        if isinstance(mod, QuantLinear):
            continue
        weight = mod.weight.detach()
        if wbits >= 16 and float_dtype is not None:
            weight = weight.to(float_dtype)
        bias = None if getattr(mod, "bias", None) is None else mod.bias.detach().float()
        ql = QuantLinear.from_float(weight, bias, wbits, abits, layout.group_size, backend=backend, paths=paths)
        model.set_submodule(name, ql)
    return model
