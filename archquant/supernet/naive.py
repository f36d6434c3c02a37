"""The naive per-branch supernet forward, kept only to benchmark the vectorised one against.

Every open decision is evaluated branch by branch and the branch outputs are mixed with the gate
probabilities (the classic DNAS "mixed op"): each linear runs one matmul per (activation bits,
weight bits) pair, the MLP runs once per width choice, attention once per (KV groups, heads per
group, head size) combination. The hidden size stays a residual mask (running the whole network per
hidden width would multiply the cost again). With one-hot gates it computes the same subnet as the
vectorised forward; with soft gates it is the output-mixing relaxation rather than the masked one.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from archquant.supernet.attention import ElasticAttention, apply_rope
from archquant.supernet.linear import ElasticLinear, _take
from archquant.supernet.mlp import ElasticMLP


def _branches(p, choices: list, fixed_value) -> list[tuple[torch.Tensor | float, object]]:
    """``[(weight, value)]``: every choice of a soft gate, else the single fixed / one-hot value."""
    if isinstance(p, torch.Tensor):
        return [(p[i], c) for i, c in enumerate(choices)]
    if isinstance(p, int):
        return [(1.0, choices[p])]
    return [(1.0, fixed_value)]


def naive_linear(
    lin: ElasticLinear, x: torch.Tensor, abits: list[int], pa, fa: int | None, pw, out_sub=None, in_sub=None
) -> torch.Tensor:
    """``sum_{a,b} pi_a pi_b * linear(Q_a(x), Q_b(W))``: one matmul per (act bits, weight bits) branch."""
    if fa is not None:
        pa = fa
    a_br = _branches(pa, abits, None)
    k = lin.chosen(pw)
    w_br = [(1.0, k)] if k is not None else [(pw[j], j) for j in range(len(lin.bits))]
    bias = lin.active_bias()
    if bias is not None:
        bias = _take(bias, out_sub, 0)
    y = None
    for wa, a in a_br:
        for wb, j in w_br:
            xq = lin.backend.fake_quant_act(x, a, lin.bits[j])
            w = _take(_take(lin.qweight(j), out_sub, 0), in_sub, 1)
            term = F.linear(xq, w, bias) * (wa * wb)
            y = term if y is None else y + term
    return y


def naive_attention(
    attn: ElasticAttention, x: torch.Tensor, cos, sin, lp: dict, d_sub: int | None = None
) -> torch.Tensor:
    """One attention pass per (KV groups, heads per group, head size) branch, outputs mixed."""
    bsz, seq, _ = x.shape
    fa = attn.fixed.get("abits")
    pa = lp["abits"]
    out = None
    for (w1, kv), (w2, qg), (w3, hd) in itertools.product(
        _branches(lp["kv_groups"], attn.kv_choices, attn.kv_act),
        _branches(lp["q_per_group"], attn.qpg_choices, attn.qpg_act),
        _branches(lp["head_dim"], attn.hd_choices, attn.hd_act),
    ):
        sub = attn._sub(kv, qg, hd)
        g = (lambda key: sub[key]) if sub is not None else (lambda key: None)
        h = kv * qg
        def proj(name: str, heads: int) -> torch.Tensor:
            lin = getattr(attn, f"{name}_proj")
            y = naive_linear(lin, x, attn.abits, pa, fa, lp[f"w.{name}"], g(name), d_sub)
            return y.view(bsz, seq, heads, hd).transpose(1, 2)

        q, k, v = proj("q", h), proj("k", kv), proj("v", kv)
        rope = sub["rope"] if sub is not None else attn.rope_sel
        c, s = (cos[..., rope], sin[..., rope]) if rope is not None else (cos, sin)
        q, k = apply_rope(q, k, c, s)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hd**-0.5, enable_gqa=h != kv)
        y = y.transpose(1, 2).reshape(bsz, seq, h * hd)
        term = naive_linear(attn.o_proj, y, attn.abits, pa, fa, lp["w.o"], d_sub, g("o")) * (w1 * w2 * w3)
        out = term if out is None else out + term
    return out


def naive_mlp(mlp: ElasticMLP, x: torch.Tensor, lp: dict, d_sub: int | None = None) -> torch.Tensor:
    """One MLP pass per width branch, outputs mixed."""
    fa = mlp.fixed.get("abits")
    pa = lp["abits"]
    out = None
    for wm, m in _branches(lp["mlp"], mlp.choices, mlp.width):
        m_sub = None if m == mlp.width else m
        gate = naive_linear(mlp.gate_proj, x, mlp.abits, pa, fa, lp["w.gate"], m_sub, d_sub)
        up = naive_linear(mlp.up_proj, x, mlp.abits, pa, fa, lp["w.up"], m_sub, d_sub)
        term = naive_linear(mlp.down_proj, mlp.act_fn(gate) * up, mlp.abits, pa, fa, lp["w.down"], d_sub, m_sub) * wm
        out = term if out is None else out + term
    return out
