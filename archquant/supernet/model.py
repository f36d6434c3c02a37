"""The supernet: every subnet of a space in one weight-shared module, one vectorised forward per step.

``Supernet`` owns a compact Llama forward over shared (importance-permuted) weights. A probability
vector per gate (``sample_probs``/``probs``, or one-hot from an ``Arch``) drives the forward:
cumulative width masks, mixed quantised weights, depth as ``h + pi_keep f(h)`` and RMSNorm over the
expected hidden width (``norm.py``). Fixing a gate (entropy pruner, ``set_arch``) slices the
weights to the chosen width and keeps only the chosen quantiser, so later steps get cheaper.

A gate whose vector is an exact one-hot without gradient (``probs=None``, ``arch_probs``) is run on
its slice, at the subnet's real cost and bit for bit like ``materialize``; gates with gradients (soft
or straight-through samples) go through the masks. One approximation remains on the masked path:
with the opt-in ``q_per_group``/``head_dim`` choices, ``o_proj`` is quantised in groups of the full
layout, which need not coincide with the groups of the narrower slice (one-hot and fixed gates
quantise the slice itself).

Gate logits and the fixed-gate map are part of ``state_dict()`` so a search can be resumed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from archquant.backends import Backend
from archquant.core.arch import Arch, ArchError
from archquant.core.linears import ATTN_LINEARS
from archquant.core.space import Space
from archquant.supernet.block import SuperBlock
from archquant.supernet.gates import GateError, GateSet
from archquant.supernet.masks import expected, width_table
from archquant.supernet.quant import mixed_act, onehot_index

STATE_VERSION = 1
LAYER_KEYS = ("kv_groups", "q_per_group", "head_dim", "mlp", "keep", "abits")
MODES = ("vectorized", "naive")


class ElasticEmbedding(nn.Module):
    """Token embedding on a prefix of the hidden channels of a shared table ``[V, D]``."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight
        self.active: int | None = None  # hidden width once the hidden gate is fixed

    def forward(self, input_ids: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """Shape: ``[B, S]`` -> ``[B, S, width or active width]``."""
        width = width or self.active
        w = self.weight if width is None else self.weight[:, :width]
        return F.embedding(input_ids, w)


class Supernet(nn.Module):
    """Weight-entangled supernet over a Llama-family model. Build it with ``supernet.build``.

    Attributes:
        space: the resolved search space; ``gate_names == list(space.gates())``.
        backend: the serving engine whose quantisers are simulated.
        base_config: the original Hugging Face config.
        mode: ``"vectorized"`` (one pass) or ``"naive"`` (one pass per branch; benchmarks only).
        importance: the calibration importance used for the permutation (or ``None``).
    """

    def __init__(
        self,
        *,
        space: Space,
        backend: Backend,
        base_config,
        embed_tokens: ElasticEmbedding,
        layers: list[SuperBlock],
        norm: nn.Module,
        lm_head: nn.Module,
        rotary_emb: nn.Module,
        lm_head_class_bits: list[int],
        init_logits: dict[str, torch.Tensor] | None = None,
        rope_perms: list[torch.Tensor | None] | None = None,
        importance=None,
    ) -> None:
        super().__init__()
        self.space = space
        self.backend = backend
        self.base_config = base_config
        self.importance = importance
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = lm_head
        self.rotary_emb = rotary_emb
        self.lm_head_class_bits = lm_head_class_bits
        self.rope_perms = rope_perms or [None] * len(layers)
        self.gates = GateSet(space.gates(), init_logits)
        d = space.fingerprint["hidden_size"]
        self.register_buffer("hidden_table", width_table(space.hidden, d), persistent=False)
        self.register_buffer("hidden_values", torch.tensor(space.hidden, dtype=torch.float32), persistent=False)
        self._group_of = {lin: g for g, members in space.bit_groups.items() for lin in members}
        self._layer_names = [
            {
                **{k: f"layers.{l}.{k}" for k in LAYER_KEYS},
                **{f"w.{lin}": f"layers.{l}.wbits.{g}" for lin, g in self._group_of.items()},
            }
            for l in range(len(layers))
        ]
        self._mode = "vectorized"
        for name, idx in list(self.gates.fixed.items()):
            self._apply_fix(name, idx)

    # ---- public surface ----------------------------------------------------------------------
    @property
    def gate_names(self) -> list[str]:
        return list(self.gates.names)

    @property
    def fixed(self) -> dict[str, int]:
        """``gate name -> fixed choice index`` (single-choice gates are fixed from the start)."""
        return self.gates.fixed

    def open_gates(self) -> list[str]:
        return self.gates.open_gates()

    def arch_parameters(self) -> list[nn.Parameter]:
        """Gate logits, one leaf Parameter per gate, in ``gate_names`` order."""
        return list(self.gates.logits)

    def weight_parameters(self) -> list[nn.Parameter]:
        """The shared supernet weights (tied embedding / lm_head counted once)."""
        return [p for n, p in self.named_parameters() if not n.startswith("gates.")]

    def sample_probs(
        self, tau: float, hard: bool = False, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Gumbel-Softmax probabilities of every gate (see ``GateSet.sample``)."""
        return self.gates.sample(tau, hard=hard, generator=generator)

    def probs(self) -> dict[str, torch.Tensor]:
        """``softmax(logits)`` of every gate, no noise; fixed gates one-hot."""
        return self.gates.probs()

    def entropy(self) -> dict[str, float]:
        """Normalised gate entropies ``H / log K`` (0 for fixed gates), for the entropy pruner."""
        return self.gates.entropy()

    def arch_probs(self, arch: Arch) -> dict[str, torch.Tensor]:
        """Exact one-hot probabilities (no gradient) selecting ``arch``."""
        arch.check(self.space)
        choice = arch.to_choices(self.space)
        return self.gates.onehot({n: self.gates.choices[n].index(choice[n]) for n in self.gates.names})

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"supernet mode must be one of {MODES}, got {value!r}")
        self._mode = value
        for blk in self.layers:
            blk.naive = value == "naive"

    # ---- fixing gates ------------------------------------------------------------------------
    def fix_gate(self, name: str, index: int) -> None:
        """Fix gate ``name`` to choice ``index`` and drop the other branches physically.

        Width gates slice the shared weights to the chosen units (views of the same Parameters, so
        optimisers stay valid); bits gates keep only the chosen quantiser; a skipped block is no
        longer run. Fixing is final: a fixed gate cannot be re-opened or re-fixed to another choice.
        """
        if name in self.gates.fixed and self.gates.fixed[name] == int(index):
            return
        self.gates.fix(name, index)
        self._apply_fix(name, int(index))

    def _linear(self, l: int, lin: str):
        blk = self.layers[l]
        return getattr(blk.self_attn, f"{lin}_proj") if lin in ATTN_LINEARS else getattr(blk.mlp, f"{lin}_proj")

    def _apply_fix(self, name: str, index: int) -> None:
        if name == "hidden":
            d = self.space.hidden[index]
            sel = None if d == self.space.fingerprint["hidden_size"] else d
            self.embed_tokens.active = sel
            self.lm_head.set_slice(in_sel=sel)
            for l in range(len(self.layers)):
                for lin in ("q", "k", "v", "gate", "up"):
                    self._linear(l, lin).set_slice(in_sel=sel)
                for lin in ("o", "down"):
                    self._linear(l, lin).set_slice(out_sel=sel)
            return
        if name == "lm_head.wbits":
            self.lm_head.fix_bits(index)
            return
        _, l, key = name.split(".", 2)
        l = int(l)
        blk = self.layers[l]
        if key in ("kv_groups", "q_per_group", "head_dim"):
            blk.self_attn.fix(key, index)
        elif key == "mlp":
            blk.mlp.fix("mlp", index)
        elif key == "keep":
            blk.keep_fixed = index
        elif key == "abits":
            blk.self_attn.fix("abits", index)
            blk.mlp.fix("abits", index)
        elif key.startswith("wbits."):
            for lin in self.space.bit_groups[key.split(".", 1)[1]]:
                self._linear(l, lin).fix_bits(index)
        else:  # pragma: no cover - names come from the space
            raise GateError(f"unknown gate {name!r}")

    def argmax_arch(self) -> Arch:
        """The architecture of every gate's fixed choice or logit argmax."""
        idx = self.gates.argmax_indices()
        return Arch.from_choices(self.space, {n: self.gates.choices[n][i] for n, i in idx.items()})

    def set_arch(self, arch: Arch) -> None:
        """Fix every gate to ``arch`` (which must not contradict gates fixed earlier)."""
        arch.check(self.space)
        choice = arch.to_choices(self.space)
        for name in self.gates.names:
            idx = self.gates.choices[name].index(choice[name])
            if name in self.gates.fixed and self.gates.fixed[name] != idx:
                fixed_val = self.gates.choices[name][self.gates.fixed[name]]
                raise ArchError(f"arch sets {name}={choice[name]!r} but the supernet has fixed it to {fixed_val!r}")
        for name in self.gates.names:
            self.fix_gate(name, self.gates.choices[name].index(choice[name]))

    # ---- checkpointing -----------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "fixed": dict(self.gates.fixed),
            "fingerprint": dict(self.space.fingerprint),
            "gates": {n: list(c) for n, c in self.gates.choices.items()},
            # RoPE pair orders are not weights but must match the (permuted) weights of the checkpoint
            "rope_perms": [None if p is None else p.tolist() for p in self.rope_perms],
        }

    def set_extra_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"supernet checkpoint version {state.get('version')!r} is not {STATE_VERSION}")
        if dict(state.get("fingerprint", {})) != dict(self.space.fingerprint):
            raise ArchError(
                f"this supernet checkpoint was made for another model ({state.get('fingerprint')}), "
                f"not {self.space.fingerprint}"
            )
        if state["gates"] != {n: list(c) for n, c in self.gates.choices.items()}:
            raise ArchError("this supernet checkpoint was made over another search space; build with the same space")
        perms = [None if p is None else torch.tensor(p) for p in state["rope_perms"]]
        for l, (mine, theirs) in enumerate(zip(self.rope_perms, perms)):
            if (mine is None) != (theirs is None) or (mine is not None and not torch.equal(mine.cpu(), theirs)):
                self.layers[l].self_attn.set_rope_perm(theirs)
        self.rope_perms = perms
        for name, idx in state["fixed"].items():
            self.fix_gate(name, idx)

    # ---- forward -----------------------------------------------------------------------------
    def _layer_probs(self, probs: dict[str, torch.Tensor], l: int) -> dict:
        """This block's gates: ``None`` (fixed), ``int`` (exact one-hot, no gradient) or ``Tensor``."""
        fixed = self.gates.fixed
        return {key: (None if name in fixed else _resolve(probs[name])) for key, name in self._layer_names[l].items()}

    def forward(self, input_ids: torch.Tensor, probs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits of the subnet mixture selected by ``probs``.

        Gates whose vector is an exact one-hot without gradient (``probs=None``, ``arch_probs``, fixed)
        are computed on the chosen slice, at the subnet's real cost; the others are mixed by masks.

        Args:
            input_ids: token ids (packed text, no padding). Shape: ``[B, S]``.
            probs: ``gate name -> Tensor[K]`` (``sample_probs``/``probs``/``arch_probs``); ``None``
                runs the argmax architecture with exact one-hot gates.

        Returns:
            Logits. Shape: ``[B, S, V]``.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if probs is None:
            probs = self.gates.onehot(self.gates.argmax_indices())
        else:
            self.gates.check_probs(probs)
        fixed = self.gates.fixed
        hidden_mask = count = d_sub = None
        if "hidden" not in fixed:
            ph = _resolve(probs["hidden"])
            if isinstance(ph, int):
                d = self.space.hidden[ph]
                d_sub = None if d == self.space.fingerprint["hidden_size"] else d
            else:
                hidden_mask = expected(ph, self.hidden_table)  # [D]
                count = expected(ph, self.hidden_values)
        x = self.embed_tokens(input_ids, d_sub)  # [B, S, D_run]
        if hidden_mask is not None:
            x = x * hidden_mask
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        cos, sin = self.rotary_emb(x, pos)  # [1, S, head_dim]
        for l, blk in enumerate(self.layers):
            if blk.skipped:
                continue
            x = blk(x, cos, sin, hidden_mask, count, self._layer_probs(probs, l), d_sub)
        x = self.norm(x, count)
        p_lm = None if "lm_head.wbits" in fixed else _resolve(probs["lm_head.wbits"])
        if self._mode == "naive":
            from archquant.supernet.naive import naive_linear

            return naive_linear(self.lm_head, x, [16], None, 0, p_lm, None, d_sub)
        need = sorted(self.lm_head.needed_classes(p_lm))
        xs = mixed_act(x, self.backend, [16], None, 0, self.lm_head_class_bits, need)
        return self.lm_head(xs, p_lm, None, d_sub)  # [B, S, V]


def _resolve(p: torch.Tensor) -> torch.Tensor | int:
    """An exact one-hot vector without gradient becomes its index; anything else stays a tensor."""
    k = onehot_index(p)
    return p if k is None else k
