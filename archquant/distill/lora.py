"""LoRA adapters (``peft``) for QAT: the adapter update is added to the weight BEFORE fake-quantisation.

peft's stock LoRA computes ``Q(W) x + s B A x``; merging then exports ``Q(W + s B A)``, which at 4 bits
rounds most of a small update away, so the merged model is not the one that was trained. Here the
adapted linear computes ``Q(W + s B A) x`` (straight-through gradients reach ``A`` and ``B``), so
``merge_and_unload`` yields exactly the trained function.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from archquant.core.linears import MODULE_PATHS
from archquant.utils.errors import UserError


class LoraRankError(UserError, ValueError):
    """A LoRA rank larger than an adapted layer's width."""


def _qat_lora_linear_cls():
    from peft.tuners.lora.layer import Linear as LoraLinear

    class QATLoraLinear(LoraLinear):
        """peft LoRA linear over a ``FakeQuantLinear`` that quantises ``W + s B A`` as one weight."""

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            base = self.get_base_layer()
            if self.disable_adapters or self.merged:
                return base(x)
            w = base.weight
            for name in self.active_adapters:
                if name in self.lora_A:
                    w = w + self.get_delta_weight(name)  # [N, K]
            x = base.backend.fake_quant_act(x, base.abits, base.wbits)
            wq = w if base.wbits >= 16 else base.backend.fake_quant_weight(w, base.wbits, base.group_size)
            return F.linear(x, wq, base.bias)

    return QATLoraLinear


def check_rank(model: nn.Module, rank: int, targets: list[str]) -> None:
    """Refuse a rank above ``min(in, out)`` of any adapted linear, naming the first such layer."""
    for i, block in enumerate(model.model.layers):
        for lin in targets:
            mod = block.get_submodule(MODULE_PATHS[lin])
            width = min(mod.in_features, mod.out_features)
            if rank > width:
                raise LoraRankError(
                    f"distill.lora.rank={rank} exceeds layer {i} {lin}_proj's width {width} "
                    f"({mod.in_features} -> {mod.out_features}); choose distill.lora.rank <= {width}"
                )


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> nn.Module:
    """Inject QAT LoRA adapters into ``model``'s targeted linears (base weights frozen), in place.

    Returns:
        The peft-wrapped model; ``merge_lora`` turns it back into the plain model.
    """
    from peft import LoraConfig, get_peft_model

    from archquant.models.fake_quant_linear import FakeQuantLinear

    check_rank(model, rank, targets)
    names = sorted({MODULE_PATHS[t].split(".")[-1] for t in targets})
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=names, bias="none")
    config._register_custom_module({FakeQuantLinear: _qat_lora_linear_cls()})
    return get_peft_model(model, config)


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and return the plain model (no peft modules left)."""
    return peft_model.merge_and_unload()


def is_lora(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)
