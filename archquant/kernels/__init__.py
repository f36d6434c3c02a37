"""Quantisers and kernels; every Triton kernel sits beside a pure-torch reference."""
