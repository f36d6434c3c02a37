"""``archquant-distill``: materialise a chosen arch, distil it (KD + QAT, optional LoRA), save the result.

Writes ``<run>/<distill.output>/``: ``config.json`` + ``model.safetensors`` (raw weights of the
``ArchQuantForCausalLM``, adapters merged), tokenizer files, ``arch.json`` and ``distill.json`` (held-out
KD and perplexity before and after, steps, tokens seen, timings). ``archquant-export
export.checkpoint=<that folder>`` exports it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from archquant.commands.session import Session
from archquant.core.arch import Arch
from archquant.data import resolve_data_path
from archquant.distill.loop import DistillLoop
from archquant.distill.lora import add_lora, merge_lora
from archquant.evaluation.perplexity import perplexity
from archquant.models.hetero import ArchQuantForCausalLM
from archquant.training import make_fabric, make_loggers
from archquant.training.checkpoint import config_identity
from archquant.utils.env import run_header
from archquant.utils.errors import MissingFileError
from archquant.utils.io import atomic_write_json

log = logging.getLogger(__name__)

DISTILL_RECORD_VERSION = 1
# keys that do not change the trajectory: a resume may differ in them
_IDENTITY_IGNORE = ("distill.checkpoint_every", "distill.keep_checkpoints", "distill.eval_every", "distill.ppl_windows",
                    "distill.output")


def distill_identity(cfg, arch: Arch) -> dict[str, Any]:
    """The settings a distillation checkpoint must agree with on resume: the config that shapes the trajectory
    and the subnet itself (a checkpoint of another subnet is refused, whatever file its arch came from)."""
    ident = config_identity({"distill": cfg.distill, "model": cfg.model, "data": cfg.data, "space": cfg.space,
                             "backend": cfg.latency.backend})
    ident = {k: v for k, v in ident.items() if not any(k == p or k.startswith(p + ".") for p in _IDENTITY_IGNORE)}
    ident.pop("distill.arch", None)  # the path may move; the subnet it names is compared below
    return {**ident, "subnet": json.dumps(arch.to_dict(), sort_keys=True)}


def _ppl_text(model, tokenizer, cfg) -> dict[str, Any] | None:
    if cfg.distill.ppl_windows <= 0:
        return None
    res = perplexity(model, tokenizer, resolve_data_path(cfg.data, "ppl_file"), seq_len=cfg.eval.ppl_seq_len,
                     max_windows=cfg.distill.ppl_windows, batch_size=2)
    return {"ppl": res["ppl"], "tokens": res["tokens"], "source": res.get("source")}


def run_distill(cfg, *, session: Session | None = None, arch: Arch | None = None, out_dir: str | Path | None = None,
                resume: bool | None = None, progress: bool = True) -> dict[str, Any]:
    """The Python verb behind ``archquant-distill``; returns the ``distill.json`` record.

    Args:
        cfg: the root ``Config`` (``distill.*`` for the loop; ``distill.arch`` unless ``arch`` is given).
        session: a loaded ``Session`` (the main job passes its own; default: load ``model.name``).
        arch: the subnet to distil (default: read ``distill.arch``).
        out_dir: run folder (default ``cfg.resume`` or ``cfg.out_dir``).
        resume: continue from the folder's checkpoint (default: ``cfg.resume`` is set).
    """
    record, _ = distill_subnet(cfg, session=session, arch=arch, out_dir=out_dir, resume=resume, progress=progress)
    return record


def distill_subnet(cfg, *, session: Session | None = None, arch: Arch | None = None,
                   out_dir: str | Path | None = None, resume: bool | None = None,
                   progress: bool = True) -> tuple[dict[str, Any], nn.Module]:
    """Distil ``arch`` (materialised from the session's model) and save it; returns ``(record, model)``."""
    dc = cfg.distill
    resume = cfg.resume is not None if resume is None else resume
    run_dir = Path(out_dir or (cfg.resume if cfg.resume is not None else cfg.out_dir))
    t0 = time.perf_counter()
    fabric = make_fabric(cfg.trainer, make_loggers(cfg.logger, run_dir, "distill"))
    session = session or Session.load(cfg)
    arch = arch if arch is not None else session.load_arch(dc.arch, "distill.arch")
    student = session.materialize(arch)
    log.info("subnet: %s", arch.summary())
    calib_ids = session.calib_ids()
    targets = session.teacher_targets("calib", dc.teacher_topk, dc.kd_temperature)
    val = session.teacher_targets("val", dc.teacher_topk, dc.kd_temperature)
    if dc.lora.enabled:
        student = add_lora(student, dc.lora.rank, dc.lora.alpha, list(dc.lora.targets))
    loop = DistillLoop(fabric, student, targets, dc, run_dir, identity=distill_identity(cfg, arch),
                       teacher=session.model if dc.hidden_weight > 0 else None, val=val, progress=progress)
    before = {"heldout": loop.evaluate(), "text": _ppl_text(student, session.tokenizer, cfg)}
    loop.prepare(resume)
    steps = loop.fit()
    after = {"heldout": loop.evaluate()}
    final = merge_lora(student) if dc.lora.enabled else student
    final.eval()
    after["text"] = _ppl_text(final, session.tokenizer, cfg)
    if dc.lora.enabled:
        after["heldout_merged"] = _merged_eval(loop, final)
    out = run_dir / dc.output
    record = {
        "version": DISTILL_RECORD_VERSION,
        "header": run_header(cfg.latency.device),
        "arch": arch.summary(),
        "model": cfg.model.name,
        "backend": cfg.latency.backend,
        "steps": steps,
        "tokens_seen": steps * dc.batch_size * int(calib_ids.shape[1]),
        "heldout_blocks": int(val.ids.shape[0]),
        "before": before,
        "after": after,
        "lora": dataclasses.asdict(dc.lora),
        "config": dataclasses.asdict(dc),
        "resumed_from": None if loop.resumed_from is None else str(loop.resumed_from),
        "wall_s": time.perf_counter() - t0,
        "folder": str(out),
    }
    if fabric.is_global_zero:
        save_distilled(final, session.tokenizer, arch, out, record)
    fabric.barrier()
    b, a = before["heldout"], after["heldout"]
    log.info("held-out KD %.4f -> %.4f, perplexity %.3f -> %.3f after %d steps (%d tokens); saved %s",
             b["kd"], a["kd"], b["ppl"], a["ppl"], steps, record["tokens_seen"], out)
    return record, final


def _merged_eval(loop, merged) -> dict[str, float]:
    """Held-out metrics of the merged model (equal to the adapter model's: adapters are merged pre-quantiser)."""
    saved = loop.student
    loop.student = merged
    try:
        return loop.evaluate()
    finally:
        loop.student = saved


def save_distilled(model, tokenizer, arch, out: Path, record: dict[str, Any]) -> None:
    """Write the distilled subnet folder (weights via ``save_pretrained``, no pickle)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    arch.save(out / "arch.json")
    atomic_write_json(out / "distill.json", record)


def load_distilled(folder: str | Path):
    """``(model, arch, record)`` of a folder written by ``archquant-distill``."""
    folder = Path(folder)
    missing = [f for f in ("config.json", "arch.json") if not (folder / f).is_file()]
    if missing:
        raise MissingFileError(f"{folder} is not a distilled checkpoint (missing {', '.join(missing)}); pass the "
                                "folder archquant-distill wrote (<run>/distilled)")
    model = ArchQuantForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    rec = folder / "distill.json"
    return model, Arch.load(folder / "arch.json"), (json.loads(rec.read_text()) if rec.exists() else {})


def distill(cfg) -> dict[str, Any]:
    """``archquant-distill``: ``run_distill`` and a one-line summary."""
    rec = run_distill(cfg)
    b, a = rec["before"]["heldout"], rec["after"]["heldout"]
    print(f"distilled {rec['arch']}: held-out KD {b['kd']:.4f} -> {a['kd']:.4f}, perplexity {b['ppl']:.3f} -> "
          f"{a['ppl']:.3f} ({rec['steps']} steps, {rec['tokens_seen']} tokens) -> {rec['folder']}")
    return rec
