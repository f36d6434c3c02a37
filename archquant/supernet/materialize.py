"""``materialize(supernet, arch)``: cut a real, smaller ``ArchQuantForCausalLM`` out of the supernet.

Weights are physically sliced from the supernet's shared (importance-permuted) Parameters: the first
``hidden`` channels, the kept KV groups / query heads / RoPE pairs / value dims, the first ``mlp``
neurons, and only the kept blocks. They are copied unquantised; the model's ``FakeQuantLinear`` layers
apply the backend's quantisers at the arch's bits. With hard one-hot gates at the same arch, the
supernet computes the same logits (tests pin this to 1e-4 in fp32).
"""

from __future__ import annotations

import torch

from archquant.backends.base import cut
from archquant.core.arch import Arch
from archquant.core.linears import ATTN_LINEARS, MLP_LINEARS
from archquant.models.auto import register_auto_classes
from archquant.models.hetero import ArchQuantConfig, ArchQuantForCausalLM
from archquant.supernet.attention import attention_index
from archquant.supernet.model import Supernet


def _carries_importance(sn: Supernet) -> bool:
    """Whether the supernet's quantised linears search their blocks under calibration importance."""
    return sn.backend.uses_importance and sn.lm_head.act_sq is not None


def subnet_config(sn: Supernet, arch: Arch) -> ArchQuantConfig:
    """The ``ArchQuantConfig`` of ``arch`` cut from ``sn`` (checked against the supernet's space)."""
    arch.check(sn.space)
    base, fp = sn.base_config, sn.space.fingerprint
    kept = arch.kept_layers
    rope_index = []
    for l in kept:
        hd = arch.layers[l].head_dim
        perm = sn.rope_perms[l]
        if perm is None:
            rope_index.append(None if hd == fp["head_dim"] else list(range(hd // 2)))
        else:
            rope_index.append(perm[: fp["head_dim"] // 2][: hd // 2].tolist())
    blk0 = sn.layers[0]
    bias = {
        **{k: getattr(blk0.self_attn, f"{k}_proj").bias is not None for k in ATTN_LINEARS},
        **{k: getattr(blk0.mlp, f"{k}_proj").bias is not None for k in MLP_LINEARS},
    }
    tie = bool(fp["tie_word_embeddings"]) and arch.lm_head_bits >= 16
    rope_parameters = getattr(base, "rope_parameters", None)
    return ArchQuantConfig(
        vocab_size=fp["vocab_size"],
        hidden_size=arch.hidden,
        head_dim=fp["head_dim"],
        layer_num_heads=[arch.layers[l].num_heads for l in kept],
        layer_num_kv_heads=[arch.layers[l].kv_groups for l in kept],
        layer_head_dim=[arch.layers[l].head_dim for l in kept],
        layer_intermediate_size=[arch.layers[l].mlp for l in kept],
        layer_source=kept,
        layer_rope_index=rope_index,
        linear_bias=bias,
        hidden_act=base.hidden_act,
        max_position_embeddings=base.max_position_embeddings,
        rms_norm_eps=base.rms_norm_eps,
        rope_parameters=dict(rope_parameters) if rope_parameters else None,
        tie_word_embeddings=tie,
        bos_token_id=getattr(base, "bos_token_id", None),
        eos_token_id=getattr(base, "eos_token_id", None),
        pad_token_id=getattr(base, "pad_token_id", None),
        quant={
            "backend": sn.backend.name,
            "group_size": arch.group_size,
            "layers": [{"wbits": dict(arch.layers[l].wbits), "abits": arch.layers[l].abits} for l in kept],
            "lm_head_bits": arch.lm_head_bits,
            **({"backend_options": opts} if (opts := sn.backend.options()) else {}),
            **({"importance": True} if _carries_importance(sn) else {}),
        },
        base_model=dict(fp),
    )


def _linear_cuts(sn: Supernet, arch: Arch) -> dict[str, tuple]:
    """``name -> (ElasticLinear, rows, cols)``: every linear of ``arch`` as a cut of the supernet's shared weight
    (``rows`` / ``cols`` index lists, None for all), under Llama names (``model.layers.{i}`` = i-th kept block)."""
    fp = sn.space.fingerprint
    d = torch.arange(arch.hidden)
    n_kv, n_q, hd_full = fp["num_key_value_heads"], fp["num_attention_heads"], fp["head_dim"]
    qpg = n_q // n_kv
    out = {"lm_head.weight": (sn.lm_head, None, d)}
    for i, l in enumerate(arch.kept_layers):
        la, blk = arch.layers[l], sn.layers[l]
        p = f"model.layers.{i}."
        idx = attention_index(n_kv, qpg, hd_full, la.kv_groups, la.q_per_group, la.head_dim)
        attn, mlp = blk.self_attn, blk.mlp
        for lin in ("q", "k", "v"):
            out[p + f"self_attn.{lin}_proj.weight"] = (getattr(attn, f"{lin}_proj"), idx[lin].cpu(), d)
        out[p + "self_attn.o_proj.weight"] = (attn.o_proj, d, idx["o"].cpu())
        m = torch.arange(la.mlp)
        for lin in ("gate", "up"):
            out[p + f"mlp.{lin}_proj.weight"] = (getattr(mlp, f"{lin}_proj"), m, d)
        out[p + "mlp.down_proj.weight"] = (mlp.down_proj, d, m)
    return out


@torch.no_grad()
def subnet_state(sn: Supernet, arch: Arch) -> dict[str, torch.Tensor]:
    """Sliced, unquantised weights of ``arch`` under Llama names (``model.layers.{i}`` = i-th kept block)."""
    d = arch.hidden
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": sn.embed_tokens.weight[:, :d],
                                    "model.norm.weight": sn.norm.weight[:d]}
    for name, (lin, rows, cols) in _linear_cuts(sn, arch).items():
        out[name] = cut(lin.weight, rows, cols)
        if lin.bias is not None:
            out[name.replace(".weight", ".bias")] = cut(lin.bias, rows)
    for i, l in enumerate(arch.kept_layers):
        blk, p = sn.layers[l], f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = blk.input_layernorm.weight[:d]
        out[p + "post_attention_layernorm.weight"] = blk.post_attention_layernorm.weight[:d]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


@torch.no_grad()
def _carry_importance(sn: Supernet, arch: Arch, model: ArchQuantForCausalLM) -> None:
    """Give every quantised linear its cut of the calibration importance (``act_importance``) and have the
    backend remember its blocks as cut from the supernet's, so that neither its forward nor its export
    searches them again."""
    for name, (lin, rows, cols) in _linear_cuts(sn, arch).items():
        mod = model.get_submodule(name.removesuffix(".weight"))
        if getattr(mod, "act_importance", None) is None:
            continue
        mod.act_importance.copy_(cut(lin.act_sq, cols))
        sn.backend.fake_quant_slice(lin.weight.detach(), mod.wbits, mod.group_size, lin.act_sq, rows, cols)


def materialize(sn: Supernet, arch: Arch) -> ArchQuantForCausalLM:
    """Build the real subnet ``arch`` of ``sn``.

    Args:
        sn: the supernet (gates fixed or not: weights are sliced from the full shared Parameters).
        arch: the decisions; must come from this model and the current ``Arch`` version.

    Returns:
        ``ArchQuantForCausalLM`` in eval mode, same dtype and device as the supernet.

    Raises:
        ArchError: the arch belongs to another model / space or was searched with other GGUF types, or skips
            every block.
    """
    from transformers.initialization import no_init_weights

    register_auto_classes()  # a saved subnet then loads back through AutoModelForCausalLM in this process
    arch.check_types(sn.backend)
    cfg = subnet_config(sn, arch)
    state = subnet_state(sn, arch)
    ref = sn.embed_tokens.weight
    with no_init_weights():  # every weight is overwritten below; random init would only cost time
        model = ArchQuantForCausalLM(cfg)
    model.to(device=ref.device, dtype=ref.dtype)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")
               and not k.endswith(".act_importance")]  # filled by _carry_importance
    if missing or unexpected:  # pragma: no cover - guards the name mapping above
        raise RuntimeError(f"materialised state does not fit the model: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    if cfg.quant_importance:
        _carry_importance(sn, arch, model)
    return model.eval()
