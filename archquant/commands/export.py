"""``archquant-export``: write a subnet's export folder (packed safetensors + manifest, compressed-tensors, GGUF).

``archquant-export export.arch=<arch.json>`` materialises the subnet from ``model.name``;
``export.checkpoint=<run>/distilled`` exports a distilled one instead. The folder holds the packed
model, its remote code, the tokenizer, ``archquant.json`` and ``manifest.json``, plus compressed-tensors
(uniform shapes) and GGUF (``latency.backend=llamacpp`` on CPU, or when listed in ``export.formats``).
The main job calls ``export_model`` with the model and arch it already holds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from archquant.commands.distill import load_distilled
from archquant.commands.session import Session
from archquant.core.arch import Arch
from archquant.export.packed import load, load_tokenizer, save
from archquant.utils.errors import MissingFileError, UserError

log = logging.getLogger(__name__)


def _out_path(cfg) -> Path:
    p = Path(cfg.export.out)
    return p if p.is_absolute() else Path(cfg.out_dir) / p


def _source_record(cfg) -> dict[str, Any]:
    """The ``export.record`` file (picked.json or search.json) to keep in ``archquant.json``, if given."""
    if not cfg.export.record:
        return {}
    p = Path(cfg.export.record)
    if not p.is_file():
        raise MissingFileError(f"export.record={p} does not exist (pass picked.json or search.json)")
    return {"source_record": {"path": str(p), **json.loads(p.read_text())}}


def export_model(cfg, session: Session, model: nn.Module, arch: Arch, *, tokenizer=None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export ``model`` (a materialised or distilled subnet of ``arch``) into ``export.out``; returns a summary.

    The record (``archquant.json``) holds ``extra``, the ``export.record`` file and the session's latency
    prediction for ``arch``.
    """
    ec = cfg.export
    try:
        latency = session.predicted(arch)
    except UserError as err:  # no usable table must not block an export: the record says why there is no figure
        latency = {"error": f"{type(err).__name__}: {err}"}
    record = {**(extra or {}), "latency": latency, **_source_record(cfg)}
    formats = ec.resolved_formats(cfg.latency.backend, cfg.latency.device)
    gguf_options = {}
    if "gguf" in formats and session.gguf_source() is not None:
        gguf_options["source_gguf"] = session.gguf_source()
    out = _out_path(cfg)
    res = save(model, arch, out, tokenizer=tokenizer or session.tokenizer, record=record, formats=formats,
               float_dtype=ec.float_dtype, overwrite=ec.overwrite, gguf_options=gguf_options,
               paths=("dense",) if ec.verify else None)
    summary: dict[str, Any] = {"folder": str(out), "formats": {k: v.get("written") for k, v in res.formats.items()}}
    if ec.verify:
        summary["round_trip_bit_exact"] = verify_round_trip(res.packed_model, out, int(getattr(model.config, "vocab_size", 256)))
    return summary


def export_job(cfg, *, session: Session | None = None) -> dict[str, Any]:
    """Export ``export.checkpoint`` (a distilled folder) or ``export.arch`` into ``export.out``; returns a summary."""
    ec = cfg.export
    session = session or Session.load(cfg)
    if ec.checkpoint:
        model, arch, distill_rec = load_distilled(ec.checkpoint)
        if ec.arch:
            log.info("export.checkpoint given: its own arch.json is used, export.arch=%s is ignored", ec.arch)
        arch.check(session.space)
        extra = {"distill": {k: distill_rec.get(k) for k in ("steps", "tokens_seen", "before", "after", "folder")}}
        return export_model(cfg, session, model, arch, tokenizer=load_tokenizer(ec.checkpoint), extra=extra)
    arch = session.load_arch(ec.arch, "export.arch")
    return export_model(cfg, session, session.materialize(arch), arch)


@torch.no_grad()
def verify_round_trip(packed, folder: Path, vocab: int, seq: int = 16) -> bool:
    """Load ``folder`` back onto the packed model's device and compare their logits (must be identical)."""
    device = next(packed.parameters()).device
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0)).to(device)
    loaded = load(folder, paths=("dense",), device=device)
    same = torch.equal(packed(input_ids=ids).logits, loaded(input_ids=ids).logits)
    if not same:
        raise RuntimeError(f"{folder}: the loaded export differs from the in-memory packed model; report this as a bug")
    return same


def export(cfg) -> dict[str, Any]:
    """``archquant-export``: ``export_job`` and its summary on stdout."""
    summary = export_job(cfg)
    print(json.dumps(summary, indent=2))
    return summary
