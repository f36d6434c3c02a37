"""``LlamaCppBackend``: what llama.cpp computes (GGUF block formats), what it can run, what it stores.

Bits map to GGUF tensor types (``types``, default ``{16: F16, 8: Q8_0, 4: Q4_0}``; ``16: F32`` and
``4: Q4_1`` are the alternatives). The quantiser is llama.cpp's (``quant.py``): blocks of 32 inputs,
whatever the space's group size, and the activation format follows the weight type, as in ggml's CPU
matmul (Q8_0 / Q8_1 for quantised weights, fp16 for F16 weights); the layer's ``abits`` decision is
therefore not the engine's to take and ``restrict_space`` removes it.

Q4_0 is the default 4-bit type: llama.cpp repacks it for AVX2 and decodes it fastest, and unlike
Q4_1 it does not coincide with the grid the embedded default's weights already lie on (README, The embedded default model),
so 4-bit results on that model are not flattered.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from archquant.backends.base import Backend, BackendError
from archquant.core.space import resolve_space, snap_width
from archquant.quant import gguf as quant

DEFAULT_TYPES: dict[int, str] = {16: "F16", 8: "Q8_0", 4: "Q4_0"}
ALLOWED_TYPES: dict[int, tuple[str, ...]] = {16: ("F16", "F32"), 8: ("Q8_0",), 4: ("Q4_0", "Q4_1")}


def resolve_types(types: dict[int, str] | None) -> dict[int, str]:
    """Complete and validate a ``bits -> GGUF type`` map (missing bits take the defaults).

    Raises:
        BackendError: a bit-width without a GGUF type, or a type that does not fit its bits.
    """
    out = dict(DEFAULT_TYPES)
    for bits, qtype in (types or {}).items():
        bits = int(bits)
        if bits not in ALLOWED_TYPES:
            raise BackendError(f"llama.cpp types: no GGUF type for {bits}-bit weights (supported bits: {sorted(ALLOWED_TYPES)})")
        qtype = str(qtype).upper()
        if qtype not in ALLOWED_TYPES[bits]:
            raise BackendError(f"llama.cpp types: {bits}-bit weights can be {ALLOWED_TYPES[bits]}, got {qtype!r}")
        out[bits] = qtype
    return out


class LlamaCppBackend(Backend):
    """CPU serving through GGUF in llama.cpp.

    Args:
        types: ``bits -> GGUF type`` (``{16: "F16"|"F32", 8: "Q8_0", 4: "Q4_0"|"Q4_1"}``); missing
            entries take ``DEFAULT_TYPES``.
    """

    name: ClassVar[str] = "llamacpp"
    weight_bits: ClassVar[tuple[int, ...]] = (16, 8, 4)
    act_bits: ClassVar[tuple[int, ...]] = (16, 8)  # accepted and ignored: llama.cpp picks the activation format
    block_size: ClassVar[int] = quant.BLOCK
    runtime_packages: ClassVar[tuple[str, ...]] = ("llama_cpp_python",)  # tables depend on this version

    def __init__(self, types: dict[int, str] | None = None) -> None:
        self.types = resolve_types(types)

    def options(self) -> dict:
        return {"types": {str(b): t for b, t in sorted(self.types.items(), reverse=True)}}

    def gguf_type(self, bits: int) -> str:
        """The GGUF tensor type that stores ``bits``-bit weights."""
        bits = int(bits)
        if bits not in self.types:
            raise BackendError(f"backend 'llamacpp' has no GGUF type for {bits}-bit weights (has {sorted(self.types)})")
        return self.types[bits]

    # ---- quantiser semantics -----------------------------------------------------------------
    def fake_quant_weight(self, w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
        """The weight llama.cpp computes with at ``bits`` (GGUF blocks of 32; ``group_size`` does not apply).

        Shape: ``[N, K]`` -> ``[N, K]``; straight-through gradient.
        """
        return quant.fake_quant_weight(w, self.gguf_type(bits))

    def fake_quant_act(self, x: torch.Tensor, abits: int, wbits: int) -> torch.Tensor:
        """The input a matmul with ``wbits``-bit weights sees in llama.cpp (``abits`` is ignored).

        Shape: ``[..., K]`` -> ``[..., K]``; straight-through gradient.
        """
        return quant.fake_quant_act(x, self.gguf_type(wbits))

    def weight_bytes(self, num_weights: int, bits: int, group_size: int) -> float:
        """GGUF bytes: Q8_0 34 B / 32 weights, Q4_0 18 B / 32, Q4_1 20 B / 32, F16 2 B, F32 4 B."""
        return quant.type_nbytes(num_weights, self.gguf_type(bits))

    # ---- space rules -------------------------------------------------------------------------
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
        return dataclasses.replace(cfg, kv_groups=kv_keep, mlp=mlp_keep)

    def __repr__(self) -> str:
        return f"LlamaCppBackend(types={self.types})"

