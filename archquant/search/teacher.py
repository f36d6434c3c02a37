"""The teacher's targets for KD, computed once per calibration set and cached (top-k log-probabilities)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from archquant.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)


@dataclass
class TeacherTargets:
    """Calibration blocks and the teacher's log-probabilities on them.

    Attributes:
        ids: token blocks.
        logprobs: teacher log-softmax at ``temperature`` (top ``k`` per token, or the full vocabulary).
        index: vocabulary ids of the top k (None when ``logprobs`` covers the vocabulary).
        temperature: the KD temperature the log-probabilities were taken at.

    Shape:
        ids: [N, S]; logprobs: [N, S, K]; index: [N, S, K] (int32).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    index: torch.Tensor | None
    temperature: float

    def __len__(self) -> int:
        return self.ids.shape[0]

    def batch(self, rows: torch.Tensor, device: torch.device | str = "cpu"):
        """``(ids, logprobs, index)`` of the given block rows, on ``device``."""
        idx = None if self.index is None else self.index[rows].to(device)
        return self.ids[rows].to(device), self.logprobs[rows].to(device), idx

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(
            {"ids": self.ids, "logprobs": self.logprobs, "index": self.index, "temperature": self.temperature}, buf
        )
        return buf.getvalue()

    @classmethod
    def from_file(cls, path: Path) -> TeacherTargets:
        return cls(**torch.load(path, map_location="cpu", weights_only=True))


@torch.inference_mode()
def compute_teacher_targets(
    model, ids: torch.Tensor, *, topk: int, temperature: float, batch_size: int = 4
) -> TeacherTargets:
    """Run the teacher over ``ids`` and keep its top-``topk`` log-probabilities (all when ``topk`` is 0 or >= V).

    Shape:
        ids: [N, S].
    """
    device = next(model.parameters()).device
    out_lp, out_idx = [], []
    for start in range(0, ids.shape[0], batch_size):
        chunk = ids[start : start + batch_size].to(device)
        logits = model(input_ids=chunk).logits.float()  # [b, S, V]
        lp = F.log_softmax(logits / temperature, dim=-1)
        if 0 < topk < lp.shape[-1]:
            val, idx = lp.topk(topk, dim=-1)
            out_lp.append(val.cpu())
            out_idx.append(idx.to(torch.int32).cpu())
        else:
            out_lp.append(lp.cpu())
    index = torch.cat(out_idx) if out_idx else None
    return TeacherTargets(ids=ids.cpu(), logprobs=torch.cat(out_lp), index=index, temperature=float(temperature))


def cached_teacher_targets(
    model,
    ids: torch.Tensor,
    *,
    topk: int,
    temperature: float,
    model_key: dict[str, Any],
    cache_dir: Path | None,
    batch_size: int = 4,
) -> TeacherTargets:
    """``compute_teacher_targets`` behind a disk cache keyed by the blocks, the model and the settings.

    A ladder of searches on one model and calibration set (Hydra ``-m``, ``archquant-run``) pays for
    the teacher's forward passes once.
    """
    if cache_dir is None:
        return compute_teacher_targets(model, ids, topk=topk, temperature=temperature, batch_size=batch_size)
    h = hashlib.sha256()
    h.update(json.dumps({"model": model_key, "topk": topk, "T": temperature}, sort_keys=True, default=str).encode())
    h.update(ids.to(torch.int64).contiguous().numpy().tobytes())
    path = Path(cache_dir) / f"teacher-{h.hexdigest()[:20]}.pt"
    if path.exists():
        log.info("teacher targets from cache %s", path)
        return TeacherTargets.from_file(path)
    log.info("computing teacher targets on %d blocks x %d tokens (cached to %s)", ids.shape[0], ids.shape[1], path)
    targets = compute_teacher_targets(model, ids, topk=topk, temperature=temperature, batch_size=batch_size)
    atomic_write_bytes(path, targets.to_bytes())
    return targets
