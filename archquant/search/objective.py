"""The search objective: KD to the teacher + squared-hinge latency and memory penalties."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_index: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(teacher || student), mean over tokens, scaled by T^2 (Hinton) so gradients keep their size across T.

    With ``teacher_index`` the teacher is given by its top-k log-probabilities only; the remaining mass
    of both distributions is pooled into one "tail" bucket. That is the exact KL between the two
    distributions coarsened to k+1 outcomes: never above the full KL, equal to it when the tail is empty.

    Args:
        student_logits: raw logits of the student.
        teacher_logprobs: teacher log-softmax at ``temperature``: all V, or the top k of them.
        teacher_index: vocabulary ids of the top k (None = ``teacher_logprobs`` covers the vocabulary).
        temperature: KD temperature T.

    Shape:
        student_logits: [B, S, V]; teacher_logprobs, teacher_index: [B, S, K] (K = V without index).

    Returns:
        Scalar loss (nats x T^2).
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [B, S, V]
    t = teacher_logprobs.float()
    if teacher_index is None:
        kl = (t.exp() * (t - s)).sum(-1)  # [B, S]
    else:
        s_k = s.gather(-1, teacher_index.long())  # [B, S, K]
        p_k = t.exp()
        kl = (p_k * (t - s_k)).sum(-1)
        # tail bucket: log(1 - sum p) computed stably; clamp keeps a cut-nothing tail at ~0 mass
        t_tail = torch.log1p(-p_k.sum(-1).clamp(max=1 - 1e-6))
        s_tail = torch.log1p(-s_k.exp().sum(-1).clamp(max=1 - 1e-6))
        kl = kl + t_tail.exp() * (t_tail - s_tail)
    return kl.mean() * temperature**2


def hinge_penalty(value: torch.Tensor, target: float | None) -> torch.Tensor:
    """``max(0, value / target - 1)^2``: zero inside the budget, quadratic in the relative excess outside.

    Relative excess makes the latency (ms) and memory (MB) terms commensurable with one lambda each.
    """
    if target is None:
        return value.new_zeros(())
    return torch.relu(value / target - 1.0) ** 2


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` on ``ids``.

    Shape:
        logits: [B, S, V]; ids: [B, S].
    """
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


@torch.no_grad()
def held_out_kd(logits_of: Callable[[torch.Tensor], torch.Tensor], val, temperature: float, device,
                batch_size: int = 4) -> float:
    """Mean ``kd_loss`` over the held-out blocks ``val`` (``TeacherTargets``), ``logits_of(ids)`` the student's.

    One measure for the search's ``val_kd`` (the supernet at one-hot gates) and the reference check (a
    materialised model), so that the two compare alike.
    """
    total, n = 0.0, 0
    for start in range(0, len(val), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(val)))
        ids, t_lp, t_idx = val.batch(rows, device)
        total += float(kd_loss(logits_of(ids), t_lp, t_idx, temperature)) * len(rows)
        n += len(rows)
    return total / n
