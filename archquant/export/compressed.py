"""compressed-tensors checkpoint (the format vLLM serves) for subnets whose shape is uniform across layers.

Every kept block must have the same head counts, head size and MLP width, and the shape must be one a
plain ``LlamaConfig`` accepts (transformers rejects ``hidden_size % num_attention_heads != 0``), so that
a stock Llama implementation runs it. Weights use the ``pack-quantized`` format with group-wise
asymmetric integers (``symmetric: false``, ``strategy: group``); mixed per-layer bits become one config
group per (weight bits, activation bits) pair, each targeting its modules by exact-name regex; 16-bit
linears are listed under ``ignore``. Layers with 8-bit activations carry
``input_activations: {int8, symmetric, strategy: token, dynamic: true}``.

The integers, scales and zero points are the reference quantiser's (``kernels.quant.reference``), written
through compressed-tensors' own ``ModelCompressor`` so the tensors are laid out exactly as the library
writes them. Scales are stored in float32 (they hold fp16 values exactly), so the library's dequantised
weights equal ``dequantize_weight`` bit for bit; only the activation quantiser differs slightly
(compressed-tensors divides ``max|x|`` by 127.5, the reference by 127).

Loading: ``load_compressed_tensors`` rebuilds the model through the compressed-tensors library
(``apply_quantization_config`` + ``ModelCompressor.decompress_model``). In transformers 5.23 with
compressed-tensors 0.20, ``AutoModelForCausalLM.from_pretrained`` on an asymmetric pack-quantized
checkpoint fails with a size mismatch on ``weight_zero_point`` (the loader allocates unpacked zero
points), and ``dequantize=True`` decodes every module with the first config group's scheme (correct only
for a single bit-width); ``from_pretrained_dequantized`` uses that route where it is correct.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from archquant.core.layout import ModelLayout, model_layout
from archquant.core.linears import MODULE_PATHS
from archquant.quant.reference import dequantize_weight, quantize_weight
from archquant.utils.errors import UserError

CT_DIRNAME = "compressed-tensors"


class NotUniformError(UserError, ValueError):
    """The subnet's shape cannot be described by a plain Llama config."""


@dataclass
class UniformShape:
    """The one block shape of a uniform subnet."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int


def uniform_shape(layout: ModelLayout, config=None) -> UniformShape:
    """The common block shape, or ``NotUniformError`` saying why a stock Llama cannot describe the subnet."""
    reason = config.uniform_reason() if config is not None and hasattr(config, "uniform_reason") else None
    if reason is not None:
        raise NotUniformError(f"a stock Llama cannot describe this subnet: {reason}")
    shapes = {(l.num_heads, l.num_kv_heads, l.head_dim, l.intermediate_size) for l in layout.layers}
    if len(shapes) != 1:
        raise NotUniformError(
            f"blocks differ in shape ({len(shapes)} distinct (heads, kv_heads, head_dim, mlp) tuples: "
            f"{sorted(shapes)[:4]}...); a stock Llama config has one shape for every layer"
        )
    h, kv, hd, m = shapes.pop()
    if layout.hidden_size % h:
        raise NotUniformError(
            f"hidden_size {layout.hidden_size} is not a multiple of the {h} query heads; transformers' LlamaConfig "
            "rejects that shape (vLLM would accept it with an explicit head_dim, but it cannot be verified here)"
        )
    return UniformShape(len(layout.layers), h, kv, hd, m)


def llama_config_dict(model_config, shape: UniformShape, float_dtype: torch.dtype) -> dict[str, Any]:
    """A ``LlamaConfig`` dict describing the uniform subnet (rope and norm settings copied)."""
    from transformers import LlamaConfig

    rope = getattr(model_config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(model_config, "rope_theta", 10000.0)}
    cfg = LlamaConfig(
        vocab_size=model_config.vocab_size,
        hidden_size=model_config.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=model_config.max_position_embeddings,
        rms_norm_eps=model_config.rms_norm_eps,
        rope_parameters=dict(rope),
        tie_word_embeddings=bool(model_config.tie_word_embeddings),
        bos_token_id=getattr(model_config, "bos_token_id", None),
        eos_token_id=getattr(model_config, "eos_token_id", None),
        pad_token_id=getattr(model_config, "pad_token_id", None),
        attention_bias=False,
        mlp_bias=False,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    d = cfg.to_dict()
    d["torch_dtype"] = d["dtype"] = str(float_dtype).replace("torch.", "")
    return d


@contextlib.contextmanager
def _quiet_library():
    """Silence compressed-tensors' loguru messages and progress bars for the duration."""
    from compressed_tensors.logger import logger

    logger.disable("compressed_tensors")
    try:
        yield
    finally:
        logger.enable("compressed_tensors")


