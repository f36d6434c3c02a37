"""archquant: joint architecture and per-layer precision search for LLMs under a latency budget."""

__version__ = "0.1.0"
