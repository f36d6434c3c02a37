"""Decode as a serving engine runs it: a static KV cache and, on CUDA, one captured graph per token.

Eager decoding of a small model on a GPU is launch-bound: SmolLM2-135M's kernels take ~7.5 ms of a
28.6 ms token on an H200 (NOTES.md); the rest is Python and kernel launches. Serving engines capture
the one-token step once and replay it. ``StaticDecoder`` does that for any Llama-family model here
(Hugging Face ``LlamaForCausalLM``, a materialised ``ArchQuantForCausalLM`` with per-layer head
counts, either on the ``QuantLinear`` runtime):

* the KV cache is transformers' ``StaticCache``: fixed buffers of ``max_len`` positions, one per
  layer, each allocated on the first update with that layer's own head count and head size; the write
  position is a device tensor the cache advances in place, so a replayed graph writes the next slot;
* the attention mask is an explicit additive 4-D mask built on the device from that position (the
  model passes a 4-D mask through untouched), and the RoPE positions are the same tensor;
* ``capture()`` warms the step up eagerly (which is when ``QuantLinear`` measures its paths and
  libraries tune their kernels), then records it into a ``torch.cuda.CUDAGraph``; ``step`` replays it.

Without CUDA (or with ``graph=False``) the same step runs eagerly, which is how the tests check that
the static cache and mask give the logits of an ordinary ``DynamicCache`` decode.
"""

from __future__ import annotations

import torch
from torch import nn


class StaticDecoder:
    """Prefill once, then one-token steps over a static KV cache (replayed from a CUDA graph on GPUs).

    Args:
        model: a Llama-family causal LM (``forward(input_ids, attention_mask, position_ids,
            past_key_values, logits_to_keep)``), in eval mode, on its device.
        batch: sequences decoded together.
        max_len: cache positions (prompt + generated tokens) per sequence.
        graph: capture the step into a CUDA graph; None: on CUDA devices.
    """

    def __init__(self, model: nn.Module, *, batch: int = 1, max_len: int = 512, graph: bool | None = None) -> None:
        from transformers import StaticCache

        self.model = model
        param = next(model.parameters(), None)
        buf = next(model.buffers(), None)
        ref = param if param is not None else buf
        self.device = ref.device if ref is not None else torch.device("cpu")
        self.dtype = model.get_input_embeddings().weight.dtype
        self.batch, self.max_len = batch, max_len
        self.use_graph = (self.device.type == "cuda") if graph is None else graph
        if self.use_graph and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.length = 0
        self._positions = torch.arange(max_len, device=self.device)
        self._ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        # made here, not in the step: a host-to-device copy is not allowed while a graph is being captured
        self._zero = torch.zeros((), dtype=self.dtype, device=self.device)
        self._neg = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None

    # ------------------------------------------------------------------ masks and positions
    def _mask(self, query_pos: torch.Tensor) -> torch.Tensor:
        """Additive mask ``[B, 1, S, max_len]``: query at position p sees cache slots 0..p."""
        allowed = self._positions[None, :] <= query_pos[:, None]
        return torch.where(allowed, self._zero, self._neg)[None, None].expand(self.batch, 1, -1, -1)

    def _cache_length(self) -> torch.Tensor:
        """The device tensor holding how many positions layer 0's cache holds (advanced in place)."""
        return self.cache.layers[0].cumulative_length

    def _forward(self, ids: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=ids, attention_mask=self._mask(query_pos),
            position_ids=query_pos[None, :].expand(ids.shape[0], -1), past_key_values=self.cache,
            use_cache=True, logits_to_keep=1,
        )
        return out.logits

    def _step_eager(self) -> torch.Tensor:
        pos = self._cache_length().reshape(1).to(self.device)
        return self._forward(self._ids, pos)

    # ------------------------------------------------------------------ public
    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``ids [B, S]`` into an empty cache (eagerly); returns the last position's logits."""
        if ids.shape[0] != self.batch:
            raise ValueError(f"prefill ids have batch {ids.shape[0]}, the decoder was built for {self.batch}")
        if self.length or self._graph is not None:
            raise RuntimeError("prefill runs once, into an empty cache; build a new StaticDecoder for a new prompt")
        if ids.shape[1] >= self.max_len:
            raise ValueError(f"a prompt of {ids.shape[1]} tokens leaves no room in a {self.max_len}-position cache")
        logits = self._forward(ids.to(self.device), self._positions[: ids.shape[1]])
        self.length = ids.shape[1]
        return logits[:, -1]

    @torch.inference_mode()
    def capture(self, warmup: int = 2) -> None:
        """Warm the one-token step up eagerly, then record it into a CUDA graph (no-op without graphs)."""
        if not self.use_graph or self._graph is not None:
            return
        if not self.length:
            raise RuntimeError("prefill before capture: the cache buffers are allocated by the first update")
        start = self.length
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._step_eager()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.reset(start)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self._step_eager()
        self._graph = graph
        self.reset(start)

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Decode one token per sequence (``ids [B, 1]``); returns logits ``[B, vocab]`` (a buffer the next
        step overwrites under graphs: copy it to keep it)."""
        if not self.length:
            raise RuntimeError("prefill before decoding")
        if self.length >= self.max_len:
            raise RuntimeError(f"the {self.max_len}-position cache is full; build the decoder with a larger max_len")
        self._ids.copy_(ids.reshape(self.batch, 1))
        if self.use_graph:
            if self._graph is None:
                self.capture()
            self._graph.replay()
            logits = self._logits
        else:
            logits = self._step_eager()
        self.length += 1
        return logits[:, -1]

    @torch.inference_mode()
    def reset(self, length: int) -> None:
        """Forget every cached position from ``length`` on (the next step writes slot ``length``)."""
        if not 0 < length <= self.max_len:
            raise ValueError(f"length must be in 1..{self.max_len}, got {length}")
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(length)
        self.length = length
