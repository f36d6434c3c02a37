"""The backend interface. Backend-independent code asks a ``Backend`` object; it never branches on names.

A backend is the engine that will serve the compressed model (``torch``, ``triton``, ``llamacpp``). It
fixes (1) the quantiser semantics the supernet must simulate, (2) the space rules the engine imposes,
(3) which latency tables apply.
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import torch

from archquant.kernels.quant import reference as ref


class BackendError(ValueError):
    """A request the backend cannot serve (unknown name, unsupported bits, shape it cannot run)."""


class Backend:
    """Base backend: the reference group-wise quantiser of ``archquant.kernels.quant``.

    Subclasses override the quantisers and ``restrict_space`` to match their engine.
    """

    name: ClassVar[str] = "torch"
    weight_bits: ClassVar[tuple[int, ...]] = (16, 8, 4, 3, 2)
    act_bits: ClassVar[tuple[int, ...]] = (16, 8)

    def fake_quant_weight(self, w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
        """What the engine's weight at ``bits`` computes with (dequantised), straight-through gradient."""
        if bits not in self.weight_bits:
            raise BackendError(f"backend {self.name!r} has no kernel for {bits}-bit weights (has {self.weight_bits})")
        return ref.fake_quant_weight(w, bits, group_size)

    def fake_quant_act(self, x: torch.Tensor, abits: int, wbits: int) -> torch.Tensor:
        """What the engine feeds a linear whose weight has ``wbits`` when the layer's act bits are ``abits``."""
        if abits not in self.act_bits:
            raise BackendError(f"backend {self.name!r} has no kernel for {abits}-bit activations (has {self.act_bits})")
        return ref.fake_quant_act(x, abits)

    def weight_bytes(self, num_weights: int, bits: int, group_size: int) -> float:
        """Bytes that ``num_weights`` weights take in this engine at ``bits`` (scales/zeros included).

        Reference format: packed integers + one fp16 scale and one uint8 zero per group.
        """
        if bits >= 16:
            return num_weights * 2.0
        return num_weights * bits / 8.0 + num_weights / group_size * 3.0

    def restrict_space(self, space_config, model_config):
        """Return the space config with choices the engine cannot run removed (default: unchanged)."""
        return space_config

    def options(self) -> dict:
        """JSON-serialisable constructor arguments that rebuild this backend (``get_backend(name, options)``);
        a materialised model records them so that its reloaded layers quantise the same way."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class TorchBackend(Backend):
    """The reference runtime (any device): group-wise asymmetric weights, per-token int8 activations."""

    name = "torch"


class TritonBackend(Backend):
    """This package's Triton kernels on CUDA: same quantiser as torch; kernels exist for 8 and 4 bits."""

    name = "triton"
    weight_bits = (16, 8, 4)


_REGISTRY: dict[str, type[Backend]] = {"torch": TorchBackend, "triton": TritonBackend}


def register_backend(cls: type[Backend]) -> type[Backend]:
    _REGISTRY[cls.name] = cls
    return cls


def get_backend(name: str, options: dict | None = None) -> Backend:
    """Instantiate a backend by name (``torch``, ``triton``, ``llamacpp``) with its ``options()``."""
    if name == "llamacpp" and name not in _REGISTRY:
        import archquant.backends.llamacpp  # noqa: F401  (registers itself)
    if name not in _REGISTRY:
        raise BackendError(f"latency.backend={name!r} is unknown; choose one of {sorted(_REGISTRY) + ['llamacpp']}")
    cls = _REGISTRY[name]
    try:
        inspect.signature(cls).bind(**(options or {}))
    except TypeError as err:
        raise BackendError(f"backend {name!r} does not take the options {options}: {err}") from None
    return cls(**(options or {}))
