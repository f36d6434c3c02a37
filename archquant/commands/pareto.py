"""``archquant-pareto``: collect search runs (+ reference points, + the original), evaluate and time them
together, keep the non-dominated set; writes ``pareto.json`` and ``pareto.png``."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from archquant.commands.session import Session
from archquant.core.arch import Arch
from archquant.evaluation import EvalConfig, evaluate
from archquant.latency.measure import file_timer, measure_interleaved, prepare_timer
from archquant.search.baselines import Candidate, check_baselines, prune_quantise, quantise_uniformly, room_budget
from archquant.search.pareto import (
    MEASURED_FIELDS,
    ParetoPoint,
    collect_runs,
    load_points,
    non_dominated,
    plot_front,
    resolve_metric,
    save_front,
    unique_names,
    with_measurement,
)
from archquant.utils.env import device_name, run_header
from archquant.utils.errors import MissingFileError, UserError
from archquant.utils.io import atomic_write_json

log = logging.getLogger(__name__)


def _eval_key(cfg) -> dict[str, Any]:
    """Settings a point's cached quality (``point.json``: perplexity, zero-shot) depends on; latency is not
    cached (the points are timed together on every call)."""
    return {
        "backend": cfg.latency.backend,  # the quantiser the materialised model simulates
        "ppl": [cfg.data.ppl_file, cfg.eval.ppl_seq_len, cfg.eval.ppl_max_windows],
        "zero_shot": [cfg.pareto.zero_shot, list(cfg.eval.tasks), cfg.eval.limit, cfg.eval.engine],
        "device": device_name(cfg.latency.device),
        "cached": "quality",
    }


def point_model_fn(point: ParetoPoint, session: Session):
    """A factory of the point's model (the original, or its architecture materialised), or ``None`` for a
    baseline without an architecture (it keeps what its file says)."""
    if point.source == "full":
        return lambda: session.model.eval()
    if point.arch is None:
        return None
    arch = Arch.from_dict(point.arch)
    return lambda: session.materialize(arch)


def point_eval_config(cfg) -> EvalConfig:
    """What a point's quality is: perplexity always, the zero-shot suite when ``pareto.zero_shot``."""
    tasks = list(cfg.eval.tasks) if cfg.pareto.zero_shot else []
    return dataclasses.replace(cfg.eval, perplexity=True, tasks=tasks)


def evaluate_point(point: ParetoPoint, cfg, session: Session, model_fn, cache: Path | None = None) -> ParetoPoint:
    """A point's held-out perplexity and (optionally) zero-shot accuracy; ``model_fn()`` builds its model.

    A search run folder caches these in ``point.json`` (reused when ``_eval_key`` matches; the model is then
    not built); ``cache`` names another file. Latency is measured by ``pareto_job``, all points together.
    """
    key = _eval_key(cfg)
    if point.source == "preset":
        key = {**key, "engine": "llama.cpp", "gguf_bytes": point.extra.get("gguf_bytes")}
    cache = cache or (Path(point.run_dir) / "point.json" if point.run_dir else None)
    if cache is not None and cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            log.info("%s: quality from %s", point.name, cache)
            return dataclasses.replace(point, **saved["values"])
    res = evaluate(model_fn(), session.tokenizer, point_eval_config(cfg), cfg.data, model_name=point.name)
    quality: dict[str, Any] = {"ppl": float(res["perplexity"]["ppl"])}
    if res["tasks"]:
        quality.update(zero_shot=res["tasks"], accuracy=res["summary"]["mean_headline_acc"])
    point = dataclasses.replace(point, **quality)
    log.info(
        "%s: ppl %.3f%s", point.name, point.ppl, "" if point.accuracy is None else f", accuracy {point.accuracy:.3f}"
    )
    if cache is not None:
        atomic_write_json(cache, {"key": key, "values": quality})
    return point


