"""Model code written into every export folder, so ``trust_remote_code=True`` loads it without archquant.

It is generated from the package's own model code (``render.modeling_source``), with the linears of
``packed_linear`` in place of the fake-quant ones.
"""
