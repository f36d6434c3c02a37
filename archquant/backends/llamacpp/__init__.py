"""llama.cpp as a backend: GGUF quantiser simulation, GGUF export, runtime, latency profiling.

Importing this package registers ``LlamaCppBackend`` under the name ``llamacpp``. The runtime and the
profiler import ``llama_cpp`` lazily, so the simulation and the exporter work without it.
"""

from archquant.backends.base import register_backend
from archquant.backends.llamacpp.backend import DEFAULT_TYPES, LlamaCppBackend, resolve_types

register_backend(LlamaCppBackend)

__all__ = ["DEFAULT_TYPES", "LlamaCppBackend", "resolve_types"]
