"""``archquant-export`` and ``archquant-generate``: the Hydra verbs over ``archquant.export``.

``archquant-export export.arch=<arch.json>`` materialises the subnet from ``model.name``;
``export.checkpoint=<run>/distilled`` exports a distilled one instead. The folder holds the packed
model, its remote code, the tokenizer, ``archquant.json`` and ``manifest.json``, plus compressed-tensors
(uniform shapes) and GGUF (``latency.backend=llamacpp`` on CPU, or when listed in ``export.formats``).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def _out_path(cfg) -> Path:
    p = Path(cfg.export.out)
    return p if p.is_absolute() else Path(cfg.out_dir) / p


def _record(cfg, extra: dict[str, Any]) -> dict[str, Any]:
    """Facts for ``archquant.json``: the ``export.record`` file, the distillation record, the prediction."""
    rec: dict[str, Any] = dict(extra)
    if cfg.export.record:
        p = Path(cfg.export.record)
        if not p.is_file():
            raise FileNotFoundError(f"export.record={p} does not exist (pass picked.json or search.json)")
        rec["source_record"] = {"path": str(p), **json.loads(p.read_text())}
    return rec


def predicted_latency(cfg, model_config, arch) -> dict[str, Any] | None:
    """The latency model's prediction for ``arch`` in ``latency.*`` (None when no model can be built)."""
    try:
        from archquant.backends import get_backend
        from archquant.latency import load_table_for
        from archquant.core.space import resolve_space

        backend = get_backend(cfg.latency.backend)
        space = resolve_space(backend.restrict_space(cfg.space, model_config), model_config)
        lm = load_table_for(cfg.latency, space, backend)
        return {
            "predicted_ms": float(lm.predict_ms(arch)),
            "predicted_mb": float(lm.predict_mb(arch)),
            "backend": cfg.latency.backend,
            "scenario": cfg.latency.scenario,
            "estimate": bool(getattr(lm.table, "is_estimate", False)),
        }
    except Exception as err:  # a missing table must not block an export; say why in the record
        return {"error": f"{type(err).__name__}: {err}"}


def export_job(cfg) -> dict[str, Any]:
    """Export ``export.checkpoint`` or ``export.arch`` into ``export.out``; returns a summary."""
    from archquant.export.packed import save

    ec = cfg.export
    extra: dict[str, Any] = {}
    if ec.checkpoint:
        from archquant.commands.distill import load_distilled
        from archquant.models.registry import load_tokenizer

        model, arch, distill_rec = load_distilled(ec.checkpoint)
        if ec.arch:
            log.info("export.checkpoint given: its own arch.json is used, export.arch=%s is ignored", ec.arch)
        tokenizer = _folder_tokenizer(ec.checkpoint) or load_tokenizer(cfg.model.name)
        extra["distill"] = {k: distill_rec.get(k) for k in ("steps", "tokens_seen", "before", "after", "folder")}
        base_config = None
    else:
        from archquant.commands.subnet import materialize_subnet

        sub = materialize_subnet(cfg, ec.arch, key="export.arch")
        model, arch, tokenizer = sub.student, sub.arch, sub.tokenizer
        base_config = sub.teacher.config
    if base_config is None:
        base_config = _fingerprint_config(model)
    extra["latency"] = predicted_latency(cfg, base_config, arch) if base_config is not None else None
    formats = ec.resolved_formats(cfg.latency.backend, cfg.latency.device)
    gguf_options = {}
    if "gguf" in formats:
        from archquant.models.embedded import EMBEDDED_NAME, ensure_embedded_gguf

        if cfg.model.name == EMBEDDED_NAME:
            gguf_options["source_gguf"] = ensure_embedded_gguf()
    out = _out_path(cfg)
    res = save(model, arch, out, tokenizer=tokenizer, record=_record(cfg, extra), formats=formats,
               float_dtype=ec.float_dtype, overwrite=ec.overwrite, gguf_options=gguf_options,
               paths=("dense",) if ec.verify else None)
    summary: dict[str, Any] = {"folder": str(out), "formats": {k: v.get("written") for k, v in res.formats.items()}}
    if ec.verify:
        summary["round_trip_bit_exact"] = verify_round_trip(res.packed_model, out, int(getattr(model.config, "vocab_size", 256)))
    return summary