def _regex(name: str) -> str:
    return "re:^" + re.escape(name) + "$"


def quantization_config(layout: ModelLayout):
    """compressed-tensors ``QuantizationConfig``: one config group per (wbits, abits), 16-bit linears ignored."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups: dict[tuple[int, int], list[str]] = {}
    ignore: list[str] = []
    for i, layer in enumerate(layout.layers):
        for lin, sub in MODULE_PATHS.items():
            name = f"model.layers.{i}.{sub}"
            wb = layer.wbits[lin]
            if wb >= 16 and layer.abits >= 16:
                ignore.append(name)
            else:
                groups.setdefault((wb, layer.abits), []).append(_regex(name))
    if layout.lm_head_bits >= 16:
        ignore.append("lm_head")
    else:
        groups.setdefault((layout.lm_head_bits, 16), []).append(_regex("lm_head"))
    schemes = {}
    for i, ((wb, ab), targets) in enumerate(sorted(groups.items(), key=lambda kv: (-kv[0][0], -kv[0][1]))):
        weights = None
        if wb < 16:
            weights = QuantizationArgs(
                num_bits=wb, type="int", symmetric=False, strategy="group", group_size=layout.group_size
            )
        acts = None
        if ab < 16:
            acts = QuantizationArgs(num_bits=ab, type="int", symmetric=True, strategy="token", dynamic=True)
        schemes[f"group_{i}"] = QuantizationScheme(
            targets=targets, weights=weights, input_activations=acts, format="pack-quantized" if weights else "dense"
        )
    fmt = "pack-quantized" if all(s.weights is not None for s in schemes.values()) else "mixed-precision"
    return QuantizationConfig(config_groups=schemes, format=fmt, ignore=ignore)


def _float_state(model: nn.Module, layout: ModelLayout, float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The non-linear tensors of the HF Llama state dict (embedding, norms, tied/16-bit lm_head)."""
    out = {"model.embed_tokens.weight": model.model.embed_tokens.weight.detach().to(float_dtype).float()}
    out["model.norm.weight"] = model.model.norm.weight.detach().float()
    for i, block in enumerate(model.model.layers):
        out[f"model.layers.{i}.input_layernorm.weight"] = block.input_layernorm.weight.detach().float()
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = block.post_attention_layernorm.weight.detach().float()
    return out


def _raw_weight(module: nn.Module) -> torch.Tensor:
    w = getattr(module, "weight", None)
    if w is None:
        raise TypeError(f"{type(module).__name__} has no raw .weight; export from the materialised (unpacked) model")
    return w.detach().float()


