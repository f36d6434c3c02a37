"""The one decomposition of a subnet into timed ops (``OpTerm``), shared by profiler, model and roofline.

A decoder block is: input norm, q/k/v linears, attention (RoPE, KV-cache append, softmax-attention),
o linear, post-attention norm, gate/up linears, the SiLU-and-multiply (``act``), down linear and a
per-block overhead (residual adds, dispatch). The model adds the embedding lookup, the final norm,
the lm_head and a per-token overhead once. Each ``OpTerm`` says which gates ("roles") its signature
depends on, so that the expected latency is a contraction of a LUT tensor over exactly those gates.

Table kinds and their signature keys (the JSON format of ``LatencyTable``):
``linear``/``lm_head``: K, N, wbits, abits | ``attention``: heads, kv_heads, head_dim |
``norm``/``embedding``/``act``: d | ``overhead``: name (``per_token``, ``per_layer``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

from archquant.core.space import LINEARS, Space

KINDS = ("linear", "attention", "norm", "act", "embedding", "lm_head", "overhead")
SIGNATURE_KEYS = {
    "linear": ("K", "N", "wbits", "abits"),
    "lm_head": ("K", "N", "wbits", "abits"),
    "attention": ("heads", "kv_heads", "head_dim"),
    "norm": ("d",),
    "act": ("d",),
    "embedding": ("d",),
    "overhead": ("name",),
}
# Per-block roles (gate name = f"layers.{l}.{role}"); every other role names a model-wide gate.
LAYER_ROLES = ("kv_groups", "q_per_group", "head_dim", "mlp", "abits", "keep")
MODEL_ROLES = ("hidden", "lm_head.wbits")


@dataclass(frozen=True)
class OpTerm:
    """One op of the decomposition.

    Attributes:
        name: op name (``q``, ``attention``, ``input_layernorm``, ``lm_head`` ...).
        kind: table kind (one of ``KINDS``).
        roles: the gates its signature depends on, e.g. ``("hidden", "kv_groups", "wbits.qkv", "abits")``.
        scope: ``layer`` (once per kept block, times p_keep) or ``model`` (once per forward).
        signature: role values -> table signature (a dict with the kind's ``SIGNATURE_KEYS``).
        weights: role values -> ``(num_weights, bits, row)`` it stores (``row``: the input length, which decides a
            llama.cpp block-256 type's fallback), or None for ops without weights.
    """

    name: str
    kind: str
    roles: tuple[str, ...]
    scope: str
    signature: Callable[[dict[str, Any]], dict[str, Any]]
    weights: Callable[[dict[str, Any]], tuple[int, int, int]] | None = None

    def gate(self, role: str, layer: int | None) -> str:
        """The gate name that plays ``role`` for this op in block ``layer``."""
        return role if self.scope == "model" or role in MODEL_ROLES else f"layers.{layer}.{role}"


def _heads(v: dict) -> int:
    return v["kv_groups"] * v["q_per_group"]


def _linear(name: str, wrole: str, k_of: Callable, n_of: Callable, roles: tuple[str, ...]) -> OpTerm:
    def sig(v):
        return {"K": int(k_of(v)), "N": int(n_of(v)), "wbits": int(v[wrole]), "abits": int(v["abits"])}

    def weights(v):
        return int(k_of(v)) * int(n_of(v)), int(v[wrole]), int(k_of(v))

    return OpTerm(name, "linear", roles + (wrole, "abits"), "layer", sig, weights)


def bit_role(space: Space, linear: str) -> str:
    """The per-block role (``wbits.<group>``) that decides the bits of ``linear``."""
    for group, members in space.bit_groups.items():
        if linear in members:
            return f"wbits.{group}"
    raise KeyError(f"linear {linear!r} is in no bit group of {space.bits_granularity!r}")


def op_terms(space: Space) -> list[OpTerm]:
    """Every op of a subnet of ``space``: block ops (``scope='layer'``) then model ops, in forward order."""
    fp = space.fingerprint
    vocab = int(fp["vocab_size"])
    tied = bool(fp.get("tie_word_embeddings", False))
    wb = {lin: bit_role(space, lin) for lin in LINEARS}
    qd = lambda v: _heads(v) * v["head_dim"]  # noqa: E731  (attention width: q and o_proj)
    kvd = lambda v: v["kv_groups"] * v["head_dim"]  # noqa: E731
    d = lambda v: v["hidden"]  # noqa: E731
    m = lambda v: v["mlp"]  # noqa: E731
    attn_roles = ("hidden", "kv_groups", "q_per_group", "head_dim")
    norm = lambda name: OpTerm(  # noqa: E731
        name, "norm", ("hidden",), "layer", lambda v: {"d": int(v["hidden"])}, lambda v: (int(v["hidden"]), 16, int(v["hidden"]))
    )

    def lm_head_weights(v):
        # A tied 16-bit lm_head is the embedding matrix itself: no extra bytes.
        bits = int(v["lm_head.wbits"])
        return (0 if tied and bits >= 16 else vocab * int(v["hidden"])), bits, int(v["hidden"])

    return [
        norm("input_layernorm"),
        _linear("q", wb["q"], d, qd, attn_roles),
        _linear("k", wb["k"], d, kvd, ("hidden", "kv_groups", "head_dim")),
        _linear("v", wb["v"], d, kvd, ("hidden", "kv_groups", "head_dim")),
        OpTerm(
            "attention",
            "attention",
            ("kv_groups", "q_per_group", "head_dim"),
            "layer",
            lambda v: {"heads": int(_heads(v)), "kv_heads": int(v["kv_groups"]), "head_dim": int(v["head_dim"])},
        ),
        _linear("o", wb["o"], qd, d, attn_roles),
        norm("post_attention_layernorm"),
        _linear("gate", wb["gate"], d, m, ("hidden", "mlp")),
        _linear("up", wb["up"], d, m, ("hidden", "mlp")),
        OpTerm("act", "act", ("mlp",), "layer", lambda v: {"d": int(v["mlp"])}),
        _linear("down", wb["down"], m, d, ("hidden", "mlp")),
        OpTerm("per_layer", "overhead", (), "layer", lambda v: {"name": "per_layer"}),
        OpTerm(
            "embed_tokens",
            "embedding",
            ("hidden",),
            "model",
            lambda v: {"d": int(v["hidden"])},
            lambda v: (vocab * int(v["hidden"]), 16, int(v["hidden"])),
        ),
        OpTerm("norm", "norm", ("hidden",), "model", lambda v: {"d": int(v["hidden"])}, lambda v: (int(v["hidden"]), 16, int(v["hidden"]))),
        OpTerm(
            "lm_head",
            "lm_head",
            ("hidden", "lm_head.wbits"),
            "model",
            lambda v: {"K": int(v["hidden"]), "N": vocab, "wbits": int(v["lm_head.wbits"]), "abits": 16},
            lm_head_weights,
        ),
        OpTerm("per_token", "overhead", (), "model", lambda v: {"name": "per_token"}),
    ]


def role_choices(space: Space, role: str) -> list:
    """Choices of a role (identical in every block: the space is per-layer homogeneous)."""
    gates = space.gates()
    return list(gates[role] if role in MODEL_ROLES else gates[f"layers.0.{role}"])


def signature_key(kind: str, sig: dict[str, Any]) -> tuple:
    """Hashable key of a signature (its values in ``SIGNATURE_KEYS`` order)."""
    try:
        return tuple(sig[k] for k in SIGNATURE_KEYS[kind])
    except KeyError as err:
        raise KeyError(f"{kind} signature {sig} lacks key {err} (needs {SIGNATURE_KEYS[kind]})") from None


def enumerate_signatures(space: Space) -> dict[str, list[dict[str, Any]]]:
    """Exactly the distinct op signatures that subnets of ``space`` can produce, per table kind.

    Returns:
        ``kind -> [signature, ...]`` sorted, without duplicates (the profiler times each once).
    """
    seen: dict[str, dict[tuple, dict]] = {k: {} for k in KINDS}
    for term in op_terms(space):
        choices = [role_choices(space, r) for r in term.roles]
        for combo in itertools.product(*choices):
            sig = term.signature(dict(zip(term.roles, combo)))
            seen[term.kind].setdefault(signature_key(term.kind, sig), sig)
    return {kind: [sigs[k] for k in sorted(sigs)] for kind, sigs in seen.items() if sigs}


def arch_ops(space: Space, arch) -> list[tuple[OpTerm, dict[str, Any], int | None]]:
    """The ops one forward of ``arch`` runs: ``(term, signature, block index or None)``, kept blocks only.

    Raises:
        ArchError: ``arch`` does not fit ``space`` (other model, a value that is not a choice, or bits
            that differ inside one bit group).
    """
    choices = arch.to_choices(space)
    terms = op_terms(space)
    out = []
    for l in arch.kept_layers:
        for t in terms:
            if t.scope == "layer":
                out.append((t, t.signature({r: choices[t.gate(r, l)] for r in t.roles}), l))
    for t in terms:
        if t.scope == "model":
            out.append((t, t.signature({r: choices[t.gate(r, None)] for r in t.roles}), None))
    return out
