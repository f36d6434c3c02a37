"""Elastic grouped-query attention: whole KV groups, query heads per group, head size (RoPE pairs).

Layout after the importance permutation (``permute.py``): KV groups are sorted by importance, the query
heads inside each group too, and (when head size is searchable) the RoPE pairs ``(i, i + hd/2)`` and the
value dims of every head. A width choice therefore keeps a prefix of groups, a prefix of heads inside
each kept group, the first ``c/2`` pairs and the first ``c`` value dims of each kept head.

Open width gates become one mask on the attention output before ``o_proj`` (head mask x value-dim
mask) plus a pair mask on the queries; every head is still computed, in one SDPA call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from archquant.backends import Backend
from archquant.supernet.linear import ElasticLinear, as_sel
from archquant.supernet.masks import expected, rope_pair_table, width_table
from archquant.supernet.quant import mixed_act


def head_dims(head_dim: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dims of one head kept at head size ``keep``: q/k dims (first ``keep/2`` pairs) and value dims.

    Returns:
        ``(qk_dims, v_dims)``, each a LongTensor of length ``keep``; q/k dims stay laid out as
        ``[first halves | second halves]`` so that ``rotate_half`` pairs them as before.
    """
    half, r = head_dim // 2, keep // 2
    qk = torch.cat([torch.arange(r), half + torch.arange(r)])
    return qk, torch.arange(keep)


