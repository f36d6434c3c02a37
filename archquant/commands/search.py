"""The search-side commands: ``archquant-search``, ``-pareto``, ``-pick`` and the main job ``archquant-run``.

Each command is a Python verb taking the validated root ``Config`` (``search_job``, ``pareto_job``,
``pick_job``, ``main_job``, which raise on bad input); ``search``, ``pareto``, ``pick`` and ``run`` are
the same verbs as ``archquant.cli`` calls them, turning a user error into a one-line exit message.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from archquant.search.budget import BudgetError
from archquant.search.loop import SEARCH_RECORD_VERSION, SearchResult, SearchSetupError, run_search
from archquant.search.pareto import (
    ParetoPoint,
    collect_runs,
    load_points,
    non_dominated,
    plot_front,
    resolve_metric,
    save_front,
    unique_names,
)
from archquant.latency.measure import measure_interleaved, prepare_timer
from archquant.search.pick import PickResult, pick_point
from archquant.training.checkpoint import ResumeMismatchError, config_identity
from archquant.training.loop import NonFiniteLossError
from archquant.utils.env import device_name, run_header
from archquant.utils.io import atomic_write_json

log = logging.getLogger(__name__)

# config keys that do not change a search's trajectory: a resume may differ in them
IDENTITY_IGNORE = (
    "out_dir",
    "resume",
    "logger",
    "eval",
    "slo",
    "pareto",
    "run",
    "extras",
    "trainer.num_threads",
    "search.checkpoint_every",
    "search.keep_checkpoints",
    "latency.min_run_time",
    "latency.e2e_repeats",
    "latency.out",
)


def search_identity(cfg) -> dict[str, Any]:
    """The flattened config a search checkpoint must agree with on resume."""
    return config_identity(cfg, IDENTITY_IGNORE)


# ---- archquant-search -------------------------------------------------------------------------------
def search_job(cfg, *, ctx=None, out_dir: str | Path | None = None, resume: bool | None = None, progress: bool = True) -> SearchResult:
    """One search under ``cfg.budget``; writes ``arch.json``, ``search.json`` and ``checkpoints/``.

    Args:
        cfg: the root ``Config``.
        ctx: a loaded ``SearchContext`` to reuse (the main job's ladder shares one).
        out_dir: run folder (default ``cfg.resume`` or ``cfg.out_dir``).
        resume: continue from the folder's checkpoint (default: ``cfg.resume`` is set).
        progress: progress bar.

    Raises:
        BudgetError: an infeasible or pointless budget (before any training), with the feasible range.
        ResumeMismatchError: the resume folder was made with another config (differing keys named).
        NonFiniteLossError: NaN/inf loss (step named; the last good checkpoint is kept).
    """
    from archquant.commands.session import SearchContext
    from archquant.training import make_fabric, make_loggers

    out = Path(out_dir or cfg.resume or cfg.out_dir)
    resume = cfg.resume is not None if resume is None else resume
    if resume and not (out / "checkpoints").is_dir():
        raise FileNotFoundError(f"resume={out}: no checkpoints/ folder there (is it an archquant-search run folder?)")
    # Fabric first: with several processes, launching re-runs this command in the others
    fabric = make_fabric(cfg.trainer, make_loggers(cfg.logger, out, "search"))
    ctx = ctx or SearchContext.load(cfg)
    rng = ctx.check_budget(cfg.budget)  # before any training
    log.info(
        "feasible: %.3g-%.3g ms, %.3g-%.3g MB (%s); budget: latency %s ms, memory %s MB",
        rng.min_ms, rng.max_ms, rng.min_mb, rng.max_mb, ctx.where(), cfg.budget.latency_ms, cfg.budget.memory_mb,
    )
    calib, val = ctx.targets()
    sn = ctx.build_supernet()
    result = run_search(
        sn,
        ctx.latency_model,
        calib,
        cfg.search,
        cfg.budget,
        out,
        fabric=fabric,
        identity=search_identity(cfg),
        resume=resume,
        val=val,
        progress=progress,
    )
    if not fabric.is_global_zero:
        return result
    write_search_record(out, cfg, ctx, rng, result)
    verdict = "meets" if result.meets_budget else "DOES NOT meet"
    log.info(
        "search done (%s, %d steps): %s; predicted %.3f ms, %.2f MB, %s the budget -> %s",
        result.stop_reason, result.steps, result.arch.summary(), result.predicted_ms, result.predicted_mb, verdict,
        out / "arch.json",
    )
    return result


def write_search_record(out: Path, cfg, ctx, rng, result: SearchResult) -> None:
    """``arch.json`` (the decisions) and ``search.json`` (config, space, history, open gates, step times)."""
    result.arch.save(out / "arch.json")
    steps = [h["step_s"] for h in result.history]
    atomic_write_json(
        out / "search.json",
        {
            "version": SEARCH_RECORD_VERSION,
            "header": run_header(cfg.latency.device),
            "config": dataclasses.asdict(cfg),
            "budget": dataclasses.asdict(cfg.budget),
            "feasible": rng.to_dict(),
            "space": {**ctx.space.to_dict(), "describe": ctx.space.describe()},
            "latency_model": ctx.latency_model.describe() if hasattr(ctx.latency_model, "describe") else None,
            "result": result.summary(),
            "step_time_s": {
                "first": steps[0] if steps else None,
                "last": steps[-1] if steps else None,
                "mean": sum(steps) / len(steps) if steps else None,
            },
            "open_gates": [[h["step"], h["open_gates"]] for h in result.history if h.get("fixed_now") or h["step"] == 0],
            "fixed": result.fixed,
            "history": result.history,
        },
    )


# ---- archquant-pareto -------------------------------------------------------------------------------
def _eval_key(cfg) -> dict[str, Any]:
    """Settings a point's cached quality (``point.json``: perplexity, zero-shot) depends on; latency is not
    cached (the points are timed together on every call)."""
    return {
        "backend": cfg.latency.backend,  # the quantiser the materialised model simulates
        "ppl": [cfg.data.ppl_file, cfg.eval.ppl_seq_len, cfg.eval.ppl_max_windows],
        "zero_shot": [cfg.pareto.zero_shot, list(cfg.eval.tasks), cfg.eval.limit],
        "device": device_name(cfg.latency.device),
        "cached": "quality",
    }


def point_model_fn(point: ParetoPoint, ctx, supernet):
    """A factory of the point's model (the original, or its architecture materialised), or ``None`` for a
    baseline without an architecture (it keeps what its file says)."""
    if point.source == "full":
        return lambda: ctx.model.eval()
    if point.arch is None:
        return None
    from archquant.supernet import materialize
    from archquant.core.arch import Arch

    arch = Arch.from_dict(point.arch)
    return lambda: materialize(supernet, arch).eval()


def evaluate_point(point: ParetoPoint, cfg, ctx, model_fn) -> ParetoPoint:
    """A point's held-out perplexity and (optionally) zero-shot accuracy; ``model_fn()`` builds its model.

    A search run folder caches these in ``point.json`` (reused when ``_eval_key`` matches; the model is then
    not built). Latency is measured by ``pareto_job``, all points together.
    """
    from archquant.data import resolve_data_path
    from archquant.evaluation.perplexity import perplexity

    key = _eval_key(cfg)
    cache = Path(point.run_dir) / "point.json" if point.run_dir else None
    if cache is not None and cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            log.info("%s: quality from %s", point.name, cache)
            return dataclasses.replace(point, **saved["values"])
    model = model_fn()
    quality: dict[str, Any] = {}
    ppl = perplexity(
        model,
        ctx.tokenizer,
        resolve_data_path(cfg.data, "ppl_file"),
        seq_len=cfg.eval.ppl_seq_len,
        max_windows=cfg.eval.ppl_max_windows,
        batch_size=cfg.eval.ppl_batch_size,
    )
    quality["ppl"] = float(ppl["ppl"])
    if cfg.pareto.zero_shot and cfg.eval.tasks:
        from archquant.evaluation.zero_shot import headline_mean, zero_shot

        res = zero_shot(
            model, ctx.tokenizer, cfg.eval.tasks, cfg.eval.limit, cfg.eval.batch_size, data_cfg=cfg.data,
            progress=cfg.eval.progress,
        )
        quality.update(zero_shot=res, accuracy=headline_mean(res))
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
            raise ValueError(
                f"{p.run_dir} was searched for another workload ({pretty}); a front compares one backend and "
                "scenario: pass the same latency.* settings or leave that run out of pareto.runs"
            )


def uniform_points(ctx, bits_list) -> list[ParetoPoint]:
    """Reference points: the full-width model with every linear and the lm_head at ``b`` bits, per ``b``."""
    from archquant.core.arch import Arch

    out = []
    for b in bits_list:
        b = int(b)
        if b not in ctx.space.wbits or b not in ctx.space.lm_head_bits:
            raise ValueError(
                f"pareto.uniform_bits has {b}, which the space cannot express (space.wbits={list(ctx.space.wbits)}, "
                f"lm_head bits {list(ctx.space.lm_head_bits)} after the {ctx.cfg.latency.backend} backend's rules)"
            )
        arch = Arch.full(ctx.space, bits=b)
        ms, mb = ctx.latency_model.predict_ms(arch), ctx.latency_model.predict_mb(arch)
        out.append(ParetoPoint(name=f"uniform-w{b}", source="uniform", arch=arch.to_dict(), predicted_ms=ms,
                               predicted_mb=mb, memory_mb=mb))
    return out


def pareto_job(cfg, *, ctx=None) -> tuple[list[ParetoPoint], list[ParetoPoint]]:
    """Collect search runs (+ baselines, + the original model), evaluate them, keep the non-dominated set.

    Writes ``pareto.json`` and ``pareto.png`` at ``<out_dir>/<pareto.output>``.

    Returns:
        ``(points, front)``.
    """
    from archquant.commands.session import SearchContext
    from archquant.core.arch import Arch

    if not cfg.pareto.runs and not cfg.pareto.baselines:
        raise ValueError(
            "pareto.runs is empty: pass the search folders to collect, e.g. "
            "archquant-pareto 'pareto.runs=[multirun/search/2026-01-01_12-00-00]'"
        )
    points = collect_runs(cfg.pareto.runs)
    for path in cfg.pareto.baselines:  # a baseline's figures are its own: no twin link from the file it came from
        points += [dataclasses.replace(p, source="baseline", extra={k: v for k, v in p.extra.items() if k != "same_arch_as"})
                   for p in load_points(path)]
    if not points:
        raise FileNotFoundError(f"no completed search run (search.json + arch.json) under pareto.runs={list(cfg.pareto.runs)}")
    _check_same_workload(points, cfg)
    ctx = ctx or SearchContext.load(cfg)
    for p in points:
        if p.arch is not None:
            Arch.from_dict(p.arch).check(ctx.space)  # refuses runs made for another model
    if cfg.pareto.include_full:
        full = Arch.full(ctx.space)
        points.append(
            ParetoPoint(
                name="full",
                source="full",
                predicted_ms=ctx.latency_model.predict_ms(full),
                predicted_mb=ctx.latency_model.predict_mb(full),
                memory_mb=ctx.latency_model.predict_mb(full),
            )
        )
    points += uniform_points(ctx, cfg.pareto.uniform_bits)
    unique_names(points)
    supernet = ctx.build_supernet() if any(p.arch is not None for p in points) else None
    t0 = time.perf_counter()
    # one evaluation per distinct architecture: two budgets that found the same subnet must not get
    # two different figures from noise; twins copy their source's
    first_of: dict[str, int] = {}
    twin_of: dict[int, int] = {}
    timers: dict[str, Any] = {}
    context = {"tokenizer": ctx.tokenizer, "source_gguf": ctx.gguf_source()}
    with tempfile.TemporaryDirectory(prefix="archquant-pareto-") as workdir:
        for i, p in enumerate(points):
            key = json.dumps(p.arch, sort_keys=True) if p.arch is not None else None
            if key is not None and key in first_of:
                twin_of[i] = first_of[key]
                continue
            if key is not None:
                first_of[key] = i
            fn = point_model_fn(p, ctx, supernet)
            if fn is None:
                continue
            built = functools.lru_cache(maxsize=1)(fn)  # evaluation and a llama.cpp export share one model
            points[i] = evaluate_point(p, cfg, ctx, built)
            if cfg.pareto.measure:
                model = built() if built.cache_info().currsize else None
                timers[p.name] = prepare_timer(fn, cfg.latency, Path(workdir) / f"{i:03d}", model=model, **context)
            built.cache_clear()
        if timers:
            log.info("timing %d points in %d interleaved rounds (%s)", len(timers), cfg.pareto.timing_rounds,
                     cfg.latency.backend)
            measured = measure_interleaved(timers, cfg.pareto.timing_rounds, progress=cfg.eval.progress)
            for i, p in enumerate(points):
                m = measured.get(p.name)
                if m is not None:
                    points[i] = dataclasses.replace(
                        p, measured_ms=m.ms, measured_by=m.method, extra={**p.extra, "measurement": m.to_dict()})
                    log.info("%s: latency %.3f ms (measured)", p.name, m.ms)
    for i, j in twin_of.items():
        src = points[j]
        fields = ("measured_ms", "measured_by", "ppl", "accuracy", "zero_shot")
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


# ---- archquant-pick ---------------------------------------------------------------------------------
def pick_job(cfg) -> PickResult:
    """The most accurate point of ``slo.front`` meeting ``slo.latency_ms``; writes ``picked.json``."""
    if cfg.slo.latency_ms is None:
        raise ValueError("set the latency SLO to pick for, e.g. archquant-pick slo.latency_ms=8 slo.front=<pareto.json>")
    front = cfg.slo.front or str(Path(cfg.out_dir) / "pareto.json")
    points = load_points(front)
    res = pick_point(points, cfg.slo.latency_ms, cfg.slo.metric)
    atomic_write_json(
        Path(cfg.out_dir) / cfg.slo.output, {"version": 1, "header": run_header(), "front": str(front), **res.to_dict()}
    )
    (log.info if res.met else log.warning)("%s", res.message)
    return res


# ---- CLI wrappers -----------------------------------------------------------------------------------
def _user_errors() -> tuple[type[BaseException], ...]:
    from archquant.backends import BackendError
    from archquant.core.arch import ArchError
    from archquant.core.space import SpaceError

    errors: list[type[BaseException]] = [
        BudgetError, ResumeMismatchError, NonFiniteLossError, SearchSetupError, FileExistsError, FileNotFoundError,
        BackendError, ArchError, SpaceError,
    ]
    try:
        from archquant.latency import TableError

        errors.append(TableError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _cli(verb: str, fn):
    @functools.wraps(fn)
    def wrapper(cfg):
        try:
            return fn(cfg)
        except _user_errors() as err:
            raise SystemExit(f"archquant-{verb}: {err}") from err

    wrapper.__doc__ = f"``archquant-{verb}``: ``{fn.__name__}`` with user errors turned into an exit message."
    return wrapper


def _main_job(cfg):
    from archquant.commands.run import main_job

    return main_job(cfg)


search = _cli("search", search_job)
pareto = _cli("pareto", pareto_job)
pick = _cli("pick", pick_job)
run = _cli("run", _main_job)