def _check_same_workload(points: list[ParetoPoint], cfg) -> None:
    want = {k: getattr(cfg.latency, k) for k in ("backend", "scenario", "batch", "context", "prefill_len")}
    for p in points:
        got = p.extra.get("latency") or {}
        diff = {k: (got.get(k), v) for k, v in want.items() if k in got and got.get(k) != v}
        if diff:
            pretty = ", ".join(f"latency.{k}: run has {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise UserError(
                f"{p.run_dir} was searched for another workload ({pretty}); a front compares one backend and "
                "scenario: pass the same latency.* settings or leave that run out of pareto.runs"
            )


def uniform_points(session: Session, bits_list) -> list[ParetoPoint]:
    """Reference points: the full-width model with every linear and the lm_head at ``b`` bits, per ``b``."""
    out = []
    for b in bits_list:
        b = int(b)
        if b not in session.space.wbits or b not in session.space.lm_head_bits:
            raise UserError(
                f"pareto.uniform_bits has {b}, which the space cannot express (space.wbits={list(session.space.wbits)}, "
                f"lm_head bits {list(session.space.lm_head_bits)} after the {session.cfg.latency.backend} backend's rules)"
            )
        arch = Arch.full(session.space, bits=b)
        ms, mb = session.latency_model.predict_ms(arch), session.latency_model.predict_mb(arch)
        out.append(ParetoPoint(name=f"uniform-w{b}", source="uniform", arch=arch.to_dict(), predicted_ms=ms,
                               predicted_mb=mb, memory_mb=mb))
    return out


def baseline_points(names: list[str], points: list[ParetoPoint], session: Session, cfg=None) -> list[ParetoPoint]:
    """Built-in sequential baselines (``pareto.baselines``) at the latency targets of the collected searches.

    A target nothing in a baseline's family meets is kept as a point without an architecture
    (``extra.unmet``), so ``pareto.json`` says so. ``sequential_search`` runs its 16-bit searches under
    ``<out_dir>/baselines/sequential_search`` (kept there: a rerun reuses them).
    """
    if not names:
        return []
    targets = sorted({p.budget_ms for p in points if p.source == "search" and p.budget_ms is not None})
    if not targets:
        raise UserError(f"pareto.baselines={names} compress to the searched budgets, but pareto.runs has no "
                        "search run with a latency budget")
    cands = prune_quantise(session.space, session.latency_model, targets) if "prune_quantise" in names else []
    if "sequential_search" in names:
        cands += sequential_search(cfg, session, targets)
    out = []
    for c in cands:
        extra = {"baseline": c.name.split("-w")[0], "bits": c.bits, "target_ms": c.target_ms, **c.extra}
        if c.arch is None:
            log.warning("%s: nothing in the family at %d bits meets %.4g ms", c.name, c.bits, c.target_ms)
            out.append(ParetoPoint(name=c.name, source="baseline", budget_ms=c.target_ms, extra={**extra, "unmet": True}))
            continue
        out.append(ParetoPoint(name=c.name, source="baseline", arch=c.arch.to_dict(), budget_ms=c.target_ms,
                               predicted_ms=c.predicted_ms, predicted_mb=c.predicted_mb, memory_mb=c.predicted_mb,
                               extra=extra))
    return out


