"""Mixed quantisation: ``W_eff = sum_k pi_k Q_k(W)`` and ``x_eff = sum_a pi_a Q_a(x)`` in one pass each.

The backend's quantisers are the only ones used (``backend.fake_quant_weight`` / ``fake_quant_act``),
so the supernet simulates what the serving engine computes. Quantised copies of frozen weights are
cached (quantising every linear at every step would dominate the step time) and recomputed only when
the weight changes (its autograd version counter moves) or its active slice changes.

Some engines quantise activations differently depending on the weight's bits (llama.cpp feeds Q8
activations only to quantised matmuls). ``act_classes`` probes the backend once and groups weight-bit
choices that see identical activations; a linear then needs one matmul per group, usually one.
"""

from __future__ import annotations

from typing import Callable

import torch

from archquant.backends import Backend, BackendError


def act_classes(backend: Backend, abits: list[int], wbits: list[int]) -> list[int]:
    """Group weight-bit choices whose activation quantiser is the same for every ``abits`` choice.

    Returns:
        ``cls[i]``: the class id of ``wbits[i]`` (0, 1, ... in order of first appearance).
    """
    gen = torch.Generator().manual_seed(0)
    # rows of 256 and of 288: a block-256 weight type and its fallback (another type below 256-multiples) may
    # quantise activations differently, so two choices share a class only where they agree at both
    probes = [torch.randn(3, k, generator=gen) * torch.linspace(0.1, 4.0, k) for k in (256, 288)]
    signatures: list[list[torch.Tensor]] = []
    out = []
    for b in wbits:
        sig = [backend.fake_quant_act(probe, a, b) for a in abits for probe in probes]
        for cid, other in enumerate(signatures):
            if all(torch.equal(s, o) for s, o in zip(sig, other)):
                out.append(cid)
                break
        else:
            signatures.append(sig)
            out.append(len(signatures) - 1)
    return out


def check_backend_bits(backend: Backend, wbits: list[int], abits: list[int], group_size: int) -> None:
    """Fail at build time, with the backend's message, on bits the engine cannot run."""
    w = torch.randn(2, group_size)
    for b in wbits:
        try:
            backend.fake_quant_weight(w, b, group_size)
        except BackendError as err:
            raise BackendError(f"{err}; remove {b} from space.wbits / space.lm_head_bits") from err
    for a in abits:
        try:
            backend.fake_quant_act(w, a, 16)
        except BackendError as err:
            raise BackendError(f"{err}; remove {a} from space.abits") from err


def onehot_index(p: torch.Tensor | None) -> int | None:
    """The index of an exact one-hot vector that needs no gradient, else ``None``.

    Such vectors come from fixed gates and from ``probs=None`` evaluation; a linear then computes
    only the chosen branch instead of the weighted mixture.
    """
    if p is None or p.requires_grad:
        return None
    nz = torch.nonzero(p)
    if nz.numel() == 1 and float(p[nz[0, 0]]) == 1.0:
        return int(nz[0, 0])
    return None


def mixed_act(
    x: torch.Tensor,
    backend: Backend,
    abits: list[int],
    pi_a: torch.Tensor | int | None,
    fixed_a: int | None,
    class_bits: list[int],
    needed: list[int],
) -> dict[int, torch.Tensor]:
    """Activation inputs of a linear, one per needed weight-bits class.

    Args:
        x: input activations. Shape: ``[..., K]``.
        abits: the layer's activation-bit choices.
        pi_a: probabilities over ``abits``, or the index of a one-hot choice.
        fixed_a: index of a fixed activation choice (overrides ``pi_a``), or ``None``.
        class_bits: a representative weight-bits value per class.
        needed: the classes the linears will read.

    Returns:
        ``class id -> x_eff`` with ``x_eff = sum_a pi_a * fake_quant_act(x, a, class bits)``.
    """
    if fixed_a is None and isinstance(pi_a, int):
        fixed_a = pi_a
    out = {}
    for c in needed:
        wb = class_bits[c]
        if fixed_a is not None:
            out[c] = backend.fake_quant_act(x, abits[fixed_a], wb)
            continue
        acc = None
        for i, a in enumerate(abits):
            term = backend.fake_quant_act(x, a, wb) * pi_a[i]
            acc = term if acc is None else acc + term
        out[c] = acc
    return out


