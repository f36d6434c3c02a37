"""Perplexity over non-overlapping windows of a stated length (the GPTQ / SparseGPT protocol).

The text is tokenised once without special tokens and cut into ``len // seq_len`` windows (the
trailing partial window is dropped); each window is scored on its own, predicting tokens 2..seq_len
from their prefix inside the window. ppl = exp(total NLL / predicted tokens).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from archquant.data.calibration import encode_text, token_stream
from archquant.evaluation.loglik import forward_logits, model_device, scoring_mode
from archquant.utils.errors import InputError, MissingFileError


def _tokens(tokenizer, text_or_path: str | Path) -> tuple[torch.Tensor, str]:
    if isinstance(text_or_path, Path):
        if not text_or_path.is_file():
            raise MissingFileError(f"perplexity text {text_or_path} not found; set data.ppl_file=/path/to/file")
        return token_stream(tokenizer, text_or_path), str(text_or_path)
    # a short one-line string naming an existing file is a path; anything else is the text itself
    if "\n" not in text_or_path and len(text_or_path) < 4096 and Path(text_or_path).expanduser().is_file():
        path = Path(text_or_path).expanduser()
        return token_stream(tokenizer, path), str(path)
    return encode_text(tokenizer, text_or_path), "<text>"


def window_count(tokenizer, text_or_path: str | Path, seq_len: int = 512) -> int:
    """How many whole windows of ``seq_len`` tokens ``perplexity`` cuts the text into."""
    return _tokens(tokenizer, text_or_path)[0].numel() // seq_len


def perplexity(
    model,
    tokenizer,
    text_or_path: str | Path,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    *,
    progress: bool = False,
    per_window: bool = False,
    window_indices: Sequence[int] | None = None,
) -> dict:
    """Perplexity of a causal LM on a text.

    Args:
        model: HF model, materialised subnet, or any module returning logits (``[B, S, V]``).
        tokenizer: its tokenizer.
        text_or_path: the text, or a path to a UTF-8 file (tokens cached by file hash).
        seq_len: window length in tokens.
        max_windows: score only the first ``max_windows`` windows (None = all).
        batch_size: windows per forward.
        progress: show a tqdm bar.
        per_window: also return ``window_nll``, each window's summed NLL (for paired bootstraps between
            models scored on the same windows).
        window_indices: score only these windows (indices into the text's windows, after ``max_windows``),
            in this order: a long evaluation done in resumable pieces, or an evenly spaced subset.

    Returns:
        ``{ppl, nll (mean per predicted token), tokens (predicted), windows, seq_len, source, wall_s}``
        (+ ``window_nll`` [windows] with ``per_window``).
    """
    if seq_len < 2:
        raise ValueError(f"eval.ppl_seq_len must be >= 2, got {seq_len}")
    if max_windows is not None and max_windows <= 0:
        raise ValueError(f"eval.ppl_max_windows must be > 0 or null, got {max_windows}")
    if batch_size <= 0:
        raise ValueError(f"eval.batch_size must be > 0, got {batch_size}")
    t0 = time.perf_counter()
    ids, source = _tokens(tokenizer, text_or_path)
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise InputError(f"the text has {ids.numel()} tokens, fewer than one window of eval.ppl_seq_len={seq_len}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)  # [W, seq_len]
    if window_indices is not None:
        index = torch.as_tensor(list(window_indices), dtype=torch.long)
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= n_windows:
            raise ValueError(f"window_indices must be a non-empty list inside 0..{n_windows - 1}, got {list(window_indices)[:8]}")
        windows = windows[index]
        n_windows = index.numel()
    device = model_device(model)
    window_nll: list[float] = []  # float64 accumulation: a 300k-token sum in fp32 would lose the last digits
    from tqdm.auto import tqdm

    with scoring_mode(model):
        for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", disable=not progress, leave=False):
            batch = windows[start : start + batch_size].to(device)  # [B, seq_len]
            logits = forward_logits(model, batch)  # [B, seq_len, V]
            for r in range(batch.shape[0]):  # per row: one [seq_len, V] fp32 copy at a time, not B of them
                nll = F.cross_entropy(logits[r, :-1].float(), batch[r, 1:], reduction="sum")
                window_nll.append(float(nll))
    tokens = n_windows * (seq_len - 1)
    mean_nll = math.fsum(window_nll) / tokens
    out = {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": tokens,
        "windows": n_windows,
        "seq_len": seq_len,
        "source": source,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    if per_window:
        out["window_nll"] = window_nll
    return out
