"""``ArchQuantForCausalLM``: a Llama with per-layer shapes and per-linear fake-quantised bits.

A materialised subnet differs from a Llama in three ways that ``LlamaConfig`` cannot describe: per
layer head counts, head sizes and MLP widths; a hidden size that need not divide by the head count;
and per-linear weight bits / per-layer activation bits. ``ArchQuantConfig`` (model_type
``archquant``) records them; the model keeps Llama's module names so exporters and tools find
``model.layers[i].self_attn.q_proj`` where they expect it.

Every linear is built by ``make_linear``: here ``FakeQuantLinear``, which stores the weight
unquantised and applies the backend's quantisers in its forward (the quantised weight is cached in eval
mode), so every exporter quantises the same raw weights with the same function and reproduces these
outputs bit for bit. An export folder's ``modeling_archquant.py`` is this module's own text with a
``make_linear`` over packed weights instead (``archquant.export.remote_code``), so this module imports
only torch and transformers besides those two names. ``archquant.models.auto.register_auto_classes``
makes ``AutoModelForCausalLM.from_pretrained`` find these classes by ``model_type``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationMixin, LlamaConfig, PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from archquant.core.linears import LINEARS
from archquant.models.fake_quant_linear import make_linear


class ArchQuantConfig(PreTrainedConfig):
    """Config of a heterogeneous, fake-quantised Llama (one entry per kept block in ``layer_*`` lists).

    Attributes:
        hidden_size: residual width. head_dim: the ORIGINAL head size (RoPE frequencies derive from it).
        layer_num_heads, layer_num_kv_heads, layer_head_dim, layer_intermediate_size: per kept block.
        layer_source: original index of each kept block.
        layer_rope_index: per kept block, the original RoPE pair index of each kept pair (length
            ``layer_head_dim / 2``), or ``None`` for the first ``layer_head_dim / 2`` pairs in order.
        linear_bias: ``{"q": bool, ..., "down": bool}`` which linears have a bias (Qwen2: q/k/v).
        quant: ``{"backend": name, "group_size": g, "layers": [{"wbits": {"q": b, ...}, "abits": a}, ...],
            "lm_head_bits": b, "backend_options": {...}}``; absent means 16 bits everywhere
            (``backend_options``: the backend's ``options()``, e.g. llama.cpp's GGUF types).
        base_model: dimensions of the model the subnet was cut from (``space.model_fingerprint``).
    """

    model_type = "archquant"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    head_dim: int = 128
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    intermediate_size: int | None = None
    layer_num_heads: list[int] | None = None
    layer_num_kv_heads: list[int] | None = None
    layer_head_dim: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    layer_source: list[int] | None = None
    layer_rope_index: list | None = None
    linear_bias: dict | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_dropout: float = 0.0
    quant: dict | None = None
    base_model: dict | None = None

    def __post_init__(self, **kwargs):
        if self.layer_num_heads is None:  # an empty default config (e.g. AutoConfig.for_model)
            self.layer_num_heads, self.layer_num_kv_heads = [32], [32]
            self.layer_head_dim, self.layer_intermediate_size = [self.head_dim], [11008]
        n = len(self.layer_num_heads)
        lists = {
            "layer_num_kv_heads": self.layer_num_kv_heads,
            "layer_head_dim": self.layer_head_dim,
            "layer_intermediate_size": self.layer_intermediate_size,
        }
        for key, val in lists.items():
            if val is None or len(val) != n:
                raise ValueError(f"ArchQuantConfig.{key} must list {n} values (one per kept block), got {val}")
        for i, (h, kv, hd) in enumerate(zip(self.layer_num_heads, self.layer_num_kv_heads, self.layer_head_dim)):
            if kv <= 0 or h % kv:
                raise ValueError(f"ArchQuantConfig block {i}: {h} query heads are not a multiple of {kv} KV heads")
            if hd % 2 or hd > self.head_dim:
                raise ValueError(
                    f"ArchQuantConfig block {i}: head size {hd} must be even and <= head_dim {self.head_dim}"
                )
        self.layer_source = list(self.layer_source) if self.layer_source is not None else list(range(n))
        self.layer_rope_index = list(self.layer_rope_index) if self.layer_rope_index is not None else [None] * n
        self.linear_bias = dict(self.linear_bias) if self.linear_bias else {k: False for k in LINEARS}
        self.num_hidden_layers = n
        # Summary values for generic tools that read them; the per-layer lists are authoritative.
        self.num_attention_heads = max(self.layer_num_heads)
        self.num_key_value_heads = max(self.layer_num_kv_heads)
        self.intermediate_size = max(self.layer_intermediate_size)
        super().__post_init__(**kwargs)

    # ---- quantisation lookups ----------------------------------------------------------------
    def layer_quant(self, i: int) -> tuple[dict[str, int], int]:
        """``(wbits per linear, abits)`` of kept block ``i`` (16 everywhere without ``quant``)."""
        if not self.quant:
            return {k: 16 for k in LINEARS}, 16
        entry = self.quant["layers"][i]
        return {k: int(v) for k, v in entry["wbits"].items()}, int(entry["abits"])

    @property
    def quant_backend(self) -> str:
        return (self.quant or {}).get("backend", "torch")

    @property
    def quant_backend_options(self) -> dict:
        return dict((self.quant or {}).get("backend_options") or {})

    @property
    def quant_importance(self) -> bool:
        """Whether quantised linears carry the per-channel importance their blocks were searched with."""
        return bool((self.quant or {}).get("importance", False))

    @property
    def quant_group_size(self) -> int:
        return int((self.quant or {}).get("group_size", 64))

    @property
    def lm_head_bits(self) -> int:
        return int((self.quant or {}).get("lm_head_bits", 16))

    # ---- a plain Llama when possible ---------------------------------------------------------
    def uniform_reason(self) -> str | None:
        """Why this config is not expressible as a plain ``LlamaConfig`` (``None`` when it is)."""
        shapes = set(
            zip(self.layer_num_heads, self.layer_num_kv_heads, self.layer_head_dim, self.layer_intermediate_size)
        )
        if len(shapes) != 1:
            return f"blocks differ in shape ({len(shapes)} distinct (heads, kv heads, head size, mlp) tuples)"
        h, _, hd, _ = shapes.pop()
        if hd != self.head_dim or any(r is not None for r in self.layer_rope_index):
            return "head size was cut (RoPE pairs differ from the original layout)"
        if self.hidden_size % h:
            return f"LlamaConfig requires hidden_size % num_attention_heads == 0 ({self.hidden_size} % {h})"
        if any(self.linear_bias.get(k) for k in LINEARS):
            return "linears carry biases"
        return None

    def to_llama_config(self) -> LlamaConfig:
        """The equivalent plain ``LlamaConfig`` (shapes only; bits are not representable there).

        Raises:
            ValueError: when blocks differ in shape, the head size was cut, or LlamaConfig rejects the shape.
        """
        reason = self.uniform_reason()
        if reason is not None:
            raise ValueError(f"this subnet cannot be written as a plain Llama config: {reason}")
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.layer_intermediate_size[0],
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.layer_num_heads[0],
            num_key_value_heads=self.layer_num_kv_heads[0],
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=dict(self.rope_parameters or {}),
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )


def _linear(config: ArchQuantConfig, name: str, n_in: int, n_out: int, wbits: dict[str, int], abits: int) -> nn.Module:
    return make_linear(config, name, n_in, n_out, wbits=wbits[name], abits=abits)


class ArchQuantAttention(nn.Module):
    """GQA attention of one kept block with its own head count and head size."""

    def __init__(self, config: ArchQuantConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        d = config.hidden_size
        h, kv = config.layer_num_heads[layer_idx], config.layer_num_kv_heads[layer_idx]
        hd = config.layer_head_dim[layer_idx]
        self.num_heads, self.num_key_value_heads, self.head_dim = h, kv, hd
        self.num_key_value_groups = h // kv
        self.scaling = hd**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        wbits, abits = config.layer_quant(layer_idx)
        self.q_proj = _linear(config, "q", d, h * hd, wbits, abits)
        self.k_proj = _linear(config, "k", d, kv * hd, wbits, abits)
        self.v_proj = _linear(config, "v", d, kv * hd, wbits, abits)
        self.o_proj = _linear(config, "o", h * hd, d, wbits, abits)
        pairs = config.layer_rope_index[layer_idx]
        half = config.head_dim // 2
        if pairs is None and hd == config.head_dim:
            self._rope_dims = None
        else:
            p = list(pairs) if pairs is not None else list(range(hd // 2))
            if len(p) != hd // 2:
                raise ValueError(f"layer_rope_index[{layer_idx}] has {len(p)} pairs, head size {hd} needs {hd // 2}")
            self._rope_dims = p + [i + half for i in p]  # into the original head's [first | second halves]
        self._rope_cache: dict = {}

    def _rope(self, cos: torch.Tensor, sin: torch.Tensor):
        if self._rope_dims is None:
            return cos, sin
        idx = self._rope_cache.get(cos.device)
        if idx is None:
            idx = self._rope_cache[cos.device] = torch.tensor(self._rope_dims, device=cos.device)
        return cos[..., idx], sin[..., idx]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, H, S, hd]
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, KV, S, hd]
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = self._rope(*position_embeddings)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self, q, k, v, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
        )
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


class ArchQuantMLP(nn.Module):
    def __init__(self, config: ArchQuantConfig, layer_idx: int) -> None:
        super().__init__()
        d, m = config.hidden_size, config.layer_intermediate_size[layer_idx]
        wbits, abits = config.layer_quant(layer_idx)
        self.gate_proj = _linear(config, "gate", d, m, wbits, abits)
        self.up_proj = _linear(config, "up", d, m, wbits, abits)
        self.down_proj = _linear(config, "down", m, d, wbits, abits)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ArchQuantDecoderLayer(nn.Module):
    def __init__(self, config: ArchQuantConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = ArchQuantAttention(config, layer_idx)
        self.mlp = ArchQuantMLP(config, layer_idx)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
        residual = hidden_states
        normed = self.input_layernorm(hidden_states)
        h, _ = self.self_attn(normed, position_embeddings, attention_mask, past_key_values, **kwargs)
        hidden_states = residual + h
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class ArchQuantPreTrainedModel(PreTrainedModel):
    config_class = ArchQuantConfig
    config: ArchQuantConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["ArchQuantDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_attention_backend = True


class ArchQuantModel(ArchQuantPreTrainedModel):
    """The decoder stack (embedding, kept blocks, final norm)."""

    def __init__(self, config: ArchQuantConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([ArchQuantDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        """The causal LM's forward without its head (same arguments)."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            past_key_values=past_key_values, position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, mask, past_key_values, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values)


