"""Teach ``archquant-eval`` (``load_for_eval``) to load export folders through ``archquant.export.load``."""

from __future__ import annotations

from pathlib import Path

import torch

from archquant.commands.eval import register_eval_loader


def _is_export_folder(path: Path) -> bool:
    return path.is_dir() and (path / "archquant.json").is_file() and (path / "manifest.json").is_file()


@register_eval_loader
def load_export_for_eval(name: str, dtype: torch.dtype):
    """``(model, tokenizer)`` of an export folder, or ``None`` for any other model name."""
    path = Path(name).expanduser()
    if not _is_export_folder(path):
        return None
    from archquant.export.packed import load, load_tokenizer

    model = load(path)
    if dtype != torch.float32:
        model = model.to(dtype)
    tok = load_tokenizer(path)
    if tok is None:
        raise ValueError(f"export folder {path} holds no tokenizer; re-export with the tokenizer to evaluate it")
    return model, tok
