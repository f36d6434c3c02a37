"""``Arch``: a plain, versioned, JSON-serialisable record of every decision of one subnet."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from archquant.core.space import LINEARS, Space
from archquant.utils.errors import MissingFileError, UserError

ARCH_VERSION = 1


class ArchError(UserError, ValueError):
    """An arch record that does not fit the model or space it is applied to."""


@dataclass
class LayerArch:
    """Decisions of one decoder block. Widths are absolute (not fractions)."""

    keep: bool = True
    kv_groups: int = 0
    q_per_group: int = 0
    head_dim: int = 0
    mlp: int = 0
    abits: int = 16
    wbits: dict[str, int] = field(default_factory=lambda: {n: 16 for n in LINEARS})

    @property
    def num_heads(self) -> int:
        return self.kv_groups * self.q_per_group


@dataclass
class Arch:
    """Every decision of a subnet: global hidden size, per-layer shapes and bits, lm_head bits.

    ``fingerprint`` ties the record to its base model (see ``space.model_fingerprint``); ``weight_types`` names
    what each bit-width stored when the record was searched for llama.cpp (``{"8": "Q8_0", "4": "Q4_K", ...}``;
    a block-256 type stores its fallback at rows it does not divide), empty for other engines. A record is
    materialised only by a backend with the same types (``check_types``).
    """

    hidden: int
    layers: list[LayerArch]
    lm_head_bits: int = 16
    group_size: int = 64
    fingerprint: dict[str, Any] = field(default_factory=dict)
    weight_types: dict[str, str] = field(default_factory=dict)
    version: int = ARCH_VERSION

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_choices(cls, space: Space, choice: dict[str, Any]) -> Arch:
        """Build from ``gate name -> chosen value`` (missing gates take their first choice)."""
        gates = space.gates()
        pick = {name: choice.get(name, opts[0]) for name, opts in gates.items()}
        for name, val in pick.items():
            if val not in gates[name]:
                raise ArchError(f"gate {name}: value {val!r} is not among its choices {gates[name]}")
        layers = []
        for l in range(space.num_layers):
            p = f"layers.{l}."
            wbits = {}
            for group, members in space.bit_groups.items():
                for lin in members:
                    wbits[lin] = int(pick[p + f"wbits.{group}"])
            layers.append(
                LayerArch(
                    keep=bool(pick[p + "keep"]),
                    kv_groups=int(pick[p + "kv_groups"]),
                    q_per_group=int(pick[p + "q_per_group"]),
                    head_dim=int(pick[p + "head_dim"]),
                    mlp=int(pick[p + "mlp"]),
                    abits=int(pick[p + "abits"]),
                    wbits=wbits,
                )
            )
        return cls(
            hidden=int(pick["hidden"]),
            layers=layers,
            lm_head_bits=int(pick["lm_head.wbits"]),
            group_size=space.group_size,
            fingerprint=dict(space.fingerprint),
        )

    @classmethod
    def full(cls, space: Space, bits: int | None = None) -> Arch:
        """The widest, most precise subnet of the space (the original model when the space allows).

        Args:
            bits: put every linear and the lm_head at these weight bits instead (full width and depth:
                plain uniform quantisation); ``ArchError`` when the space has no such choice.
        """
        if bits is None:
            return cls.from_choices(space, {})
        return cls.from_choices(space, {n: int(bits) for n in space.gates() if n == "lm_head.wbits" or ".wbits." in n})

    @classmethod
    def random(cls, space: Space, rng: random.Random | int = 0) -> Arch:
        """A uniformly random subnet (keeps at least one block)."""
        rng = random.Random(rng) if isinstance(rng, int) else rng
        choice = {name: rng.choice(opts) for name, opts in space.gates().items()}
        if space.depth and all(choice[f"layers.{l}.keep"] == 0 for l in range(space.num_layers)):
            choice[f"layers.{rng.randrange(space.num_layers)}.keep"] = 1
        return cls.from_choices(space, choice)

    def to_choices(self, space: Space) -> dict[str, Any]:
        """Inverse of ``from_choices``: ``gate name -> value`` (bit groups must be consistent)."""
        self.check(space)
        out: dict[str, Any] = {"hidden": self.hidden, "lm_head.wbits": self.lm_head_bits}
        for l, la in enumerate(self.layers):
            p = f"layers.{l}."
            out[p + "keep"] = int(la.keep)
            out[p + "kv_groups"] = la.kv_groups
            out[p + "q_per_group"] = la.q_per_group
            out[p + "head_dim"] = la.head_dim
            out[p + "mlp"] = la.mlp
            out[p + "abits"] = la.abits
            for group, members in space.bit_groups.items():
                vals = {la.wbits[m] for m in members}
                if len(vals) != 1:
                    raise ArchError(f"layer {l}: linears {members} share one bit gate but have bits {vals}")
                out[p + f"wbits.{group}"] = vals.pop()
        return out

    # ---- validation --------------------------------------------------------------------------
    def check_model(self, fingerprint: dict[str, Any]) -> None:
        """Refuse a record made for another base model, naming the differing dimensions."""
        diff = {k: (self.fingerprint.get(k), v) for k, v in fingerprint.items() if self.fingerprint.get(k) != v}
        if diff:
            pretty = ", ".join(f"{k}: arch has {a}, model has {b}" for k, (a, b) in diff.items())
            raise ArchError(f"this arch record was made for another model ({pretty})")

    def check_types(self, backend) -> None:
        """Refuse a backend whose weight types differ from those the record was searched with (which would
        materialise, time and export other tensors than the search chose), naming the override that fixes it."""
        theirs = {int(b): t for b, t in (getattr(backend, "options", dict)().get("types") or {}).items()}
        ours = {int(b): t for b, t in self.weight_types.items()}
        if not ours or not theirs:
            return
        used = {b for la in self.layers for b in la.wbits.values()} | {self.lm_head_bits}
        diff = {b: (ours.get(b), theirs.get(b)) for b in sorted(used, reverse=True) if ours.get(b) != theirs.get(b)}
        if diff:
            names = [ours[b] for b in sorted(ours, reverse=True) if b < 16]
            pretty = ", ".join(f"{b}-bit: record {a}, backend {t}" for b, (a, t) in diff.items())
            raise ArchError(f"this arch record was searched with other GGUF types ({pretty}); set "
                            f"latency.types=[{','.join(names)}] to use it")

    def check(self, space: Space) -> None:
        """Check the record against a space (model, layer count and that every value is a choice)."""
        self.check_model(space.fingerprint)
        if len(self.layers) != space.num_layers:
            raise ArchError(f"arch has {len(self.layers)} layers, the space has {space.num_layers}")
        gates = space.gates()
        if self.hidden not in gates["hidden"]:
            raise ArchError(f"hidden={self.hidden} is not among the space's choices {gates['hidden']}")
        for l, la in enumerate(self.layers):
            for key in ("kv_groups", "q_per_group", "head_dim", "mlp", "abits"):
                val = getattr(la, key)
                if val not in gates[f"layers.{l}.{key}"]:
                    raise ArchError(f"layer {l}: {key}={val} is not among {gates[f'layers.{l}.{key}']}")
            for lin, b in la.wbits.items():
                if b not in space.wbits:
                    raise ArchError(f"layer {l}: {lin} bits {b} not among {space.wbits}")
        if not any(la.keep for la in self.layers):
            raise ArchError("arch skips every block; keep at least one")

    # ---- summaries ---------------------------------------------------------------------------
    @property
    def kept_layers(self) -> list[int]:
        return [i for i, la in enumerate(self.layers) if la.keep]

    def is_uniform(self) -> bool:
        """True when every block is kept with the same shape (a plain Llama config describes it)."""
        kept = [self.layers[i] for i in self.kept_layers]
        shapes = {(la.kv_groups, la.q_per_group, la.head_dim, la.mlp) for la in kept}
        return len(shapes) == 1 and len(kept) == len(self.layers)

    def summary(self) -> str:
        kept = self.kept_layers
        heads = [self.layers[i].num_heads for i in kept]
        mlps = [self.layers[i].mlp for i in kept]
        bits = sorted({b for i in kept for b in self.layers[i].wbits.values()})
        return (
            f"hidden {self.hidden}, {len(kept)}/{len(self.layers)} blocks, heads {min(heads)}-{max(heads)}, "
            f"mlp {min(mlps)}-{max(mlps)}, wbits {bits}, lm_head {self.lm_head_bits}b"
        )

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Arch:
        version = d.get("version")
        if version != ARCH_VERSION:
            raise ArchError(
                f"arch record version {version!r} is not supported (this archquant reads version {ARCH_VERSION}); "
                "re-run the search with this version"
            )
        d = dict(d)
        d["layers"] = [LayerArch(**la) for la in d["layers"]]
        return cls(**d)

    def save(self, path: str | Path) -> None:
        from archquant.utils.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Arch:
        path = Path(path)
        if not path.exists():
            raise MissingFileError(f"arch file {path} does not exist (pass the arch.json written by archquant-search)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ArchError(f"{path} is not valid JSON ({err}); is it a corrupt or partial file?") from err
        return cls.from_dict(d)
