"""Cumulative width masks: ``m_j = sum_k pi_k [j < c_k]`` as one ``[K] x [K, W]`` product.

A width gate with choices ``c_1 > ... > c_K`` keeps the first ``c_k`` units of an importance-sorted
dimension. The table ``T[k, j] = [j < c_k]`` turns a probability vector into the expected keep mask of
every unit; with a one-hot vector it is the exact 0/1 mask of that width.
"""

from __future__ import annotations

import torch


def width_table(choices: list[int], width: int) -> torch.Tensor:
    """``T[k, j] = 1 if j < choices[k]``. Shape: ``[K, width]``."""
    j = torch.arange(width)
    return (j[None, :] < torch.tensor(choices)[:, None]).float()


def rope_pair_table(choices: list[int], head_dim: int) -> torch.Tensor:
    """Keep masks of a head size choice over q/k dims laid out as ``[first halves | second halves]``.

    Head size ``c`` keeps the ``c / 2`` most important RoPE pairs ``(i, i + head_dim / 2)`` (pairs are
    sorted by importance), so dims ``i`` with ``i mod head_dim/2 < c/2`` survive. Shape: ``[K, head_dim]``.
    """
    half = head_dim // 2
    i = torch.arange(head_dim) % half
    return (i[None, :] < (torch.tensor(choices) // 2)[:, None]).float()


def expected(pi: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``sum_k pi_k values_k`` (e.g. the expected kept width). Shape: ``[K], [K, ...] -> [...]``."""
    return torch.tensordot(pi.to(values.dtype), values, dims=1)