@torch.no_grad()
def save_compressed_tensors(
    model: nn.Module, path: str | Path, *, tokenizer=None, float_dtype: torch.dtype = torch.float16
) -> dict[str, Any]:
    """Write ``model`` (a materialised subnet with raw weights) as a compressed-tensors checkpoint.

    Args:
        model: materialised subnet (``ArchQuantForCausalLM`` or ``LlamaForCausalLM`` with ``config.quant``).
        path: folder to create (must not exist or be empty).
        tokenizer: saved beside the weights when given.
        float_dtype: storage dtype of the embedding and 16-bit linears.

    Returns:
        A summary: config groups, ignored modules, the vLLM command.

    Raises:
        NotUniformError: the shape is heterogeneous or not a valid ``LlamaConfig``.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from transformers import LlamaConfig, LlamaForCausalLM

    layout = model_layout(model.config)
    shape = uniform_shape(layout, model.config)
    cfg_dict = llama_config_dict(model.config, shape, float_dtype)
    qconfig = quantization_config(layout)
    # A stock Llama holding our (dequantised) weights; the library then compresses it with our qparams.
    with torch.device("meta"):
        stock = LlamaForCausalLM(LlamaConfig.from_dict(cfg_dict))
    state = _float_state(model, layout, float_dtype)
    qparams: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    linears = {f"model.layers.{i}.{sub}": (model.model.layers[i].get_submodule(sub), layer.wbits[lin])
               for i, layer in enumerate(layout.layers) for lin, sub in MODULE_PATHS.items()}
    if not layout.tied_lm_head:
        linears["lm_head"] = (model.lm_head, layout.lm_head_bits)
    for name, (mod, wb) in linears.items():
        w = _raw_weight(mod)
        if wb < 16:
            q, s, z = quantize_weight(w, wb, layout.group_size)
            state[name + ".weight"] = dequantize_weight(q, s, z)  # exactly (q - z) * s: the library re-derives q
            qparams[name] = (s.float(), z, wb)
        else:
            state[name + ".weight"] = w.to(float_dtype).float()  # the values the stored dtype holds
    stock.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
    if layout.tied_lm_head:
        stock.tie_weights()
    apply_quantization_config(stock, qconfig)
    for name, (scale, zero, wb) in qparams.items():
        mod = stock.get_submodule(name)
        mod.weight_scale.data = scale.reshape(mod.weight_scale.shape).clone()
        off = 1 << (wb - 1)  # compressed-tensors stores signed integers: q_ct = q - 2^(b-1)
        mod.weight_zero_point.data = (zero.to(torch.int16) - off).to(torch.int8).reshape(mod.weight_zero_point.shape)
    with _quiet_library():  # 8-bit groups: the library notes that it would infer int-quantized; packing is valid
        # a mixed config (some groups quantise activations only) lets each scheme's own format decide
        force = qconfig.format if qconfig.format != "mixed-precision" else None
        compressor = ModelCompressor.from_pretrained_model(stock, force)
        compressor.compress_model(stock)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in stock.state_dict().items():
        if layout.tied_lm_head and k == "lm_head.weight":
            continue
        if v.dtype.is_floating_point and k.endswith(".weight") and "norm" not in k:
            v = v.to(float_dtype)
        tensors[k] = v.detach().contiguous().clone()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
    from compressed_tensors.quantization import QuantizationStatus

    compressor.quantization_config = qconfig
    qconfig.quantization_status = QuantizationStatus.COMPRESSED
    compressor.update_config(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return {
        "format": qconfig.format,
        "groups": {n: {"weights": None if s.weights is None else s.weights.num_bits,
                       "input_activations": None if s.input_activations is None else s.input_activations.num_bits,
                       "modules": len(s.targets)} for n, s in qconfig.config_groups.items()},
        "ignore": len(qconfig.ignore or []),
        "vllm": vllm_command(path, layout),
    }


def vllm_command(path: str | Path, layout: ModelLayout) -> str:
    """The command that serves this checkpoint with vLLM (not installed here; see the README's caveats)."""
    return f"vllm serve {path} --dtype float16 --max-model-len 2048"


def load_compressed_tensors(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a compressed-tensors checkpoint through the compressed-tensors library (not through archquant code).

    The stock ``LlamaForCausalLM`` is built from ``config.json``, the library applies the checkpoint's
    ``quantization_config`` and compressed layout, the tensors are loaded as stored, and the library
    decompresses them; its forward then applies the dynamic activation quantisation of each group.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    qcfg = QuantizationConfig.model_validate(
        {k: v for k, v in cfg.pop("quantization_config").items() if k in QuantizationConfig.model_fields}
    )
    config = LlamaConfig.from_dict(cfg)
    model = LlamaForCausalLM(config).to(dtype)
    with _quiet_library():
        apply_quantization_config(model, qcfg)
        compressor = ModelCompressor(quantization_config=qcfg)
        compressor.compress_model(model)  # the compressed parameter layout, to receive the stored tensors
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: tensors missing {missing[:5]} / unexpected {unexpected[:5]}")
    with _quiet_library():
        compressor.decompress_model(model)
    if config.tie_word_embeddings:
        model.tie_weights()
    for p in model.parameters():
        if p.dtype.is_floating_point and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model.eval()
