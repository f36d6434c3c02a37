"""``archquant-run``, the main job: a ladder of searches -> Pareto front -> SLO pick -> (distil, export) -> evaluate.

One ``Session`` serves every stage, and the stages hand each other objects (the picked ``Arch``, the distilled
model); the files they write (``searches/*/arch.json``, ``pareto.json``, ``picked.json``, ``distill/``,
``export/``, ``eval.json``, ``run.json``) are records, and only a resume reads them back. As a command it exits
with ``EXIT_SLO_UNMET`` (3) when no point meets the SLO, like ``archquant-pick``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from archquant.commands.distill import distill_subnet, load_distilled
from archquant.commands.export import export_model
from archquant.commands.pareto import pareto_job
from archquant.commands.pick import pick_points
from archquant.commands.search import search_job
from archquant.commands.session import Session
from archquant.core.arch import Arch
from archquant.evaluation import evaluate
from archquant.search.pareto import ParetoPoint
from archquant.training.checkpoint import ResumeMismatchError
from archquant.utils.env import run_header
from archquant.utils.errors import EXIT_OK, EXIT_SLO_UNMET, UserError
from archquant.utils.io import atomic_write_json

log = logging.getLogger(__name__)


def budget_ladder(cfg, rng) -> tuple[list[float], list[str]]:
    """The latency targets to search (ms) and notes on the ones left out.

    ``run.budgets_ms`` when set, else ``run.budget_fractions`` x the full model's predicted latency;
    targets outside the feasible range are dropped (and said), never searched.
    """
    wanted = list(cfg.run.budgets_ms) if cfg.run.budgets_ms else [f * rng.max_ms for f in cfg.run.budget_fractions]
    ladder, notes = [], []
    for b in sorted(set(round(float(x), 4) for x in wanted)):
        if b < rng.min_ms:
            notes.append(f"{b:g} ms is below the smallest subnet's predicted {rng.min_ms:.3g} ms: skipped")
        elif b > rng.max_ms:
            notes.append(f"{b:g} ms is above the full model's predicted {rng.max_ms:.3g} ms: skipped")
        else:
            ladder.append(b)
    if not ladder:
        raise UserError(
            f"no budget of the ladder is feasible ({'; '.join(notes)}); the feasible range is "
            f"{rng.min_ms:.3g}-{rng.max_ms:.3g} ms: set run.budget_fractions or run.budgets_ms inside it"
        )
    return ladder, notes


def _stage(n: int, total: int, what: str) -> None:
    log.info("==== [%d/%d] %s", n, total, what)


def _distill(cfg, session: Session, arch: Arch, folder: Path):
    """Distil ``arch`` into ``folder``, continuing its checkpoint when it is one of this subnet's."""
    if (folder / "checkpoints").is_dir():
        try:
            return distill_subnet(cfg, session=session, arch=arch, out_dir=folder, resume=True)
        except ResumeMismatchError as err:  # an interrupted distillation of the point picked before a re-timing
            log.warning("%s: %s; distilling afresh", folder, err)
            shutil.rmtree(folder)
    return distill_subnet(cfg, session=session, arch=arch, out_dir=folder, resume=False)


def _export_preset(cfg, out: Path, chosen: ParetoPoint):
    """A picked llama-quantize preset is served as llama.cpp wrote it: its GGUF, with a manifest, is the export.

    Returns ``(notes, model)`` as ``distill_and_export``; the model is llama.cpp's logits of that file.
    """
    from archquant.engine.llamacpp import open_gguf_lm
    from archquant.engine.presets import copy_preset
    from archquant.utils.manifest import write_manifest

    notes = {"distill": f"skipped: {chosen.name} is llama.cpp's own quantisation of the original (nothing to distil)"}
    if not cfg.run.export:
        notes["export"] = "skipped (run.export=false)"
    else:
        folder = out / cfg.export.out
        gguf = copy_preset(chosen.extra["gguf"], folder)
        write_manifest(folder)
        notes["export"] = f"done: {folder} {{'gguf': '{gguf.name}'}}"
    model = None
    if cfg.run.evaluate:
        model = open_gguf_lm(chosen.extra["gguf"], seq_len=cfg.eval.ppl_seq_len, n_threads=cfg.trainer.num_threads or 2)
    for stage, note in notes.items():
        log.info("%s: %s", stage, note)
    return notes, model


