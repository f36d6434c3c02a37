"""Activation-based importance on calibration data (Minitron-style), cached on disk.

Scores, each averaged over calibration tokens (forward hooks on the Hugging Face model):
  * hidden channels: mean ``|x|`` of every RMSNorm output (both norms of every block), summed;
  * query heads: mean L2 norm of each head's attention output (the input of ``o_proj``);
  * RoPE pairs ``(i, i + hd/2)``: mean pair magnitude of the queries times that of the keys;
  * value dims: mean ``|.|`` of each dim of the attention output, summed over heads;
  * MLP neurons: mean ``|act(gate) * up|`` (the input of ``down_proj``);
  * blocks: mean ``1 - cos(x_in, x_out)`` over tokens (initialises the depth logits);
  * input second moments: mean ``x^2`` of every input channel of every linear (llama.cpp's imatrix),
    weighting the block search of the importance-weighted GGUF quantiser (``x2_*``).

The cache key hashes the model's dimensions, a sample of its weights and the calibration ids, so a
different model or calibration set never reads a stale file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from archquant.core.space import model_fingerprint

IMPORTANCE_VERSION = 2


@dataclass
class Importance:
    """Importance scores of one model on one calibration set.

    Shapes: ``hidden [D]``, ``heads [L, H]``, ``pairs [L, hd/2]``, ``vdims [L, hd]``,
    ``neurons [L, M]``, ``blocks [L]``; mean ``x^2`` of the inputs of q/k/v ``x2_attn [L, D]``, gate/up
    ``x2_mlp [L, D]``, o ``x2_o [L, H * hd]``, down ``x2_down [L, M]`` and the lm_head ``x2_head [D]``
    (None when not collected).
    """

    hidden: torch.Tensor
    heads: torch.Tensor
    pairs: torch.Tensor
    vdims: torch.Tensor
    neurons: torch.Tensor
    blocks: torch.Tensor
    x2_attn: torch.Tensor | None = None
    x2_mlp: torch.Tensor | None = None
    x2_o: torch.Tensor | None = None
    x2_down: torch.Tensor | None = None
    x2_head: torch.Tensor | None = None

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name).contiguous() for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_tensors(cls, d: dict[str, torch.Tensor]) -> Importance:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    @property
    def has_inputs(self) -> bool:
        """Whether the linears' input second moments were collected."""
        return all(getattr(self, n) is not None for n in ("x2_attn", "x2_mlp", "x2_o", "x2_down", "x2_head"))


