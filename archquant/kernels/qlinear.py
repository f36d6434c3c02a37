"""QuantLinear: a linear layer holding packed group-wise weights, run by the fastest correct path.

It computes what the supernet simulates, ``F.linear(fake_quant_act(x), fake_quant_weight(W), b)``,
with the reference quantiser of ``archquant.quant``. Paths (``QuantLinear.path`` names the
one that ran last):

* ``dense`` (any device): the dequantised weight, cached, and ``F.linear`` (on CPU in fp32 whatever
  the input dtype, where it reproduces the fake-quant forward bit for bit; 4 bytes per weight).
* ``int4pack_bf16`` (CPU): torch's int4 kernel with bf16 activations (``cpu_int4pack``), 2-8 bits.
  Relative output error vs the fp32 fake-quant path is ~2^-8 (bf16 rounding; see the tests).
* ``triton_gemv`` / ``triton_tiled`` (CUDA, 8/4-bit weights): our split-K GEMV for decode-sized M and a
  tiled GEMM for prefill-sized M (``archquant.kernels.wq_matmul``).
* ``triton_w8a8`` (CUDA, 8-bit activations): int8 x int8 dot products per group
  (``archquant.kernels.w8a8_matmul``).
* ``gemlite`` (CUDA, 8/4/2-bit weights, fp16/bf16 activations) and ``tinygemm`` (CUDA, 4-bit, bf16):
  kept libraries' kernels over the same codes (``archquant.kernels.cuda_libs``).
* On CUDA ``dense`` is the bf16/fp16 ``F.linear`` over the dequantised weight: at prefill-sized M (and
  for small layers, where a launch costs more than the weight read) it is often the fastest.

Which path runs is measured per (device, M bucket, K, N, bits) on first use (``path_select``), not
assumed; on CUDA each candidate's output is first checked against the dequantised reference and a
path that disagrees (or raises) is rejected with a warning. ``paths=`` restricts one layer; the environment variable ``ARCHQUANT_QLINEAR_PATHS``
(comma-separated names) restricts every layer it can apply to, e.g. ``dense`` for bit-exact runs or
to skip measuring in tests. The module is for inference: use the supernet's fake-quant path to train.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from archquant.backends import Backend, BackendError, get_backend
from archquant.kernels import path_select
from archquant.kernels.cpu_int4pack import int4pack_linear, int4pack_unsupported_reason, prepare_int4pack
from archquant.quant import reference as ref
from archquant.quant.packing import PACKED_BITS, PackedWeight, pack_weight, packed_words

FORMAT_VERSION = 1
TRITON_WEIGHT_BITS = (8, 4)
CPU_PATHS = ("dense", "int4pack_bf16")
CUDA_PATHS = ("dense", "triton_gemv", "triton_tiled", "triton_w8a8", "gemlite", "tinygemm")
ALL_PATHS = tuple(dict.fromkeys(CPU_PATHS + CUDA_PATHS))
ENV_PATHS = "ARCHQUANT_QLINEAR_PATHS"
# bf16 paths agree with the bf16 dense product to ~2^-8 (rounding of activations, scales and the output);
# a layout or sign mistake gives errors of order 1
CHECK_REL_TOL = 2e-2


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str | Backend) -> Backend:
    b = get_backend(backend) if isinstance(backend, str) else backend
    # QuantLinear executes the reference quantiser; a backend with other semantics (llama.cpp's
    # block-32 formats) is served by its own engine, and running it here would silently differ.
    cls = type(b)
    if cls.fake_quant_weight is not Backend.fake_quant_weight or cls.fake_quant_act is not Backend.fake_quant_act:
        raise BackendError(
            f"backend {b.name!r} quantises differently from the reference quantiser that QuantLinear runs; "
            "export it for its own engine (e.g. GGUF for llamacpp) or use backend='torch'/'triton'"
        )
    return b


class QuantLinear(nn.Module):
    """``y = x @ dequant(Wq).T + b`` from packed weights, with per-token int8 activations when ``abits == 8``.

    Args:
        in_features: K.
        out_features: N.
        wbits: 16 (float weight kept as given) or 8/4/3/2 (packed).
        abits: 16 or 8.
        group_size: inputs per weight group; must divide K.
        bias: whether the layer has a bias.
        backend: name or ``Backend`` whose bit-widths are allowed (its quantiser must be the reference one).
        paths: restrict the execution paths (e.g. ``("dense",)`` for bit-exact fp32 on CPU, or without
            ``"dense"`` to save its 4 bytes per weight); None lets measurement pick among all that apply.

    Shape:
        input ``[..., K]`` -> output ``[..., N]`` in the input dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        wbits: int,
        abits: int = 16,
        group_size: int = 64,
        bias: bool = True,
        backend: str | Backend = "torch",
        paths: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        b = _resolve_backend(backend)
        if wbits not in b.weight_bits:
            raise BackendError(f"backend {b.name!r} has no kernel for {wbits}-bit weights (has {b.weight_bits})")
        if wbits < 16 and wbits not in PACKED_BITS:
            raise BackendError(f"QuantLinear packs weight bits {PACKED_BITS} or keeps 16, got {wbits}")
        if abits not in b.act_bits:
            raise BackendError(f"backend {b.name!r} has no kernel for {abits}-bit activations (has {b.act_bits})")
        if wbits < 16 and (group_size <= 0 or in_features % group_size):
            raise ValueError(f"group_size {group_size} must divide in_features {in_features}")
        if paths is not None:
            unknown = set(paths) - set(ALL_PATHS)
            if unknown or not paths:
                raise ValueError(f"paths must be a non-empty subset of {ALL_PATHS}, got {tuple(paths)}")
        self.in_features, self.out_features = in_features, out_features
        self.wbits, self.abits, self.group_size = wbits, abits, group_size
        self.backend_name = b.name
        self.allowed_paths = tuple(paths) if paths is not None else None
        self.path: str | None = None
        self.last_choice: path_select.PathChoice | None = None
        if wbits >= 16:
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=dtype))
        else:
            words = packed_words(in_features, wbits)
            self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32))
            self.register_buffer("scales", torch.ones(out_features, in_features // group_size, dtype=torch.float16))
            self.register_buffer("zeros", torch.zeros(out_features, in_features // group_size, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        meta = [FORMAT_VERSION, wbits, abits, group_size, in_features, out_features]
        self.register_buffer("qmeta", torch.tensor(meta, dtype=torch.int32))
        self._runtime: dict[tuple[str, str, torch.dtype], object] = {}  # derived weights, never saved
        self._chosen: dict[tuple[str, int], str] = {}  # (device, M bucket) -> path this module runs

    # ------------------------------------------------------------------ construction / export
    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        wbits: int = 4,
        abits: int = 16,
        group_size: int = 64,
        backend: str | Backend = "torch",
        paths: Sequence[str] | None = None,
    ) -> QuantLinear:
        """Quantise and pack a float weight with the reference quantiser.

        Args:
            weight: Shape: ``[N, K]``.
            bias: Shape: ``[N]`` or None.
        """
        if weight.dim() != 2:
            raise ValueError(f"weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
        n, k = weight.shape
        fdtype = weight.dtype if weight.is_floating_point() else torch.float32
        mod = cls(k, n, wbits, abits, group_size, bias is not None, backend, paths, dtype=fdtype)
        with torch.no_grad():
            if wbits >= 16:
                mod.weight = weight.detach().clone()
            else:
                pw = pack_weight(weight.detach(), wbits, group_size)
                mod.qweight, mod.scales, mod.zeros = pw.qweight, pw.scales, pw.zeros
            if bias is not None:
                mod.bias = bias.detach().clone()
        return mod.to(weight.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> QuantLinear:
        """``from_float(linear.weight, linear.bias, **kwargs)``."""
        return cls.from_float(linear.weight, linear.bias, **kwargs)

    def packed_state(self) -> dict[str, torch.Tensor]:
        """Safetensors-ready tensors: ``qweight`` int32, ``scales`` fp16, ``zeros`` uint8 (or ``weight`` at 16
        bits), optional ``bias``, and ``qmeta`` int32 ``[version, wbits, abits, group_size, K, N]``."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    @classmethod
    def from_packed(
        cls, state: dict[str, torch.Tensor], backend: str | Backend = "torch", paths: Sequence[str] | None = None
    ) -> QuantLinear:
        """Rebuild from ``packed_state()`` (no re-quantisation, bit-identical weights)."""
        if "qmeta" not in state:
            raise ValueError("packed state has no 'qmeta' tensor; was it written by QuantLinear.packed_state()?")
        version, wbits, abits, g, k, n = (int(v) for v in state["qmeta"].tolist())
        if version != FORMAT_VERSION:
            raise ValueError(f"packed state format version {version} is not supported (expected {FORMAT_VERSION})")
        fdtype = next((state[kk].dtype for kk in ("weight", "bias") if kk in state), torch.float32)
        mod = cls(k, n, wbits, abits, g, "bias" in state, backend, paths, dtype=fdtype)
        missing = set(mod.state_dict()) - set(state)
        if missing:
            raise ValueError(f"packed state lacks {sorted(missing)} for a {wbits}-bit layer")
        device = state["qmeta"].device
        mod.load_state_dict({k2: state[k2] for k2 in mod.state_dict()})
        return mod.to(device)

    def packed_weight(self) -> PackedWeight:
        if self.wbits >= 16:
            raise ValueError("a 16-bit QuantLinear holds a float weight, not a packed one")
        return PackedWeight(self.qweight, self.scales, self.zeros, self.wbits, self.group_size, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer computes with. Shape: ``[N, K]``."""
        if self.wbits >= 16:
            return self.weight.to(dtype)
        return self.packed_weight().dequantize(dtype)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The supernet's fake-quant computation in fp32: ``F.linear(fake_quant_act(x), W_deq, b)``."""
        xf = ref.fake_quant_act(x.float(), self.abits)
        b = None if self.bias is None else self.bias.float()
        return F.linear(xf, self.dequantized_weight(torch.float32), b).to(x.dtype)

    def nbytes(self) -> int:
        """Bytes of the stored (packed) state, excluding runtime caches."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, wbits={self.wbits}, "
            f"abits={self.abits}, group_size={self.group_size}, bias={self.bias is not None}, path={self.path}"
        )

    def _apply(self, fn, recurse=True):
        self._runtime.clear()  # device/dtype moved: derived weights are rebuilt lazily
        self._chosen.clear()
        out = super()._apply(fn, recurse)
        if self.wbits < 16 and self.scales.dtype != torch.float16:
            # `.to(dtype)` / `.double()` cast every float buffer; the stored format keeps fp16 scales
            # (exact: they came from fp16)
            self.scales = self.scales.half()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        self._runtime.clear()
        return super()._load_from_state_dict(*args, **kwargs)

    # ------------------------------------------------------------------ paths
    def applicable_paths(self, device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
        """Paths that can run this layer on ``device`` for ``dtype`` activations (None: any float dtype),
        after ``paths=`` and the environment restriction.

        Raises:
            BackendError: the device has no kernel for these bits, or ``paths=`` excludes all that can run.
        """
        paths = self._device_paths(device, dtype)
        env = [p.strip() for p in os.environ.get(ENV_PATHS, "").split(",") if p.strip()]
        if self.allowed_paths is None and env:
            # a global preference: layers it cannot apply to keep their own candidates
            paths = [p for p in paths if p in env] or paths
        if self.allowed_paths is not None:
            restricted = [p for p in paths if p in self.allowed_paths]
            if not restricted:
                raise BackendError(
                    f"none of paths={self.allowed_paths} can run a {self.wbits}-bit {self.in_features}->"
                    f"{self.out_features} layer on {device.type}; allow one of {paths}"
                )
            paths = restricted
        return paths

    def _device_paths(self, device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
        """Every path with a kernel for this layer's bits and shape on ``device``, before restrictions."""
        paths = ["dense"]
        if self.wbits >= 16:
            return paths
        n, k, bits, g = self.out_features, self.in_features, self.wbits, self.group_size
        if device.type == "cuda":
            from archquant.kernels import cuda_libs

            if bits in TRITON_WEIGHT_BITS and _triton_available():
                paths += ["triton_gemv", "triton_tiled"] + (["triton_w8a8"] if self.abits == 8 else [])
            act = torch.bfloat16 if dtype is None else dtype  # None: a path for any dtype counts
            if cuda_libs.gemlite_unsupported_reason(n, k, bits, g, act) is None:
                paths.append("gemlite")
            if cuda_libs.tinygemm_unsupported_reason(n, k, bits, g, act) is None:
                paths.append("tinygemm")
        elif device.type == "cpu" and int4pack_unsupported_reason(n, k, bits, g) is None:
            paths.append("int4pack_bf16")
        return paths

    def _prepared(self, path: str, device: torch.device, dtype: torch.dtype):
        key = (path, str(device), dtype if path in ("dense", "gemlite") else torch.float32)
        hit = self._runtime.get(key)
        if hit is None:
            if path == "dense":
                hit = self.dequantized_weight(dtype)
            elif path == "int4pack_bf16":
                hit = prepare_int4pack(self.packed_weight())
            elif path == "gemlite":
                from archquant.kernels.cuda_libs import prepare_gemlite

                hit = prepare_gemlite(self.packed_weight(), dtype)
            elif path == "tinygemm":
                from archquant.kernels.cuda_libs import prepare_tinygemm

                hit = prepare_tinygemm(self.packed_weight())
            else:
                hit = True  # Triton paths read the buffers directly
            self._runtime[key] = hit
        return hit

    def run_path(self, path: str, x2: torch.Tensor) -> torch.Tensor:
        """Run one named path, without selection (for profilers and tests).

        Shape: ``x2 [M, K]`` -> ``[M, N]`` in ``x2.dtype``.
        """
        dev = x2.device
        if path == "dense":
            # CPU: compute in (at least) fp32 even for bf16/fp16 inputs; low-precision GEMM on CPUs
            # without native support is ~100x slower (NOTES.md) and less exact
            cdtype = torch.promote_types(x2.dtype, torch.float32) if dev.type == "cpu" else x2.dtype
            w = self._prepared(path, dev, cdtype)
            b = None if self.bias is None else self.bias.to(cdtype)
            return F.linear(ref.fake_quant_act(x2.to(cdtype), self.abits), w, b).to(x2.dtype)
        if path == "int4pack_bf16":
            y = int4pack_linear(x2, self._prepared(path, dev, x2.dtype), self.abits)
        elif path in ("triton_gemv", "triton_tiled"):
            from archquant.kernels.wq_matmul.kernel import wq_matmul

            xin = ref.fake_quant_act(x2, self.abits)
            y = wq_matmul(xin, self.qweight, self.scales, self.zeros, self.wbits, self.group_size,
                          mode=path.removeprefix("triton_"))
        elif path == "gemlite":
            from archquant.kernels.cuda_libs import gemlite_linear

            y = gemlite_linear(ref.fake_quant_act(x2, self.abits), self._prepared(path, dev, x2.dtype))
        elif path == "tinygemm":
            from archquant.kernels.cuda_libs import tinygemm_linear

            y = tinygemm_linear(ref.fake_quant_act(x2, self.abits), self._prepared(path, dev, x2.dtype))
        elif path == "triton_w8a8":
            from archquant.kernels.w8a8_matmul.kernel import w8a8_matmul

            y = w8a8_matmul(x2, self.qweight, self.scales, self.zeros, self.wbits, self.group_size)
        else:
            raise ValueError(f"unknown QuantLinear path {path!r}")
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x2.dtype)

    def select_path(self, device: torch.device, m: int, dtype: torch.dtype = torch.float32) -> str:
        """The path for ``m`` rows of ``dtype`` activations on ``device``: measured once per shape class.

        On CUDA each candidate first runs once on random inputs and is compared with ``dense`` (the
        dequantised weight in the same dtype); one that raises or disagrees by more than
        ``CHECK_REL_TOL`` is left out of the measurement, with a warning naming it.
        """
        paths = self.applicable_paths(device, dtype)
        key = path_select.PathKey(
            path_select.device_key(device), path_select.m_bucket(m, device), self.in_features, self.out_features,
            self.wbits, self.abits, self.group_size, str(dtype).removeprefix("torch."), tuple(sorted(paths)),
        )
        if len(paths) > 1 and path_select.cached_choice(key) is None:
            mb = key.m_bucket
            x = torch.randn(mb, self.in_features, device=device).to(dtype)
            ok = self._checked_paths(paths, x) if device.type == "cuda" else paths
            cands = {p: (lambda p=p: self.run_path(p, x)) for p in ok}
            choice = path_select.choose(key, cands, device)
            self._chosen[(str(device), key.m_bucket)] = choice.path
            self._drop_unused()
        else:
            choice = path_select.choose(key, {p: None for p in paths}, device)
            self._chosen[(str(device), key.m_bucket)] = choice.path
        self.last_choice = choice
        return choice.path

    def _checked_paths(self, paths: list[str], x: torch.Tensor) -> list[str]:
        """The paths whose output on ``x`` matches ``dense`` within ``CHECK_REL_TOL`` (dense itself always)."""
        ref_y = self.run_path("dense", x).float()
        ok = []
        for p in paths:
            if p == "dense":
                ok.append(p)
                continue
            try:
                y = self.run_path(p, x).float()
                err = float((y - ref_y).norm() / ref_y.norm().clamp_min(1e-30))
            except Exception as e:  # a library kernel that cannot run this shape: not a candidate
                warnings.warn(f"QuantLinear path {p!r} failed on {self.in_features}->{self.out_features} "
                              f"w{self.wbits} M={x.shape[0]} and is not used: {type(e).__name__}: {e}")
                continue
            if not err <= CHECK_REL_TOL:
                warnings.warn(f"QuantLinear path {p!r} disagrees with the dequantised weight on {self.in_features}->"
                              f"{self.out_features} w{self.wbits} (relative error {err:.2e} > {CHECK_REL_TOL}) "
                              "and is not used")
                continue
            ok.append(p)
        return ok

    def _drop_unused(self) -> None:
        """Free derived weights (int4 planes, fp32 copy) of paths no M bucket of this layer runs."""
        keep = set(self._chosen.values())
        for k in [k for k in self._runtime if k[0] not in keep]:
            del self._runtime[k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear expects inputs [..., {self.in_features}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"QuantLinear expects float inputs, got {x.dtype}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        with torch.no_grad():
            path = self.select_path(x2.device, x2.shape[0], x2.dtype)
            y = self.run_path(path, x2)
        self.path = path
        return y.reshape(*lead, self.out_features)