class WeightChoices:
    """``Q_k(W_active)`` for every bits choice ``k`` of one linear.

    The quantised copies are stacked ``[K', N, K_in]``; the choice whose quantiser leaves the weight as it
    is (16 bits in the reference backend), if any, is the active weight itself, so no copy of it is kept
    (for a prefix slice that is a view of the shared Parameter).
    """

    def __init__(self, stack: torch.Tensor | None, ident: torch.Tensor | None = None, ident_index: int | None = None):
        self.stack, self.ident, self.ident_index = stack, ident, ident_index

    @classmethod
    def build(cls, w: torch.Tensor, bits: list[int], quantise: Quantise) -> WeightChoices:
        """``quantise(w, b)`` for every ``b`` of ``bits``."""
        qs, ident, ident_index = [], None, None
        for i, b in enumerate(bits):
            q = quantise(w, b)
            if q is w and ident_index is None:
                ident, ident_index = w, i
            else:
                qs.append(q)
        return cls(torch.stack(qs) if qs else None, ident, ident_index)

    def _row(self, k: int) -> int:
        return k if self.ident_index is None or k < self.ident_index else k - 1

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.ident if k == self.ident_index else self.stack[self._row(k)]

    def take(self, take, out_sub, in_sub) -> WeightChoices:
        """The same choices restricted to output rows ``out_sub`` / input columns ``in_sub`` (``take(t, sel, dim)``)."""
        if out_sub is None and in_sub is None:
            return self
        stack = None if self.stack is None else take(take(self.stack, out_sub, 1), in_sub, 2)
        ident = None if self.ident is None else take(take(self.ident, out_sub, 0), in_sub, 1)
        return WeightChoices(stack, ident, self.ident_index)

    def mix(self, pi: torch.Tensor, ks: list[int]) -> torch.Tensor:
        """``sum_{k in ks} pi_k Q_k`` (``mix_choices``)."""
        rows = [k for k in ks if k != self.ident_index]
        stack = pi_rows = None
        if rows:
            r = [self._row(k) for k in rows]
            adjacent = r == list(range(r[0], r[0] + len(r)))  # a view of the stack, else a gathered copy
            stack, pi_rows = (self.stack[r[0] : r[0] + len(r)] if adjacent else self.stack[r]), pi[rows]
        with_ident = self.ident_index is not None and self.ident_index in ks
        return mix_choices(stack, pi_rows, self.ident if with_ident else None,
                           pi[self.ident_index] if with_ident else None)

    def nbytes_owned(self, weight: torch.Tensor) -> int:
        """Bytes these choices hold beyond ``weight``'s own storage."""
        n = 0 if self.stack is None else self.stack.numel() * self.stack.element_size()
        if self.ident is not None and self.ident.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
            n += self.ident.numel() * self.ident.element_size()
        return n


Quantise = Callable[[torch.Tensor, int], torch.Tensor]  # (active weight, bits) -> what the engine computes with


def backend_quantiser(backend: Backend, group_size: int) -> Quantise:
    """``(w, bits) -> backend.fake_quant_weight(w, bits, group_size)``."""
    return lambda w, b: backend.fake_quant_weight(w, b, group_size)


class QuantCache:
    """Quantised copies ``Q_k(W_active)`` of one linear's weight (``WeightChoices``; ``single``: one bits
    choice of a slice).

    The cache is valid while the weight's data pointer, version counter and the active slice are
    unchanged. When the weight trains (``requires_grad`` under grad mode) the choices are rebuilt with
    the straight-through estimator every call, so gradients reach the shared Parameter.
    """

    def __init__(self) -> None:
        self.key = None
        self.choices: WeightChoices | None = None
        self.single: dict = {}

    def clear(self) -> None:
        self.key, self.choices, self.single = None, None, {}

    def _valid(self, weight: torch.Tensor, slice_version: int) -> bool:
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype, slice_version)
        if key != self.key:
            self.clear()
            self.key = key
            return False
        return True

    @staticmethod
    def _trains(weight: torch.Tensor) -> bool:
        return weight.requires_grad and torch.is_grad_enabled()

    def one(self, weight, w_active_fn, bits: int, quantise: Quantise, slice_version: int, tag=None):
        """``quantise(w_active_fn(), bits)`` (cached under ``(bits, tag)`` unless the weight trains)."""
        if self._trains(weight):
            return quantise(w_active_fn(), bits)
        self._valid(weight, slice_version)
        hit = self.single.get((bits, tag))
        if hit is None:
            with torch.no_grad():
                hit = quantise(w_active_fn(), bits).contiguous()
            self.single[(bits, tag)] = hit
        return hit

    def all(self, weight, w_active_fn, bits: list[int], quantise: Quantise, slice_version: int) -> WeightChoices:
        """``quantise(W_active, bits[k])`` for every ``k``."""
        if self._trains(weight):
            return WeightChoices.build(w_active_fn(), bits, quantise)
        if not self._valid(weight, slice_version) or self.choices is None:
            with torch.no_grad():
                self.choices = WeightChoices.build(w_active_fn(), bits, quantise)
        return self.choices


