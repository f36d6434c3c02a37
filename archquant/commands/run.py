"""``archquant-run``, the main job: a ladder of searches -> Pareto front -> SLO pick -> (distil, export) -> evaluate."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from archquant.utils.env import run_header
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
        raise ValueError(
            f"no budget of the ladder is feasible ({'; '.join(notes)}); the feasible range is "
            f"{rng.min_ms:.3g}-{rng.max_ms:.3g} ms: set run.budget_fractions or run.budgets_ms inside it"
        )
    return ladder, notes


def _stage(n: int, total: int, what: str) -> None:
    log.info("==== [%d/%d] %s", n, total, what)


def _evaluate_model(model, cfg, ctx) -> dict[str, Any]:
    from archquant.data import resolve_data_path
    from archquant.evaluation.perplexity import perplexity
    from archquant.evaluation.zero_shot import headline_mean, zero_shot

    out: dict[str, Any] = {}
    if cfg.eval.perplexity:
        out["perplexity"] = perplexity(
            model, ctx.tokenizer, resolve_data_path(cfg.data, "ppl_file"), seq_len=cfg.eval.ppl_seq_len,
            max_windows=cfg.eval.ppl_max_windows, batch_size=cfg.eval.ppl_batch_size,
        )
    if cfg.eval.tasks:
        res = zero_shot(
            model, ctx.tokenizer, cfg.eval.tasks, cfg.eval.limit, cfg.eval.batch_size, data_cfg=cfg.data,
            progress=cfg.eval.progress,
        )
        out["tasks"] = res
        out["mean"] = headline_mean(res)
    return out


def _distill_and_export(cfg, out: Path, chosen) -> tuple[dict[str, str], Path | None]:
    """Distil the chosen subnet (``archquant-distill``) and export it (``archquant-export``) inside the run folder.

    A failure here is recorded and logged, not raised: the evaluation of the undistilled pick still runs.
    Returns the stage notes and the distilled folder (None when not distilled).
    """
    notes: dict[str, str] = {}
    distilled: Path | None = None
    if chosen is None or chosen.arch is None:
        why = "no point was picked" if chosen is None else f"the picked point {chosen.name!r} is the original model"
        return {"distill": f"skipped: {why}", "export": "skipped: nothing to export"}, None
    if chosen.run_dir is not None:
        arch_path = Path(chosen.run_dir) / "arch.json"
    else:  # a reference point (e.g. uniform-w4): its record lives in pareto.json only
        from archquant.core.arch import Arch

        arch_path = out / "picked_arch.json"
        Arch.from_dict(chosen.arch).save(arch_path)
    if not cfg.run.distill:
        notes["distill"] = "skipped (run.distill=false)"
    else:
        folder = out / "distill"
        done = folder / cfg.distill.output / "distill.json"
        try:
            if not done.exists():
                from archquant.commands.distill import run_distill

                dcfg = dataclasses.replace(
                    cfg, out_dir=str(folder), resume=str(folder) if (folder / "checkpoints").is_dir() else None,
                    distill=dataclasses.replace(cfg.distill, arch=str(arch_path)),
                )
                run_distill(dcfg)
            distilled = folder / cfg.distill.output
            notes["distill"] = f"done: {distilled}"
        except Exception as err:  # noqa: BLE001 - later stages still run; the record says what failed
            log.exception("distillation failed")
            notes["distill"] = f"failed: {type(err).__name__}: {err}"
    if not cfg.run.export:
        notes["export"] = "skipped (run.export=false)"
    else:
        try:
            from archquant.commands.export import export_job

            ecfg = dataclasses.replace(
                cfg, out_dir=str(out), resume=None,
                export=dataclasses.replace(
                    cfg.export, arch=str(arch_path), checkpoint=None if distilled is None else str(distilled),
                    record=str(out / cfg.slo.output), out=str(out / cfg.export.out), overwrite=True,
                ),
            )
            summary = export_job(ecfg)
            notes["export"] = f"done: {summary.get('folder')} {summary.get('formats')}"
        except Exception as err:  # noqa: BLE001
            log.exception("export failed")
            notes["export"] = f"failed: {type(err).__name__}: {err}"
    for stage, note in notes.items():
        log.info("%s: %s", stage, note)
    return notes, distilled


def main_job(cfg) -> dict[str, Any]:
    """Run the main job into ``cfg.out_dir`` (or continue ``cfg.resume``); returns the ``run.json`` record.

    Layout: ``searches/latency_<ms>ms/`` (one ``archquant-search`` folder per budget), ``pareto.json``/``.png``,
    ``picked.json``, ``eval.json``, ``run.json`` (stages, timings, paths). With ``resume=<folder>``,
    finished searches are kept, interrupted ones continue from their checkpoints, and later stages rerun.
    """
    from archquant.commands.search import pareto_job, pick_job, search_job
    from archquant.commands.session import SearchContext
    from archquant.supernet import materialize
    from archquant.core.arch import Arch

    if cfg.trainer.devices != 1:
        raise ValueError(
            f"archquant-run runs on one device (trainer.devices={cfg.trainer.devices}); run multi-process searches "
            "with archquant-search trainer.devices=N and collect them with archquant-pareto"
        )
    out = Path(cfg.resume or cfg.out_dir)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    total = 5

    _stage(1, total, f"load {cfg.model.name}, latency model ({cfg.latency.backend} {cfg.latency.scenario})")
    t0 = time.perf_counter()
    ctx = SearchContext.load(cfg)
    rng = ctx.feasible()
    ladder, notes = budget_ladder(cfg, rng)
    for note in notes:
        log.warning("budget ladder: %s", note)
    ctx.targets()
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
            search_job(sub, ctx=ctx, out_dir=folder, resume=(folder / "checkpoints").is_dir())
        searches.append(str(folder))
    timings["search"] = time.perf_counter() - t0

    _stage(3, total, "Pareto front: measure latency in the backend, held-out perplexity")
    t0 = time.perf_counter()
    pcfg = dataclasses.replace(cfg, out_dir=str(out), pareto=dataclasses.replace(cfg.pareto, runs=[str(out / "searches")]))
    points, front = pareto_job(pcfg, ctx=ctx)
    timings["pareto"] = time.perf_counter() - t0

    full = next((p for p in points if p.source == "full"), None)
    slo = cfg.slo.latency_ms
    if slo is None:
        ref = full.latency_ms if full is not None and full.latency_ms is not None else rng.max_ms
        slo = round(cfg.run.slo_fraction * ref, 3)
        log.info("slo.latency_ms unset: using run.slo_fraction=%g x the full model's %.3f ms = %g ms", cfg.run.slo_fraction, ref, slo)
    scfg = dataclasses.replace(cfg, out_dir=str(out), slo=dataclasses.replace(cfg.slo, latency_ms=slo, front=str(out / cfg.pareto.output)))
    picked = pick_job(scfg)

    _stage(4, total, "distil + export the picked subnet")
    t0 = time.perf_counter()
    chosen = picked.point if picked.met else picked.fastest
    later, distilled = _distill_and_export(cfg, out, chosen)
    timings["distill_export"] = time.perf_counter() - t0

    _stage(5, total, f"evaluate the picked model and the original ({list(cfg.eval.tasks)}, limit {cfg.eval.limit})")
    t0 = time.perf_counter()
    evaluation: dict[str, Any] = {}
    if cfg.run.evaluate:
        if distilled is not None:
            from archquant.commands.distill import load_distilled

            evaluation["picked"] = {"name": f"{chosen.name} (distilled)", **_evaluate_model(load_distilled(distilled)[0], cfg, ctx)}
        elif chosen is not None and chosen.arch is not None:
            sn = ctx.build_supernet()
            model = materialize(sn, Arch.from_dict(chosen.arch)).eval()
            evaluation["picked"] = {"name": chosen.name, **_evaluate_model(model, cfg, ctx)}
        evaluation["full"] = {"name": "full", **_evaluate_model(ctx.model, cfg, ctx)}
        atomic_write_json(out / cfg.eval.output, {"version": 1, "header": run_header(), **evaluation})
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
        "evaluation": {k: {"name": v.get("name"), "ppl": (v.get("perplexity") or {}).get("ppl"), "mean": v.get("mean")} for k, v in evaluation.items()},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "files": {"pareto": str(out / cfg.pareto.output), "picked": str(out / cfg.slo.output), "eval": str(out / cfg.eval.output)},
    }
    atomic_write_json(out / "run.json", record)
    log.info("main job done in %.1f min: %s -> %s", timings["total"] / 60, picked.message, out / "run.json")
    return record
