"""Serving engines: each says what it computes (quantisers), what it can run (space rules) and how fast."""

from archquant.backends.base import Backend, get_backend

__all__ = ["Backend", "get_backend"]
