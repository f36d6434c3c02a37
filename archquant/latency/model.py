"""``LatencyModel``: expected latency and weight memory of a subnet, differentiable in the gate probabilities.

For gates drawn independently, E[latency] = sum_l p_keep(l) * sum_{ops of a block} E[LUT(op)] + model
ops, and the expectation of one op is the contraction of its LUT tensor (over the gates its signature
depends on) with those gates' probability vectors: one ``einsum`` per op, batched over blocks.
A one-hot probability dict gives the latency of one architecture (``predict_ms``), the same formula.
"""

from __future__ import annotations

import itertools
import math

import torch

from archquant.backends import Backend, BackendError, get_backend
from archquant.core.space import Space
from archquant.latency.signatures import MODEL_ROLES, OpTerm, arch_ops, op_terms, role_choices
from archquant.latency.table import LatencyTable, TableError

_LETTERS = "abcdefghijkmnopqrstuvwxyz"  # einsum subscripts for roles ('l' is the block axis)


class LatencyModel:
    """Expected latency (ms) and weight memory (MB = 1e6 bytes) of subnets of ``space``.

    Args:
        space: the resolved search space (gate layout and model fingerprint).
        table: a profiled ``LatencyTable`` (or a roofline estimate, ``table.is_estimate``).
        backend: the serving engine (name or ``Backend``); its quantiser format gives weight bytes.

    Raises:
        BackendError: the space has bit-widths the backend has no kernel for.
        TableError: the table is for another backend or model, or lacks an entry the space needs.
    """

    def __init__(self, space: Space, table: LatencyTable, backend: Backend | str = "torch") -> None:
        self.space = space
        self.table = table
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        bad_w = sorted({b for b in space.wbits + space.lm_head_bits if b not in self.backend.weight_bits})
        bad_a = sorted({a for a in space.abits if a not in self.backend.act_bits})
        if bad_w or bad_a:
            raise BackendError(
                f"backend {self.backend.name!r} has no kernel for weight bits {bad_w} / activation bits {bad_a} "
                f"(it runs weights {self.backend.weight_bits}, activations {self.backend.act_bits}); "
                "drop them from space.wbits / space.lm_head_bits / space.abits"
            )
        hb = table.header.get("backend")
        if hb is not None and hb != self.backend.name:
            raise TableError(
                f"latency table is for backend {hb!r}, not {self.backend.name!r}; set latency.backend={hb} or re-profile"
            )
        model_fp = table.header.get("model")
        if isinstance(model_fp, dict):
            diff = {k: (model_fp.get(k), v) for k, v in space.fingerprint.items() if k in model_fp and model_fp[k] != v}
            if diff:
                pretty = ", ".join(f"{k}: table {a}, space {b}" for k, (a, b) in diff.items())
                raise TableError(f"latency table was profiled for another model ({pretty}); profile this model")
        self.terms: list[OpTerm] = op_terms(space)
        self.num_layers = space.num_layers
        self._gates = space.gates()
        keep = role_choices(space, "keep")
        self._keep_index = keep.index(1)
        self._lut = {"ms": {}, "bytes": {}}
        for term in self.terms:
            ms, nbytes = self._build_lut(term)
            self._lut["ms"][term.name] = ms
            self._lut["bytes"][term.name] = nbytes
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}

    # ---- LUT tensors -------------------------------------------------------------------------
    def _build_lut(self, term: OpTerm) -> tuple[torch.Tensor, torch.Tensor]:
        """LUT tensors (ms and bytes) of one op over the product of its roles' choices (float64)."""
        choices = [role_choices(self.space, r) for r in term.roles]
        shape = [len(c) for c in choices]
        ms = torch.zeros(math.prod(shape), dtype=torch.float64)
        nbytes = torch.zeros_like(ms)
        g = self.space.group_size
        for i, combo in enumerate(_product(choices)):
            values = dict(zip(term.roles, combo))
            ms[i] = self.table.lookup(term.kind, term.signature(values))
            if term.weights is not None:
                n, bits, row = term.weights(values)
                nbytes[i] = self.backend.weight_bytes(n, bits, g, row=row) if n else 0.0
        return ms.reshape(shape), nbytes.reshape(shape)

    def _luts(self, which: str, device, dtype) -> dict[str, torch.Tensor]:
        key = (which, str(device), dtype)
        if key not in self._cache:
            self._cache[key] = {k: v.to(device=device, dtype=dtype) for k, v in self._lut[which].items()}
        return self._cache[key]

    # ---- probabilities -----------------------------------------------------------------------
    def _prob(self, probs: dict[str, torch.Tensor], gate: str, like: torch.Tensor) -> torch.Tensor:
        k = len(self._gates[gate])
        p = probs.get(gate)
        if p is None:
            if k == 1:
                return torch.ones(1, device=like.device, dtype=like.dtype)
            raise KeyError(f"probs have no entry for gate {gate!r} ({k} choices); pass one vector per gate of space.gates()")
        if p.shape != (k,):
            raise ValueError(f"probs[{gate!r}] has shape {tuple(p.shape)}, expected ({k},) like space.gates()[{gate!r}]")
        return p.to(dtype=like.dtype)

    def _expect(self, probs: dict[str, torch.Tensor], which: str) -> torch.Tensor:
        like = next(iter(probs.values())) if probs else torch.zeros(())
        if not like.is_floating_point():
            like = like.double()
        luts = self._luts(which, like.device, like.dtype)
        L = self.num_layers
        stacked: dict[str, torch.Tensor] = {}

        def role_prob(role: str) -> torch.Tensor:
            if role not in stacked:
                if role in MODEL_ROLES:
                    stacked[role] = self._prob(probs, role, like)  # [K]
                else:
                    stacked[role] = torch.stack([self._prob(probs, f"layers.{l}.{role}", like) for l in range(L)])  # [L, K]
            return stacked[role]

        layer_total = torch.zeros(L, device=like.device, dtype=like.dtype)
        model_total = torch.zeros((), device=like.device, dtype=like.dtype)
        for term in self.terms:
            lut = luts[term.name]
            letters = _LETTERS[: len(term.roles)]
            operands, subs = [lut], [letters]
            for role, c in zip(term.roles, letters):
                operands.append(role_prob(role))
                subs.append(c if role in MODEL_ROLES else "l" + c)
            if term.scope == "layer":
                if term.roles and any(r not in MODEL_ROLES for r in term.roles):
                    layer_total = layer_total + torch.einsum(",".join(subs) + "->l", *operands)
                else:  # depends on model-wide gates only (e.g. norms: hidden) or on nothing
                    layer_total = layer_total + torch.einsum(",".join(subs) + "->", *operands)
            else:
                model_total = model_total + torch.einsum(",".join(subs) + "->", *operands)
        p_keep = role_prob("keep")[:, self._keep_index]  # [L]
        return (p_keep * layer_total).sum() + model_total

    # ---- public API --------------------------------------------------------------------------
    def expected_ms(self, probs: dict[str, torch.Tensor], corrected: bool = True) -> torch.Tensor:
        """Expected latency (ms) under independent gates with probabilities ``probs``.

        Args:
            probs: gate name -> probability vector ordered like ``space.gates()[name]`` (single-choice
                gates may be left out). Shape: each ``[K_gate]``.
            corrected: apply the table's fitted ``scale * ms + offset_ms`` correction.

        Returns:
            Scalar tensor, differentiable in ``probs``. Shape: ``[]``.
        """
        raw = self._expect(probs, "ms")
        if not corrected:
            return raw
        c = self.table.correction
        return raw * c["scale"] + c["offset_ms"]

    def expected_mb(self, probs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Expected weight memory in MB (1e6 bytes, scales and zeros included). Shape: ``[]``."""
        return self._expect(probs, "bytes") / 1e6

    def one_hot(self, arch) -> dict[str, torch.Tensor]:
        """One-hot float64 probabilities of ``arch`` (validated against the space)."""
        choices = arch.to_choices(self.space)
        out = {}
        for gate, opts in self._gates.items():
            p = torch.zeros(len(opts), dtype=torch.float64)
            p[opts.index(choices[gate])] = 1.0
            out[gate] = p
        return out

    def predict_ms(self, arch, corrected: bool = True) -> float:
        """Latency of one architecture (the ``expected_ms`` formula on one-hot probabilities)."""
        return float(self.expected_ms(self.one_hot(arch), corrected=corrected))

    def predict_mb(self, arch) -> float:
        """Weight memory of one architecture in MB (1e6 bytes)."""
        return float(self.expected_mb(self.one_hot(arch)))

    def breakdown_ms(self, arch) -> dict[str, float]:
        """Uncorrected ms per op name (summed over kept blocks), from direct table lookups."""
        out: dict[str, float] = {}
        for term, sig, _ in arch_ops(self.space, arch):
            out[term.name] = out.get(term.name, 0.0) + self.table.lookup(term.kind, sig)
        return out

    def sum_of_ops_ms(self, arch) -> float:
        """Uncorrected latency of ``arch`` as a plain sum of table lookups (independent of the LUT tensors)."""
        return sum(self.breakdown_ms(arch).values())

    def range_ms(self, corrected: bool = True) -> tuple[float, float]:
        """(smallest, largest) latency over every subnet of the space (at least one block kept)."""
        lo, hi = self._range("ms")
        if corrected:
            c = self.table.correction
            lo, hi = sorted((lo * c["scale"] + c["offset_ms"], hi * c["scale"] + c["offset_ms"]))
        return lo, hi

    def range_mb(self) -> tuple[float, float]:
        """(smallest, largest) weight memory in MB over every subnet of the space."""
        lo, hi = self._range("bytes")
        return lo / 1e6, hi / 1e6

    def _range(self, which: str) -> tuple[float, float]:
        """Exact extremes: per hidden size, the best/worst block (joint over its gates) and model ops."""
        luts = self._lut[which]
        layer_roles = ["hidden"] + sorted({r for t in self.terms if t.scope == "layer" for r in t.roles} - {"hidden"})
        model_roles = ["hidden", "lm_head.wbits"]
        block = _joint(luts, [t for t in self.terms if t.scope == "layer"], layer_roles, self.space)
        model = _joint(luts, [t for t in self.terms if t.scope == "model"], model_roles, self.space)
        b_min, b_max = block.flatten(1).amin(1), block.flatten(1).amax(1)  # [H]
        m_min, m_max = model.flatten(1).amin(1), model.flatten(1).amax(1)
        L = self.num_layers
        can_skip = len(role_choices(self.space, "keep")) > 1
        n_lo = torch.where(b_min < 0, torch.full_like(b_min, L), torch.full_like(b_min, 1 if can_skip else L))
        n_hi = torch.where(b_max > 0, torch.full_like(b_max, L), torch.full_like(b_max, 1 if can_skip else L))
        return float((m_min + n_lo * b_min).min()), float((m_max + n_hi * b_max).max())

    def describe(self) -> str:
        """One line naming where the numbers come from (shown in logs and search records)."""
        h = self.table.header
        if self.table.is_estimate:
            kind = "ROOFLINE ESTIMATE (no profiled table)"
        else:
            kind = f"profiled table ({h.get('method', '?')})"
        return (
            f"latency model: {kind}; device {h.get('device')}, backend {h.get('backend')}, scenario {h.get('scenario')} "
            f"(batch {h.get('batch')}, context {h.get('context')}, prefill {h.get('prefill_len')}), date {h.get('date')}"
        )

    def __repr__(self) -> str:
        return f"LatencyModel({self.describe()})"


def _product(choices: list[list]) -> list[tuple]:
    return list(itertools.product(*choices))


def _joint(luts: dict[str, torch.Tensor], terms: list[OpTerm], roles: list[str], space: Space) -> torch.Tensor:
    """Sum of the terms' LUTs broadcast over the joint grid of ``roles`` (``roles[0]`` first). Shape: ``[K_r...]``."""
    shape = [len(role_choices(space, r)) for r in roles]
    total = torch.zeros(shape, dtype=torch.float64)
    for t in terms:
        lut = luts[t.name]
        perm = sorted(range(len(t.roles)), key=lambda i: roles.index(t.roles[i]))
        lut = lut.permute(*perm) if perm else lut
        view = [shape[i] if r in t.roles else 1 for i, r in enumerate(roles)]
        total = total + lut.reshape(view)
    return total
