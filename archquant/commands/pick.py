"""``archquant-pick``: the most accurate point of a Pareto front that meets a latency SLO; writes ``picked.json``.

As a command it exits with ``EXIT_SLO_UNMET`` (3) when no point meets the SLO (``picked.json`` is still written,
``met: false``), so a script can tell; README lists the exit codes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from archquant.search.pareto import ParetoPoint, load_points
from archquant.search.pick import PickResult, pick_point
from archquant.utils.env import run_header
from archquant.utils.errors import EXIT_OK, EXIT_SLO_UNMET, UserError
from archquant.utils.io import atomic_write_json

log = logging.getLogger(__name__)


def pick_points(points: list[ParetoPoint], slo_cfg, out_dir: str | Path) -> PickResult:
    """Pick for ``slo_cfg.latency_ms`` among ``points`` and write ``<out_dir>/<slo.output>`` (``picked.json``)."""
    res = pick_point(points, slo_cfg.latency_ms, slo_cfg.metric)
    atomic_write_json(Path(out_dir) / slo_cfg.output,
                      {"version": 1, "header": run_header(), "front": str(slo_cfg.front), **res.to_dict()})
    (log.info if res.met else log.warning)("%s", res.message)
    return res


def pick_job(cfg) -> PickResult:
    """The most accurate point of ``slo.front`` (a ``pareto.json``) meeting ``slo.latency_ms``; writes ``picked.json``."""
    if cfg.slo.latency_ms is None:
        raise UserError("set the latency SLO to pick for, e.g. archquant-pick slo.latency_ms=8 slo.front=<pareto.json>")
    front = cfg.slo.front or str(Path(cfg.out_dir) / "pareto.json")
    return pick_points(load_points(front), dataclasses.replace(cfg.slo, front=front), cfg.out_dir)


def pick(cfg) -> int:
    """``archquant-pick``: ``pick_job``, then the exit status (``EXIT_SLO_UNMET`` when no point meets the SLO)."""
    return EXIT_OK if pick_job(cfg).met else EXIT_SLO_UNMET
