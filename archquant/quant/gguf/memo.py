"""Importance-weighted blocks, remembered by content, and cut out of a bigger tensor's blocks.

The importance-weighted search costs ~0.4 us per weight on one core (a minute for SmolLM2's linears at
one type), where round-to-nearest costs ~100x less. Two facts make it affordable in a search that
quantises the same weights again and again:

* **Blocks are local.** A block's codes and scales depend only on its own weights and importance, so the
  blocks of any row subset and whole-block column subset of ``W`` are the same subset of ``W``'s blocks
  (``slice_parts``; tested bit for bit per type). The supernet quantises each shared weight once at full
  size and every subnet cuts its blocks from there.
* **Results are remembered by content** (a digest of the weight's and the importance's bytes, and the
  type): a materialised subnet whose blocks were cut from the supernet's (``remember``) does not search
  again, and neither do its export, its reload in the same process, or the next search's supernet.

The memo holds at most ``$ARCHQUANT_QUANT_MEMO_MB`` (default 3072) MB, least recently used out first.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

import torch

from archquant.quant.gguf.types import block_size
from archquant.utils.errors import InputError

MEMO_ENV = "ARCHQUANT_QUANT_MEMO_MB"
Parts = dict[str, torch.Tensor]
_memo: OrderedDict[str, Parts] = OrderedDict()
_bytes = 0


def _budget() -> int:
    raw = os.environ.get(MEMO_ENV, "3072")
    try:
        mb = float(raw)
    except ValueError:
        raise InputError(f"${MEMO_ENV}={raw!r} is not a number of MB; set it to e.g. 3072 (0 keeps nothing)") from None
    return int(mb * 2**20)


def _nbytes(parts: Parts) -> int:
    return sum(v.numel() * v.element_size() for v in parts.values())


def key(w: torch.Tensor, qtype: str, importance: torch.Tensor) -> str:
    """Digest of a quantisation request: ``qtype``, shapes and the exact bytes of ``w`` and ``importance``."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{qtype}|{tuple(w.shape)}|{tuple(importance.shape)}|".encode())
    for t in (w, importance):
        h.update(t.detach().float().cpu().contiguous().numpy().data)
    return h.hexdigest()


def lookup(k: str) -> Parts | None:
    parts = _memo.get(k)
    if parts is not None:
        _memo.move_to_end(k)
    return parts


def store(k: str, parts: Parts) -> None:
    """Keep ``parts`` under ``k`` (CPU), dropping the least recently used entries beyond the budget."""
    global _bytes
    if k in _memo:
        return
    parts = {n: v.detach().cpu() for n, v in parts.items()}
    size = _nbytes(parts)
    if size > _budget():
        return
    _memo[k] = parts
    _bytes += size
    while _bytes > _budget():
        _, old = _memo.popitem(last=False)
        _bytes -= _nbytes(old)


def remember(w: torch.Tensor, qtype: str, importance: torch.Tensor, parts: Parts) -> None:
    """Record that ``quantize(w, qtype, importance)`` is ``parts`` (e.g. blocks cut from a bigger tensor's)."""
    store(key(w, qtype, importance), parts)


def clear() -> None:
    global _bytes
    _memo.clear()
    _bytes = 0


def whole_blocks(cols: torch.Tensor, bs: int, k: int) -> torch.Tensor | None:
    """Block indices of a column index list (columns of a ``k``-column tensor) that consists of whole
    blocks of ``bs`` in order (``[64..95, 0..31]`` -> ``[2, 0]`` for 32-blocks), else None."""
    cols = cols.reshape(-1).cpu()
    if cols.numel() % bs or (cols.numel() and (int(cols.max()) >= k or int(cols.min()) < 0)):
        return None
    grid = cols.view(-1, bs)
    starts = grid[:, 0]
    if (starts % bs).any() or not torch.equal(grid, starts[:, None] + torch.arange(bs)):
        return None
    return starts // bs


def slice_parts(parts: Parts, qtype: str, rows: torch.Tensor | None, cols: torch.Tensor | None) -> Parts:
    """The parts of ``W[rows][:, cols]`` cut from the parts of a 2-D ``W``.

    Args:
        parts: ``quantize(W, qtype, ...)`` of a ``[N, K]`` weight (codes ``q [N, K]``, block parameters
            ``[N, K // bs, ...]``).
        rows: output rows to keep (LongTensor), or None for all.
        cols: input columns to keep (LongTensor made of whole blocks, see ``whole_blocks``), or None.

    Raises:
        ValueError: ``cols`` cuts through a block.
    """
    q = parts["q"]
    out = dict(parts)
    if rows is not None:
        rows = rows.to(q.device)
        out = {n: v.index_select(0, rows) for n, v in out.items()}
    if cols is not None:
        blocks = whole_blocks(cols, block_size(qtype), q.shape[-1])
        if blocks is None:
            raise ValueError(f"columns {cols.tolist()[:8]}... are not whole {qtype} blocks of {block_size(qtype)}")
        cols, blocks = cols.to(q.device), blocks.to(q.device)
        out = {n: v.index_select(1, cols if n == "q" else blocks) for n, v in out.items()}
    return {n: v.contiguous() for n, v in out.items()}
