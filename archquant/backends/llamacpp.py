"""``LlamaCppBackend``: what llama.cpp computes (GGUF block formats), what it can run, what it stores.

Bits map to GGUF tensor types (``types``, default ``{16: F16, 8: Q8_0, 4: Q4_0}``; ``latency.types``
sets them from the config, one type per bit-width out of llama.cpp's CPU palette: ``ALLOWED_TYPES``).
The quantiser is llama.cpp's (``archquant.quant.gguf``): blocks of 32 inputs (256 for the K-quants
and IQ4_XS), whatever the space's group size, and the activation format follows the weight type, as
in ggml's CPU matmul (Q8_0 / Q8_1 / Q8_K for quantised weights, fp16 for F16 weights); the layer's
``abits`` decision is therefore not the engine's to take and ``restrict_space`` removes it.

A block-256 type is a **joint** decision with the widths: a tensor stores it only where its row length (set by
the hidden / heads / MLP gates) is a multiple of 256, and otherwise its fallback (``FALLBACK``, llama.cpp's own
``tensor_type_fallback``: Q4_K -> Q5_0, ...), so the choice "Q4_K" of a q_proj is Q5_0 at hidden 576 and Q4_K
at hidden 512. ``gguf_type(bits, row)`` is that rule, and everything that quantises, prices or writes a tensor
asks it with the tensor's row length: the supernet's forward at each width, the latency tables (one entry per
(row, bits), so the expected latency contracts the joint probability of width and type), materialised layers
and the GGUF writer, which writes the fallback's blocks itself (nothing is left for llama.cpp to change).
With ``fallback=False`` (``latency.fallback=false``) a block-256 type is refused wherever a reachable row is
not a multiple of 256, naming the tensor.

Q4_0 is the default 4-bit type: llama.cpp repacks it for AVX2 and decodes it fastest, and unlike
Q4_1 it does not coincide with the grid the embedded default's weights already lie on (README, The embedded default model),
so 4-bit results on that model are not flattered.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from archquant.backends.base import Backend, BackendError, cut
from archquant.core.space import is_type_name, named_types, resolve_space, snap_width
from archquant.quant import gguf as quant

DEFAULT_TYPES: dict[int, str] = {16: "F16", 8: "Q8_0", 4: "Q4_0"}
# the bit-width slot each palette type fills (its nominal bits; one type per slot in a search)
ALLOWED_TYPES: dict[int, tuple[str, ...]] = {
    16: ("F16", "F32"), 8: ("Q8_0",), 6: ("Q6_K",), 5: ("Q5_0", "Q5_1", "Q5_K"),
    4: ("Q4_0", "Q4_1", "Q4_K", "IQ4_NL", "IQ4_XS"), 3: ("Q3_K",),
}


# llama.cpp's tensor_type_fallback in the pinned build, read off its own presets of the embedded default (rows of
# 576: Q4_K_M stores Q5_0, Q5_K_M Q5_1, Q6_K Q8_0, Q3_K_M Q4_0)
FALLBACK: dict[str, str] = {"Q6_K": "Q8_0", "Q5_K": "Q5_1", "Q4_K": "Q5_0", "Q3_K": "Q4_0", "IQ4_XS": "IQ4_NL"}


def stored_type(qtype: str, row: int | None, fallback: bool = True) -> str:
    """The type a tensor of input length ``row`` stores for the choice ``qtype`` (None: any row): ``qtype`` where
    its block divides the row, else its ``FALLBACK``.

    Raises:
        BackendError: the row fits neither (or ``fallback`` is off), naming the row and the choices that fit.
    """
    if row is None or int(row) % quant.block_size(qtype) == 0:
        return qtype
    alt = FALLBACK.get(qtype) if fallback else None
    if alt is None or int(row) % quant.block_size(alt):
        fits = [t for ts in ALLOWED_TYPES.values() for t in ts if int(row) % quant.block_size(t) == 0]
        how = "" if fallback else f" (latency.fallback=true stores {FALLBACK.get(qtype)} there, as llama.cpp does)"
        raise BackendError(f"{qtype} needs rows that are multiples of {quant.block_size(qtype)}, not {row}{how}; "
                           f"rows of {row} can be {fits}")
    return alt


def _storable(qtype: str, row: int, fallback: bool) -> bool:
    """Whether a tensor of input length ``row`` can hold the choice ``qtype`` (itself or its fallback)."""
    try:
        stored_type(qtype, row, fallback)
    except BackendError:
        return False
    return True


def linear_rows(space) -> dict[str, set[int]]:
    """Every input length (row) the space can give each kind of linear."""
    hd = space.head_dim[0] if space.head_dim else space.fingerprint["head_dim"]
    return {"q/k/v/gate/up": set(space.hidden), "o": {kv * q * hd for kv in space.kv_groups for q in space.q_per_group},
            "down": set(space.mlp)}


def space_types(space, backend) -> tuple[list[str], list[str]]:
    """The GGUF types a space's block linears and its lm_head can store under ``backend`` (each choice's type and,
    at rows its block does not divide, its fallback), sorted."""
    rows = set().union(*linear_rows(space).values())
    lin = {backend.gguf_type(b, k) for b in space.wbits for k in rows}
    lm = {backend.gguf_type(b, k) for b in space.lm_head_bits for k in space.hidden}
    return sorted(lin), sorted(lm)


def _slot_range(qtype: str) -> tuple[int, int]:
    """The bit-width slots a type may fill: its nominal bits, or up to its storage bits per weight (rounded up),
    so that two types of one nominal width can share a search (Q4_0 at 4, Q4_1 at 5: 5.0 bits per weight)."""
    nominal = next(b for b, ts in ALLOWED_TYPES.items() if qtype in ts)
    if nominal == 16:
        return 16, 16
    return nominal, min(15, max(nominal, math.ceil(quant.bits_per_weight(qtype))))


def _check_order(types: dict[int, str]) -> None:
    """More bits must mean a type at least as precise (storage bits per weight), or the search's order lies."""
    slots = sorted(types)
    for lo, hi in zip(slots, slots[1:]):
        if quant.bits_per_weight(types[lo]) > quant.bits_per_weight(types[hi]):
            raise BackendError(f"llama.cpp types: {types[lo]} at {lo} bits stores more bits per weight than "
                               f"{types[hi]} at {hi} bits; a higher bit-width must be the more precise type")


