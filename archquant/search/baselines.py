"""Sequential baselines: compress in two separate steps, for the front to compare the joint search with.

``prune_quantise`` (Minitron-style): the supernet's channels are ordered by importance (its
calibration-based scores; ``supernet.importance``), so a *uniform* shape (the same hidden size, MLP
width and KV-group count in every block, every block kept) is importance pruning. Per quantised
bit-width ``b`` it keeps the largest uniform shape (weight MB) whose predicted latency with every
linear and the lm_head at ``b`` meets the target, ties to the faster. One architecture per
(target, b); the Pareto stage evaluates and times each like any point.

``sequential_search`` (architecture search, then quantisation): per target ``T`` and quantised bit-width
``b``, the architecture is searched with every bits gate fixed at 16 under the budget that leaves room for
``b`` (``T`` times the full model's 16-bit / ``b``-bit predicted latency ratio), then every linear and the
lm_head are quantised to ``b`` (``quantise_uniformly``); the search itself runs in ``commands.pareto``.

A target nothing in the family meets is reported (``unmet``), not dropped silently.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass

from archquant.core.arch import Arch
from archquant.core.space import Space
from archquant.utils.errors import UserError

BASELINES = ("prune_quantise", "sequential_search")


class BaselineError(UserError, ValueError):
    """An unknown baseline name."""


def check_baselines(names) -> list[str]:
    """Built-in baseline names among ``pareto.baselines`` entries (files are left to the caller)."""
    out = []
    for name in names:
        if str(name).endswith(".json"):
            continue
        if name not in BASELINES:
            raise BaselineError(f"pareto.baselines has {name!r}: neither a built-in baseline ({list(BASELINES)}) nor a "
                                "points file (*.json)")
        out.append(str(name))
    return out


@dataclass
class Candidate:
    """One baseline architecture for one target."""

    name: str
    target_ms: float
    bits: int
    arch: Arch | None  # None: nothing in the family meets the target at these bits
    predicted_ms: float | None = None
    predicted_mb: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)


def uniform_shape(space: Space, hidden: int, mlp: int, kv_groups: int, bits: int, lm_head_bits: int | None = None) -> Arch:
    """Every block kept at one shape, every linear at ``bits`` and the lm_head at ``lm_head_bits`` (default
    ``bits``; the space's least precise choice where it lacks the value)."""
    gates = space.gates()
    choice = {n: v[0] for n, v in gates.items()}
    choice["hidden"] = hidden
    lm = bits if lm_head_bits is None else lm_head_bits
    choice["lm_head.wbits"] = lm if lm in gates["lm_head.wbits"] else gates["lm_head.wbits"][-1]
    for name in gates:
        if name.endswith(".mlp"):
            choice[name] = mlp
        elif name.endswith(".kv_groups"):
            choice[name] = kv_groups
        elif ".wbits." in name:
            choice[name] = bits
    return Arch.from_choices(space, choice)


def prune_quantise(space: Space, latency_model, targets_ms, bits_list=None) -> list[Candidate]:
    """Per target and quantised bit-width, the largest importance-pruned uniform shape meeting the target.

    Args:
        space: the resolved space (its width choices are the pruning grid).
        latency_model: predicts ms and MB of an ``Arch``.
        targets_ms: latency targets.
        bits_list: quantised bit-widths to try (default: every one below 16 the space has).
    """
    bits_list = [b for b in (bits_list or space.wbits) if int(b) < 16]
    if not bits_list:
        raise BaselineError("prune_quantise quantises uniformly but space.wbits has no bit-width below 16")
    shapes = list(itertools.product(space.hidden, space.mlp, space.kv_groups))
    out = []
    for b in bits_list:
        priced = []
        for h, m, kv in shapes:
            arch = uniform_shape(space, h, m, kv, int(b))
            priced.append((latency_model.predict_ms(arch), latency_model.predict_mb(arch), arch))
        for t in targets_ms:
            fits = [p for p in priced if p[0] <= t]
            name = f"prune_quantise-w{b}@{t:g}ms"
            if not fits:
                out.append(Candidate(name, float(t), int(b), None))
                continue
            ms, mb, arch = max(fits, key=lambda p: (p[1], -p[0]))
            out.append(Candidate(name, float(t), int(b), arch, ms, mb))
    return out


def full_shape(space: Space) -> tuple[int, int, int]:
    """``(hidden, mlp, kv_groups)`` of the unpruned model (``uniform_shape``'s widest shape)."""
    return max(space.hidden), max(space.mlp), max(space.kv_groups)


def room_budget(space: Space, latency_model, target_ms: float, bits: int) -> float:
    """The 16-bit latency budget whose architectures meet ``target_ms`` once quantised to ``bits``, assuming they
    speed up as the full model does: ``target * ms(full @ 16) / ms(full @ bits)``."""
    ms16 = latency_model.predict_ms(uniform_shape(space, *full_shape(space), 16))
    msb = latency_model.predict_ms(uniform_shape(space, *full_shape(space), bits))
    return float(target_ms) * ms16 / msb


def quantise_uniformly(space: Space, arch: Arch, bits: int) -> Arch:
    """``arch``'s shape (searched in any space of the same model) with every linear and the lm_head at ``bits``,
    checked against ``space``."""
    out = Arch.from_dict(arch.to_dict())
    for la in out.layers:
        la.wbits = {k: int(bits) for k in la.wbits}
    out.lm_head_bits = int(bits)
    out.group_size = space.group_size
    out.check(space)
    return out


def reference_candidates(space: Space, latency_model, budget_ms: float) -> list[tuple[str, Arch]]:
    """The simple architectures a search at ``budget_ms`` must do at least as well as, where they meet it: every
    block kept at full width with every linear at one bit-width and the lm_head at the same or a more precise one
    (the tensor llama.cpp's own presets keep high), and the ``prune_quantise`` shapes."""
    out = []
    full = full_shape(space)
    for b in sorted({int(b) for b in space.wbits}, reverse=True):
        for lm in sorted({int(x) for x in space.lm_head_bits if int(x) >= b} or {b}):
            arch = uniform_shape(space, *full, b, lm)
            if latency_model.predict_ms(arch) <= budget_ms * (1 + 1e-6):
                out.append((f"uniform-w{b}" + (f"-head{lm}" if lm != b else ""), arch))
    seen = {json_key(a) for _, a in out}
    for c in prune_quantise(space, latency_model, [budget_ms]) if any(int(b) < 16 for b in space.wbits) else []:
        if c.arch is not None and json_key(c.arch) not in seen:
            seen.add(json_key(c.arch))
            out.append((c.name, c.arch))
    return out


def json_key(arch: Arch) -> str:
    return json.dumps(arch.to_dict(), sort_keys=True)