class _MixCPU(torch.autograd.Function):
    """``sum_r pi_r stack[r] (+ pi_i ident)`` as scaled in-place adds: one streaming pass per choice.

    On CPU this beats one ``torch.mv`` over a transposed ``[K, N*K_in]`` stack (SmolLM2's lm_head: forward
    1.6x, forward + backward 1.3x; ``scripts/bench_mix.py``). The backward is ``d pi_r = <g, stack[r]>`` (one
    ``mv``), ``d pi_i = <g, ident>``, and ``pi_r g`` for trainable (straight-through) weights.
    """

    @staticmethod
    def forward(ctx, pi_rows, pi_ident, stack, ident):
        terms = list(zip(stack, pi_rows.tolist())) if stack is not None else []
        if ident is not None:
            terms.append((ident, float(pi_ident)))
        out = torch.mul(terms[0][0], terms[0][1])
        for w, c in terms[1:]:
            out.add_(w, alpha=c)
        ctx.save_for_backward(pi_rows, pi_ident, stack, ident)
        return out

    @staticmethod
    def backward(ctx, g):
        pi_rows, pi_ident, stack, ident = ctx.saved_tensors
        gf = g.reshape(-1)
        d_rows = d_ident = d_stack = d_w = None
        if stack is not None and ctx.needs_input_grad[0]:
            d_rows = torch.mv(stack.reshape(stack.shape[0], -1), gf).to(pi_rows.dtype)
        if ident is not None and ctx.needs_input_grad[1]:
            d_ident = torch.dot(ident.reshape(-1), gf).to(pi_ident.dtype)
        if stack is not None and ctx.needs_input_grad[2]:
            d_stack = pi_rows.to(g.dtype).view(-1, *([1] * g.dim())) * g
        if ident is not None and ctx.needs_input_grad[3]:
            d_w = g * pi_ident.to(g.dtype)
        return d_rows, d_ident, d_stack, d_w


def mix_choices(stack: torch.Tensor | None, pi_rows: torch.Tensor | None, ident: torch.Tensor | None = None,
                pi_ident: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_r pi_rows[r] stack[r] + pi_ident ident``. Shapes: ``stack [R, N, K_in]``, ``ident [N, K_in]``."""
    if stack is None and ident is None:
        raise ValueError("mix_choices needs a stack or an identity choice")
    ref = stack if stack is not None else ident
    # outside autocast: a bf16 autocast would copy the whole stack to bf16 on every call
    with torch.autocast(device_type=ref.device.type, enabled=False):
        if ref.device.type == "cpu":
            dummy = ref.new_zeros(())
            return _MixCPU.apply(pi_rows if pi_rows is not None else dummy,
                                 pi_ident if pi_ident is not None else dummy, stack, ident)
        out = mix_weights(stack, pi_rows) if stack is not None else None
        if ident is not None:
            term = ident * pi_ident.to(ident.dtype)
            out = term if out is None else out + term
        return out


def mix_weights(stack: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """``sum_k pi_k stack[k]`` as one matrix-vector product (one pass over the stack).

    The backward is one more pass: ``d pi_k = <dW_eff, stack[k]>``. Shape: ``stack [K, N, K_in]``,
    ``pi [K]`` -> ``[N, K_in]``.
    """
    k, n, m = stack.shape
    # outside autocast: a bf16 autocast would copy the whole stack to bf16 on every call
    with torch.autocast(device_type=stack.device.type, enabled=False):
        return torch.mv(stack.reshape(k, n * m).t(), pi.to(stack.dtype)).reshape(n, m)
