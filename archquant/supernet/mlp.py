"""Elastic gated MLP: neurons sorted by importance, width choice = keep the first ``m`` neurons.

An open width gate is the cumulative mask on the intermediate activations ``act(gate) * up``; since
``down_proj`` is linear in them, the masked pass equals the mixture of the per-width branches.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from archquant.backends import Backend
from archquant.supernet.linear import ElasticLinear
from archquant.supernet.masks import expected, width_table
from archquant.supernet.quant import mixed_act


class ElasticMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` over shared weights.

    Args:
        gate_proj, up_proj, down_proj: elastic linears over the permuted full weights.
        intermediate: full MLP width; choices: the space's widths (descending).
        hidden_act: the base model's activation name (``silu`` for Llama).
        abits, backend, class_bits: activation quantisation (see ``quant.mixed_act``).
    """

    def __init__(
        self,
        gate_proj: ElasticLinear,
        up_proj: ElasticLinear,
        down_proj: ElasticLinear,
        *,
        intermediate: int,
        choices: list[int],
        hidden_act: str,
        abits: list[int],
        backend: Backend,
        class_bits: list[int],
    ) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.intermediate, self.choices = intermediate, choices
        self.act_fn = ACT2FN[hidden_act]
        self.abits, self.backend, self.class_bits = abits, backend, class_bits
        self.register_buffer("table", width_table(choices, intermediate), persistent=False)
        self.fixed: dict[str, int] = {}  # mlp, abits
        self.width = intermediate

    def fix(self, key: str, index: int) -> None:
        """Fix the width (slice gate/up rows and down columns) or the activation bits."""
        self.fixed[key] = int(index)
        if key == "mlp":
            m = self.choices[index]
            sel = None if m == self.intermediate else m
            self.gate_proj.set_slice(out_sel=sel)
            self.up_proj.set_slice(out_sel=sel)
            self.down_proj.set_slice(in_sel=sel)
            self.width = m

    def forward(self, x: torch.Tensor, lp: dict, d_sub: int | None = None) -> torch.Tensor:
        """One vectorised pass. Shape: ``x [B, S, D_run]`` -> ``[B, S, D_run]``.

        ``lp`` holds this block's gates (``None`` fixed, ``int`` one-hot this call, ``Tensor`` mixed):
        ``mlp``, ``abits``, ``w.gate``, ``w.up``, ``w.down``. ``d_sub``: hidden width of a one-hot
        hidden gate.
        """
        pa, p_m = lp["abits"], lp["mlp"]
        fa = self.fixed.get("abits")
        m_sub = self.choices[p_m] if isinstance(p_m, int) and self.choices[p_m] != self.width else None
        need = self.gate_proj.needed_classes(lp["w.gate"]) | self.up_proj.needed_classes(lp["w.up"])
        xs = mixed_act(x, self.backend, self.abits, pa, fa, self.class_bits, sorted(need))
        h = self.act_fn(self.gate_proj(xs, lp["w.gate"], m_sub, d_sub)) * self.up_proj(xs, lp["w.up"], m_sub, d_sub)
        if isinstance(p_m, torch.Tensor):
            h = h * expected(p_m, self.table)  # [B, S, M]
        need_d = sorted(self.down_proj.needed_classes(lp["w.down"]))
        hs = mixed_act(h, self.backend, self.abits, pa, fa, self.class_bits, need_d)
        return self.down_proj(hs, lp["w.down"], d_sub, m_sub)