class ArchQuantForCausalLM(ArchQuantPreTrainedModel, GenerationMixin):
    """Causal LM over ``ArchQuantModel``; ``lm_head`` is quantised at ``quant.lm_head_bits``."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ArchQuantConfig) -> None:
        super().__init__(config)
        self.model = ArchQuantModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = make_linear(config, "lm_head", config.hidden_size, config.vocab_size, wbits=config.lm_head_bits,
                                   abits=16)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )
        h = out.last_hidden_state
        sl = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(h[:, sl, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)

    def to_llama(self):
        """A plain ``LlamaForCausalLM`` with the fake-quantised weights baked in (uniform subnets only).

        Exact when every activation is 16-bit (a plain Llama cannot quantise activations).

        Raises:
            ValueError: the shape is not uniform (see ``ArchQuantConfig.uniform_reason``) or some
                activations are quantised.
        """
        from transformers import LlamaForCausalLM

        cfg = self.config
        if any(cfg.layer_quant(i)[1] < 16 for i in range(cfg.num_hidden_layers)):
            raise ValueError("activation bits < 16 cannot be expressed in a plain Llama; keep ArchQuantForCausalLM")
        llama_cfg = cfg.to_llama_config()
        tie = cfg.tie_word_embeddings
        llama_cfg.tie_word_embeddings = tie
        model = LlamaForCausalLM(llama_cfg).to(self.dtype)
        state = {}
        with torch.no_grad():
            for name, mod in self.named_modules():
                if hasattr(mod, "quantized_weight"):  # every linear ``make_linear`` builds
                    state[f"{name}.weight"] = mod.quantized_weight().detach().clone()
            for name, p in self.named_parameters():
                state.setdefault(name, p.detach().clone())
        if tie:
            state.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (tie and k == "lm_head.weight")]
        if missing or unexpected:  # pragma: no cover - guards the name mapping
            raise RuntimeError(f"plain Llama does not fit these weights: missing {missing}, unexpected {unexpected}")
        return model.eval()

