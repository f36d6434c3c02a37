"""Serving engines' weight formats: what each computes (quantisers), can run (space rules) and stores (bytes)."""

from archquant.backends.base import Backend, BackendError
from archquant.backends.registry import BACKENDS, get_backend, register_backend

__all__ = ["BACKENDS", "Backend", "BackendError", "get_backend", "register_backend"]
