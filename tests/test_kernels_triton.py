"""Triton quantised matmuls vs their torch references; on CPU under TRITON_INTERPRET=1 (tiny shapes).

bf16 ``tl.dot`` is wrong in the interpreter (NOTES.md), so CPU runs cover fp32 and fp16; bf16 is
covered where a GPU compiles the kernels for real.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

_CUDA = torch.cuda.is_available()
_SAVED_ENV = os.environ.get("TRITON_INTERPRET")
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit decorates, i.e. at kernel import
triton = pytest.importorskip("triton")


def _load(modname: str):
    mod = importlib.import_module(modname)
    interpreted = type(next(v for k, v in vars(mod).items() if k.endswith("_kernel"))).__name__ == "InterpretedFunction"
    if not _CUDA and not interpreted:  # imported earlier without the interpreter: rebuild the jit objects
        importlib.reload(sys.modules["archquant.kernels.codes"])
        mod = importlib.reload(mod)
    return mod


wq = _load("archquant.kernels.wq_matmul.kernel")
a8 = _load("archquant.kernels.w8a8_matmul.kernel")


def _restore_env():
    if _SAVED_ENV is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _SAVED_ENV


_restore_env()  # the jit objects exist; other modules collected after this one see the usual environment


@pytest.fixture(autouse=True, scope="module")
def _interpreter_env():
    """Triton also reads the flag at launch time, so keep it set while this module's tests run."""
    if not _CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    _restore_env()

from archquant.kernels.w8a8_matmul.reference import w8a8_matmul_ref  # noqa: E402
from archquant.kernels.wq_matmul.reference import wq_matmul_ref  # noqa: E402
from archquant.quant.packing import pack_weight  # noqa: E402
from archquant.quant.reference import fake_quant_act, fake_quant_weight  # noqa: E402

DEVICE = "cuda" if _CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if _CUDA else [])
# Output tolerances relative to max |y|: fp32 sums in another order (~1e-6); fp16/bf16 round the
# output (and x, identically in both) to 11 / 8 mantissa bits.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = [(1, 64, 40), (3, 192, 72), (17, 128, 40)]  # odd M and N; K a multiple of the group
GEMV_SHAPES = SHAPES[:2]  # the GEMV serves M <= 8; M = 17 would only slow the interpreter


def _operands(m, k, n, bits, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g).to(dtype)
    pw = pack_weight(w, bits, 64)
    return x.to(DEVICE), pw.to(DEVICE), w


def _assert_close(y, ref, dtype):
    assert y.dtype == ref.dtype and y.shape == ref.shape
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= RTOL[dtype] * ref.float().abs().max().item(), err


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "m,k,n,mode", [(*s, "gemv") for s in GEMV_SHAPES] + [(*s, "tiled") for s in SHAPES]
)
def test_weight_only_matmul_matches_reference(m, k, n, mode, dtype, bits):
    x, pw, _ = _operands(m, k, n, bits, dtype)
    y = wq.wq_matmul(x, pw.qweight, pw.scales, pw.zeros, bits, 64, mode=mode)
    _assert_close(y, wq_matmul_ref(x, pw.qweight, pw.scales, pw.zeros, bits, 64), dtype)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_w8a8_matmul_matches_reference(m, k, n, dtype, bits):
    x, pw, _ = _operands(m, k, n, bits, dtype, seed=1)
    y = a8.w8a8_matmul(x, pw.qweight, pw.scales, pw.zeros, bits, 64)
    _assert_close(y, w8a8_matmul_ref(x, pw.qweight, pw.scales, pw.zeros, bits, 64), dtype)


def test_kernels_compute_the_supernet_fake_quant_forward():
    # the references are the fake-quant forward of the supernet: check that link once, in fp32
    x, pw, w = _operands(3, 192, 72, 4, torch.float32, seed=2)
    w = w.to(DEVICE)
    y16 = wq.wq_matmul(x, pw.qweight, pw.scales, pw.zeros, 4, 64, mode="tiled")
    ref16 = torch.nn.functional.linear(x, fake_quant_weight(w, 4, 64))
    torch.testing.assert_close(y16, ref16, rtol=0, atol=1e-5 * ref16.abs().max().item())
    y8 = a8.w8a8_matmul(x, pw.qweight, pw.scales, pw.zeros, 4, 64)
    ref8 = torch.nn.functional.linear(fake_quant_act(x, 8), fake_quant_weight(w, 4, 64))
    torch.testing.assert_close(y8, ref8, rtol=0, atol=1e-5 * ref8.abs().max().item())


def test_gemv_split_k_covers_a_ragged_last_split():
    # K = 192 with BK = 64 gives three K blocks; M = 3 on the interpreter's 2 "SMs" asks for two
    # splits, of 128 and 64 (the last one shorter)
    if not _CUDA:
        assert wq.gemv_split(3, 192, 40, 64, wq._num_sms(torch.device("cpu"))) == (2, 128)
    x, pw, _ = _operands(3, 192, 40, 8, torch.float32, seed=3)
    y = wq.wq_matmul(x, pw.qweight, pw.scales, pw.zeros, 8, 64, mode="gemv")
    _assert_close(y, wq_matmul_ref(x, pw.qweight, pw.scales, pw.zeros, 8, 64), torch.float32)


def test_launchers_reject_bits_and_shapes_they_cannot_run():
    x, pw, _ = _operands(1, 64, 40, 4, torch.float32)
    with pytest.raises(ValueError, match=r"Triton kernels exist for \(8, 4\)-bit"):
        wq.wq_matmul(x, pw.qweight, pw.scales, pw.zeros, 3, 64)
    with pytest.raises(ValueError, match="qweight must be int32"):
        wq.wq_matmul(x[:, :32].contiguous(), pw.qweight, pw.scales, pw.zeros, 4, 64)
    with pytest.raises(ValueError, match="mode must be"):
        wq.wq_matmul(x, pw.qweight, pw.scales, pw.zeros, 4, 64, mode="fast")


@pytest.mark.parametrize("path,abits", [("triton_gemv", 16), ("triton_tiled", 8), ("triton_w8a8", 8)])
def test_quantlinear_glue_for_triton_paths(path, abits):
    # QuantLinear's CUDA paths (bias, activation fake-quant, dtype) run here through the interpreter
    from archquant.kernels.qlinear import QuantLinear

    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(40, 128, generator=g), torch.randn(40, generator=g)
    ql = QuantLinear.from_float(w, b, wbits=4, abits=abits).to(DEVICE)
    x = torch.randn(3, 128, generator=g).to(DEVICE)
    y = ql.run_path(path, x)
    ref = ql.reference_forward(x)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