def distill_and_export(cfg, session: Session, out: Path, chosen: ParetoPoint | None):
    """Distil the chosen subnet and export it inside the run folder.

    A failure here is recorded and logged, not raised: the evaluation of the undistilled pick still runs.
    A distillation finished before (``distill/<output>/distill.json``) is reloaded, not redone.

    Returns:
        ``(notes, model)``: the stage notes and the model to evaluate as the pick (distilled when distillation
        ran, else the materialised subnet; None when nothing was picked or the pick is the original).
    """
    if chosen is not None and chosen.source == "preset":
        return _export_preset(cfg, out, chosen)
    if chosen is None or chosen.arch is None:
        why = "no point was picked" if chosen is None else f"the picked point {chosen.name!r} is the original model"
        return {"distill": f"skipped: {why}", "export": "skipped: nothing to export"}, None
    arch = Arch.from_dict(chosen.arch)
    notes: dict[str, str] = {}
    model, extra = None, {}
    if not cfg.run.distill:
        notes["distill"] = "skipped (run.distill=false)"
    else:
        folder = out / "distill"
        done = folder / cfg.distill.output
        try:
            if (done / "distill.json").exists():
                model, done_arch, record = load_distilled(done)
                if done_arch.to_dict() != arch.to_dict():  # a resume re-timed the front and picked another point
                    log.warning("%s holds a distillation of another subnet (%s): distilling %s afresh", folder,
                                done_arch.summary(), chosen.name)
                    shutil.rmtree(folder)
                    model = None
            if model is None:
                record, model = _distill(cfg, session, arch, folder)
            extra["distill"] = {k: record.get(k) for k in ("steps", "tokens_seen", "before", "after", "folder")}
            notes["distill"] = f"done: {done}"
        except Exception as err:  # noqa: BLE001 - later stages still run; the record says what failed
            log.exception("distillation failed")
            notes["distill"] = f"failed: {type(err).__name__}: {err}"
            model = None
    if model is None and (cfg.run.export or cfg.run.evaluate):
        model = session.materialize(arch)
    if not cfg.run.export:
        notes["export"] = "skipped (run.export=false)"
    else:
        try:
            ecfg = dataclasses.replace(cfg, out_dir=str(out), export=dataclasses.replace(
                cfg.export, record=str(out / cfg.slo.output), out=cfg.export.out, overwrite=True))  # out: under out_dir
            summary = export_model(ecfg, session, model, arch, extra=extra)
            notes["export"] = f"done: {summary.get('folder')} {summary.get('formats')}"
        except Exception as err:  # noqa: BLE001
            log.exception("export failed")
            notes["export"] = f"failed: {type(err).__name__}: {err}"
    for stage, note in notes.items():
        log.info("%s: %s", stage, note)
    return notes, model


