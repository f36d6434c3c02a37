"""The search: objective, temperature schedule, entropy pruner, search loop, Pareto front and SLO pick."""

from archquant.latency.measure import LatencyMeasurement, measure_latency, register_latency_meter
from archquant.search.budget import BudgetError, FeasibleRange, check_budget, feasible_range, repair_to_budget
from archquant.search.loop import ArchSearch, SearchResult, SearchSetupError, run_search
from archquant.search.objective import hinge_penalty, kd_loss
from archquant.search.pareto import ParetoPoint, collect_runs, load_points, non_dominated
from archquant.search.pick import PickResult, pick_point
from archquant.search.pruner import EntropyPruner, normalized_entropy
from archquant.search.schedule import penalty_scale, temperature
from archquant.search.teacher import TeacherTargets, cached_teacher_targets, compute_teacher_targets

__all__ = [
    "ArchSearch",
    "BudgetError",
    "EntropyPruner",
    "FeasibleRange",
    "LatencyMeasurement",
    "ParetoPoint",
    "PickResult",
    "SearchResult",
    "SearchSetupError",
    "TeacherTargets",
    "cached_teacher_targets",
    "check_budget",
    "collect_runs",
    "compute_teacher_targets",
    "feasible_range",
    "hinge_penalty",
    "kd_loss",
    "load_points",
    "measure_latency",
    "non_dominated",
    "normalized_entropy",
    "penalty_scale",
    "pick_point",
    "register_latency_meter",
    "repair_to_budget",
    "run_search",
    "temperature",
]
