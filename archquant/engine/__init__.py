"""llama.cpp as the CPU engine: write a model as GGUF, read and check a GGUF's header, serve it (verified first)."""