def _weights_digest(model) -> str:
    """A cheap digest of the weights: shape, a strided sample and the sum of every parameter."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            h.update(name.encode() + str(tuple(p.shape)).encode())
            h.update(flat[::step].float().cpu().numpy().tobytes())
            h.update(repr(float(flat.double().sum())).encode())
    return h.hexdigest()


def importance_key(model, calib_ids: torch.Tensor) -> str:
    """Cache key: model dimensions + weight digest + calibration ids + scoring version."""
    h = hashlib.sha256()
    h.update(json.dumps(model_fingerprint(model.config), sort_keys=True).encode())
    h.update(_weights_digest(model).encode())
    h.update(str(tuple(calib_ids.shape)).encode())
    h.update(calib_ids.detach().to(torch.int64).cpu().numpy().tobytes())
    h.update(f"v{IMPORTANCE_VERSION}".encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def compute_importance(model, calib_ids: torch.Tensor, batch_size: int = 8) -> Importance:
    """Run the model over ``calib_ids`` and collect every score (see module docstring).

    Args:
        model: a Llama-family ``*ForCausalLM``.
        calib_ids: calibration token ids. Shape: ``[N, S]``.
        batch_size: rows per forward.
    """
    cfg = model.config
    layers = model.model.layers
    n_layers = len(layers)
    d = cfg.hidden_size
    n_q = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_q
    hd = getattr(cfg, "head_dim", None) or d // n_q
    m = cfg.intermediate_size
    acc = {
        "hidden": torch.zeros(d, dtype=torch.float64),
        "heads": torch.zeros(n_layers, n_q, dtype=torch.float64),
        "qpairs": torch.zeros(n_layers, hd // 2, dtype=torch.float64),
        "kpairs": torch.zeros(n_layers, hd // 2, dtype=torch.float64),
        "vdims": torch.zeros(n_layers, hd, dtype=torch.float64),
        "neurons": torch.zeros(n_layers, m, dtype=torch.float64),
        "blocks": torch.zeros(n_layers, dtype=torch.float64),
        "x2_attn": torch.zeros(n_layers, d, dtype=torch.float64),
        "x2_mlp": torch.zeros(n_layers, d, dtype=torch.float64),
        "x2_o": torch.zeros(n_layers, n_q * hd, dtype=torch.float64),
        "x2_down": torch.zeros(n_layers, m, dtype=torch.float64),
        "x2_head": torch.zeros(d, dtype=torch.float64),
    }
    block_in: dict[int, torch.Tensor] = {}
    hooks = []

    def pair_norm(y: torch.Tensor, heads: int) -> torch.Tensor:
        y = y.float().reshape(-1, heads, 2, hd // 2)  # [T, heads, (first, second half), hd/2]
        return y.pow(2).sum(2).sqrt().sum((0, 1)).double()  # [hd/2]

    for l, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp

        def norm_hook(_m, _inp, out, key=None, l=l):
            y = out.detach().float().reshape(-1, d)
            acc["hidden"].add_(y.abs().sum(0).double())
            acc[key][l].add_(y.pow(2).sum(0).double())

        def o_pre(_m, args, l=l):
            y = args[0].detach().float().reshape(-1, n_q, hd)  # [T, H, hd]
            acc["x2_o"][l].add_(y.pow(2).sum(0).reshape(-1).double())
            acc["heads"][l].add_(y.norm(dim=-1).sum(0).double())
            acc["vdims"][l].add_(y.abs().sum((0, 1)).double())

        def q_hook(_m, _inp, out, l=l):
            acc["qpairs"][l].add_(pair_norm(out.detach(), n_q))

        def k_hook(_m, _inp, out, l=l):
            acc["kpairs"][l].add_(pair_norm(out.detach(), n_kv))

        def down_pre(_m, args, l=l):
            y = args[0].detach().float().reshape(-1, m)
            acc["neurons"][l].add_(y.abs().sum(0).double())
            acc["x2_down"][l].add_(y.pow(2).sum(0).double())

        def block_pre(_m, args, kwargs, l=l):
            block_in[l] = args[0] if args else kwargs["hidden_states"]

        def block_post(_m, _args, _kwargs, out, l=l):
            y = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(block_in.pop(l).float(), y.float(), dim=-1)
            acc["blocks"][l] += float((1.0 - cos).sum())

        hooks += [
            layer.input_layernorm.register_forward_hook(functools.partial(norm_hook, key="x2_attn")),
            layer.post_attention_layernorm.register_forward_hook(functools.partial(norm_hook, key="x2_mlp")),
            attn.o_proj.register_forward_pre_hook(o_pre),
            attn.q_proj.register_forward_hook(q_hook),
            attn.k_proj.register_forward_hook(k_hook),
            mlp.down_proj.register_forward_pre_hook(down_pre),
            layer.register_forward_pre_hook(block_pre, with_kwargs=True),
            layer.register_forward_hook(block_post, with_kwargs=True),
        ]

    def head_pre(_m, args):
        acc["x2_head"].add_(args[0].detach().float().reshape(-1, d).pow(2).sum(0).double())

    hooks.append(model.get_output_embeddings().register_forward_pre_hook(head_pre))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, calib_ids.shape[0], batch_size):
            model(input_ids=calib_ids[i : i + batch_size].to(model.device), use_cache=False)
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)
    tokens = float(calib_ids.numel())
    return Importance(
        hidden=(acc["hidden"] / tokens).float(),
        heads=(acc["heads"] / tokens).float(),
        pairs=(acc["qpairs"] * acc["kpairs"] / tokens**2).float(),
        vdims=(acc["vdims"] / tokens).float(),
        neurons=(acc["neurons"] / tokens).float(),
        blocks=(acc["blocks"] / tokens).float(),
        **{k: (acc[k] / tokens).float() for k in ("x2_attn", "x2_mlp", "x2_o", "x2_down", "x2_head")},
    )


def load_or_compute(model, calib_ids: torch.Tensor, cache_dir: str | Path | None = None) -> Importance:
    """Importance from ``<cache_dir>/importance/<key>.safetensors``, computing and storing it once.

    Args:
        cache_dir: cache root (default ``archquant.utils.paths.cache_dir()``, i.e. ``$ARCHQUANT_CACHE``).
    """
    from safetensors.torch import load_file, save_file

    from archquant.utils.paths import cache_dir as default_cache

    if calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise ValueError(
            f"calib_ids must be a non-empty [N, S] LongTensor of token ids, got shape {tuple(calib_ids.shape)}"
        )
    if int(calib_ids.max()) >= model.config.vocab_size or int(calib_ids.min()) < 0:
        raise ValueError(
            f"calib_ids hold token ids outside [0, {model.config.vocab_size}); tokenise with this model's tokenizer"
        )
    root = Path(cache_dir) if cache_dir is not None else default_cache()
    path = root / "importance" / f"{importance_key(model, calib_ids)}.safetensors"
    if path.exists():
        return Importance.from_tensors(load_file(str(path)))
    imp = compute_importance(model, calib_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
    save_file(imp.to_tensors(), str(tmp))
    tmp.replace(path)  # atomic: a killed run never leaves a half-written cache entry
    return imp


def depth_logits(blocks: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
    """Initial ``[keep, skip]`` logits per block from block importance ``1 - cos(x_in, x_out)``.

    ``logit_keep - logit_skip = scale * b_l / mean(b)``: a block that changes nothing starts at
    ``p_keep = 0.5``, an average block at ``sigmoid(scale)`` (0.88 for the default 2), and the most
    transformative blocks close to 1. Shape: ``[L] -> [L, 2]``.
    """
    b = blocks.float().clamp_min(0.0)
    rel = b / b.mean().clamp_min(1e-12)
    return torch.stack([scale * rel, torch.zeros_like(rel)], dim=-1)
