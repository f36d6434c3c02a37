"""``archquant-generate``: answer a prompt with an export folder (its GGUF in llama.cpp, or the packed model) or
any model name.

Every engine verifies the export folder's manifest before it serves: a modified or truncated file is refused
with the file named (``archquant.export.load`` for the packed model, the llama.cpp runtime for the GGUF).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from archquant.commands.session import load_by_name
from archquant.utils.errors import UserError

log = logging.getLogger(__name__)


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` (the prompt not included)."""
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def gguf_to_serve(name: str, engine: str) -> Path | None:
    """The GGUF ``archquant-generate`` runs in llama.cpp, or None for the torch path (see ``export.engine``).

    Raises:
        UserError: ``export.engine=llamacpp`` but there is no GGUF to run.
    """
    folder = Path(name)
    gguf = folder / "model.gguf" if folder.is_dir() else (folder if folder.suffix == ".gguf" else None)
    have = gguf is not None and gguf.is_file()
    if engine == "torch":
        return None
    if engine == "llamacpp":
        if not have:
            raise UserError(f"export.engine=llamacpp but {name} holds no model.gguf; export with "
                            "export.formats=[packed,gguf]")
        from archquant.engine.llamacpp import require_llama_cpp

        require_llama_cpp()
        return gguf
    return gguf if have and importlib.util.find_spec("llama_cpp") is not None else None


def generate(cfg) -> str:
    """``archquant-generate``: ``export.path=<folder>`` (or ``model.name``), ``export.prompt``."""
    name = cfg.export.path or cfg.model.name
    gguf = gguf_to_serve(name, cfg.export.engine)
    if gguf is not None:
        from archquant.engine.llamacpp import generate as llamacpp_generate

        log.info("generating with llama.cpp from %s", gguf)
        text = llamacpp_generate(gguf, cfg.export.prompt, cfg.export.max_new_tokens,
                                 n_threads=cfg.trainer.num_threads or 2)
    else:
        model, tok = load_by_name(name)
        text = generate_text(model, tok, cfg.export.prompt, cfg.export.max_new_tokens)
    print(cfg.export.prompt + text)
    return text
