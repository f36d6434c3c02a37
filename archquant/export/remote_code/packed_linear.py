"""``PackedLinear``: the linear of an export folder's generated model code, over QuantLinear's packed weights.

It stands in for ``archquant.models.fake_quant_linear`` (same ``make_linear`` signature) when
``render.modeling_source`` writes ``modeling_archquant.py``, so it imports only torch: the folder
must load with ``trust_remote_code=True`` where archquant is not installed. That is why it reads the
packed format with its own few lines instead of ``archquant.quant.packing``; the export tests pin
its outputs to ``archquant.export.load`` bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACKED_FORMAT_VERSION = 1


def _unpack(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """int32 words ``[N, W]`` -> unsigned codes ``[N, k]``."""
    vpw = 32 // bits
    shifts = torch.arange(vpw, device=qweight.device, dtype=torch.int64) * bits
    vals = (qweight.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)
    return vals.reshape(qweight.shape[0], -1)[:, :k]


def _fake_quant_act(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token symmetric quantise-dequantise (the reference activation quantiser)."""
    if bits >= 16:
        return x
    qmax = (1 << (bits - 1)) - 1
    scale = (x.detach().float().abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=1e-8)
    q = torch.clamp(torch.round(x.detach().float() / scale), -qmax, qmax)
    return x + (q * scale - x).to(x.dtype).detach()


class PackedLinear(nn.Module):
    """A linear layer over packed group-wise integer weights (dequantised once, then cached).

    Packed layout (``<module>.qweight`` etc. in ``model.safetensors``): ``qweight`` int32
    ``[N, ceil(K / (32 // bits))]``, value ``k`` of a row in word ``k // (32 // bits)`` at bit
    ``(k % (32 // bits)) * bits``, least significant first; ``scales`` fp16 and ``zeros`` uint8
    ``[N, K // group_size]``, ``w = (q - zero) * scale``; ``qmeta`` int32
    ``[version, wbits, abits, group_size, K, N]``; 16-bit linears store ``weight`` instead (a Parameter
    here, so that transformers can tie a 16-bit ``lm_head`` to the embedding; a tied head has no ``qmeta``,
    as the file stores nothing of it). Activations get per-token symmetric fake-quant where ``abits`` is 8.

    Shape: ``x [..., K]`` -> ``[..., N]`` in the input dtype.
    """

    def __init__(self, in_features: int, out_features: int, wbits: int, abits: int, group_size: int, bias: bool,
                 tied: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.wbits, self.abits, self.group_size = wbits, abits, group_size
        if wbits >= 16:
            self.weight = nn.Parameter(torch.zeros(out_features, in_features), requires_grad=False)
        else:
            words = -(-in_features // (32 // wbits))
            self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32))
            self.register_buffer("scales", torch.ones(out_features, in_features // group_size, dtype=torch.float16))
            self.register_buffer("zeros", torch.zeros(out_features, in_features // group_size, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        if not tied:
            meta = [PACKED_FORMAT_VERSION, wbits, abits, group_size, in_features, out_features]
            self.register_buffer("qmeta", torch.tensor(meta, dtype=torch.int32))
        self._cache: tuple | None = None

    def quantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer computes with, dequantised. Shape: ``[N, K]``."""
        if self.wbits >= 16:
            return self.weight.to(dtype)
        src = self.qweight
        key = (src.data_ptr(), src._version, src.device, dtype)
        if self._cache is None or self._cache[0] != key:
            q = _unpack(self.qweight, self.wbits, self.in_features).float()
            n, k = q.shape
            g = self.group_size
            w = (q.reshape(n, k // g, g) - self.zeros.float()[..., None]) * self.scales.float()[..., None]
            self._cache = (key, w.reshape(n, k).to(dtype))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(_fake_quant_act(x, self.abits), self.quantized_weight(x.dtype), b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, wbits={self.wbits}, "
                f"abits={self.abits}")


def make_linear(config, name: str, n_in: int, n_out: int, *, wbits: int, abits: int) -> PackedLinear:
    """Linear ``name`` (``q`` ... ``down``, ``lm_head``) of ``ArchQuantForCausalLM`` over packed weights."""
    tied = name == "lm_head" and config.tie_word_embeddings  # only a 16-bit head is tied (materialize)
    bias = bool(config.linear_bias.get(name, False))
    return PackedLinear(n_in, n_out, wbits, abits, config.quant_group_size, bias, tied)
