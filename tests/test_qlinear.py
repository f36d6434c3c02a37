"""QuantLinear: packed storage, agreement with the supernet's fake-quant forward, path selection, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archquant.backends import Backend, BackendError, get_backend
from archquant.kernels import path_select
from archquant.kernels.qlinear import QuantLinear
from archquant.quant.reference import fake_quant_weight

# int4pack_bf16 vs the fp32 fake-quant forward: activations, per-group S and Z, and the output are
# rounded to bf16 (relative 2^-9 = 1.95e-3 each). Measured relative Frobenius error 1.8e-3..2.4e-3 on
# 1536x576 and these small layers, for 2..8 bits; bound 2.5 x 2^-9.
INT4PACK_REL_FRO = 2.5 * 2**-9
INT4PACK_REL_MAX = 8 * 2**-9  # largest element error relative to max |y|


def _layer(n=48, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g) * 0.1


def _supernet_forward(x, w, b, wbits, abits, backend="torch"):
    be = get_backend(backend)
    return F.linear(be.fake_quant_act(x, abits, wbits), be.fake_quant_weight(w, wbits, 64), b)


@pytest.fixture(autouse=True)
def _fresh_cache():
    path_select.clear_path_cache()
    yield
    path_select.clear_path_cache()


@pytest.mark.parametrize("wbits", [16, 8, 4, 3, 2])
@pytest.mark.parametrize("abits", [16, 8])
def test_dense_path_reproduces_the_fake_quant_forward_bit_for_bit(wbits, abits):
    w, b = _layer()
    ql = QuantLinear.from_float(w, b, wbits=wbits, abits=abits, group_size=64, paths=("dense",))
    x = torch.randn(2, 3, 128)  # leading dims are flattened and restored
    y = ql(x)
    assert ql.path == "dense" and y.shape == (2, 3, 48)
    assert torch.equal(y, _supernet_forward(x, w, b, wbits, abits))
    assert torch.equal(ql.dequantized_weight(), fake_quant_weight(w, wbits, 64))


@pytest.mark.parametrize("wbits", [8, 4, 3, 2])
@pytest.mark.parametrize("abits", [16, 8])
@pytest.mark.parametrize("m", [1, 5])
def test_int4pack_path_agrees_within_bf16_tolerance(wbits, abits, m):
    w, b = _layer(n=64, k=192, seed=wbits)
    ql = QuantLinear.from_float(w, b, wbits=wbits, abits=abits, paths=("int4pack_bf16",))
    x = torch.randn(m, 192, generator=torch.Generator().manual_seed(m))
    y = ql(x)
    ref = _supernet_forward(x, w, b, wbits, abits)
    assert ql.path == "int4pack_bf16" and y.dtype == torch.float32
    assert (y - ref).norm() <= INT4PACK_REL_FRO * ref.norm()
    assert (y - ref).abs().max() <= INT4PACK_REL_MAX * ref.abs().max()


def test_measured_selection_runs_a_correct_path_and_is_cached():
    w, b = _layer(n=64, k=128)
    ql = QuantLinear.from_float(w, b, wbits=4)
    x = torch.randn(1, 128)
    y = ql(x)  # measures dense vs int4pack_bf16 on this machine; either may win
    assert ql.path in ("dense", "int4pack_bf16")
    assert set(ql.last_choice.timings_ms) == {"dense", "int4pack_bf16"}
    ref = _supernet_forward(x, w, b, 4, 16)
    assert (y - ref).norm() <= INT4PACK_REL_FRO * ref.norm()
    (key,) = path_select.path_cache()
    assert (key.m_bucket, key.k, key.n, key.wbits, key.abits) == (1, 128, 64, 4, 16)
    # only the winner's derived weights are kept
    assert {k[0] for k in ql._runtime} == {ql.path}


def test_measurement_runs_outside_inference_mode_after_running_inside(monkeypatch):
    monkeypatch.setattr(path_select, "_FLUSH", {})  # the cache-flush buffer is first made inside inference mode
    w, b = _layer(n=64, k=128)
    with torch.inference_mode():
        QuantLinear.from_float(w, b, wbits=4)(torch.randn(1, 128))  # the profiler measures here
    path_select.clear_path_cache()
    assert QuantLinear.from_float(w, b, wbits=4)(torch.randn(1, 128)).shape == (1, 64)


def test_selection_picks_the_fastest_measured_path_per_shape_class(monkeypatch):
    calls = []

    def fake_measure(cands, device, m):
        calls.append((m, tuple(sorted(cands))))
        return {"dense": 1.0, "int4pack_bf16": 0.5} if m <= 4 else {"dense": 0.5, "int4pack_bf16": 1.0}

    monkeypatch.setattr(path_select, "measure", fake_measure)
    w, b = _layer(n=64, k=128)
    a = QuantLinear.from_float(w, b, wbits=4)
    c = QuantLinear.from_float(w * 2, b, wbits=4)  # same shape class: shares the decision
    a(torch.randn(1, 128))
    assert a.path == "int4pack_bf16"
    c(torch.randn(1, 128))
    a(torch.randn(3, 128))  # bucket 4
    assert c.path == "int4pack_bf16" and a.path == "int4pack_bf16"
    a(torch.randn(2, 100, 128))  # M = 200 -> bucket 256
    assert a.path == "dense"
    both = ("dense", "int4pack_bf16")
    assert calls == [(1, both), (4, both), (256, both)]
    # both paths stay ready on `a` because it runs both (decode and prefill)
    assert {k[0] for k in a._runtime} == {"dense", "int4pack_bf16"}


def test_environment_restricts_paths_where_it_applies(monkeypatch):
    monkeypatch.setattr(path_select, "measure", lambda *a: pytest.fail("a single candidate is not measured"))
    monkeypatch.setenv("ARCHQUANT_QLINEAR_PATHS", "int4pack_bf16")
    w, b = _layer(n=64)
    ql = QuantLinear.from_float(w, b, wbits=4)
    ql(torch.randn(1, 128))
    assert ql.path == "int4pack_bf16"
    # N = 40 cannot run int4pack: that layer keeps its own (single) candidate instead of failing
    q40 = QuantLinear.from_float(torch.randn(40, 128), None, wbits=4)
    q40(torch.randn(1, 128))
    assert q40.path == "dense"


def test_packed_state_round_trips_through_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    w, b = _layer(n=64, k=192)
    for wbits in (16, 8, 4, 3):
        ql = QuantLinear.from_float(w, b, wbits=wbits, abits=8, paths=("dense",))
        state = ql.packed_state()
        if wbits < 16:
            assert state["qweight"].dtype == torch.int32 and state["scales"].dtype == torch.float16
            assert state["zeros"].dtype == torch.uint8 and "weight" not in state
        safetensors_torch.save_file(state, tmp_path / f"w{wbits}.safetensors")
        loaded = safetensors_torch.load_file(tmp_path / f"w{wbits}.safetensors")
        back = QuantLinear.from_packed(loaded, paths=("dense",))
        assert (back.wbits, back.abits, back.group_size) == (wbits, 8, 64)
        assert torch.equal(back.dequantized_weight(), ql.dequantized_weight())
        x = torch.randn(4, 192)
        assert torch.equal(back(x), ql(x))
    # 4-bit storage: codes + fp16 scale + uint8 zero per 64 weights, vs 4 bytes per fp32 weight
    q4 = QuantLinear.from_float(w, None, wbits=4)
    assert q4.nbytes() - q4.qmeta.numel() * 4 == 64 * 192 // 2 + 64 * 3 * 3


def test_to_device_or_dtype_drops_derived_weights():
    w, b = _layer()
    ql = QuantLinear.from_float(w, b, wbits=8, paths=("dense",))
    ql(torch.randn(1, 128))
    assert ql._runtime
    y32 = ql(torch.ones(1, 128))
    ql.to("cpu", torch.float64)  # float buffers are cast; derived weights must not go stale
    assert not ql._runtime
    assert ql.scales.dtype == torch.float16 and ql.bias.dtype == torch.float64  # stored format kept
    y64 = ql(torch.ones(1, 128, dtype=torch.float64))
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y32)


def test_bad_bits_shapes_and_backends_fail_with_a_clear_message():
    w, b = _layer()
    with pytest.raises(BackendError, match="no kernel for 5-bit weights"):
        QuantLinear.from_float(w, b, wbits=5)
    with pytest.raises(BackendError, match="backend 'triton' has no kernel for 3-bit weights"):
        QuantLinear.from_float(w, b, wbits=3, backend="triton")
    with pytest.raises(BackendError, match="no kernel for 4-bit activations"):
        QuantLinear.from_float(w, b, wbits=4, abits=4)
    with pytest.raises(ValueError, match="group_size 48 must divide in_features 128"):
        QuantLinear.from_float(w, b, wbits=4, group_size=48)
    # a 3-bit layer has no packed kernel on CUDA: it runs the dequantised weight there (decided before any GPU use)
    ql3 = QuantLinear.from_float(w, b, wbits=3)
    assert ql3.applicable_paths(torch.device("cuda")) == ["dense"]
    assert QuantLinear.from_float(w, b, wbits=4).applicable_paths(torch.device("cuda"))[:3] == [
        "dense", "triton_gemv", "triton_tiled"]
    # torch's int4 kernel needs N % 16 == 0: forcing it on N = 40 names the paths that can run
    w40 = torch.randn(40, 128)
    with pytest.raises(BackendError, match=r"allow one of \['dense'\]"):
        QuantLinear.from_float(w40, None, wbits=4, paths=("int4pack_bf16",))(torch.randn(1, 128))
    with pytest.raises(ValueError, match=r"inputs \[\.\.\., 128\]"):
        ql3(torch.randn(1, 64))

    class Block32(Backend):
        name = "block32"

        def fake_quant_weight(self, w, bits, group_size):
            return w

    with pytest.raises(BackendError, match="quantises differently from the reference quantiser"):
        QuantLinear.from_float(w, b, wbits=4, backend=Block32())


def test_low_precision_inputs_keep_their_dtype():
    w, b = _layer(n=64)
    for path in ("dense", "int4pack_bf16"):
        ql = QuantLinear.from_float(w, b, wbits=4, paths=(path,))
        x = torch.randn(3, 128)
        for dt in (torch.bfloat16, torch.float16):
            y = ql(x.to(dt))
            ref = _supernet_forward(x.to(dt).float(), w, b, 4, 16)
            assert y.dtype == dt
            assert (y.float() - ref).norm() <= 2 * INT4PACK_REL_FRO * ref.norm()


def test_empty_input_and_int_input():
    w, b = _layer()
    ql = QuantLinear.from_float(w, b, wbits=4, paths=("dense",))
    assert ql(torch.randn(0, 128)).shape == (0, 48)
    with pytest.raises(TypeError, match="float inputs"):
        ql(torch.ones(1, 128, dtype=torch.long))