def resolve_types(types: dict[int, str] | None) -> dict[int, str]:
    """Complete and validate a ``bits -> GGUF type`` map (missing bits take the defaults).

    A type fills its nominal bit-width, or a slot up to its storage bits per weight (``_slot_range``: Q4_1, 5.0
    bits per weight, may be the 5-bit choice beside Q4_0 at 4), and slots must order the types by precision.

    Raises:
        BackendError: a bit-width without a GGUF type, a type outside its slots, or slots out of precision order.
    """
    out = dict(DEFAULT_TYPES)
    for bits, qtype in (types or {}).items():
        bits = int(bits)
        if bits not in ALLOWED_TYPES and not 2 <= bits <= 15:
            raise BackendError(f"llama.cpp types: no GGUF type for {bits}-bit weights (supported bits: {sorted(ALLOWED_TYPES)})")
        qtype = str(qtype).upper()
        if qtype not in quant.PALETTE:
            raise BackendError(f"llama.cpp types: {qtype!r} is not a type this llama.cpp backend writes and runs "
                               f"({list(quant.PALETTE)})")
        lo, hi = _slot_range(qtype)
        if not lo <= bits <= hi:
            where = f"a {lo}-bit type" + (f" (slots {lo}-{hi})" if hi > lo else "")
            raise BackendError(f"llama.cpp types: {bits}-bit weights can be {list(ALLOWED_TYPES.get(bits, ()))}; "
                               f"{qtype} is {where}")
        out[bits] = qtype
    _check_order(out)
    return out


