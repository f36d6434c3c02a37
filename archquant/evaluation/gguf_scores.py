"""Scores of a GGUF in llama.cpp, cached per file: WikiText-2 NLL per window and zero-shot results per task.

The whole WikiText-2 test takes ~15 min per 135M-parameter file on 2 cores, so scores are kept per window, under
the file's sha256 together with the text file's, the window length and llama.cpp's version
(``$ARCHQUANT_SCORES``, default ``$ARCHQUANT_CACHE/gguf_scores``): a killed run resumes, a later run that asks for more windows scores only the
missing ones, and every script that scores the same file (``scripts/exp_joint_vs_sequential.py``,
``scripts/bench_llamacpp.py``) shares them. Each window's NLL is the sum over its ``seq_len - 1`` predicted tokens.
Each record also names its key (``"key"``) and the file it was last scored from (``"file"``), so a folder of
records kept with the results (the scripts' ``--scores results/gguf_scores``) is readable and carries a long
scoring run over to another machine that rebuilds the same files.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable

from archquant.utils.io import atomic_write_json

SCORES_ENV = "ARCHQUANT_SCORES"


def scores_dir() -> Path:
    """Folder of the score records: ``$ARCHQUANT_SCORES``, else ``$ARCHQUANT_CACHE/gguf_scores``."""
    import os

    from archquant.utils.paths import cache_dir

    env = os.environ.get(SCORES_ENV)
    return Path(env).expanduser() if env else cache_dir() / "gguf_scores"


def _key(path: str | Path, seq_len: int) -> dict:
    from archquant.data.config import DataConfig
    from archquant.data.files import resolve_data_path
    from archquant.engine.llamacpp import llama_cpp_version
    from archquant.utils.manifest import sha256_file

    return {"gguf_sha256": sha256_file(path), "text_sha256": sha256_file(resolve_data_path(DataConfig(), "ppl_file")),
            "seq_len": int(seq_len), "llama_cpp": llama_cpp_version()}


def cache_path(path: str | Path, seq_len: int) -> Path:
    """The score record of one GGUF at one window length."""
    key = list(_key(path, seq_len).values())
    return scores_dir() / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]}.json"


def _save(cache: Path, rec: dict, path: Path, seq_len: int) -> None:
    if "key" not in rec:  # hashing the GGUF and the text is not free: once per record
        rec["key"] = _key(path, seq_len)
    rec["file"] = path.name
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache, rec)


def load(cache: Path) -> dict:
    """``{"window_nll": {window: nll}, "zero_shot": {"task:limit": result}}`` (empty when nothing is cached)."""
    return json.loads(cache.read_text()) if cache.is_file() else {"window_nll": {}, "zero_shot": {}}


def perplexity(path: str | Path, tokenizer, windows: list[int] | None = None, *, seq_len: int = 512, threads: int = 2,
               chunk: int = 8, log: Callable[[str], None] = print, score_missing: bool = True) -> dict:
    """llama.cpp perplexity of a GGUF on WikiText-2 windows of ``seq_len`` tokens, every window cached.

    Args:
        windows: window indices (None: the whole test).
        chunk: windows scored between cache writes.
        score_missing: False scores nothing: when the record lacks some of ``windows``, ``ppl``, ``window_nll``
            and ``tokens`` are None (``unscored`` says how many it lacks).

    Returns:
        ``{"ppl", "window_nll" (in ``windows`` order), "windows", "of_windows", "tokens", "unscored"}``.
    """
    from archquant.data.config import DataConfig
    from archquant.data.files import resolve_data_path
    from archquant.engine.llamacpp import open_gguf_lm
    from archquant.evaluation.perplexity import perplexity as score
    from archquant.evaluation.perplexity import window_count

    path = Path(path)
    cache = cache_path(path, seq_len)
    rec = load(cache)
    ppl_file = resolve_data_path(DataConfig(), "ppl_file")
    n = window_count(tokenizer, ppl_file, seq_len)
    wanted = list(range(n)) if windows is None else [int(w) for w in windows]
    bad = [w for w in wanted if not 0 <= w < n]
    if bad:
        raise ValueError(f"windows {bad[:5]} are outside the {n} windows of {seq_len} tokens")
    missing = [w for w in wanted if str(w) not in rec["window_nll"]]
    if missing and not score_missing:
        return {"ppl": None, "window_nll": None, "windows": len(wanted), "of_windows": n, "tokens": None,
                "unscored": len(missing)}
    if missing:
        lm = open_gguf_lm(path, seq_len=seq_len, n_threads=threads)
        try:
            t0 = time.perf_counter()
            for i in range(0, len(missing), chunk):
                part = missing[i : i + chunk]
                got = score(lm, tokenizer, ppl_file, seq_len=seq_len, batch_size=1, per_window=True, window_indices=part)
                rec = load(cache)  # another process may have added windows meanwhile
                rec["window_nll"].update({str(w): x for w, x in zip(part, got["window_nll"])})
                _save(cache, rec, path, seq_len)
                done = i + len(part)
                log(f"  {path.name}: {done}/{len(missing)} windows, {(time.perf_counter() - t0) / done:.2f} s/window")
        finally:
            lm.runner.close()
    nll = [rec["window_nll"][str(w)] for w in wanted]
    tokens = len(nll) * (seq_len - 1)
    return {"ppl": math.exp(math.fsum(nll) / tokens), "window_nll": nll, "windows": len(wanted), "of_windows": n,
            "tokens": tokens, "unscored": 0}


def zero_shot(path: str | Path, tokenizer, jobs: list[tuple[str, int | None]], *, seq_len: int = 512,
              threads: int = 2, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Zero-shot results of a GGUF on llama.cpp's logits, cached per ``(task, limit)`` (``limit`` rows, None or 0:
    all): ``task -> {"acc", "acc_norm", "n", "stderr", "metric"}``."""
    from archquant.engine.llamacpp import open_gguf_lm
    from archquant.evaluation.zero_shot import zero_shot as run

    path = Path(path)
    cache = cache_path(path, seq_len)
    key = {task: f"{task}:{limit or 0}" for task, limit in jobs}
    todo = [(t, lim) for t, lim in jobs if key[t] not in load(cache)["zero_shot"]]
    if todo:
        lm = open_gguf_lm(path, seq_len=seq_len, n_threads=threads)
        try:
            for task, limit in todo:
                t0 = time.perf_counter()
                res = run(lm, tokenizer, tasks=[task], limit=limit or None, batch_size=1, progress=False,
                          max_length=seq_len)[task]
                rec = load(cache)
                rec["zero_shot"][key[task]] = {k: res.get(k) for k in ("acc", "acc_norm", "n", "stderr", "metric")}
                _save(cache, rec, path, seq_len)
                log(f"  {path.name}: {task} ({res['n']} rows, {time.perf_counter() - t0:.0f} s) "
                    f"{res['metric']} {res[res['metric']]:.4f}")
        finally:
            lm.runner.close()
    rec = load(cache)
    return {t: rec["zero_shot"][key[t]] for t, _ in jobs}
