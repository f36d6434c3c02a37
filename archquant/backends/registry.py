"""The backends by name, listed explicitly (no import-time self-registration)."""

from __future__ import annotations

import inspect

from archquant.backends.base import Backend, BackendError
from archquant.backends.llamacpp import LlamaCppBackend
from archquant.backends.reference import TorchBackend, TritonBackend

BACKENDS: dict[str, type[Backend]] = {
    "torch": TorchBackend,
    "triton": TritonBackend,
    "llamacpp": LlamaCppBackend,
}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Add a backend class under ``cls.name`` (plugins and tests; the built-in ones are listed above)."""
    BACKENDS[cls.name] = cls
    return cls


def get_backend(name: str, options: dict | None = None) -> Backend:
    """Instantiate a backend by name (``torch``, ``triton``, ``llamacpp``) with its ``options()``.

    Raises:
        BackendError: an unknown name, or options its constructor does not take.
    """
    if name not in BACKENDS:
        raise BackendError(f"latency.backend={name!r} is unknown; choose one of {sorted(BACKENDS)}")
    cls = BACKENDS[name]
    try:
        inspect.signature(cls).bind(**(options or {}))
    except TypeError as err:
        raise BackendError(f"backend {name!r} does not take the options {options}: {err}") from None
    return cls(**(options or {}))