def types_from_names(names) -> dict[int, str]:
    """``[Q6_K, Q5_0, Q4_1]`` -> ``{6: "Q6_K", 5: "Q5_0", 4: "Q4_1"}``: each type fills its bit-width's slot, and
    where two share one the more precise moves up within its storage bits (``[Q8_0, Q4_1, Q4_0]`` ->
    ``{8: Q8_0, 5: Q4_1, 4: Q4_0}``; then ``space.wbits=[16,8,5,4]``).

    Raises:
        BackendError: a name outside the palette, or more types near one bit-width than slots for them.
    """
    qtypes = []
    for name in names:
        qtype = str(name).upper()
        if not any(qtype in ts for ts in ALLOWED_TYPES.values()):
            raise BackendError(f"latency.types has {name!r}, not a type this llama.cpp backend writes and runs; "
                               f"choose from {[t for ts in ALLOWED_TYPES.values() for t in ts]}")
        if qtype not in qtypes:
            qtypes.append(qtype)
    out: dict[int, str] = {}
    prev = 0
    for qtype in sorted(qtypes, key=lambda t: (quant.bits_per_weight(t), t)):
        lo, hi = _slot_range(qtype)
        slot = max(lo, prev + 1)
        if slot > hi:
            raise BackendError(f"latency.types has {out[prev]} and {qtype}: no bit-width slot is left for {qtype} "
                               f"(it may fill {lo}-{hi}); keep one of them")
        out[slot], prev = qtype, slot
    return dict(sorted(out.items(), reverse=True))


