"""The search space: a config of fractions, resolved against a model's real dimensions.

``SpaceConfig`` holds what a user writes (fractions of the original widths, bit choices);
``resolve_space(config, model_config)`` snaps it to the model (multiples of ``width_multiple``,
whole KV groups), drops duplicates and checks that the group size divides every width a subnet can
reach. The resolved ``Space`` names every gate: ``Space.gates()`` maps a gate name to its choices,
which is the one layout the supernet, the latency model and the search share.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from archquant.core.linears import LINEARS
from archquant.utils.errors import UserError

BIT_GROUPS = {
    "linear": {name: (name,) for name in LINEARS},
    "fused": {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)},
    "layer": {"all": LINEARS},
}


class SpaceError(UserError, ValueError):
    """A search space that cannot be applied to the model."""


@dataclass
class SpaceConfig:
    """Search-space choices, as fractions of the original model's dimensions.

    Attributes:
        hidden: fractions of the hidden size (global, residual channels).
        kv_groups: fractions of the KV groups kept per layer (whole GQA groups).
        q_per_group: fractions of the query heads per KV group (opt-in; default keeps all).
        head_dim: fractions of the head size per layer (opt-in; RoPE pairs kept together).
        mlp: fractions of the MLP intermediate size per layer.
        depth: whether blocks may be skipped.
        wbits: weight bit-widths per linear (16 = unquantised); with ``latency.backend=llamacpp`` the GGUF types
            themselves may be named instead (``[F16,Q8_0,Q4_1,Q4_0]``): they become ``latency.types`` and each
            name the bit-width slot its type fills (``[16,8,5,4]``; ``backends.llamacpp.types_from_names``).
        abits: activation bit-widths per layer (16 = unquantised).
        lm_head_bits: weight bit-widths of the output projection (or GGUF type names, as ``wbits``).
        group_size: weight-quantisation group size; must divide every reachable input width.
        width_multiple: widths (hidden, MLP) snap to multiples of this.
        bits_granularity: ``linear`` (one gate per linear), ``fused`` (q/k/v and gate/up tied) or ``layer``.
    """

    hidden: list[float] = field(default_factory=lambda: [1.0, 0.875, 0.75, 0.625, 0.5])
    kv_groups: list[float] = field(default_factory=lambda: [1.0, 0.67, 0.33])
    q_per_group: list[float] = field(default_factory=lambda: [1.0])
    head_dim: list[float] = field(default_factory=lambda: [1.0])
    mlp: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25])
    depth: bool = True
    wbits: list[Any] = field(default_factory=lambda: [16, 8, 4])
    abits: list[int] = field(default_factory=lambda: [16, 8])
    lm_head_bits: list[Any] = field(default_factory=lambda: [16, 8, 4])
    group_size: int = 64
    width_multiple: int = 64
    bits_granularity: str = "fused"

    def __post_init__(self) -> None:
        for key in ("hidden", "kv_groups", "q_per_group", "head_dim", "mlp"):
            vals = list(getattr(self, key))
            if not vals or any(not (0.0 < float(v) <= 1.0) for v in vals):
                raise SpaceError(f"space.{key} must be a non-empty list of fractions in (0, 1], got {vals}")
        for key in ("wbits", "lm_head_bits"):  # GGUF type names stay names until a backend gives them slots
            setattr(self, key, [v.upper() if is_type_name(v) else v for v in getattr(self, key)])
        for key in ("wbits", "abits", "lm_head_bits"):
            vals = [v for v in getattr(self, key) if not (key != "abits" and is_type_name(v))]
            if key != "abits" and not vals and getattr(self, key):
                continue
            # every width from 2 to 8 can name a GGUF type's slot (Q6_K 6, Q5_0 5, Q4_1 beside Q4_0 at 5, ...);
            # each backend refuses the bits it cannot run
            if not vals or any(int(b) not in (2, 3, 4, 5, 6, 7, 8, 16) for b in vals):
                raise SpaceError(f"space.{key} must be a non-empty list drawn from {{16, 8, 7, 6, 5, 4, 3, 2}} (or GGUF "
                                 f"type names with latency.backend=llamacpp), got {vals}")
        if any(int(b) not in (8, 16) for b in self.abits):
            raise SpaceError(f"space.abits supports 16 and 8 (per-token dynamic int8), got {list(self.abits)}")
        if self.group_size <= 0 or self.width_multiple <= 0:
            raise SpaceError(
                f"space.group_size and space.width_multiple must be > 0, got {self.group_size}, {self.width_multiple}"
            )
        if self.bits_granularity not in BIT_GROUPS:
            raise SpaceError(f"space.bits_granularity must be one of {sorted(BIT_GROUPS)}, got {self.bits_granularity!r}")


def is_type_name(value) -> bool:
    """Whether a ``space.wbits`` entry names a weight type (``Q4_0``, ``F16``) rather than a bit-width."""
    return isinstance(value, str) and not value.strip().isdigit()


def named_types(config: SpaceConfig) -> list[str]:
    """The type names of ``space.wbits`` and ``space.lm_head_bits``, in order, each once."""
    return list(dict.fromkeys(v for key in ("wbits", "lm_head_bits") for v in getattr(config, key) if is_type_name(v)))


def snap_width(value: float, multiple: int, maximum: int) -> int:
    """Nearest multiple of ``multiple`` (ties up), clamped to [multiple, maximum]."""
    k = int(value / multiple + 0.5)
    return max(multiple, min(maximum, k * multiple)) if maximum >= multiple else maximum


def _dedup_desc(values) -> list[int]:
    return sorted({int(v) for v in values}, reverse=True)


@dataclass
class Space:
    """A search space resolved against one model: concrete choices, descending (widest first)."""

    num_layers: int
    hidden: list[int]
    kv_groups: list[int]
    q_per_group: list[int]
    head_dim: list[int]
    mlp: list[int]
    depth: bool
    wbits: list[int]
    abits: list[int]
    lm_head_bits: list[int]
    group_size: int
    bits_granularity: str
    fingerprint: dict[str, Any]

    # ---- gate layout -------------------------------------------------------------------------
    @property
    def bit_groups(self) -> dict[str, tuple[str, ...]]:
        """Gate suffix -> the linears whose bits it decides (``fused``: qkv, o, gate_up, down)."""
        return BIT_GROUPS[self.bits_granularity]

    def gates(self) -> dict[str, list]:
        """Every decision as ``name -> choices``.

        Choices are listed widest/most precise first. Names: ``hidden``, ``lm_head.wbits`` and per layer ``layers.{l}.{kv_groups,q_per_group,
        head_dim,mlp,keep,abits,wbits.<group>}``. ``keep`` has choices ``[1, 0]`` (keep, skip).
        Single-choice decisions are included too, so that the layout never depends on the config.
        """
        out: dict[str, list] = {"hidden": list(self.hidden), "lm_head.wbits": list(self.lm_head_bits)}
        for l in range(self.num_layers):
            p = f"layers.{l}."
            out[p + "kv_groups"] = list(self.kv_groups)
            out[p + "q_per_group"] = list(self.q_per_group)
            out[p + "head_dim"] = list(self.head_dim)
            out[p + "mlp"] = list(self.mlp)
            out[p + "keep"] = [1, 0] if self.depth else [1]
            out[p + "abits"] = list(self.abits)
            for g in self.bit_groups:
                out[p + f"wbits.{g}"] = list(self.wbits)
        return out

    def searchable(self) -> dict[str, list]:
        """The gates with more than one choice."""
        return {k: v for k, v in self.gates().items() if len(v) > 1}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Space:
        return cls(**d)

    def describe(self) -> str:
        """One line per dimension, for logs and ``arch.json``."""
        return "\n".join(
            [
                f"hidden      {self.hidden}",
                f"kv groups   {self.kv_groups} (x {self.q_per_group} query heads per group)",
                f"head dim    {self.head_dim}",
                f"mlp         {self.mlp}",
                f"depth       {'keep/skip per block' if self.depth else 'fixed'} ({self.num_layers} blocks)",
                f"weight bits {self.wbits} per {self.bits_granularity} (group {self.group_size}); lm_head {self.lm_head_bits}",
                f"act bits    {self.abits}",
            ]
        )


def model_fingerprint(model_config) -> dict[str, Any]:
    """The dimensions that identify a base model for arch/space records."""
    n_q = model_config.num_attention_heads
    return {
        "model_type": model_config.model_type,
        "hidden_size": model_config.hidden_size,
        "num_hidden_layers": model_config.num_hidden_layers,
        "num_attention_heads": n_q,
        "num_key_value_heads": getattr(model_config, "num_key_value_heads", None) or n_q,
        "head_dim": getattr(model_config, "head_dim", None) or model_config.hidden_size // n_q,
        "intermediate_size": model_config.intermediate_size,
        "vocab_size": model_config.vocab_size,
        "tie_word_embeddings": bool(getattr(model_config, "tie_word_embeddings", False)),
    }


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def resolve_space(config: SpaceConfig, model_config) -> Space:
    """Snap a ``SpaceConfig`` to a model's dimensions and validate it.

    Raises:
        SpaceError: unsupported model family, or a group size that does not divide a reachable width.
    """
    if named_types(config):
        raise SpaceError(f"space.wbits / space.lm_head_bits name weight types {named_types(config)}; only "
                         "latency.backend=llamacpp turns type names into bit-widths (else write bit-widths, e.g. [16,8,4])")
    fp = model_fingerprint(model_config)
    if fp["model_type"] not in SUPPORTED_MODEL_TYPES:
        raise SpaceError(
            f"model_type {fp['model_type']!r} is not supported by the supernet (supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}: Llama-family decoder-only models)"
        )
    d, m, hd = fp["hidden_size"], fp["intermediate_size"], fp["head_dim"]
    n_kv, n_q = fp["num_key_value_heads"], fp["num_attention_heads"]
    wm = config.width_multiple
    mlp = _dedup_desc([snap_width(f * m, wm, m) for f in config.mlp])
    kv = _dedup_desc([max(1, min(n_kv, int(f * n_kv + 0.5))) for f in config.kv_groups])
    qpg_full = n_q // n_kv
    qpg = _dedup_desc([max(1, min(qpg_full, int(f * qpg_full + 0.5))) for f in config.q_per_group])
    hdim = _dedup_desc([max(2, min(hd, 2 * int(f * hd / 2 + 0.5))) for f in config.head_dim])  # RoPE pairs
    hidden = _dedup_desc([snap_width(f * d, wm, d) for f in config.hidden])
    space = Space(
        num_layers=fp["num_hidden_layers"],
        hidden=hidden,
        kv_groups=kv,
        q_per_group=qpg,
        head_dim=hdim,
        mlp=mlp,
        depth=bool(config.depth),
        wbits=_dedup_desc(config.wbits),
        abits=_dedup_desc(config.abits),
        lm_head_bits=_dedup_desc(config.lm_head_bits),
        group_size=int(config.group_size),
        bits_granularity=config.bits_granularity,
        fingerprint=fp,
    )
    check_group_size(space)
    return space


def check_group_size(space: Space) -> None:
    """Every input width a quantised linear can see must be a multiple of the group size."""
    g = space.group_size
    if all(b == 16 for b in space.wbits + space.lm_head_bits):
        return
    problems = []
    for h in space.hidden:
        if h % g:
            problems.append(f"q/k/v/gate/up/lm_head input = hidden size {h}")
    for kv in space.kv_groups:
        for q in space.q_per_group:
            for hd in space.head_dim:
                w = kv * q * hd
                if w % g:
                    problems.append(f"o_proj input = {kv * q} heads x head_dim {hd} = {w}")
    for mw in space.mlp:
        if mw % g:
            problems.append(f"down_proj input = mlp width {mw}")
    if problems:
        raise SpaceError(
            f"space.group_size={g} does not divide these reachable widths (every layer): "
            + "; ".join(sorted(set(problems)))
            + ". Choose a group size that divides them (e.g. space.group_size=32) or drop those choices."
        )
