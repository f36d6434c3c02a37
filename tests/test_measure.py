"""Timing several models together: ``measure_interleaved`` and ``prepare_timer``; the interval of a median
over rounds against its closed form, brute force and simulation; rounds that stop once the intervals settle."""

from __future__ import annotations

import itertools
import math
import random
from types import SimpleNamespace

import pytest
import torch

from archquant.latency.interval import median_interval, order_statistic_level
from archquant.latency.measure import LatencyMeasurement, measure_interleaved, prepare_timer


def _clocked(bases: dict[str, float], spell: set[int]):
    """Timers reading a shared clock: call k costs ``base + 100`` while ``k`` is in the noisy ``spell``."""
    calls: list[str] = []

    def timer(name):
        def run():
            k = len(calls)
            calls.append(name)
            return LatencyMeasurement(ms=bases[name] + (100.0 if k in spell else 0.0), method="fake")

        return run

    return {n: timer(n) for n in bases}, calls


def test_rounds_rotate_the_order_and_take_the_median():
    timers, calls = _clocked({"a": 1.0, "b": 2.0, "c": 3.0}, spell=set())
    out = measure_interleaved(timers, rounds=3)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {n: m.ms for n, m in out.items()} == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert out["b"].samples == [2.0, 2.0, 2.0] and "3 interleaved rounds" in out["b"].method
    assert out["b"].details["rounds"] == 3


def test_a_noisy_spell_hits_every_model_once_instead_of_reordering_them():
    # the machine is slow during call 1: timed one after the other, b (as fast as a) looks 100 ms slower than c
    timers, _ = _clocked({"a": 5.0, "b": 5.0, "c": 6.0}, spell={1})
    once = measure_interleaved(timers, rounds=1)
    assert once["b"].ms > once["c"].ms > once["a"].ms
    timers, _ = _clocked({"a": 5.0, "b": 5.0, "c": 6.0}, spell={3, 4, 5})  # a round's length of noise
    out = measure_interleaved(timers, rounds=3)
    assert out["a"].ms == out["b"].ms == 5.0 and out["c"].ms == 6.0


def test_rounds_below_one_are_refused():
    with pytest.raises(ValueError, match="pareto.timing_rounds"):
        measure_interleaved({"a": lambda: LatencyMeasurement(1.0, "x")}, rounds=0)


def test_llamacpp_timer_exports_once_and_times_the_file(tmp_path):
    pytest.importorskip("llama_cpp")
    from archquant.models.registry import load_model

    model, tok = load_model("tiny-llama", tiny_overrides={"num_hidden_layers": 2})
    made = []

    def model_fn():
        made.append(1)
        return model

    cfg = SimpleNamespace(backend="llamacpp", scenario="decode", batch=1, context=16, prefill_len=8)
    timer = prepare_timer(model_fn, cfg, tmp_path / "p", model=model, tokenizer=tok, tokens=3)
    assert (tmp_path / "p" / "model.gguf").exists() and made == []  # exported from the model given
    out = measure_interleaved({"p": timer, "q": timer}, rounds=2)
    assert made == [] and len(out["p"].samples) == 2 and out["p"].ms > 0
    assert out["p"].details["types"]["16"] == "F16" and "llama.cpp decode" in out["p"].method


def test_other_backends_time_a_fresh_model_each_round():
    made = []

    def model_fn():
        made.append(1)
        return torch.nn.Linear(2, 2)

    seen = []

    def meter(model, latency_cfg, **_):
        seen.append(model)
        return LatencyMeasurement(ms=1.0, method="fake meter")

    from archquant.latency.measure import _METERS, register_latency_meter

    register_latency_meter("fake-backend")(meter)
    try:
        from archquant import backends

        class Fake(backends.Backend):
            name = "fake-backend"

        backends.register_backend(Fake)
        cfg = SimpleNamespace(backend="fake-backend")
        out = measure_interleaved({"m": prepare_timer(model_fn, cfg, "/nonexistent")}, rounds=2)
        assert out["m"].ms == 1.0 and len(made) == 2 and seen[0] is not seen[1]
    finally:
        _METERS.pop("fake-backend", None)
        backends.BACKENDS.pop("fake-backend", None)