class LlamaCppBackend(Backend):
    """CPU serving through GGUF in llama.cpp.

    Args:
        types: ``bits -> GGUF type`` (``ALLOWED_TYPES`` lists each bit-width's choices, e.g.
            ``{4: "Q4_1", 5: "Q5_0", 6: "Q6_K"}``); missing 16/8/4 entries take ``DEFAULT_TYPES``.
        importance: quantise with the importance-weighted block search wherever the caller passes
            per-channel importance (llama.cpp's imatrix idea; the supernet and materialised subnets pass
            the calibration inputs' mean ``x^2``); False: round-to-nearest everywhere.
    """

    name: ClassVar[str] = "llamacpp"
    act_bits: ClassVar[tuple[int, ...]] = (16, 8)  # accepted and ignored: llama.cpp picks the activation format
    block_size: ClassVar[int] = quant.BLOCK
    runtime_packages: ClassVar[tuple[str, ...]] = ("llama_cpp_python",)  # tables depend on this version

    def __init__(self, types: dict[int, str] | None = None, importance: bool = True, fallback: bool = True) -> None:
        self.types = resolve_types(types)
        self.weight_bits = tuple(sorted(self.types, reverse=True))
        self.uses_importance = bool(importance)
        self.fallback = bool(fallback)

    def options(self) -> dict:
        out: dict = {"types": {str(b): t for b, t in sorted(self.types.items(), reverse=True)}}
        if not self.uses_importance:
            out["importance"] = False
        if not self.fallback:
            out["fallback"] = False
        return out

    def permutation_block(self, space) -> int:
        """The largest block of the space's quantised types (32, or 256 with a K-quant): kept whole by the
        importance sort, so a model that is already on a type's grid re-quantises to it losslessly."""
        bits = {int(b) for b in space.wbits} | {int(b) for b in space.lm_head_bits}
        return max([quant.block_size(self.gguf_type(b)) for b in bits if b < 16], default=1)

    def row_types_problem(self, space) -> str | None:
        """Why a space's reachable row lengths cannot hold its types (None when they can): a K-quant needs
        every row of the tensors it may store to be a multiple of 256."""
        rows = linear_rows(space)
        wbits, lm_bits = {int(b) for b in space.wbits}, {int(b) for b in space.lm_head_bits}
        for bits in sorted(wbits | lm_bits):
            qtype = self.gguf_type(bits)
            bs = quant.block_size(qtype)
            if bs == 1:
                continue
            checks = dict(rows) if bits in wbits else {}
            if bits in lm_bits:
                checks["lm_head"] = set(space.hidden)
            for lin, lengths in checks.items():
                bad = sorted(k for k in lengths if not _storable(qtype, k, self.fallback))
                if bad:
                    ok = [t for t in quant.QUANT_TYPES if all(k % quant.block_size(t) == 0 for k in lengths)]
                    how = (f"latency.fallback=true stores {FALLBACK[qtype]} there, as llama.cpp does; or "
                           if not self.fallback and qtype in FALLBACK else "")
                    return (f"{qtype} ({bits}-bit) needs rows that are multiples of {bs}, but {lin} rows can be {bad}; "
                            f"{how}for {bits}-bit weights choose one of "
                            f"{[t for t in ALLOWED_TYPES.get(bits, ()) if t in ok]} (latency.types), or drop "
                            f"{bits} from space.wbits / space.lm_head_bits")
        return None

    def gguf_type(self, bits: int, row: int | None = None) -> str:
        """The GGUF tensor type that stores ``bits``-bit weights: the choice's type, or its fallback for a tensor
        of input length ``row`` that the type's block does not divide (None: the choice's type)."""
        bits = int(bits)
        if bits not in self.types:
            raise BackendError(f"backend 'llamacpp' has no GGUF type for {bits}-bit weights (has {sorted(self.types)})")
        return stored_type(self.types[bits], row, self.fallback)

    def weight_format(self, bits: int, row: int | None = None) -> str:
        return self.gguf_type(bits, row)

    # ---- quantiser semantics -----------------------------------------------------------------
    def fake_quant_weight(self, w: torch.Tensor, bits: int, group_size: int,
                          importance: torch.Tensor | None = None) -> torch.Tensor:
        """The weight llama.cpp computes with at ``bits`` (GGUF blocks of 32; ``group_size`` does not apply):
        the importance-weighted blocks with ``importance`` (``[K]``) unless built with ``importance=False``.

        Shape: ``[N, K]`` -> ``[N, K]``; straight-through gradient.
        """
        return quant.fake_quant_weight(w, self.gguf_type(bits, w.shape[-1]), importance if self.uses_importance else None)

    def fake_quant_slice(self, w: torch.Tensor, bits: int, group_size: int, importance: torch.Tensor | None,
                         rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
        """The importance-weighted blocks of ``w[rows][:, cols]`` cut from those of the whole ``w`` (blocks are
        local: bit for bit what quantising the cut would give, tested), and remembered for the cut's content,
        so that its materialised layer and its GGUF export find them instead of searching again."""
        k = w.shape[1]
        qtype = self.gguf_type(bits, k if cols is None else cols.numel())
        if (importance is None or not self.uses_importance or qtype not in quant.QUANT_TYPES or k % quant.block_size(qtype)
                or (cols is not None and quant.memo.whole_blocks(cols, quant.block_size(qtype), k) is None)):
            return super().fake_quant_slice(w, bits, group_size, importance, rows, cols)
        with torch.no_grad():
            parts = quant.memo.slice_parts(quant.quantize(w, qtype, importance), qtype, rows, cols)
            quant.memo.remember(cut(w, rows, cols), qtype, cut(importance, cols), parts)
            return quant.dequantize(parts, qtype).to(device=w.device, dtype=w.dtype)

    def fake_quant_act(self, x: torch.Tensor, abits: int, wbits: int) -> torch.Tensor:
        """The input a matmul with ``wbits``-bit weights sees in llama.cpp (``abits`` is ignored).

        Shape: ``[..., K]`` -> ``[..., K]``; straight-through gradient.
        """
        return quant.fake_quant_act(x, self.gguf_type(wbits, x.shape[-1]))

    def weight_bytes(self, num_weights: int, bits: int, group_size: int, row: int | None = None) -> float:
        """GGUF bytes of the type a tensor of input length ``row`` stores at ``bits`` (e.g. Q8_0 34 B / 32 weights,
        Q4_0 18 B / 32, Q6_K 210 B / 256)."""
        return quant.type_nbytes(num_weights, self.gguf_type(bits, row))

    # ---- space rules -------------------------------------------------------------------------
    def name_slots(self, space_config):
        """``space.wbits`` / ``space.lm_head_bits`` with GGUF type names replaced by the slots this backend gives
        them (``[F16,Q8_0,Q4_0]`` -> ``[16,8,4]``).

        Raises:
            BackendError: a named type that is not one of this backend's ``types``.
        """
        names = named_types(space_config)
        if not names:
            return space_config
        slot = {t: b for b, t in self.types.items()}
        missing = [n for n in names if n not in slot]
        if missing:
            raise BackendError(f"space.wbits names {missing}, which this llama.cpp backend does not store (its types: "
                               f"{ {b: t for b, t in sorted(self.types.items(), reverse=True)} }); add them to "
                               "latency.types, or name every type in space.wbits and let the config derive latency.types")
        def slots(vals):
            return [slot[v] if is_type_name(v) else int(v) for v in vals]

        return dataclasses.replace(space_config, wbits=slots(space_config.wbits),
                                   lm_head_bits=slots(space_config.lm_head_bits))

    def restrict_space(self, space_config, model_config):
        """Remove what a GGUF cannot hold or llama.cpp decides itself.

        * widths snap to multiples of ``lcm(space.width_multiple, 32)`` and the group size becomes 32
          (every quantised row length must be a multiple of the block);
        * one global head size (``head_dim`` choice dropped), no ``abits`` choice (llama.cpp decides);
        * bits limited to those with a GGUF type; head-count choices whose attention width
          (heads x head_dim) is not a multiple of 32 are dropped when any bits are quantised.

        Raises:
            BackendError: nothing of a dimension survives (the message names the key to change).
        """
        space_config = self.name_slots(space_config)
        wbits = [b for b in space_config.wbits if int(b) in self.types]
        lm_bits = [b for b in space_config.lm_head_bits if int(b) in self.types]
        for key, kept, orig in (("space.wbits", wbits, space_config.wbits),
                                ("space.lm_head_bits", lm_bits, space_config.lm_head_bits)):
            if not kept:
                raise BackendError(
                    f"{key}={list(orig)} has no bit-width llama.cpp can store; use some of {sorted(self.types)}"
                )
        multiple = math.lcm(int(space_config.width_multiple), self.block_size)
        cfg = dataclasses.replace(
            space_config,
            width_multiple=multiple,
            group_size=self.block_size,
            head_dim=[1.0],
            abits=[16],
            wbits=wbits,
            lm_head_bits=lm_bits,
        )
        if all(int(b) >= 16 for b in wbits + lm_bits):
            return cfg
        probe = resolve_space(dataclasses.replace(cfg, wbits=[16], lm_head_bits=[16]), model_config)
        hd = probe.head_dim[0]
        block = self.block_size
        if probe.hidden[-1] % block or any(h % block for h in probe.hidden):
            raise BackendError(
                f"hidden size choices {probe.hidden} are not all multiples of {block}: the model's hidden size "
                f"{probe.fingerprint['hidden_size']} cannot be quantised in GGUF blocks; use space.wbits=[16]"
            )
        n_kv, n_q = probe.fingerprint["num_key_value_heads"], probe.fingerprint["num_attention_heads"]
        qpg_full = n_q // n_kv

        def kv_of(f):
            return max(1, min(n_kv, int(f * n_kv + 0.5)))

        def q_of(f):
            return max(1, min(qpg_full, int(f * qpg_full + 0.5)))

        kv_keep = [f for f in cfg.kv_groups if all(kv_of(f) * q_of(g) * hd % block == 0 for g in cfg.q_per_group)]
        if not kv_keep:
            raise BackendError(
                f"no space.kv_groups choice gives an attention width (heads x head_dim {hd}) that is a multiple of "
                f"{block} for every space.q_per_group choice; widen space.q_per_group or use space.wbits=[16]"
            )
        mlp_keep = [f for f in cfg.mlp if snap_width(f * probe.fingerprint["intermediate_size"], multiple,
                                                 probe.fingerprint["intermediate_size"]) % block == 0]
        if not mlp_keep:
            raise BackendError(
                f"MLP width {probe.fingerprint['intermediate_size']} is not a multiple of {block}; use space.wbits=[16]"
            )
        out = dataclasses.replace(cfg, kv_groups=kv_keep, mlp=mlp_keep)
        problem = self.row_types_problem(resolve_space(out, model_config))
        if problem:
            raise BackendError(problem)
        return out

    def __repr__(self) -> str:
        return f"LlamaCppBackend(types={self.types}, importance={self.uses_importance}, fallback={self.fallback})"

