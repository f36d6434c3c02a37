"""``build(model, SpaceConfig)``: turn a loaded Hugging Face Llama-family model into a ``Supernet``.

Steps: check the model family and structure; let the backend restrict the space; resolve the space
against the model; score importance on calibration ids (cached on disk); permute a copy of the weights
so every width keeps its most important units; wrap the copy in elastic modules. The input model is
left untouched (it stays usable as the distillation teacher).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from archquant.backends import Backend, get_backend
from archquant.core.linears import MODULE_PATHS, NORM_PATHS
from archquant.core.space import SpaceConfig, SpaceError, resolve_space
from archquant.supernet.attention import ElasticAttention
from archquant.supernet.block import SuperBlock
from archquant.supernet.importance import Importance, depth_logits, load_or_compute
from archquant.supernet.linear import ElasticLinear
from archquant.supernet.mlp import ElasticMLP
from archquant.supernet.model import ElasticEmbedding, Supernet
from archquant.supernet.norm import ElasticRMSNorm
from archquant.supernet.permute import input_moments, make_permutation, permute_state
from archquant.supernet.quant import act_classes, check_backend_bits


class UnsupportedModelError(SpaceError):
    """A model the supernet cannot wrap (family, structure or attention variant)."""


def check_model(model) -> None:
    """Fail fast, naming the problem, on models whose forward the supernet does not reproduce."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a Hugging Face *ForCausalLM with a `.model.layers` decoder stack; "
            "the supernet supports Llama-family models (llama, mistral, qwen2)"
        )
    layer = model.model.layers[0]
    missing = []
    for name in (*MODULE_PATHS.values(), *NORM_PATHS):
        try:
            layer.get_submodule(name)
        except AttributeError:
            missing.append(name)
    if missing:
        raise UnsupportedModelError(
            f"decoder layers lack the Llama modules {missing}; this model family is not supported"
        )
    if (getattr(cfg, "pretraining_tp", 1) or 1) != 1:
        raise UnsupportedModelError(f"pretraining_tp={cfg.pretraining_tp} is not supported (set it to 1 in the config)")
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and window < cfg.max_position_embeddings:
        raise UnsupportedModelError(
            f"sliding-window attention (sliding_window={window} < max_position_embeddings="
            f"{cfg.max_position_embeddings}) is not supported by the supernet's forward"
        )
    if not hasattr(model.model, "rotary_emb"):
        raise UnsupportedModelError("the model has no shared `model.rotary_emb`; RoPE cannot be reproduced")


