"""Calibration text cut into disjoint calibration / validation token blocks, cached on disk.

The text is tokenised once per (tokenizer, file) and the token stream cached under
``cache_dir()/tokens/``; blocks are non-overlapping ``seq_len`` slices of that stream. The last
``val_fraction`` of the blocks is the validation pool and the rest the calibration pool, so the two
splits never share a token whatever ``num_calib_blocks`` / ``num_val_blocks`` are; inside each pool a
seeded draw picks the blocks (spread over the whole book rather than its first chapters).
"""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import torch

from archquant.data.config import DataConfig
from archquant.data.files import file_sha256, resolve_data_path
from archquant.utils.io import atomic_write_bytes
from archquant.utils.paths import cache_dir

GUTENBERG_START = "*** START OF TH"  # "THIS" or "THE" PROJECT GUTENBERG EBOOK ...
GUTENBERG_END = "*** END OF TH"
CACHE_VERSION = 1  # bump when the tokenisation or block rule changes


def tokenizer_fingerprint(tokenizer) -> str:
    """A short stable hash of a tokenizer's full definition (vocab, merges, normaliser, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        payload = backend.to_str()
    else:  # slow tokenizers: the vocabulary and class identify them well enough
        payload = type(tokenizer).__name__ + repr(sorted(tokenizer.get_vocab().items()))
    payload += repr((tokenizer.bos_token, tokenizer.eos_token))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def strip_gutenberg(text: str) -> str:
    """The book between Project Gutenberg's START and END marker lines (the text itself if absent)."""
    start = text.find(GUTENBERG_START)
    if start >= 0:
        nl = text.find("\n", start)
        text = text[nl + 1 :] if nl >= 0 else ""
    end = text.find(GUTENBERG_END)
    if end >= 0:
        text = text[:end]
    return text.strip("\n") + "\n"


def read_text(path: str | Path, *, gutenberg: bool = False) -> str:
    """Read a UTF-8 text file, optionally keeping only the Gutenberg book body."""
    text = Path(path).read_text(encoding="utf-8")
    return strip_gutenberg(text) if gutenberg else text


def encode_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a whole text, without special tokens.

    Shape:
        returns ``[T]`` int64.
    """
    # verbose=False: a long text exceeds model_max_length by design; it is cut into windows later.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _save_tensor(path: Path, tensor: torch.Tensor) -> None:
    buf = io.BytesIO()
    torch.save(tensor, buf)
    atomic_write_bytes(path, buf.getvalue())  # concurrent runs never read half a file


def _token_dir(tokenizer, path: Path, gutenberg: bool) -> Path:
    key = f"v{CACHE_VERSION}-{file_sha256(path)[:16]}-{'pg' if gutenberg else 'raw'}"
    return cache_dir() / "tokens" / tokenizer_fingerprint(tokenizer) / key


def token_stream(tokenizer, path: str | Path, *, gutenberg: bool = False, cache: bool = True) -> torch.Tensor:
    """Token ids of a text file, cached on disk by tokenizer fingerprint + file sha256.

    Shape:
        returns ``[T]`` int64.
    """
    path = Path(path)
    target = _token_dir(tokenizer, path, gutenberg) / "stream.pt"
    if cache and target.exists():
        return torch.load(target).long()
    ids = encode_text(tokenizer, read_text(path, gutenberg=gutenberg))
    if cache:
        # int32 halves the file; every vocabulary here is far below 2**31
        _save_tensor(target, ids.to(torch.int32))
    return ids


def split_block_indices(num_blocks: int, n: int, split: str, *, val_fraction: float, seed: int) -> list[int]:
    """Indices of the ``n`` blocks of one split out of ``num_blocks`` consecutive blocks.

    The last ``ceil(val_fraction * num_blocks)`` blocks form the validation pool, the others the
    calibration pool; a seeded draw without replacement picks ``n`` of the pool, returned sorted.

    Raises:
        ValueError: the pool holds fewer than ``n`` blocks (names the key to lower).
    """
    if split not in ("calib", "val"):
        raise ValueError(f"split must be 'calib' or 'val', got {split!r}")
    n_val_pool = max(1, math.ceil(val_fraction * num_blocks))
    pool = range(num_blocks - n_val_pool, num_blocks) if split == "val" else range(0, num_blocks - n_val_pool)
    if n > len(pool):
        key = "num_val_blocks" if split == "val" else "num_calib_blocks"
        raise ValueError(
            f"data.{key}={n} but the text gives only {len(pool)} {split} blocks of this length "
            f"({num_blocks} blocks in all, val_fraction={val_fraction}); lower data.{key} or data.seq_len, "
            "or point data.calib_file at a longer text"
        )
    gen = torch.Generator().manual_seed(seed + (1 if split == "val" else 0))
    pick = torch.randperm(len(pool), generator=gen)[:n]
    return sorted(pool[int(i)] for i in pick)


def calibration_blocks(tokenizer, data_cfg: DataConfig | None = None, split: str = "calib") -> torch.Tensor:
    """Disjoint calibration or validation token blocks from the calibration text.

    Args:
        tokenizer: the model's tokenizer.
        data_cfg: ``data`` config (file, ``seq_len``, block counts, seed); None = defaults.
        split: ``calib`` (``data.num_calib_blocks`` blocks) or ``val`` (``data.num_val_blocks``).

    Returns:
        Token ids, cached under ``cache_dir()/tokens/<tokenizer>/<file>/``.

    Shape:
        returns ``[N, seq_len]`` int64.
    """
    data_cfg = data_cfg or DataConfig()
    if split not in ("calib", "val"):
        raise ValueError(f"split must be 'calib' or 'val', got {split!r}")
    path = resolve_data_path(data_cfg, "calib_file")
    n = data_cfg.num_calib_blocks if split == "calib" else data_cfg.num_val_blocks
    seq_len = data_cfg.seq_len
    folder = _token_dir(tokenizer, path, data_cfg.strip_gutenberg)
    target = folder / f"blocks-{split}-L{seq_len}-n{n}-s{data_cfg.seed}-v{data_cfg.val_fraction:g}.pt"
    if target.exists():
        return torch.load(target).long()
    stream = token_stream(tokenizer, path, gutenberg=data_cfg.strip_gutenberg)
    num_blocks = stream.numel() // seq_len
    idx = split_block_indices(num_blocks, n, split, val_fraction=data_cfg.val_fraction, seed=data_cfg.seed)
    blocks = stream[: num_blocks * seq_len].view(num_blocks, seq_len)[idx].clone()  # [N, seq_len]
    _save_tensor(target, blocks.to(torch.int32))
    return blocks
