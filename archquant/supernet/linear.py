"""The elastic linear: one max-size shared Parameter, an active slice, and mixed weight bits.

Width choices never copy the weight: a subnet's linear is a slice (rows = output units, columns =
input units) of the same ``nn.Parameter``. Width *masks* of open gates are applied to activations by
the owning module; the linear itself only holds the slice that fixed gates left active and mixes
the quantised copies ``W_eff = sum_k pi_k Q_k(W_active)`` of its open bits gate in one pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from archquant.backends import Backend
from archquant.supernet.quant import QuantCache, Quantise, WeightChoices

Sel = int | torch.Tensor | None  # None: all; int: a prefix; LongTensor: a gathered index list


def _take(t: torch.Tensor, sel: Sel, dim: int) -> torch.Tensor:
    if sel is None:
        return t
    if isinstance(sel, int):
        return t.narrow(dim, 0, sel)
    return t.index_select(dim, sel.to(t.device))


def _class_members(classes: list[int]) -> dict[int, list[int]]:
    """``class -> the indices of its bits choices`` (in gate order; a class's choices need not be adjacent: a
    palette may alternate Q8_0- and Q8_K-activation types)."""
    members: dict[int, list[int]] = {}
    for i, c in enumerate(classes):
        members.setdefault(c, []).append(i)
    return members


def compose(sel: Sel, sub: Sel, full: int) -> torch.Tensor | None:
    """The index list of ``_take(_take(t, sel), sub)`` into ``t``'s ``full`` units (None: all of them)."""
    if sel is None and sub is None:
        return None
    idx = torch.arange(full) if sel is None else torch.arange(sel) if isinstance(sel, int) else sel.cpu()
    if sub is None:
        return idx
    return idx[:sub] if isinstance(sub, int) else idx.index_select(0, sub.cpu())


def as_sel(index: torch.Tensor, full: int) -> Sel:
    """Simplest selector for an index list: ``None`` (everything), a prefix length, or the list."""
    n = index.numel()
    if n and torch.equal(index.cpu(), torch.arange(n)):
        return None if n == full else n
    return index


