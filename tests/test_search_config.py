"""Search-side configs: every new key is validated with a message naming it; presets compose."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from archquant.cli import CONFIG_DIR
from archquant.config import register_configs, to_object
from archquant.search.config import BudgetConfig, ParetoConfig, RunConfig, SearchConfig, SloConfig


def _compose(overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=list(overrides))
        cfg.out_dir = "."
        return to_object(cfg)


@pytest.mark.parametrize(
    "make,key",
    [
        (lambda: BudgetConfig(latency_ms=0), "budget.latency_ms"),
        (lambda: BudgetConfig(memory_mb=float("inf")), "budget.memory_mb"),
        (lambda: BudgetConfig(latency_ms=float("nan")), "budget.latency_ms"),
        (lambda: SearchConfig(steps=-1), "search.steps"),
        (lambda: SearchConfig(tau_end=0), "search.tau_end"),
        (lambda: SearchConfig(tau_start=1.0, tau_end=2.0), "search.tau_end"),
        (lambda: SearchConfig(arch_lr=float("nan")), "search.arch_lr"),
        (lambda: SearchConfig(lambda_growth=-0.1), "search.lambda_growth"),
        (lambda: SearchConfig(teacher_topk=-1), "search.teacher_topk"),
        (lambda: SearchConfig(prune_epsilon=1.0), "search.prune_epsilon"),
        (lambda: SearchConfig(keep_checkpoints=0), "search.keep_checkpoints"),
        (lambda: SloConfig(metric="speed"), "slo.metric"),
        (lambda: RunConfig(budget_fractions=[0.5, 1.5]), "run.budget_fractions"),
        (lambda: RunConfig(budgets_ms=[10, -1]), "run.budgets_ms"),
        (lambda: RunConfig(slo_fraction=0), "run.slo_fraction"),
        (lambda: ParetoConfig(timing_rounds=0), "pareto.timing_rounds"),
    ],
)
def test_bad_values_fail_naming_the_key(make, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        make()


def test_unknown_search_keys_are_refused():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        _compose(["search.tempreature=3"])
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        _compose(["run.budgets=[1,2]"])


def test_quick_preset_sizes_the_main_job_and_stays_overridable():
    cfg = _compose(["preset=quick"])
    assert cfg.search.steps == 30 and cfg.data.seq_len == 64 and cfg.eval.tasks == ["piqa", "arc_easy"]
    assert len(cfg.run.budget_fractions) == 3 and cfg.distill.steps == 20 and cfg.pareto.uniform_bits == [8, 4]
    assert _compose(["preset=quick", "search.steps=5"]).search.steps == 5
    assert _compose([]).search.steps == 150  # without the preset, the full-size defaults


def test_standard_preset_is_the_quick_job_with_longer_searches():
    quick, std = _compose(["preset=quick"]), _compose(["preset=standard"])
    assert (std.search.steps, std.search.refine_evals, std.data.num_calib_blocks, std.eval.ppl_max_windows) == (
        120, 24, 64, 40)
    # everything else is the quick job's (the same budgets, baselines, presets, distillation)
    for group in ("budget", "latency", "space", "pareto", "run", "distill", "slo", "trainer"):
        assert getattr(std, group) == getattr(quick, group), group
    assert _compose(["preset=standard", "search.steps=60"]).search.steps == 60


def test_budget_and_resume_reach_the_config():
    cfg = _compose(["budget.latency_ms=25", "budget.memory_mb=60", "search.steps=150", "resume=/tmp/x"])
    assert (cfg.budget.latency_ms, cfg.budget.memory_mb, cfg.resume) == (25.0, 60.0, "/tmp/x")
