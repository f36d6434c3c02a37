"""Shared tiny-model fixtures: a small GQA Llama, a matching search space and calibration ids."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from archquant.core.space import SpaceConfig
from archquant.models.tiny import tiny_llama

VOCAB = 256


def tiny_model(seed: int = 0, layers: int = 2, **overrides):
    """A random tiny Llama (hidden 128, MLP 256, 8 query / 4 KV heads of 16) in fp32 eval mode."""
    return tiny_llama(seed=seed, num_hidden_layers=layers, vocab_size=VOCAB, **overrides)


def tiny_space(**overrides) -> SpaceConfig:
    """The default space snapped to multiples of 32 (group size 32) so the tiny model has choices."""
    kwargs = {"width_multiple": 32, "group_size": 32, **overrides}
    return SpaceConfig(**kwargs)


def token_ids(rows: int = 2, seq: int = 16, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    """Deterministic random token ids. Shape: ``[rows, seq]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, seq), generator=g)


@contextlib.contextmanager
def one_thread():
    """Run tiny models on one intra-op thread (restored afterwards): they gain nothing from more, and on a
    shared, loaded machine thread hand-offs dominate their run time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class CountLinear(TorchFunctionMode):
    """Counts ``F.linear`` calls inside its ``with`` block (``.calls``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            self.calls += 1
        return func(*args, **(kwargs or {}))