def sequential_search(cfg, session: Session, targets: list[float]) -> list[Candidate]:
    """Search then quantise: per target and quantised bit-width, a search with every bits gate at 16 under the
    budget that leaves room for that bit-width (``baselines.room_budget``), then uniform quantisation. The same
    search settings as the joint searches (steps, reference check)."""
    from archquant.commands.search import search_job

    if cfg is None:
        raise UserError("pareto.baselines=[sequential_search] needs the run's config to search")
    bits_list = sorted({int(b) for b in session.space.wbits if int(b) < 16}, reverse=True)
    if not bits_list:
        raise UserError("sequential_search quantises after searching, but space.wbits has no bit-width below 16")
    s16 = session.with_space(dataclasses.replace(cfg.space, wbits=[16], lm_head_bits=[16]))
    rng16 = s16.feasible()
    root = Path(cfg.out_dir) / "baselines" / "sequential_search"
    lm = session.latency_model
    out = []
    for b in bits_list:
        for t in targets:
            name = f"sequential_search-w{b}@{t:g}ms"
            room = room_budget(session.space, lm, t, b)
            extra = {"search_budget_ms": round(room, 4)}
            if room < rng16.min_ms:
                out.append(Candidate(name, float(t), b, None, extra=extra))
                continue
            folder = root / f"w{b}_{t:g}ms"
            if room >= rng16.max_ms:  # the full 16-bit shape leaves room: nothing to search
                arch16 = Arch.full(s16.space)
            elif (folder / "arch.json").exists() and (folder / "search.json").exists():
                arch16 = Arch.load(folder / "arch.json")
            else:
                log.info("%s: 16-bit search at %.4g ms -> %s", name, room, folder)
                sub = dataclasses.replace(s16.cfg, budget=dataclasses.replace(cfg.budget, latency_ms=room, memory_mb=None),
                                          resume=None)
                arch16 = search_job(sub, session=s16, out_dir=folder, resume=(folder / "checkpoints").is_dir(),
                                    progress=False).arch
            arch = quantise_uniformly(session.space, arch16, b)
            ms = lm.predict_ms(arch)
            extra["meets_target"] = bool(ms <= t * (1 + 1e-6))
            out.append(Candidate(name, float(t), b, arch, ms, lm.predict_mb(arch), extra=extra))
    return out


def preset_points(cfg, session: Session) -> list[ParetoPoint]:
    """llama.cpp's own presets of the original model (``pareto.presets``), made once per model into the cache
    (``$ARCHQUANT_CACHE/presets/<model key>``) and reused by every run."""
    from archquant.engine.presets import ORIGINAL, preset_files

    names = cfg.pareto.resolved_presets(cfg.latency.backend)
    if not names:
        return []
    if ORIGINAL in names and session.gguf_source() is None:
        log.info("pareto.presets: %s was not loaded from a GGUF file, so there is no 'original' file to time",
                 cfg.model.name)
        names = [n for n in names if n != ORIGINAL]
    from archquant.latency.loader import model_slug
    from archquant.utils.paths import cache_dir

    # shared by every run of this model: the F32 source (~0.5 GB for SmolLM2) and the presets are made once
    folder = cache_dir() / "presets" / model_slug(cfg.model.name)
    files = preset_files(session.model, folder, names, source_gguf=session.gguf_source(),
                         tokenizer=session.tokenizer, threads=cfg.trainer.num_threads or 0, log=log.info)
    return [ParetoPoint(name=n if n == ORIGINAL else f"preset-{n}", source="preset", memory_mb=p.stat().st_size / 1e6,
                        extra={"preset": n, "gguf": str(p), "gguf_bytes": p.stat().st_size})
            for n, p in files.items()]


def _preset_model(point: ParetoPoint, cfg):
    """llama.cpp's logits of a preset file, as a module ``evaluate`` can score (closed by the caller)."""
    from archquant.engine.llamacpp import open_gguf_lm

    return open_gguf_lm(point.extra["gguf"], seq_len=cfg.eval.ppl_seq_len, n_threads=cfg.trainer.num_threads or 2)