# ---- the interval of a median ----------------------------------------------------------------------
@pytest.mark.parametrize("n", range(2, 13))
def test_order_statistic_coverage_matches_brute_force_over_sign_patterns(n):
    # for a continuous distribution each sample falls below the median with probability 1/2, independently:
    # [x_(k), x_(n+1-k)] holds the median exactly when k..n-k samples fall below it
    for k in range(1, (n + 1) // 2 + 1):
        hits = sum(k <= sum(signs) <= n - k for signs in itertools.product((0, 1), repeat=n))
        assert order_statistic_level(n, k) == pytest.approx(hits / 2**n, abs=1e-15)


@pytest.mark.parametrize(
    "n,k,level",
    [(3, 1, 0.75), (5, 1, 1 - 2 / 32), (6, 1, 1 - 2 / 64), (10, 2, 1 - 22 / 1024), (15, 4, 1 - 2 * 576 / 2**15)],
)
def test_median_interval_is_the_narrowest_pair_reaching_the_confidence(n, k, level):
    xs = [float(v) for v in random.Random(n).sample(range(100), n)]
    iv = median_interval(xs, 0.95)
    s = sorted(xs)
    assert (iv.lo, iv.hi) == (s[k - 1], s[n - k]) and iv.level == pytest.approx(level)
    assert iv.median == pytest.approx(sorted(xs)[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2)
    assert iv.reached == (level >= 0.95)  # 3 and 5 rounds are too few for 95%: [min, max] at its own level
    if k + 1 <= n // 2:  # the next pair in would fall below the confidence
        assert order_statistic_level(n, k + 1) < 0.95


def test_median_interval_covers_a_skewed_median_as_often_as_it_says():
    rng = random.Random(0)
    n, trials, true_median = 9, 4000, math.exp(0.0)  # lognormal(0, 0.5): median exp(0)
    level = median_interval([1.0] * n, 0.95).level
    hits = 0
    for _ in range(trials):
        iv = median_interval([rng.lognormvariate(0.0, 0.5) for _ in range(n)], 0.95)
        hits += iv.lo <= true_median <= iv.hi
    assert level == pytest.approx(1 - 20 / 512)
    assert abs(hits / trials - level) < 4 * math.sqrt(level * (1 - level) / trials)


def test_median_interval_needs_two_samples_and_a_confidence_in_0_1():
    assert median_interval([3.0], 0.95) is None and median_interval([], 0.95) is None
    iv = median_interval([10.0, 10.3, 9.8, 10.0, 10.1, 9.9], 0.95)
    assert iv.rel_halfwidth == pytest.approx(0.3 / 10.0)  # the larger side counts
    with pytest.raises(ValueError, match="pareto.timing_confidence"):
        median_interval([1.0, 2.0], 1.0)


# ---- rounds until the intervals settle -------------------------------------------------------------
def _scripted(values: dict[str, list[float]]):
    """Timers returning their scripted values in turn (the last one repeated), and the call order."""
    calls: list[str] = []

    def timer(name):
        def run():
            k = sum(c == name for c in calls)
            calls.append(name)
            seq = values[name]
            return LatencyMeasurement(ms=seq[min(k, len(seq) - 1)], method="fake")

        return run

    return {n: timer(n) for n in values}, calls


def test_rounds_stop_as_soon_as_every_interval_is_narrow_enough():
    steady = [10.0, 10.1, 9.9, 10.05, 9.95, 10.0, 10.02]
    timers, calls = _scripted({"a": steady, "b": [2 * v for v in steady]})
    out = measure_interleaved(timers, rounds=3, max_rounds=15, ci=0.03, confidence=0.95)
    # 6 rounds: the first with a 95% interval ([min, max] of 6, level 31/32), and it lies within ±3%
    assert out["a"].details["rounds"] == 6 and len(calls) == 12 and out["a"].details["settled"]
    assert out["a"].ci_ms == (9.9, 10.1) and out["a"].ci_level == pytest.approx(1 - 2 / 64)
    assert out["a"].ms == pytest.approx(10.0) and out["b"].ci_ms == (19.8, 20.2)
    assert calls[:6] == ["a", "b", "b", "a", "a", "b"]  # still interleaved, rotated every round
    # at a confidence 3 rounds can give (75%), the minimum is enough
    timers, calls = _scripted({"a": steady, "b": steady})
    out = measure_interleaved(timers, rounds=3, max_rounds=15, ci=0.03, confidence=0.75)
    assert out["a"].details["rounds"] == 3 and out["a"].ci_level == 0.75


def test_one_scattering_model_keeps_every_model_in_rounds_up_to_the_cap():
    steady = [5.0] * 20
    scatter = [8.0, 10.0, 9.0, 8.2, 10.4, 9.5, 8.0, 10.0, 9.9, 8.1, 9.3, 10.2, 8.4, 9.7, 8.8, 9.0]
    timers, calls = _scripted({"steady": steady, "noisy": scatter})
    out = measure_interleaved(timers, rounds=3, max_rounds=9, ci=0.03, confidence=0.95)
    assert len(calls) == 18 and all(m.details["rounds"] == 9 for m in out.values())
    assert out["steady"].details["settled"] and not out["noisy"].details["settled"]
    s = sorted(scatter[:9])
    assert out["noisy"].ci_ms == (s[1], s[7]) and out["noisy"].ms == s[4]  # k=2 at n=9: level 0.961
    d = out["noisy"].to_dict()
    assert d["ci_ms"] == [s[1], s[7]] and d["ci_level"] == pytest.approx(1 - 20 / 512) and d["rounds"] == 9
    assert "9 interleaved rounds" in d["method"] and "96.1% order-statistic interval" in d["method"]


def test_without_a_cap_the_rounds_are_fixed_and_one_round_has_no_interval():
    timers, calls = _scripted({"a": [1.0, 3.0, 2.0], "b": [1.0]})
    out = measure_interleaved(timers, rounds=3)
    assert len(calls) == 6 and out["a"].ci_ms == (1.0, 3.0) and out["a"].ci_level == 0.75
    assert not out["a"].details["settled"]  # 75% < 95%: recorded as unsettled, not hidden
    once = measure_interleaved(_scripted({"a": [1.0]})[0], rounds=1, max_rounds=5, ci=0.03)
    assert once["a"].details["rounds"] == 5  # no interval from 1 round, none at 95% before 6: up to the cap
    single = measure_interleaved(_scripted({"a": [1.0]})[0], rounds=1)
    assert single["a"].ci_ms is None and single["a"].to_dict()["ci_ms"] is None


@pytest.mark.parametrize(
    "kwargs,key",
    [({"rounds": 4, "max_rounds": 3}, "pareto.timing_max_rounds"), ({"ci": 0.0}, "pareto.timing_ci"),
     ({"confidence": 1.0}, "pareto.timing_confidence")],
)
def test_bad_round_settings_are_refused_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        measure_interleaved({"a": lambda: LatencyMeasurement(1.0, "x")}, **kwargs)
