"""Write a (materialised) Llama-family model as one GGUF that llama.cpp runs: arch ``llama`` or ``deci``.

The exporter reads every shape from the weights themselves (so it serves ``ArchQuantForCausalLM``,
a plain ``LlamaForCausalLM`` or any model with Llama module names), validates the whole plan before
a byte is written, and quantises each linear from its raw weights with the same quantiser the
``llamacpp`` backend simulates (``gguf.quants``; ``quant.py`` is tested bit-exact against it).

Arch ``llama`` is written when every block has the same shape and none was skipped; ``deci`` (the
Nemotron-51B path of llama.cpp) otherwise, with per-layer ``head_count``, ``head_count_kv`` and
``feed_forward_length`` arrays. Traps this module never writes (measured, NOTES.md): an FFN length of
0 (drops the whole layer; aborts on the last one), a query-head count not divisible by the layer's KV
heads (aborts), per-layer head sizes (GGUF has one), a quantised row length not divisible by 32.

HF stores q/k rows in "rotate half" order; llama.cpp's RoPE pairs adjacent rows, so q and k are
permuted per head exactly as llama.cpp's ``convert_hf_to_gguf.py`` does (``permute_qk``).

``write_gguf`` is the one place a GGUF is assembled from an ``ExportPlan`` (metadata keys, per-layer
arrays, tokenizer entries, tensor names and order); its caller supplies only the tensor bytes: a
model's weights here (``export_gguf``), random bytes of the same shapes for the latency profiler.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from archquant.backends.llamacpp import FALLBACK, resolve_types, stored_type
from archquant.core.linears import LINEARS, MODULE_PATHS, NORM_PATHS, gguf_name
from archquant.engine.gguf_reader import read_header
from archquant.quant import gguf as quant
from archquant.utils.errors import UserError

# which search decision sets a linear's input width, for error messages
ROW_DECISION = {"q": "hidden", "k": "hidden", "v": "hidden", "o": "kv_groups/q_per_group", "gate": "hidden",
                "up": "hidden", "down": "mlp"}
# the ``general.file_type`` a type's GGUF is labelled with (gguf.LlamaFileType; informational in llama.cpp)
_FILE_TYPE_NAMES = {"F32": "ALL_F32", "Q5_K": "MOSTLY_Q5_K_M", "Q4_K": "MOSTLY_Q4_K_M", "Q3_K": "MOSTLY_Q3_K_M"}
_NORMS = dict(zip(("attn_norm", "ffn_norm"), NORM_PATHS))  # GGUF part -> module path inside a block


def _file_type(qtype: str) -> int:
    from gguf import LlamaFileType

    return int(LlamaFileType[_FILE_TYPE_NAMES.get(qtype, f"MOSTLY_{qtype}")])


# (key, value, GGUF value type, array element type or None): one metadata entry as GGUFWriter.add_key_value takes it
KeyValue = tuple[str, Any, Any, Any]


class GGUFExportError(UserError, ValueError):
    """A model GGUF / llama.cpp cannot represent or would crash on; raised before anything is written."""


def linear_shapes(hidden: int, head_dim: int, n_head: int, n_kv: int, n_ff: int) -> dict[str, tuple[int, int]]:
    """``(rows, cols)`` = ``(out, in)`` (torch's weight layout) of a block's seven linears."""
    q, kv = n_head * head_dim, n_kv * head_dim
    return {"q": (q, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, q),
            "gate": (n_ff, hidden), "up": (n_ff, hidden), "down": (hidden, n_ff)}


@dataclass
class LayerPlan:
    """One kept block as it goes into the GGUF.

    Attributes:
        index: block index in the GGUF (kept blocks only).
        source: the block's index in the original model (the ``layers.{source}.*`` decisions).
        n_head, n_head_kv, n_ff: query heads, KV heads, MLP width.
        types: linear name -> GGUF type.
        rope_pairs: for a block whose head dims were reordered by importance, the original RoPE pair of
            each stored pair (``ArchQuantConfig.layer_rope_index``); q/k rows are put back in order.
    """

    index: int
    source: int
    n_head: int
    n_head_kv: int
    n_ff: int
    types: dict[str, str]
    rope_pairs: list[int] | None = None


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as ``write_gguf`` writes it.

    Attributes:
        name: GGUF tensor name (``core.linears.gguf_name``).
        part: a linear's short name, ``attn_norm``, ``ffn_norm``, ``embed``, ``output`` or ``output_norm``.
        layer: the block it belongs to (None for the embedding, final norm and lm_head).
        shape: torch order, ``(rows, cols)`` or ``(n,)``.
        type: GGUF type name.
    """

    name: str
    part: str
    layer: LayerPlan | None
    shape: tuple[int, ...]
    type: str


@dataclass
class ExportPlan:
    """Everything a GGUF holds but the tensor bytes: what ``write_gguf`` writes.

    ``plan_gguf`` builds and validates it from a model; the latency profiler builds it from a sampled
    subnet's shapes (``SubnetShape.plan``), which its restricted space keeps within llama.cpp's limits.
    """

    arch: str
    hidden: int
    head_dim: int
    vocab: int
    context_length: int
    rope_theta: float
    rms_eps: float
    num_source_layers: int
    layers: list[LayerPlan]
    embd_type: str
    output_type: str | None  # None: tied to token_embd
    types: dict[int, str] = field(default_factory=dict)

    def tensors(self) -> list[TensorSpec]:
        """Every tensor in writing order: embedding, final norm, untied lm_head, then per block its two
        norms and seven linears."""
        embd = (self.vocab, self.hidden)
        out = [TensorSpec(gguf_name("embed"), "embed", None, embd, self.embd_type),
               TensorSpec(gguf_name("output_norm"), "output_norm", None, (self.hidden,), "F32")]
        if self.output_type is not None:
            out.append(TensorSpec(gguf_name("output"), "output", None, embd, self.output_type))
        for lp in self.layers:
            out += [TensorSpec(gguf_name(norm, lp.index), norm, lp, (self.hidden,), "F32") for norm in _NORMS]
            shapes = linear_shapes(self.hidden, self.head_dim, lp.n_head, lp.n_head_kv, lp.n_ff)
            out += [TensorSpec(gguf_name(lin, lp.index), lin, lp, shapes[lin], lp.types[lin]) for lin in LINEARS]
        return out

    def tensor_types(self) -> dict[str, str]:
        """GGUF tensor name -> type, as written."""
        return {t.name: t.type for t in self.tensors()}

    def describe(self) -> str:
        heads = sorted({lp.n_head for lp in self.layers})
        ffn = sorted({lp.n_ff for lp in self.layers})
        kinds = sorted({t for lp in self.layers for t in lp.types.values()})
        return (
            f"GGUF arch {self.arch}: hidden {self.hidden}, {len(self.layers)}/{self.num_source_layers} blocks, "
            f"heads {heads}, ffn {ffn}, head_dim {self.head_dim}, linear types {kinds}, "
            f"lm_head {self.output_type or self.embd_type + ' (tied)'}"
        )


def _get(cfg, key, default=None):
    val = getattr(cfg, key, None)
    return default if val is None else val


def _rope_theta(cfg) -> float:
    params = _get(cfg, "rope_parameters") or {}
    scaling = _get(cfg, "rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise GGUFExportError(
            f"RoPE type {rope_type!r} is not supported by this exporter (only the default RoPE); "
            "export a model without rope scaling"
        )
    theta = params.get("rope_theta", _get(cfg, "rope_theta"))
    if theta is None:
        raise GGUFExportError("the model config has no rope_theta (config.rope_parameters['rope_theta'])")
    return float(theta)


def _layer_sources(cfg, n_kept: int) -> tuple[list[int], int]:
    src = _get(cfg, "layer_source")
    total = _get(cfg, "num_source_layers") or (_get(cfg, "base_model") or {}).get("num_hidden_layers")
    if src is None:
        return list(range(n_kept)), int(total or n_kept)
    src = [int(s) for s in src]
    if len(src) != n_kept:
        raise GGUFExportError(f"config.layer_source lists {len(src)} blocks but the model has {n_kept}")
    return src, int(total or (max(src) + 1))


def _quant_record(cfg) -> dict[str, Any] | None:
    q = _get(cfg, "quant")
    if q is None:
        return None
    return q if isinstance(q, dict) else dict(q)


def _warn_other_backend(qrec: dict[str, Any] | None, plans: list[LayerPlan], embd_type: str) -> None:
    """A model simulating another engine's quantiser will not reproduce the GGUF's numbers: say so."""
    backend = (qrec or {}).get("backend")
    if backend in (None, "llamacpp"):
        return
    lossy = {t for lp in plans for t in lp.types.values()} | {embd_type}
    if lossy - {"F32"}:
        warnings.warn(
            f"the model simulates backend {backend!r}'s quantiser; its GGUF computes llama.cpp's formats "
            f"({sorted(lossy)}), so logits will differ from the model's (materialise with backend=llamacpp to match)",
            stacklevel=3,
        )


def _stored(qtype: str, row: int, fallback: bool) -> str:
    """``stored_type`` where the row fits the type or its fallback; else the type itself (the caller names the
    tensor and decision in its error)."""
    try:
        return stored_type(qtype, row, fallback)
    except UserError:
        return qtype


def plan_gguf(model, *, types: dict[int, str] | None = None, arch: str | None = None) -> ExportPlan:
    """Read and validate the GGUF a model would become (nothing is written).

    Args:
        model: a causal LM with Llama module names (``model.embed_tokens``, ``model.layers[i].self_attn.q_proj``,
            ..., ``lm_head``); per-layer shapes are read from the weights, bits from ``config.quant``.
        types: ``bits -> GGUF type`` (see ``LlamaCppBackend``); default: the types the model was
            materialised with (``config.quant["backend_options"]``), else ``DEFAULT_TYPES``.
        arch: force ``llama`` or ``deci`` (default: ``llama`` when uniform and no block skipped).

    Raises:
        GGUFExportError: naming the layer, tensor and search decision that GGUF cannot represent.
    """
    cfg = model.config
    qrec = _quant_record(cfg)
    if types is None and (qrec or {}).get("backend") == "llamacpp":
        types = (qrec.get("backend_options") or {}).get("types")  # the types the model was materialised with
    types = resolve_types(types)
    # a block-256 type stores its fallback at rows it does not divide, as in the supernet that searched it
    fallback = bool(((qrec or {}).get("backend_options") or {}).get("fallback", True))
    body = getattr(model, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "embed_tokens"):
        raise GGUFExportError(
            f"{type(model).__name__} does not have Llama module names (model.embed_tokens, model.layers, model.norm, "
            "lm_head); pass a materialised archquant model or a LlamaForCausalLM"
        )
    embd = body.embed_tokens.weight
    vocab, hidden = embd.shape
    blocks = list(body.layers)
    if not blocks:
        raise GGUFExportError("the model has no decoder blocks; keep at least one (every layers.*.keep is 0)")
    sources, n_src = _layer_sources(cfg, len(blocks))
    qlayers = (qrec or {}).get("layers")
    if qlayers is not None and len(qlayers) != len(blocks):
        raise GGUFExportError(f"config.quant has {len(qlayers)} layer records but the model has {len(blocks)} blocks")
    layer_hd = _get(cfg, "layer_head_dim")
    head_dim = int(_get(cfg, "head_dim") or hidden // int(_get(cfg, "num_attention_heads")))
    if layer_hd is not None and len({int(h) for h in layer_hd}) > 1:
        i = next(i for i, h in enumerate(layer_hd) if int(h) != int(layer_hd[0]))
        raise GGUFExportError(
            f"layer {i} (source block {sources[i]}): head_dim {layer_hd[i]} differs from layer 0's {layer_hd[0]}; "
            f"GGUF has one global head size (decision layers.{sources[i]}.head_dim). Search with backend=llamacpp, "
            "whose space has no head-size choice"
        )
    if layer_hd is not None:
        head_dim = int(layer_hd[0])
    if head_dim % 2:
        raise GGUFExportError(f"head_dim {head_dim} is odd; RoPE needs pairs of dimensions")
    act = str(_get(cfg, "hidden_act", "silu"))
    if act not in ("silu", "swish"):
        raise GGUFExportError(f"hidden_act {act!r}: llama.cpp's llama/deci graphs run SiLU-gated MLPs only")

    def fail(i: int, msg: str) -> GGUFExportError:
        return GGUFExportError(f"layer {i} (source block {sources[i]}): {msg}")

    plans = []
    for i, block in enumerate(blocks):
        w = {lin: _module(block, path, i, sources).weight for lin, path in MODULE_PATHS.items()}
        for path in MODULE_PATHS.values():
            if getattr(_module(block, path, i, sources), "bias", None) is not None:
                raise fail(i, f"{path} has a bias; the llama/deci GGUF path written here has none")
        q_rows, k_rows = w["q"].shape[0], w["k"].shape[0]
        if q_rows % head_dim or k_rows % head_dim:
            raise fail(i, f"q_proj/k_proj widths {q_rows}/{k_rows} are not multiples of head_dim {head_dim} "
                          f"(decision layers.{sources[i]}.head_dim)")
        n_head, n_kv = q_rows // head_dim, k_rows // head_dim
        n_ff = w["gate"].shape[0]
        if n_head == 0 or n_kv == 0:
            raise fail(i, f"{n_head} query heads / {n_kv} KV heads; keep at least one KV group "
                          f"(decision layers.{sources[i]}.kv_groups)")
        if n_head % n_kv:
            raise fail(i, f"{n_head} query heads are not a multiple of its {n_kv} KV heads, which aborts llama.cpp "
                          f"(decisions layers.{sources[i]}.kv_groups / q_per_group)")
        if n_ff == 0:
            raise fail(i, f"MLP width 0 would drop the whole layer in llama.cpp (decision layers.{sources[i]}.mlp)")
        for lin, shape in linear_shapes(hidden, head_dim, n_head, n_kv, n_ff).items():
            if tuple(w[lin].shape) != shape:
                raise fail(i, f"{MODULE_PATHS[lin]}.weight has shape {tuple(w[lin].shape)}, expected {shape}")
        for norm in NORM_PATHS:
            nw = _module(block, norm, i, sources).weight
            if tuple(nw.shape) != (hidden,):
                raise fail(i, f"{norm}.weight has shape {tuple(nw.shape)}, expected ({hidden},)")
        bits = (qlayers[i].get("wbits") if qlayers is not None else None) or {}
        ltypes = {}
        for lin in LINEARS:
            b = int(bits.get(lin, 16))
            if b not in types:
                raise fail(i, f"{lin} has {b}-bit weights; GGUF types exist for {sorted(types)} bits "
                              f"(decision layers.{sources[i]}.wbits)")
            k = w[lin].shape[1]
            qtype = _stored(types[b], k, fallback)
            if qtype in quant.QUANT_TYPES and k % quant.block_size(qtype):
                how = (f"; latency.fallback=true stores {FALLBACK[qtype]} there, as llama.cpp does"
                       if not fallback and qtype in FALLBACK else
                       "; search with backend=llamacpp, whose space only has multiples of 32")
                raise fail(i, f"{lin} row length {k} is not a multiple of {qtype}'s block of {quant.block_size(qtype)} "
                              f"(decision {ROW_DECISION[lin]} of layer {sources[i]}){how}")
            ltypes[lin] = qtype
        plans.append(LayerPlan(i, sources[i], n_head, n_kv, n_ff, ltypes, _rope_pairs(cfg, i, head_dim, sources)))

    lm_head = model.get_output_embeddings()
    if lm_head is None or tuple(lm_head.weight.shape) != (vocab, hidden):
        raise GGUFExportError(f"lm_head must have shape ({vocab}, {hidden}) like the embedding")
    if getattr(lm_head, "bias", None) is not None:
        raise GGUFExportError("lm_head has a bias; the llama/deci GGUF path written here has none")
    lm_bits = int((qrec or {}).get("lm_head_bits", 16))
    if lm_bits not in types:
        raise GGUFExportError(f"lm_head has {lm_bits}-bit weights; GGUF types exist for {sorted(types)} (decision lm_head.wbits)")
    embd_type = _stored(types[16], hidden, fallback)
    out_type = _stored(types[lm_bits], hidden, fallback)
    if out_type in quant.QUANT_TYPES and hidden % quant.block_size(out_type):
        raise GGUFExportError(f"lm_head row length {hidden} is not a multiple of {quant.block_size(out_type)} (decision hidden)")
    tied = lm_head.weight.data_ptr() == embd.data_ptr() and out_type == embd_type
    uniform = len({(lp.n_head, lp.n_head_kv, lp.n_ff) for lp in plans}) == 1 and len(plans) == n_src
    if arch is None:
        arch = "llama" if uniform else "deci"
    if arch not in ("llama", "deci"):
        raise GGUFExportError(f"arch must be 'llama' or 'deci', got {arch!r}")
    if arch == "llama" and len({(lp.n_head, lp.n_head_kv, lp.n_ff) for lp in plans}) > 1:
        raise GGUFExportError("arch='llama' needs every block to have the same heads / KV heads / MLP width; use arch='deci'")
    plan = ExportPlan(
        arch=arch,
        hidden=int(hidden),
        head_dim=head_dim,
        vocab=int(vocab),
        context_length=int(_get(cfg, "max_position_embeddings", 2048)),
        rope_theta=_rope_theta(cfg),
        rms_eps=float(_get(cfg, "rms_norm_eps", 1e-5)),
        num_source_layers=n_src,
        layers=plans,
        embd_type=embd_type,
        output_type=None if tied else out_type,
        types=types,
    )
    for qtype in plan.tensor_types().values():
        quant.check_type(qtype)
    _warn_other_backend(qrec, plans, embd_type)
    return plan


def _rope_pairs(cfg, i: int, head_dim: int, sources: list[int]) -> list[int] | None:
    """The block's stored-pair -> original-RoPE-pair order, or None when already in order."""
    index = _get(cfg, "layer_rope_index")
    pairs = index[i] if index is not None and i < len(index) else None
    full = int(_get(cfg, "head_dim") or head_dim)
    if pairs is None:
        if head_dim != full:
            raise GGUFExportError(
                f"layer {i} (source block {sources[i]}): head size {head_dim} was cut from {full}; llama.cpp derives RoPE "
                f"frequencies from the stored head size (decision layers.{sources[i]}.head_dim). Search with "
                "backend=llamacpp, whose space keeps the head size"
            )
        return None
    pairs = [int(p) for p in pairs]
    if sorted(pairs) != list(range(full // 2)) or head_dim != full:
        raise GGUFExportError(
            f"layer {i} (source block {sources[i]}): keeps RoPE pairs {pairs[:6]}... of a head of {full}; GGUF needs "
            f"whole heads (decision layers.{sources[i]}.head_dim)"
        )
    return None if pairs == list(range(full // 2)) else pairs


def unpermute_rope_pairs(w: torch.Tensor, n_head: int, pairs: list[int]) -> torch.Tensor:
    """Put q/k rows whose RoPE pairs were reordered back in frequency order (HF "rotate half" layout).

    Row ``j`` (and ``j + hd/2``) of each head holds original pair ``pairs[j]``. Shape: ``[n_head * hd, K]``.
    """
    hd = w.shape[0] // n_head
    half = hd // 2
    src = torch.empty(hd, dtype=torch.long)
    for j, p in enumerate(pairs):
        src[p], src[p + half] = j, j + half
    return w.reshape(n_head, hd, -1)[:, src].reshape(w.shape)


def _module(block, path: str, i: int, sources: list[int]):
    mod = block
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            raise GGUFExportError(f"layer {i} (source block {sources[i]}) has no {path}; not a Llama-family block")
    return mod


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF "rotate half" row order -> llama.cpp's interleaved RoPE order, per head (llama.cpp's converter).

    Shape: ``[n_head * head_dim, K]`` -> same.
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(w: torch.Tensor, qtype: str, importance: torch.Tensor | None = None,
            rows: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[np.ndarray, Any]:
    """Array + raw GGML type (None for float arrays) for ``GGUFWriter.add_tensor``: the very blocks the
    supernet simulates (``archquant.quant.gguf``; round-to-nearest is byte-identical to gguf-py where it has
    the type), searched under ``importance`` when given. ``rows`` reorders rows after quantising (rows are
    quantised independently), so that the blocks are those the model computes with, found by content."""
    from gguf import GGMLQuantizationType

    rows = rows or (lambda t: t)
    w = w.detach().float().cpu()
    if not torch.isfinite(w).all():
        raise GGUFExportError("a weight tensor holds NaN or inf; refusing to write it")
    if qtype == "F32":
        return np.ascontiguousarray(rows(w).numpy()), None
    if qtype == "F16":
        return np.ascontiguousarray(rows(w).numpy().astype(np.float16)), None
    parts = quant.quantize(w, qtype, importance)
    return quant.pack_parts({k: rows(v) for k, v in parts.items()}, qtype), GGMLQuantizationType[qtype]


# ---- tokenizer ----------------------------------------------------------------------------------


def tokenizer_kv_from_gguf(path: str | Path) -> list[KeyValue]:
    """``(key, value, type, sub_type)`` of every ``tokenizer.*`` entry of a GGUF (vocab, merges, chat template)."""
    fields, _ = read_header(path)
    return [(k, f.value, f.type, f.sub_type) for k, f in fields.items() if k.startswith("tokenizer.")]


def tokenizer_kv_from_hf(tokenizer, vocab_size: int) -> list[KeyValue]:
    """GGUF tokenizer entries for a byte-level BPE Hugging Face tokenizer (GPT-2 style, as SmolLM2's).

    Ids the tokenizer does not cover (a padded embedding) become unused ``[PAD{i}]`` tokens.

    Raises:
        GGUFExportError: not a fast byte-level BPE tokenizer (pass ``source_gguf=`` instead).
    """
    from gguf import GGUFValueType as V

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(
            f"tokenizer of type {model.get('type')!r} cannot be converted here (byte-level BPE only); "
            "pass source_gguf=<a GGUF of the same model> to copy its tokenizer"
        )
    vocab = tokenizer.get_vocab()
    n = max(vocab_size, max(vocab.values()) + 1)
    if n > vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {n - 1} but the model's vocabulary has {vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(n)]
    ttype = [5] * n  # UNUSED
    for tok, i in vocab.items():
        tokens[i], ttype[i] = tok, 1  # NORMAL
    special = {t["id"]: t for t in spec.get("added_tokens", [])}
    for i, t in special.items():
        ttype[i] = 3 if t.get("special", False) else 4  # CONTROL / USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    out = [
        ("tokenizer.ggml.model", "gpt2", V.STRING, None),
        ("tokenizer.ggml.pre", "default", V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("tokenizer.ggml.token_type", ttype, V.ARRAY, V.INT32),
        ("tokenizer.ggml.merges", merges or [" "], V.ARRAY, V.STRING),
        ("tokenizer.ggml.add_bos_token", False, V.BOOL, None),
    ]
    for attr, key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding"), ("unk_token_id", "unknown")):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            out.append((f"tokenizer.ggml.{key}_token_id", int(tid), V.UINT32, None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        out.append(("tokenizer.chat_template", template, V.STRING, None))
    return out


def _check_vocab(kv: list[tuple], vocab: int) -> None:
    tokens = next((v for k, v, *_ in kv if k == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        raise GGUFExportError("the tokenizer entries have no tokenizer.ggml.tokens")
    if len(tokens) != vocab:
        raise GGUFExportError(
            f"the tokenizer has {len(tokens)} tokens but the model's embedding has {vocab} rows; llama.cpp needs them "
            "equal (copy the tokenizer of the model this subnet was cut from)"
        )


# ---- writer -------------------------------------------------------------------------------------


def write_gguf(
    path: str | Path,
    plan: ExportPlan,
    tokenizer_kv: list[KeyValue],
    tensor: Callable[[TensorSpec], tuple[np.ndarray, Any]],
    *,
    name: str,
    extra_kv: Iterable[KeyValue] = (),
) -> Path:
    """Write ``plan`` as a GGUF: its metadata, the tokenizer entries, ``extra_kv``, then every tensor of
    ``plan.tensors()`` with the bytes ``tensor(spec)`` returns.

    Args:
        path: output ``.gguf`` (written atomically: a failure leaves no partial file).
        plan: shapes, types and hyper-parameters (validated: ``plan_gguf``, or built by the caller).
        tokenizer_kv: ``tokenizer.*`` entries; their vocabulary must have ``plan.vocab`` tokens.
        tensor: ``spec -> (array, raw GGML type)``: a float32/float16 array of ``spec.shape`` with None, or
            the uint8 blocks of a quantised type with its ``GGMLQuantizationType``.
        name: ``general.name``.
        extra_kv: more metadata entries, written after the tokenizer's.

    Returns:
        The written path.

    Raises:
        GGUFExportError: the tokenizer's vocabulary is not ``plan.vocab``, or a tensor's bytes do not have
            the shape or type its spec says (the header, which llama.cpp trusts, is written from the plan).
    """
    from gguf import GGUFWriter

    _check_vocab(tokenizer_kv, plan.vocab)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # one INFO line per file otherwise
    try:
        writer = GGUFWriter(tmp, plan.arch)
        _write_kv(writer, plan, name)
        for key, val, vtype, sub in [*tokenizer_kv, *extra_kv]:
            writer.add_key_value(key, val, vtype, sub_type=sub)
        for spec in plan.tensors():
            arr, raw = tensor(spec)
            _check_encoded(spec, arr, raw)
            writer.add_tensor(spec.name, arr, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _check_encoded(spec: TensorSpec, arr: np.ndarray, raw) -> None:
    """The bytes must be what the metadata says: llama.cpp reads shapes from the header, not the data."""
    per_block, nbytes = quant.TYPE_SIZES[spec.type]
    if raw is None:
        dtype, shape = {"F32": np.float32, "F16": np.float16}.get(spec.type), spec.shape
    else:
        dtype, shape = np.uint8, (*spec.shape[:-1], spec.shape[-1] // per_block * nbytes)
        if raw.name != spec.type:
            raise GGUFExportError(f"{spec.name}: encoded as {raw.name}, planned as {spec.type}")
    if arr.dtype != dtype or tuple(arr.shape) != shape:
        raise GGUFExportError(f"{spec.name}: encoded as {arr.dtype}{tuple(arr.shape)}, {spec.type} "
                              f"{spec.shape} needs {np.dtype(dtype) if dtype else 'raw blocks'}{shape}")


def _write_kv(writer, plan: ExportPlan, name: str) -> None:
    writer.add_name(name)
    writer.add_quantization_version(2)
    by_type: dict[str, int] = {}
    for lp in plan.layers:
        for t in lp.types.values():
            by_type[t] = by_type.get(t, 0) + 1
    main = max(by_type, key=lambda t: (by_type[t], t)) if by_type else "F32"
    writer.add_file_type(_file_type(main))
    writer.add_context_length(plan.context_length)
    writer.add_embedding_length(plan.hidden)
    writer.add_block_count(len(plan.layers))
    writer.add_vocab_size(plan.vocab)
    if plan.arch == "deci":
        writer.add_feed_forward_length([lp.n_ff for lp in plan.layers])
        writer.add_head_count([lp.n_head for lp in plan.layers])
        writer.add_head_count_kv([lp.n_head_kv for lp in plan.layers])
    else:
        lp = plan.layers[0]
        writer.add_feed_forward_length(lp.n_ff)
        writer.add_head_count(lp.n_head)
        writer.add_head_count_kv(lp.n_head_kv)
    writer.add_key_length(plan.head_dim)
    writer.add_value_length(plan.head_dim)
    writer.add_rope_dimension_count(plan.head_dim)
    writer.add_rope_freq_base(plan.rope_theta)
    writer.add_layer_norm_rms_eps(plan.rms_eps)


def export_gguf(
    model,
    path: str | Path,
    *,
    source_gguf: str | Path | None = None,
    tokenizer=None,
    types: dict[int, str] | None = None,
    arch: str | None = None,
    name: str | None = None,
) -> Path:
    """Write ``model`` as a GGUF llama.cpp runs.

    Args:
        model: a materialised subnet (``ArchQuantForCausalLM``) or any Llama-named causal LM.
        path: output ``.gguf`` (written atomically: a failure leaves no partial file).
        source_gguf: a GGUF whose ``tokenizer.*`` entries (vocab, merges, chat template) are copied;
            for the embedded default, ``archquant.models.embedded.ensure_embedded_gguf()``.
        tokenizer: a Hugging Face byte-level BPE tokenizer to convert when there is no ``source_gguf``.
        types: ``bits -> GGUF type`` (``{16: "F16"|"F32", 8: "Q8_0", 4: "Q4_0"|"Q4_1"}``).
        arch: force ``llama`` or ``deci``.
        name: ``general.name`` (default: the model's ``name_or_path``).

    Returns:
        The written path.

    Raises:
        GGUFExportError: a shape or type GGUF cannot hold, or no tokenizer (before anything is written).
    """
    from gguf import GGUFValueType as V

    plan = plan_gguf(model, types=types, arch=arch)
    if source_gguf is not None:
        kv = tokenizer_kv_from_gguf(source_gguf)
    elif tokenizer is not None:
        kv = tokenizer_kv_from_hf(tokenizer, plan.vocab)
    else:
        raise GGUFExportError(
            "llama.cpp needs a tokenizer in the GGUF: pass source_gguf= (e.g. ensure_embedded_gguf() for the embedded "
            "default) or tokenizer= (a Hugging Face byte-level BPE tokenizer)"
        )
    extra = [
        ("archquant.layer_source", [lp.source for lp in plan.layers], V.ARRAY, None),
        ("archquant.types", json.dumps({str(k): v for k, v in plan.types.items()}), V.STRING, None),
    ]
    name = name or str(getattr(model.config, "name_or_path", "") or "archquant-subnet")
    return write_gguf(path, plan, kv, lambda spec: _tensor(model, spec), name=name, extra_kv=extra)


def _tensor(model, spec: TensorSpec) -> tuple[np.ndarray, Any]:
    """The GGUF array of ``spec``: the model's tensor (q/k rows in llama.cpp's RoPE order), quantised under
    the layer's calibration importance where it carries one (``FakeQuantLinear.act_importance``)."""
    body = model.model
    lp = spec.layer
    if lp is None:
        mod = {"embed": body.embed_tokens, "output_norm": body.norm, "output": model.get_output_embeddings()}[spec.part]
    else:
        mod = body.layers[lp.index].get_submodule(MODULE_PATHS.get(spec.part) or _NORMS[spec.part])
    imp = getattr(mod, "act_importance", None) if spec.part != "embed" else None
    rows = None
    if lp is not None and spec.part in ("q", "k"):
        heads = lp.n_head if spec.part == "q" else lp.n_head_kv

        def rows(t: torch.Tensor, heads=heads, pairs=lp.rope_pairs) -> torch.Tensor:
            return permute_qk(t if pairs is None else unpermute_rope_pairs(t, heads, pairs), heads)

    return _encode(mod.weight, spec.type, imp, rows)