def pareto_job(cfg, *, session: Session | None = None) -> tuple[list[ParetoPoint], list[ParetoPoint]]:
    """Collect search runs (+ baselines, + the original model), evaluate them, keep the non-dominated set.

    Writes ``pareto.json`` and ``pareto.png`` at ``<out_dir>/<pareto.output>``.

    Returns:
        ``(points, front)``.
    """
    if not cfg.pareto.runs and not cfg.pareto.baselines:
        raise UserError(
            "pareto.runs is empty: pass the search folders to collect, e.g. "
            "archquant-pareto 'pareto.runs=[multirun/archquant-search/2026-01-01_12-00-00]'"
        )
    builtin = check_baselines(cfg.pareto.baselines)
    points = collect_runs(cfg.pareto.runs)
    for path in (b for b in cfg.pareto.baselines if b not in builtin):  # a file's figures are its own: no twin link
        points += [dataclasses.replace(p, source="baseline", extra={k: v for k, v in p.extra.items() if k != "same_arch_as"})
                   for p in load_points(path)]
    if not points:
        raise MissingFileError(f"no completed search run (search.json + arch.json) under pareto.runs={list(cfg.pareto.runs)}")
    _check_same_workload(points, cfg)
    session = session or Session.load(cfg)
    for p in points:
        if p.arch is not None:
            Arch.from_dict(p.arch).check(session.space)  # refuses runs made for another model
    if cfg.pareto.include_full:
        full = Arch.full(session.space)
        points.append(
            ParetoPoint(
                name="full",
                source="full",
                predicted_ms=session.latency_model.predict_ms(full),
                predicted_mb=session.latency_model.predict_mb(full),
                memory_mb=session.latency_model.predict_mb(full),
            )
        )
    points += uniform_points(session, cfg.pareto.uniform_bits)
    points += baseline_points(builtin, points, session, cfg)
    points += preset_points(cfg, session)
    unique_names(points)
    t0 = time.perf_counter()
    # one evaluation per distinct architecture: two budgets that found the same subnet must not get
    # two different figures from noise; twins copy their source's
    first_of: dict[str, int] = {}
    twin_of: dict[int, int] = {}
    timers: dict[str, Any] = {}
    context = {"tokenizer": session.tokenizer, "source_gguf": session.gguf_source()}
    with tempfile.TemporaryDirectory(prefix="archquant-pareto-") as workdir:
        for i, p in enumerate(points):
            key = json.dumps(p.arch, sort_keys=True) if p.arch is not None else None
            if key is not None and key in first_of:
                twin_of[i] = first_of[key]
                continue
            if key is not None:
                first_of[key] = i
            if p.source == "preset":
                lm = _preset_model(p, cfg)
                try:
                    points[i] = evaluate_point(p, cfg, session, lambda lm=lm: lm,
                                               cache=Path(p.extra["gguf"]).with_suffix(".point.json"))
                finally:
                    lm.runner.close()
                if cfg.pareto.measure:
                    timers[p.name] = file_timer(p.extra["gguf"], cfg.latency)
                continue
            fn = point_model_fn(p, session)
            if fn is None:
                continue
            built = functools.lru_cache(maxsize=1)(fn)  # evaluation and a llama.cpp export share one model
            points[i] = evaluate_point(p, cfg, session, built)
            if cfg.pareto.measure:
                model = built() if built.cache_info().currsize else None
                timers[p.name] = prepare_timer(fn, cfg.latency, Path(workdir) / f"{i:03d}", model=model, **context)
            built.cache_clear()
        if timers:
            log.info("timing %d points in %d interleaved rounds (%s)", len(timers), cfg.pareto.timing_rounds,
                     cfg.latency.backend)
            pc = cfg.pareto
            measured = measure_interleaved(timers, pc.timing_rounds, progress=cfg.eval.progress,
                                           max_rounds=pc.timing_max_rounds, ci=pc.timing_ci,
                                           confidence=pc.timing_confidence)
            for i, p in enumerate(points):
                m = measured.get(p.name)
                if m is not None:
                    points[i] = with_measurement(p, m)
                    log.info("%s: latency %.3f ms (measured; interval %s)", p.name, m.ms, m.ci_ms)
    for i, j in twin_of.items():
        src = points[j]
        fields = MEASURED_FIELDS + ("ppl", "accuracy", "zero_shot")
        points[i] = dataclasses.replace(points[i], **{f: getattr(src, f) for f in fields},
                                        extra={**points[i].extra, "same_arch_as": src.name})
    metric = resolve_metric(points, "auto")
    front = non_dominated(points, metric)
    out = Path(cfg.out_dir) / cfg.pareto.output
    latency = dataclasses.asdict(cfg.latency)
    save_front(
        out, points, front, metric=metric, latency=latency,
        header=run_header(cfg.latency.device, eval_wall_s=round(time.perf_counter() - t0, 1)),
    )
    plot_front(out.with_suffix(".png"), points, front, metric=metric, latency=latency, device=device_name(cfg.latency.device))
    log.info("Pareto front (%s): %s -> %s", metric, [p.name for p in front], out)
    return points, front
