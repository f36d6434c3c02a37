"""Self-contained model code of an archquant export folder (needs only torch and transformers).

``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads this file through the
folder's ``config.json`` ``auto_map``. It runs the heterogeneous subnet (per-layer head counts, head
sizes and MLP widths) from the packed weights in ``model.safetensors``: each linear unpacks its
group-wise integers once, ``w = (q - zero) * scale``, and computes in the activation dtype, with
per-token symmetric int8 activation fake-quant where the layer's ``abits`` is 8. It reproduces
``archquant.export.load`` (dense path) on CPU in fp32.

Packed layout per linear (``<module>.qweight`` etc.): ``qweight`` int32 ``[N, ceil(K / (32 // bits))]``,
value ``k`` of a row in word ``k // (32 // bits)`` at bit ``(k % (32 // bits)) * bits``, least significant
first; ``scales`` fp16 and ``zeros`` uint8 ``[N, K // group_size]``; ``qmeta`` int32
``[version, wbits, abits, group_size, K, N]``; 16-bit linears store ``weight`` instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig
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

PACKED_FORMAT_VERSION = 1
LINEAR_NAMES = ("q", "k", "v", "o", "gate", "up", "down")


class ArchQuantConfig(PreTrainedConfig):
    """Heterogeneous Llama config: one entry per kept block in the ``layer_*`` lists, bits in ``quant``."""

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
    archquant_export: dict | None = None

    def __post_init__(self, **kwargs):
        if self.layer_num_heads is None:
            self.layer_num_heads, self.layer_num_kv_heads = [32], [32]
            self.layer_head_dim, self.layer_intermediate_size = [self.head_dim], [11008]
        n = len(self.layer_num_heads)
        self.layer_source = list(self.layer_source) if self.layer_source is not None else list(range(n))
        self.layer_rope_index = list(self.layer_rope_index) if self.layer_rope_index is not None else [None] * n
        self.linear_bias = dict(self.linear_bias) if self.linear_bias else {k: False for k in LINEAR_NAMES}
        self.num_hidden_layers = n
        self.num_attention_heads = max(self.layer_num_heads)
        self.num_key_value_heads = max(self.layer_num_kv_heads)
        self.intermediate_size = max(self.layer_intermediate_size)
        super().__post_init__(**kwargs)

    def layer_quant(self, i: int) -> tuple[dict[str, int], int]:
        if not self.quant:
            return {k: 16 for k in LINEAR_NAMES}, 16
        entry = self.quant["layers"][i]
        return {k: int(v) for k, v in entry["wbits"].items()}, int(entry["abits"])

    @property
    def group_size(self) -> int:
        return int((self.quant or {}).get("group_size", 64))

    @property
    def lm_head_bits(self) -> int:
        return int((self.quant or {}).get("lm_head_bits", 16))


def _unpack(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """int32 words ``[N, W]`` -> unsigned codes ``[N, k]``."""
    vpw = 32 // bits
    shifts = torch.arange(vpw, device=qweight.device, dtype=torch.int64) * bits
    vals = (qweight.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)
    return vals.reshape(qweight.shape[0], -1)[:, :k]


def _fake_quant_act(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token symmetric quantise-dequantise (the reference activation quantiser)."""
    if bits >= 16:
        return x
    qmax = (1 << (bits - 1)) - 1
    scale = (x.detach().float().abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=1e-8)
    q = torch.clamp(torch.round(x.detach().float() / scale), -qmax, qmax)
    return x + (q * scale - x).to(x.dtype).detach()


class PackedLinear(nn.Module):
    """A linear layer over packed group-wise integer weights (dequantised once, then cached)."""

    def __init__(self, in_features: int, out_features: int, wbits: int, abits: int, group_size: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.wbits, self.abits, self.group_size = wbits, abits, group_size
        if wbits >= 16:
            self.register_buffer("weight", torch.zeros(out_features, in_features))
        else:
            words = -(-in_features // (32 // wbits))
            self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32))
            self.register_buffer("scales", torch.ones(out_features, in_features // group_size, dtype=torch.float16))
            self.register_buffer("zeros", torch.zeros(out_features, in_features // group_size, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        meta = [PACKED_FORMAT_VERSION, wbits, abits, group_size, in_features, out_features]
        self.register_buffer("qmeta", torch.tensor(meta, dtype=torch.int32))
        self._cache: tuple | None = None

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight this layer computes with. Shape: ``[N, K]``."""
        if self.wbits >= 16:
            return self.weight.to(dtype)
        src = self.qweight
        key = (src.data_ptr(), src._version, src.device, dtype)
        if self._cache is None or self._cache[0] != key:
            q = _unpack(self.qweight, self.wbits, self.in_features).float()
            n, k = q.shape
            g = self.group_size
            w = (q.reshape(n, k // g, g) - self.zeros.float()[..., None]) * self.scales.float()[..., None]
            self._cache = (key, w.reshape(n, k).to(dtype))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(_fake_quant_act(x, self.abits), self.dequantized_weight(x.dtype), b)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, wbits={self.wbits}, abits={self.abits}"


def _linear(config: ArchQuantConfig, name: str, n_in: int, n_out: int, wbits: dict[str, int], abits: int) -> PackedLinear:
    return PackedLinear(n_in, n_out, wbits[name], abits, config.group_size, bool(config.linear_bias.get(name, False)))


class ArchQuantAttention(nn.Module):
    """GQA attention of one kept block with its own head count and head size."""

    def __init__(self, config: ArchQuantConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        d = config.hidden_size
        h, kv, hd = config.layer_num_heads[layer_idx], config.layer_num_kv_heads[layer_idx], config.layer_head_dim[layer_idx]
        self.head_dim = hd
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
            self._rope_dims = p + [i + half for i in p]

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, H, S, hd]
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, KV, S, hd]
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        if self._rope_dims is not None:
            idx = torch.tensor(self._rope_dims, device=cos.device)
            cos, sin = cos[..., idx], sin[..., idx]
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
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


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
        h, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask, past_key_values, **kwargs)
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
    _keys_to_ignore_on_load_unexpected = [r"lm_head\.weight"]


class ArchQuantModel(ArchQuantPreTrainedModel):
    """The decoder stack (embedding, kept blocks, final norm)."""

    def __init__(self, config: ArchQuantConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([ArchQuantDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs) -> BaseModelOutputWithPast:
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


class _TiedHead(nn.Module):
    """A 16-bit lm_head that reads the embedding matrix (stored once in the file)."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self._embedding = [embedding]  # a list: not a submodule, so the tensor is not saved twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._embedding[0].weight.to(x.dtype))


class ArchQuantForCausalLM(ArchQuantPreTrainedModel, GenerationMixin):
    """Causal LM over ``ArchQuantModel`` with a packed (or tied 16-bit) ``lm_head``."""

    def __init__(self, config: ArchQuantConfig) -> None:
        super().__init__(config)
        self.model = ArchQuantModel(config)
        self.vocab_size = config.vocab_size
        if config.tie_word_embeddings and config.lm_head_bits >= 16:
            self.lm_head = _TiedHead(self.model.embed_tokens)
        else:
            self.lm_head = PackedLinear(config.hidden_size, config.vocab_size, config.lm_head_bits, 16, config.group_size, False)
        self.post_init()

    def get_output_embeddings(self):
        return None  # the head is packed (or reads the embedding directly): nothing for transformers to tie

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
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
