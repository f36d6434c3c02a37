"""Gumbel-Softmax gates: one logit vector per decision, sampled for every gate at once.

Every decision of the space (``Space.gates()``) owns a leaf ``nn.Parameter`` of logits, ordered like
its choices (widest / most precise first). Sampling pads all logit vectors into one ``[G, Kmax]``
matrix and draws every gate's Gumbel-Softmax sample in a handful of tensor ops, so the cost of a
step does not grow with the number of gates in Python time. A *fixed* gate (by the entropy pruner,
by ``set_arch``, or because it has a single choice) always yields an exact one-hot vector.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from archquant.utils.errors import UserError


class GateError(UserError, ValueError):
    """A gate name, index or probability vector that does not fit the space."""


class GateSet(nn.Module):
    """The logits of every gate, plus which gates are fixed.

    Args:
        gates: ``name -> choices`` in the space's order (``Space.gates()``).
        init_logits: optional ``name -> Tensor[K]`` initial logits (default zeros: uniform).
    """

    def __init__(self, gates: dict[str, list], init_logits: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        init_logits = init_logits or {}
        self.names: list[str] = list(gates)
        self.choices: dict[str, list] = {n: list(c) for n, c in gates.items()}
        self.index: dict[str, int] = {n: i for i, n in enumerate(self.names)}
        params = []
        for name in self.names:
            k = len(self.choices[name])
            init = init_logits.get(name)
            init = torch.zeros(k) if init is None else torch.as_tensor(init, dtype=torch.float32).clone()
            if init.shape != (k,):
                raise GateError(f"initial logits of gate {name} have shape {tuple(init.shape)}, expected ({k},)")
            params.append(nn.Parameter(init))
        self.logits = nn.ParameterList(params)
        # Single-choice decisions are fixed from the start: they have nothing to search.
        self.fixed: dict[str, int] = {n: 0 for n in self.names if len(self.choices[n]) == 1}
        sizes = [len(self.choices[n]) for n in self.names]
        self.sizes = sizes
        self.kmax = max(sizes)
        rows = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        cols = torch.cat([torch.arange(k) for k in sizes])
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)
        self.register_buffer("_fixed_rows", torch.zeros(len(sizes), dtype=torch.bool), persistent=False)
        self.register_buffer("_fixed_onehot", torch.zeros(len(sizes), self.kmax), persistent=False)
        for name, idx in self.fixed.items():
            self._mark_fixed(name, idx)

    # ---- fixing ------------------------------------------------------------------------------
    def _mark_fixed(self, name: str, index: int) -> None:
        row = self.index[name]
        self._fixed_rows[row] = True
        self._fixed_onehot[row].zero_()
        self._fixed_onehot[row, index] = 1.0

    def check_index(self, name: str, index: int) -> None:
        if name not in self.index:
            raise GateError(f"unknown gate {name!r}; gates look like 'hidden', 'layers.0.mlp' (see sn.gate_names)")
        k = len(self.choices[name])
        if not 0 <= int(index) < k:
            raise GateError(f"gate {name}: index {index} out of range for its {k} choices {self.choices[name]}")
        if name in self.fixed and self.fixed[name] != int(index):
            raise GateError(
                f"gate {name} is already fixed to choice {self.choices[name][self.fixed[name]]!r}; "
                f"it cannot be re-fixed to {self.choices[name][int(index)]!r}"
            )

    def fix(self, name: str, index: int) -> None:
        """Record gate ``name`` as fixed to choice ``index`` (its logits stop mattering)."""
        self.check_index(name, index)
        self.fixed[name] = int(index)
        self._mark_fixed(name, int(index))

    def open_gates(self) -> list[str]:
        return [n for n in self.names if n not in self.fixed]

    # ---- probabilities -----------------------------------------------------------------------
    def _padded_logits(self) -> torch.Tensor:
        """All logits in one ``[G, Kmax]`` matrix, ``-inf`` where a gate has fewer choices."""
        flat = torch.cat(list(self.logits))
        pad = flat.new_full((len(self.names), self.kmax), float("-inf"))
        return pad.index_put((self._rows, self._cols), flat)

    def _split(self, padded: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = padded[self._rows, self._cols]
        return dict(zip(self.names, torch.split(flat, self.sizes)))

    def _with_fixed(self, probs: torch.Tensor) -> torch.Tensor:
        return torch.where(self._fixed_rows[:, None], self._fixed_onehot.to(probs.dtype), probs)

    def probs(self) -> dict[str, torch.Tensor]:
        """``softmax(logits)`` per gate, no noise; fixed gates one-hot. Shape: ``name -> [K]``."""
        return self._split(self._with_fixed(torch.softmax(self._padded_logits(), dim=-1)))

    def sample(
        self, tau: float, hard: bool = False, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Gumbel-Softmax sample of every gate at temperature ``tau``.

        Args:
            tau: temperature (> 0); low values approach one-hot samples.
            hard: one-hot forward values with the soft sample's gradient (straight-through).
            generator: optional RNG for reproducible noise.

        Returns:
            ``name -> Tensor[K]``; fixed gates are exact one-hot vectors without gradient.
        """
        if not tau > 0:
            raise GateError(f"Gumbel-Softmax temperature must be > 0, got {tau}")
        logits = self._padded_logits()
        u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        # clamp keeps log(-log(u)) finite for u in {0, 1}
        gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))
        soft = torch.softmax((logits + gumbel) / tau, dim=-1)
        if hard:
            onehot = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
            soft = onehot - soft.detach() + soft
        return self._split(self._with_fixed(soft))

    def argmax_indices(self) -> dict[str, int]:
        """The chosen index of every gate: its fixed index, or the argmax of its logits."""
        out = {}
        for name, p in zip(self.names, self.logits):
            out[name] = self.fixed[name] if name in self.fixed else int(torch.argmax(p.detach()))
        return out

    def onehot(self, indices: dict[str, int]) -> dict[str, torch.Tensor]:
        """Exact one-hot probability vectors (no gradient) for ``name -> index``."""
        dev = self._rows.device
        out = {}
        for name in self.names:
            v = torch.zeros(len(self.choices[name]), device=dev)
            v[indices[name]] = 1.0
            out[name] = v
        return out

    def entropy(self) -> dict[str, float]:
        """Normalised entropy ``H(softmax(a)) / log K`` of every gate (0 for fixed gates)."""
        with torch.no_grad():
            p = self._with_fixed(torch.softmax(self._padded_logits(), dim=-1))
            h = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
        out = {}
        for i, name in enumerate(self.names):
            k = self.sizes[i]
            out[name] = 0.0 if name in self.fixed or k == 1 else float(h[i]) / math.log(k)
        return out

    def check_probs(self, probs: dict[str, torch.Tensor]) -> None:
        """Fail fast on a probability dict that misses an open gate or has the wrong length."""
        for name in self.names:
            p = probs.get(name)
            if p is None:
                if name in self.fixed:
                    continue
                raise GateError(f"probs has no entry for open gate {name!r} (pass sn.sample_probs(...) or sn.probs())")
            if p.shape != (len(self.choices[name]),):
                raise GateError(
                    f"probs[{name!r}] has shape {tuple(p.shape)}, expected ({len(self.choices[name])},): "
                    "probability vectors keep their full length, ordered like space.gates()"
                )