def _tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def build(
    model,
    space_cfg: SpaceConfig | None = None,
    *,
    backend: str | Backend = "torch",
    calib_ids: torch.Tensor | None = None,
    cache_dir: str | Path | None = None,
    importance: Importance | None = None,
    train_weights: bool = False,
    depth_init_scale: float = 2.0,
) -> Supernet:
    """Build the weight-entangled supernet of ``model`` over the space ``space_cfg``.

    Args:
        model: a Hugging Face Llama-family causal LM (``LlamaForCausalLM`` and kin), fp32 for exactness.
        space_cfg: search-space fractions (default: ``SpaceConfig()``, the space of ``configs/space/default.yaml``).
        backend: engine name or object; its quantisers are simulated and it may restrict the space.
        calib_ids: calibration token ids ``[N, S]``; with them, units are importance-sorted and the
            depth logits initialised from block importance. Without them the original order is kept.
        cache_dir: cache root for importance scores (default ``$ARCHQUANT_CACHE``).
        importance: precomputed scores (skips ``calib_ids``).
        train_weights: leave the shared weights trainable (default frozen: only gate logits learn).
        depth_init_scale: see ``importance.depth_logits``.

    Returns:
        The supernet; ``model`` itself is not modified.
    """
    check_model(model)
    be = get_backend(backend) if isinstance(backend, str) else backend
    space_cfg = space_cfg if space_cfg is not None else SpaceConfig()
    space_cfg = be.restrict_space(space_cfg, model.config)
    space = resolve_space(space_cfg, model.config)
    check_backend_bits(be, space.wbits + space.lm_head_bits, space.abits, space.group_size)
    cfg = model.config
    if importance is None and calib_ids is not None:
        importance = load_or_compute(model, calib_ids, cache_dir)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tied = _tied(model)
    if tied:
        state.pop("lm_head.weight", None)
    rope_perms = [None] * cfg.num_hidden_layers
    init_logits: dict[str, torch.Tensor] = {}
    fp = space.fingerprint
    moments: dict[str, torch.Tensor] = {}
    if importance is not None:
        perm = make_permutation(importance, space, be.permutation_block(space))
        state = permute_state(state, perm, cfg)
        if be.uses_importance and importance.has_inputs:  # the quantiser's per-channel importance
            moments = input_moments(importance, perm, cfg)
        rope_perms = [perm.rope_perm(l, fp["head_dim"]) for l in range(cfg.num_hidden_layers)]
        if space.depth:
            for l, logit in enumerate(depth_logits(importance.blocks, depth_init_scale)):
                init_logits[f"layers.{l}.keep"] = logit

    def param(name: str) -> nn.Parameter:
        # clone: the supernet owns its weights; the caller's model stays the untouched teacher
        return nn.Parameter(state[name].clone(), requires_grad=train_weights)

    def opt_param(name: str) -> nn.Parameter | None:
        return param(name) if name in state else None

    classes = act_classes(be, space.abits, space.wbits)
    class_bits = [space.wbits[classes.index(c)] for c in sorted(set(classes))]
    lm_classes = act_classes(be, [16], space.lm_head_bits)
    lm_class_bits = [space.lm_head_bits[lm_classes.index(c)] for c in sorted(set(lm_classes))]
    g = space.group_size
    n_kv, n_q, hd = fp["num_key_value_heads"], fp["num_attention_heads"], fp["head_dim"]
    eps = cfg.rms_norm_eps
    blocks = []
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."

        def lin(mod: str, name: str) -> ElasticLinear:
            w = p + f"{mod}.{name}_proj.weight"
            return ElasticLinear(param(w), opt_param(p + f"{mod}.{name}_proj.bias"), space.wbits, g, be, classes,
                                 act_sq=moments.get(w))

        attn = ElasticAttention(
            lin("self_attn", "q"), lin("self_attn", "k"), lin("self_attn", "v"), lin("self_attn", "o"),
            num_kv=n_kv, qpg=n_q // n_kv, head_dim=hd, kv_choices=space.kv_groups, qpg_choices=space.q_per_group,
            hd_choices=space.head_dim, rope_perm=rope_perms[l], abits=space.abits, backend=be, class_bits=class_bits,
        )
        mlp = ElasticMLP(
            lin("mlp", "gate"), lin("mlp", "up"), lin("mlp", "down"), intermediate=fp["intermediate_size"],
            choices=space.mlp, hidden_act=cfg.hidden_act, abits=space.abits, backend=be, class_bits=class_bits,
        )
        blocks.append(
            SuperBlock(
                ElasticRMSNorm(param(p + "input_layernorm.weight"), eps), attn,
                ElasticRMSNorm(param(p + "post_attention_layernorm.weight"), eps), mlp,
            )
        )
    embed = ElasticEmbedding(param("model.embed_tokens.weight"))
    head_w = embed.weight if tied else param("lm_head.weight")
    lm_head = ElasticLinear(head_w, opt_param("lm_head.bias"), space.lm_head_bits, g, be, lm_classes,
                            act_sq=moments.get("lm_head.weight"))
    return Supernet(
        space=space,
        backend=be,
        base_config=cfg,
        embed_tokens=embed,
        layers=blocks,
        norm=ElasticRMSNorm(param("model.norm.weight"), eps),
        lm_head=lm_head,
        rotary_emb=copy.deepcopy(model.model.rotary_emb),
        lm_head_class_bits=lm_class_bits,
        init_logits=init_logits,
        rope_perms=rope_perms,
        importance=importance,
    )
