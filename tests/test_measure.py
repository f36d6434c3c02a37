"""Timing several models together: ``measure_interleaved`` and ``prepare_timer``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

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