def main_job(cfg) -> dict[str, Any]:
    """Run the main job into ``cfg.out_dir`` (or continue ``cfg.resume``); returns the ``run.json`` record.

    Layout: ``searches/latency_<ms>ms/`` (one ``archquant-search`` folder per budget), ``pareto.json``/``.png``,
    ``picked.json``, ``eval.json``, ``run.json`` (stages, timings, paths). With ``resume=<folder>``,
    finished searches are kept, interrupted ones continue from their checkpoints, and later stages rerun.
    """
    if cfg.trainer.devices != 1:
        raise UserError(
            f"archquant-run runs on one device (trainer.devices={cfg.trainer.devices}); run multi-process searches "
            "with archquant-search trainer.devices=N and collect them with archquant-pareto"
        )
    out = Path(cfg.resume or cfg.out_dir)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    total = 5

    _stage(1, total, f"load {cfg.model.name}, latency model ({cfg.latency.backend} {cfg.latency.scenario})")
    t0 = time.perf_counter()
    session = Session.load(cfg)
    rng = session.feasible()
    ladder, notes = budget_ladder(cfg, rng)
    for note in notes:
        log.warning("budget ladder: %s", note)
    session.targets()
    timings["load"] = time.perf_counter() - t0

    _stage(2, total, f"search at {len(ladder)} budgets {[f'{b:g}' for b in ladder]} ms (feasible {rng.min_ms:.3g}-{rng.max_ms:.3g} ms)")
    t0 = time.perf_counter()
    searches = []
    for i, b in enumerate(ladder):
        folder = out / "searches" / f"latency_{b:g}ms"
        sub = dataclasses.replace(cfg, budget=dataclasses.replace(cfg.budget, latency_ms=b), resume=None)
        if (folder / "arch.json").exists() and (folder / "search.json").exists():
            log.info("search %d/%d at %g ms: done before, kept (%s)", i + 1, len(ladder), b, folder)
        else:
            log.info("search %d/%d at %g ms -> %s", i + 1, len(ladder), b, folder)
            search_job(sub, session=session, out_dir=folder, resume=(folder / "checkpoints").is_dir())
        searches.append(str(folder))
    timings["search"] = time.perf_counter() - t0

    _stage(3, total, "Pareto front: measure latency in the backend, held-out perplexity")
    t0 = time.perf_counter()
    pcfg = dataclasses.replace(cfg, out_dir=str(out), pareto=dataclasses.replace(cfg.pareto, runs=[str(out / "searches")]))
    points, front = pareto_job(pcfg, session=session)
    timings["pareto"] = time.perf_counter() - t0

    full = next((p for p in points if p.source == "full"), None)
    slo = cfg.slo.latency_ms
    if slo is None:
        ref = full.latency_ms if full is not None and full.latency_ms is not None else rng.max_ms
        slo = round(cfg.run.slo_fraction * ref, 3)
        log.info("slo.latency_ms unset: using run.slo_fraction=%g x the full model's %.3f ms = %g ms", cfg.run.slo_fraction, ref, slo)
    slo_cfg = dataclasses.replace(cfg.slo, latency_ms=slo, front=str(out / cfg.pareto.output))
    picked = pick_points(points, slo_cfg, out)

    _stage(4, total, "distil + export the picked subnet")
    t0 = time.perf_counter()
    chosen = picked.point if picked.met else picked.fastest
    later, model = distill_and_export(cfg, session, out, chosen)
    timings["distill_export"] = time.perf_counter() - t0

    _stage(5, total, f"evaluate the picked model and the original ({list(cfg.eval.tasks)}, limit {cfg.eval.limit})")
    t0 = time.perf_counter()
    evaluation: dict[str, Any] = {}
    if cfg.run.evaluate:
        if model is not None:
            name = chosen.name + (" (distilled)" if later["distill"].startswith("done") else "")
            evaluation["picked"] = evaluate(model, session.tokenizer, cfg.eval, cfg.data, model_name=name)
        evaluation["full"] = evaluate(session.model, session.tokenizer, cfg.eval, cfg.data, model_name="full")
        atomic_write_json(out / cfg.eval.output, {"version": 2, "header": run_header(), **evaluation})
    timings["evaluate"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    record = {
        "version": 1,
        "header": run_header(cfg.latency.device),
        "feasible": rng.to_dict(),
        "ladder_ms": ladder,
        "ladder_notes": notes,
        "searches": searches,
        "front": [p.name for p in front],
        "slo_ms": slo,
        "picked": picked.to_dict(),
        "stages": later,
        "evaluation": {k: {"name": v["model"], "ppl": (v["perplexity"] or {}).get("ppl"),
                           "mean": v["summary"]["mean_headline_acc"]} for k, v in evaluation.items()},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "files": {"pareto": str(out / cfg.pareto.output), "picked": str(out / cfg.slo.output), "eval": str(out / cfg.eval.output)},
    }
    atomic_write_json(out / "run.json", record)
    log.info("main job done in %.1f min: %s -> %s", timings["total"] / 60, picked.message, out / "run.json")
    return record


def run(cfg) -> int:
    """``archquant-run``: ``main_job``, then the exit status (``EXIT_SLO_UNMET`` when no point meets the SLO)."""
    return EXIT_OK if main_job(cfg)["picked"]["met"] else EXIT_SLO_UNMET
