"""``archquant-search``: one search under ``budget.*``; writes ``arch.json``, ``search.json`` and ``checkpoints/``.

``search_job(cfg)`` is the Python verb (it raises ``UserError`` subclasses on bad input; ``archquant.cli``
turns those into a one-line message); the main job calls it once per budget with its own ``Session``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from archquant.commands.session import Session
from archquant.search.loop import SEARCH_RECORD_VERSION, SearchResult, run_search
from archquant.search.objective import held_out_kd
from archquant.training import make_fabric, make_loggers
from archquant.training.checkpoint import config_identity
from archquant.utils.env import run_header
from archquant.utils.errors import MissingFileError
from archquant.utils.io import atomic_write_json

log = logging.getLogger(__name__)

# config keys that do not change a search's trajectory: a resume may differ in them
IDENTITY_IGNORE = (
    "out_dir",
    "resume",
    "logger",
    "eval",
    "search.reference_check",  # scores the result after the loop; a resumed loop is the same either way
    "search.refine_evals",
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
def search_job(cfg, *, session: Session | None = None, out_dir: str | Path | None = None, resume: bool | None = None, progress: bool = True) -> SearchResult:
    """One search under ``cfg.budget``; writes ``arch.json``, ``search.json`` and ``checkpoints/``.

    Args:
        cfg: the root ``Config``.
        session: a loaded ``Session`` to reuse (the main job's ladder shares one).
        out_dir: run folder (default ``cfg.resume`` or ``cfg.out_dir``).
        resume: continue from the folder's checkpoint (default: ``cfg.resume`` is set).
        progress: progress bar.

    Raises:
        BudgetError: an infeasible or pointless budget (before any training), with the feasible range.
        ResumeMismatchError: the resume folder was made with another config (differing keys named).
        NonFiniteLossError: NaN/inf loss (step named; the last good checkpoint is kept).
    """
    out = Path(out_dir or cfg.resume or cfg.out_dir)
    resume = cfg.resume is not None if resume is None else resume
    if resume and not (out / "checkpoints").is_dir():
        raise MissingFileError(f"resume={out}: no checkpoints/ folder there (is it an archquant-search run folder?)")
    # Fabric first: with several processes, launching re-runs this command in the others
    fabric = make_fabric(cfg.trainer, make_loggers(cfg.logger, out, "search"))
    session = session or Session.load(cfg)
    rng = session.check_budget(cfg.budget)  # before any training
    log.info(
        "feasible: %.3g-%.3g ms, %.3g-%.3g MB (%s); budget: latency %s ms, memory %s MB",
        rng.min_ms, rng.max_ms, rng.min_mb, rng.max_mb, session.where(), cfg.budget.latency_ms, cfg.budget.memory_mb,
    )
    calib, val = session.targets()
    sn = session.search_supernet()
    result = run_search(
        sn,
        session.latency_model,
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
    if cfg.search.reference_check and cfg.budget.latency_ms is not None and val is not None and len(val):
        result = check_references(result, session, cfg, val)
    write_search_record(out, cfg, session, rng, result)
    verdict = "meets" if result.meets_budget else "DOES NOT meet"
    log.info(
        "search done (%s, %d steps): %s; predicted %.3f ms, %.2f MB, %s the budget -> %s",
        result.stop_reason, result.steps, result.arch.summary(), result.predicted_ms, result.predicted_mb, verdict,
        out / "arch.json",
    )
    return result


def model_kd(model, val, temperature: float) -> float:
    """``held_out_kd`` of a materialised model, as the search scores its supernet."""
    return held_out_kd(lambda ids: model(input_ids=ids).logits, val, temperature, next(model.parameters()).device)


def check_references(result: SearchResult, session: Session, cfg, val) -> SearchResult:
    """Keep the searched architecture only if no simple reference meeting the budget beats it on held-out KD.

    A short search can end below a plain choice it could have made (measured: a 30-step search at exactly
    all-Q4_1's predicted latency ended at ppl 53.8 against 44.6 for all-Q4_1). The references (full width at one
    quantised bit-width; importance-pruned uniform shapes, ``search.baselines.reference_candidates``; with
    ``search.allocate_bits`` the greedy bit allocation by measured sensitivity, ``search.allocate``) and the
    searched arch are scored alike, on materialised models; the lowest KD wins and the record says so.
    """
    from archquant.search.allocate import allocate, bits_gates
    from archquant.search.baselines import reference_candidates

    temperature = cfg.search.kd_temperature
    cands = reference_candidates(session.space, session.latency_model, cfg.budget.latency_ms)
    if cfg.search.allocate_bits and bits_gates(session.space):
        greedy = allocate(session.space, session.latency_model, session.bit_sensitivity(val, temperature),
                          cfg.budget.latency_ms)
        if greedy is not None:
            cands.append(("greedy-bits", greedy))
    if not cands:
        return result
    scored = {"search": model_kd(session.materialize(result.arch), val, temperature)}
    archs = {"search": result.arch}
    for name, arch in cands:
        scored[name] = model_kd(session.materialize(arch), val, temperature)
        archs[name] = arch
    best = min(scored, key=scored.get)
    log.info("held-out KD of the searched arch vs the references meeting the budget: %s",
             ", ".join(f"{k} {v:.4f}" for k, v in scored.items()))
    refined = None
    if cfg.search.refine_evals and cfg.search.allocate_bits and bits_gates(session.space):
        refined = _refine(session, cfg, val, archs[best], scored[best])
        if refined.kd < scored[best]:
            log.info("local search from %s: held-out KD %.4f -> %.4f in %d scorings (%d moves taken)",
                     best, scored[best], refined.kd, refined.evals, len(refined.accepted))
            best = f"{best}+refined"
            archs[best], scored[best] = refined.arch, refined.kd
    if best == "search":
        return result
    arch = archs[best]
    log.info("%s (held-out KD %.4f) beats the searched arch (%.4f): it is the result", best, scored[best], scored["search"])
    lm = session.latency_model
    return dataclasses.replace(
        result, arch=arch, predicted_ms=float(lm.predict_ms(arch)), predicted_mb=float(lm.predict_mb(arch)),
        meets_budget=True, val_kd=scored[best],
        reference={"name": best, "val_kd": scored[best], "searched_val_kd": scored["search"],
                   "searched_arch": result.arch.summary(),
                   **({"refine": {"start_kd": refined.start_kd, "kd": refined.kd, "evals": refined.evals,
                                  "accepted": refined.accepted}} if refined is not None else {})},
    )


def _refine(session: Session, cfg, val, start, start_kd: float):
    """``search.allocate.refine`` from ``start`` with the session's sensitivities, scored like the references."""
    from archquant.search.allocate import refine

    temperature = cfg.search.kd_temperature
    return refine(session.space, session.latency_model, session.bit_sensitivity(val, temperature), start,
                  cfg.budget.latency_ms, lambda a: model_kd(session.materialize(a), val, temperature),
                  cfg.search.refine_evals, start_kd=start_kd)


def write_search_record(out: Path, cfg, session: Session, rng, result: SearchResult) -> None:
    """``arch.json`` (the decisions) and ``search.json`` (config, space, history, open gates, step times)."""
    result.arch.weight_types = dict((session.backend.options() or {}).get("types") or {})
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
            "space": {**session.space.to_dict(), "describe": session.space.describe()},
            "latency_model": session.latency_model.describe(),
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