class ElasticLinear(nn.Module):
    """``y = x W_eff^T (+ b)`` over the active slice of a shared weight.

    Args:
        weight: the shared max-size Parameter. Shape: ``[N, K]``.
        bias: optional shared bias Parameter ``[N]``.
        bits: weight-bit choices of this linear's gate (descending).
        group_size: quantisation group size along the input dimension.
        backend: the engine whose quantiser is simulated.
        classes: activation class of each bits choice (see ``quant.act_classes``).
        act_sq: mean ``x^2`` of each input channel on calibration data (``[K]``, in the shared weight's
            column order), or None. A backend that ``uses_importance`` searches its blocks under it; the
            blocks of any slice are cut from those of the whole weight (``Backend.fake_quant_slice``).

    Attributes:
        mix_outputs_max_tokens: up to this many input rows, open bits are mixed as outputs
            (``sum_k pi_k x Q_k^T``), else as one mixed weight (see ``_mixed_term``). 0 (default):
            always one matmul per linear; the search raises it for short calibration batches
            (``search.mix_outputs_max_tokens``).
    """

    mix_outputs_max_tokens: int = 0

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        bits: list[int],
        group_size: int,
        backend: Backend,
        classes: list[int],
        act_sq: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.weight = weight
        self.register_buffer("act_sq", None if act_sq is None else act_sq.detach().float().clone(), persistent=False)
        self.bias = bias
        self.bits = list(bits)
        self.group_size = group_size
        self.backend = backend
        self.classes = list(classes)
        self.class_members = _class_members(self.classes)
        self.fixed_bits: int | None = None
        self.out_sel: Sel = None
        self.in_sel: Sel = None
        self._slice_version = 0
        self._cache = QuantCache()
        self._cut_differs: dict[tuple, bool] = {}

    # ---- slicing -----------------------------------------------------------------------------
    def set_slice(self, out_sel: Sel = ..., in_sel: Sel = ...) -> None:
        """Restrict to a sub-matrix (``...`` leaves that side unchanged); cached quantisations are dropped."""
        if out_sel is not ...:
            self.out_sel = out_sel
        if in_sel is not ...:
            self.in_sel = in_sel
        self._slice_version += 1
        self._cache.clear()
        self._cut_differs.clear()

    def fix_bits(self, index: int) -> None:
        self.fixed_bits = int(index)
        self._cache.clear()

    def active_weight(self) -> torch.Tensor:
        """The active slice of the shared weight (a view for prefixes). Shape: ``[N_act, K_act]``."""
        return _take(_take(self.weight, self.out_sel, 0), self.in_sel, 1)

    def active_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else _take(self.bias, self.out_sel, 0)

    @property
    def out_features(self) -> int:
        return self.active_weight().shape[0]

    # ---- quantised weights -------------------------------------------------------------------
    def quantiser(self, out_sub: Sel = None, in_sub: Sel = None) -> Quantise:
        """``(w, bits) -> Q_bits(w)`` for ``w`` the active slice further cut by ``out_sub`` / ``in_sub``.

        With ``act_sq`` on a backend that uses it (and frozen weights), the importance-weighted blocks of the
        cut, taken from those of the whole shared weight; else the backend's quantiser of ``w``."""
        def quantise(w: torch.Tensor, bits: int) -> torch.Tensor:
            if (bits >= 16 or self.act_sq is None or not self.backend.uses_importance
                    or (w.requires_grad and torch.is_grad_enabled())):
                # training the shared weights: round-to-nearest's straight-through estimate (a search per step
                # would cost ~100x the step)
                return self.backend.fake_quant_weight(w, bits, self.group_size)
            n, k = self.weight.shape
            rows, cols = compose(self.out_sel, out_sub, n), compose(self.in_sel, in_sub, k)
            return self.backend.fake_quant_slice(self.weight.detach(), bits, self.group_size, self.act_sq, rows, cols)

        return quantise

    def qweight(self, index: int) -> torch.Tensor:
        """``Q_{bits[index]}(W_active)``, cached; a quantiser that leaves the weight as it is (16 bits in
        the reference backend) returns the active slice itself, so the full choice is the Parameter."""
        b = self.bits[index]
        gathered = isinstance(self.out_sel, torch.Tensor) or isinstance(self.in_sel, torch.Tensor)
        if b >= 16 and not gathered:
            w = self.active_weight()
            q = self.backend.fake_quant_weight(w, b, self.group_size)
            if q is w:
                return w
        return self._cache.one(self.weight, self.active_weight, b, self.quantiser(), self._slice_version)

    def cut_stores_otherwise(self, in_sub: Sel, bits) -> bool:
        """Whether a prefix cut of the active input columns stores one of ``bits`` in another format than the
        active weight does (a block-256 GGUF type on a row length it does not divide falls back to another
        type), so that the cut must be quantised as itself rather than cut from the quantised active weight."""
        if not isinstance(in_sub, int):
            return False
        key = (in_sub, tuple(bits))
        if key not in self._cut_differs:
            k_act = self.active_weight().shape[1]
            self._cut_differs[key] = any(
                b < 16 and self.backend.weight_format(b, in_sub) != self.backend.weight_format(b, k_act) for b in bits)
        return self._cut_differs[key]

    def chosen(self, pi: torch.Tensor | int | None) -> int | None:
        """The single bits choice this call computes (fixed gate or one-hot ``int``), or ``None`` to mix."""
        if self.fixed_bits is not None:
            return self.fixed_bits
        return pi if isinstance(pi, int) else None

    def needed_classes(self, pi: torch.Tensor | int | None) -> set[int]:
        k = self.chosen(pi)
        return {self.classes[k]} if k is not None else set(self.classes)

    def forward(
        self, xs: dict[int, torch.Tensor], pi: torch.Tensor | int | None, out_sub: Sel = None, in_sub: Sel = None
    ) -> torch.Tensor:
        """Mixed-precision linear.

        Args:
            xs: ``activation class -> input`` (from ``quant.mixed_act``). Shape: ``[..., K_run]``.
            pi: probabilities over ``bits``, or the index of a one-hot choice (ignored when fixed).
            out_sub, in_sub: a further slice of the active weight for this call only (a width gate
                that is one-hot in this call); the quantised active weight is sliced, which equals
                quantising the slice because kept inputs are whole quantisation groups, unless the cut's
                row length stores another type (``cut_stores_otherwise``): then the cut is quantised itself.

        Returns:
            Shape: ``[..., N_run]``.
        """
        k = self.chosen(pi)
        bias = self.active_bias()
        if bias is not None:
            bias = _take(bias, out_sub, 0)
        def cut():
            return _take(_take(self.active_weight(), out_sub, 0), in_sub, 1)

        tag = (id(in_sub) if isinstance(in_sub, torch.Tensor) else in_sub,
               id(out_sub) if isinstance(out_sub, torch.Tensor) else out_sub)
        if k is not None:
            b = self.bits[k]
            if b < 16 and (isinstance(in_sub, torch.Tensor) or self.cut_stores_otherwise(in_sub, [b])):
                # Gathered input columns need not be whole quantisation groups of the active weight, and a cut
                # may store another type: quantise the cut itself, as the materialised layer does.
                w = self._cache.one(self.weight, cut, b, self.quantiser(out_sub, in_sub), self._slice_version, tag=tag)
            else:
                w = _take(_take(self.qweight(k), out_sub, 0), in_sub, 1)
            return F.linear(xs[self.classes[k]], w, bias)
        if self.cut_stores_otherwise(in_sub, self.bits):
            quantise = self.quantiser(out_sub, in_sub)
            choices = WeightChoices.build(cut(), self.bits, lambda w, b: self._cache.one(
                self.weight, lambda: w, b, quantise, self._slice_version, tag=tag))
        else:
            choices = self._cache.all(
                self.weight, self.active_weight, self.bits, self.quantiser(), self._slice_version
            ).take(_take, out_sub, in_sub)
        y = None
        for c, ks in self.class_members.items():
            term = self._mixed_term(xs[c], choices, pi, ks)
            y = term if y is None else y + term
        return y if bias is None else y + bias

    def _mixed_term(self, x: torch.Tensor, choices: WeightChoices, pi: torch.Tensor, ks: list[int]) -> torch.Tensor:
        """``x (sum_{k in ks} pi_k Q_k)^T``, mixing weights or outputs, whichever moves fewer bytes.

        Mixing weights costs two passes over the choices and a full ``[N, K]`` write per call and per
        backward; mixing outputs costs one matmul per choice. Below ``mix_outputs_max_tokens`` rows the
        matmuls are cheaper (a search step on one short block); above, one mixed matmul is.
        """
        if len(ks) == 1:
            return F.linear(x, choices[ks[0]]) * pi[ks[0]]
        rows = x.numel() // max(1, x.shape[-1])
        if rows <= self.mix_outputs_max_tokens:
            y = None
            for k in ks:
                term = F.linear(x, choices[k]) * pi[k]
                y = term if y is None else y + term
            return y
        return F.linear(x, choices.mix(pi, ks))

    def extra_repr(self) -> str:
        n, k = self.weight.shape
        return f"full={n}x{k}, bits={self.bits}, fixed_bits={self.fixed_bits}, group_size={self.group_size}"