def _fingerprint_config(model):
    """A stand-in config with the base model's dimensions (from ``config.base_model``) for the latency model."""
    fp = getattr(model.config, "base_model", None)
    if not fp:
        return None
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=fp["vocab_size"], hidden_size=fp["hidden_size"], intermediate_size=fp["intermediate_size"],
        num_hidden_layers=fp["num_hidden_layers"], num_attention_heads=fp["num_attention_heads"],
        num_key_value_heads=fp["num_key_value_heads"], head_dim=fp["head_dim"],
        tie_word_embeddings=fp["tie_word_embeddings"],
    ) if fp["hidden_size"] % fp["num_attention_heads"] == 0 else None


def _folder_tokenizer(folder):
    from archquant.export.packed import load_tokenizer

    return load_tokenizer(folder)


@torch.no_grad()
def verify_round_trip(packed, folder: Path, vocab: int, seq: int = 16) -> bool:
    """Load ``folder`` back and compare its logits with the in-memory packed model (must be identical)."""
    from archquant.export.packed import load

    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))
    loaded = load(folder, paths=("dense",))
    same = torch.equal(packed(input_ids=ids).logits, loaded(input_ids=ids).logits)
    if not same:
        raise RuntimeError(f"{folder}: the loaded export differs from the in-memory packed model; report this as a bug")
    return same


def export(cfg) -> dict[str, Any] | None:
    """Hydra entry point of ``archquant-export``."""
    from archquant.export.manifest import ManifestError
    from archquant.export.packed import ExportFormatError
    from archquant.core.arch import ArchError

    try:
        summary = export_job(cfg)
    except (ArchError, ExportFormatError, ManifestError, FileExistsError, FileNotFoundError, ValueError) as err:
        sys.exit(f"archquant-export: {err}")
    print(json.dumps(summary, indent=2))
    return summary


def load_any(name: str):
    """``(model, tokenizer)`` of an export folder (``archquant.export.load``) or any registry name / HF path."""
    from archquant.export.packed import load, load_tokenizer

    path = Path(name).expanduser()
    if path.is_dir() and (path / "archquant.json").is_file():
        tok = load_tokenizer(path)
        if tok is None:
            raise ValueError(f"export folder {path} holds no tokenizer; re-export it with one to generate text")
        return load(path), tok
    from archquant.models.registry import load_model

    return load_model(name)


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` (the prompt not included)."""
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def generate(cfg) -> str:
    """Hydra entry point of ``archquant-generate``: ``export.path=<folder>`` (or ``model.name``), ``export.prompt``."""
    from archquant.export.manifest import ManifestError
    from archquant.export.packed import ExportFormatError

    name = cfg.export.path or cfg.model.name
    gguf = gguf_to_serve(name, cfg.export.engine)
    if gguf is not None:
        from archquant.engine.llamacpp import generate as llamacpp_generate

        log.info("generating with llama.cpp from %s", gguf)
        text = llamacpp_generate(gguf, cfg.export.prompt, cfg.export.max_new_tokens,
                                 n_threads=cfg.trainer.num_threads or 2)
    else:
        try:
            model, tok = load_any(name)
        except (ExportFormatError, ManifestError, ValueError) as err:
            sys.exit(f"archquant-generate: {err}")
        text = generate_text(model, tok, cfg.export.prompt, cfg.export.max_new_tokens)
    print(cfg.export.prompt + text)
    return text


def gguf_to_serve(name: str, engine: str) -> Path | None:
    """The GGUF ``archquant-generate`` runs in llama.cpp, or None for the torch path (see ``export.engine``)."""
    import importlib.util

    folder = Path(name)
    gguf = folder / "model.gguf" if folder.is_dir() else (folder if folder.suffix == ".gguf" else None)
    have = gguf is not None and gguf.is_file()
    if engine == "torch":
        return None
    if engine == "llamacpp":
        if not have:
            sys.exit(f"archquant-generate: export.engine=llamacpp but {name} holds no model.gguf; "
                     "export with export.formats=[packed,gguf]")
        from archquant.engine.llamacpp import require_llama_cpp

        require_llama_cpp()
        return gguf
    return gguf if have and importlib.util.find_spec("llama_cpp") is not None else None