def attention_index(n_kv: int, qpg: int, head_dim: int, kv: int, q: int, hd: int) -> dict[str, torch.Tensor]:
    """Rows of q/k/v and columns of o kept by ``kv`` groups x ``q`` heads per group x head size ``hd``.

    Args:
        n_kv, qpg, head_dim: full dimensions (KV groups, query heads per group, head size).
        kv, q, hd: the kept ones.

    Returns:
        LongTensors ``q``, ``k``, ``v`` (row indices), ``o`` (column indices), ``qk_dims``, ``v_dims``.
    """
    qk_dims, v_dims = head_dims(head_dim, hd)
    heads = (torch.arange(kv)[:, None] * qpg + torch.arange(q)[None, :]).reshape(-1)
    groups = torch.arange(kv)
    return {
        "q": (heads[:, None] * head_dim + qk_dims[None, :]).reshape(-1),
        "k": (groups[:, None] * head_dim + qk_dims[None, :]).reshape(-1),
        "v": (groups[:, None] * head_dim + v_dims[None, :]).reshape(-1),
        "o": (heads[:, None] * head_dim + v_dims[None, :]).reshape(-1),
        "qk_dims": qk_dims,
        "v_dims": v_dims,
    }


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Llama RoPE. Shape: ``q [B, H, S, hd]``, ``k [B, KV, S, hd]``, ``cos/sin [B|1, S, hd]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class ElasticAttention(nn.Module):
    """Attention of one block over shared q/k/v/o weights.

    Args:
        q_proj, k_proj, v_proj, o_proj: elastic linears over the permuted full weights.
        num_kv: KV groups; qpg: query heads per group; head_dim: head size (full).
        kv_choices, qpg_choices, hd_choices: the space's choices (descending).
        rope_perm: permuted q/k dim -> original dim (RoPE frequency), or ``None`` when unpermuted.
        abits: activation-bit choices; backend; class_bits: representative weight bits per act class.
    """

    def __init__(
        self,
        q_proj: ElasticLinear,
        k_proj: ElasticLinear,
        v_proj: ElasticLinear,
        o_proj: ElasticLinear,
        *,
        num_kv: int,
        qpg: int,
        head_dim: int,
        kv_choices: list[int],
        qpg_choices: list[int],
        hd_choices: list[int],
        rope_perm: torch.Tensor | None,
        abits: list[int],
        backend: Backend,
        class_bits: list[int],
    ) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.num_kv, self.qpg, self.head_dim = num_kv, qpg, head_dim
        self.kv_choices, self.qpg_choices, self.hd_choices = kv_choices, qpg_choices, hd_choices
        self.abits, self.backend, self.class_bits = abits, backend, class_bits
        self.register_buffer("kv_table", width_table(kv_choices, num_kv), persistent=False)
        self.register_buffer("qpg_table", width_table(qpg_choices, qpg), persistent=False)
        self.register_buffer("pair_table", rope_pair_table(hd_choices, head_dim), persistent=False)
        self.register_buffer("vdim_table", width_table(hd_choices, head_dim), persistent=False)
        self.register_buffer("hd_values", torch.tensor(hd_choices, dtype=torch.float32), persistent=False)
        self.register_buffer("rope_perm", rope_perm, persistent=False)
        self.fixed: dict[str, int] = {}  # gate suffix -> fixed index (kv_groups, q_per_group, head_dim, abits)
        self.kv_act, self.qpg_act, self.hd_act = num_kv, qpg, head_dim
        # original RoPE dims of the active q/k dims (None: identity), a buffer so it follows .to(device)
        self.register_buffer("rope_sel", rope_perm, persistent=False)
        self._subs: dict = {}

    # ---- fixing ------------------------------------------------------------------------------
    def fix(self, key: str, index: int) -> None:
        """Fix one of this block's attention gates and slice the weights to the kept units."""
        self.fixed[key] = int(index)
        if key == "abits":
            return
        kv = self.kv_choices[self.fixed["kv_groups"]] if "kv_groups" in self.fixed else self.num_kv
        q = self.qpg_choices[self.fixed["q_per_group"]] if "q_per_group" in self.fixed else self.qpg
        hd = self.hd_choices[self.fixed["head_dim"]] if "head_dim" in self.fixed else self.head_dim
        idx = attention_index(self.num_kv, self.qpg, self.head_dim, kv, q, hd)
        full_q = full_o = self.num_kv * self.qpg * self.head_dim
        full_kv = self.num_kv * self.head_dim
        self.q_proj.set_slice(out_sel=as_sel(idx["q"], full_q))
        self.k_proj.set_slice(out_sel=as_sel(idx["k"], full_kv))
        self.v_proj.set_slice(out_sel=as_sel(idx["v"], full_kv))
        self.o_proj.set_slice(in_sel=as_sel(idx["o"], full_o))
        self.kv_act, self.qpg_act, self.hd_act = kv, q, hd
        self._update_rope_sel()

    def set_rope_perm(self, rope_perm: torch.Tensor | None) -> None:
        """Adopt another RoPE pair order (a checkpoint's); the weights must follow the same order."""
        self.rope_perm = None if rope_perm is None else rope_perm.to(self.hd_values.device)
        self._update_rope_sel()

    def _update_rope_sel(self) -> None:
        dims = head_dims(self.head_dim, self.hd_act)[0].to(self.hd_values.device)
        if self.hd_act == self.head_dim and self.rope_perm is None:
            self.rope_sel = None
        else:
            self.rope_sel = dims if self.rope_perm is None else self.rope_perm[dims]
        self._subs = {}

    def _sub(self, kv: int, q: int, hd: int) -> dict | None:
        """Per-call slices of the active layout for one-hot width gates (``None``: the whole active layout)."""
        if (kv, q, hd) == (self.kv_act, self.qpg_act, self.hd_act):
            return None
        key = (kv, q, hd)
        if key not in self._subs:
            idx = attention_index(self.kv_act, self.qpg_act, self.hd_act, kv, q, hd)
            h_act = self.kv_act * self.qpg_act
            base = self.rope_sel
            if base is None:
                base = torch.arange(self.hd_act, device=self.hd_values.device)
            rope = base[idx["qk_dims"].to(base.device)]
            self._subs[key] = {
                "q": as_sel(idx["q"], h_act * self.hd_act),
                "k": as_sel(idx["k"], self.kv_act * self.hd_act),
                "v": as_sel(idx["v"], self.kv_act * self.hd_act),
                "o": as_sel(idx["o"], h_act * self.hd_act),
                "rope": None if torch.equal(rope.cpu(), torch.arange(self.head_dim)) else rope,
            }
        return self._subs[key]

    # ---- forward -----------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lp: dict, d_sub: int | None = None
    ) -> torch.Tensor:
        """One vectorised pass.

        Args:
            x: normed hidden states. Shape: ``[B, S, D_run]``.
            cos, sin: RoPE tables of the original head size. Shape: ``[1, S, head_dim]``.
            lp: this block's gates: ``None`` (fixed), an ``int`` (one-hot this call: computed on the
                slice) or a probability ``Tensor`` (mixed by masks): ``kv_groups``, ``q_per_group``,
                ``head_dim``, ``abits``, ``w.q``, ``w.k``, ``w.v``, ``w.o``.
            d_sub: hidden width of this call when the hidden gate is one-hot (``None``: active width).

        Returns:
            Shape: ``[B, S, D_run]``.
        """
        bsz, seq, _ = x.shape
        p_kv, p_q, p_hd = lp["kv_groups"], lp["q_per_group"], lp["head_dim"]
        kv = self.kv_choices[p_kv] if isinstance(p_kv, int) else self.kv_act
        qg = self.qpg_choices[p_q] if isinstance(p_q, int) else self.qpg_act
        hd = self.hd_choices[p_hd] if isinstance(p_hd, int) else self.hd_act
        sub = self._sub(kv, qg, hd)
        h = kv * qg
        pa = lp["abits"]
        fa = self.fixed.get("abits")
        need = set().union(*(getattr(self, f"{n}_proj").needed_classes(lp[f"w.{n}"]) for n in "qkv"))
        xs = mixed_act(x, self.backend, self.abits, pa, fa, self.class_bits, sorted(need))
        g = (lambda key: sub[key]) if sub is not None else (lambda key: None)
        q = self.q_proj(xs, lp["w.q"], g("q"), d_sub).view(bsz, seq, h, hd).transpose(1, 2)  # [B, H, S, hd]
        k = self.k_proj(xs, lp["w.k"], g("k"), d_sub).view(bsz, seq, kv, hd).transpose(1, 2)  # [B, KV, S, hd]
        v = self.v_proj(xs, lp["w.v"], g("v"), d_sub).view(bsz, seq, kv, hd).transpose(1, 2)
        rope = sub["rope"] if sub is not None else self.rope_sel
        if rope is not None:
            cos, sin = cos[..., rope], sin[..., rope]
        q, k = apply_rope(q, k, cos, sin)
        soft_hd = isinstance(p_hd, torch.Tensor)
        if soft_hd:
            # Head size open: drop unkept RoPE pairs from q.k and scale by the expected head size
            # (1/sqrt(c) of the chosen size when the gate is one-hot, as the narrower model does).
            q = q * (expected(p_hd, self.pair_table) * expected(p_hd, self.hd_values).rsqrt())
            scale = 1.0
        else:
            scale = hd**-0.5
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=h != kv)
        y = y.transpose(1, 2).reshape(bsz, seq, h * hd)  # [B, S, H*hd]
        mask = self._output_mask(p_kv, p_q, p_hd, kv, qg, hd)
        if mask is not None:
            y = y * mask
        need_o = sorted(self.o_proj.needed_classes(lp["w.o"]))
        ys = mixed_act(y, self.backend, self.abits, pa, fa, self.class_bits, need_o)
        return self.o_proj(ys, lp["w.o"], d_sub, g("o"))

    def _output_mask(self, p_kv, p_q, p_hd, kv: int, qg: int, hd: int) -> torch.Tensor | None:
        """Head mask x value-dim mask of the soft width gates, flattened. Shape: ``[H_run * hd_run]``."""
        soft = [isinstance(p, torch.Tensor) for p in (p_kv, p_q, p_hd)]
        if not any(soft):
            return None
        dev = self.kv_table.device
        m_kv = expected(p_kv, self.kv_table) if soft[0] else torch.ones(kv, device=dev)
        m_q = expected(p_q, self.qpg_table) if soft[1] else torch.ones(qg, device=dev)
        m_v = expected(p_hd, self.vdim_table) if soft[2] else torch.ones(hd, device=dev)
        return (m_kv[:, None, None] * m_q[None, :, None] * m_v[None, None, :]).reshape(-1)
