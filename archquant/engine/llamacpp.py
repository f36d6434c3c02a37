"""Run a GGUF in llama.cpp (through ``llama-cpp-python``): logits for token ids, greedy generation, timing.

``LlamaCppRunner`` drives llama.cpp's C API through the binding's thin wrappers (model, context,
batch), not the high-level ``Llama`` class: that class allocates an ``n_ctx x vocab`` score buffer
and copies logits on every call, which would be timed along with llama.cpp. Before a file is loaded
it is checked against the ``manifest.json`` of its folder when it has one (an export folder: a
modified or truncated copy is refused by name, not served), then its metadata (``check_gguf``) for
the shapes that abort the process instead of raising.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from archquant.engine.gguf_reader import check_gguf
from archquant.utils.errors import MissingFileError, UserError
from archquant.utils.manifest import verify_file

INSTALL_HINT = (
    "pip install llama-cpp-python==0.3.36  (PyPI has only the source: it compiles llama.cpp with cmake + a C++ "
    "compiler, ~12 min on 2 cores; pip caches the built wheel)"
)
KV_TYPES = {"f16": 1, "f32": 0}  # GGML_TYPE_F16 / GGML_TYPE_F32


class LlamaCppMissingError(UserError, ImportError):
    """``llama-cpp-python`` is not installed."""


def require_llama_cpp():
    """Import ``llama_cpp`` or raise with the install command; refuse a build this machine cannot run."""
    try:
        import llama_cpp
    except ImportError as err:
        raise LlamaCppMissingError(f"the llamacpp backend needs llama-cpp-python: {INSTALL_HINT}") from err
    _quiet(llama_cpp)
    _check_amx(llama_cpp)
    return llama_cpp


AMX_REBUILD = (
    "CMAKE_ARGS=\"-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
    "-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'\" "
    "pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36"
)
_PROBE = """
import tempfile
from pathlib import Path
from archquant.engine.gguf_writer import export_gguf
from archquant.engine.llamacpp import LlamaCppRunner
from archquant.engine.presets import quantize_gguf
from archquant.models.tiny import tiny_llama
from archquant.models.tokenizers import byte_tokenizer
tok = byte_tokenizer()
with tempfile.TemporaryDirectory() as d:
    f16 = export_gguf(tiny_llama(vocab_size=len(tok)), Path(d) / "f16.gguf", tokenizer=tok)
    path = quantize_gguf(f16, Path(d) / "q8_0.gguf", "Q8_0", pure=True)  # AMX runs quantised matmuls
    with LlamaCppRunner(path, n_ctx=32) as runner:
        runner.logits(list(range(1, 17)))
"""
_AMX_OK: bool | None = None
_PROBE_ENV = "ARCHQUANT_LLAMACPP_PROBE"  # set in the probe's own process


def _check_amx(llama_cpp, probe: str = _PROBE) -> None:
    """A llama.cpp compiled with ``-march=native`` on a CPU that reports AMX uses AMX tile instructions in its
    matmuls; a virtual machine that reports AMX without running it kills the process with SIGILL at the first
    matmul, with no message. Where the build has AMX, a child process decodes a tiny model once (the verdict is
    cached per build and CPU); if the child dies by SIGILL this raises with the rebuild command."""
    import os

    global _AMX_OK
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    if _AMX_OK or "AMX_INT8 = 1" not in info or os.environ.get(_PROBE_ENV):
        return
    import hashlib
    import json
    import signal
    import subprocess
    import sys

    from archquant.utils.env import _cpu_model
    from archquant.utils.io import atomic_write_json
    from archquant.utils.paths import cache_dir

    # a reinstall (another build of the same version) rewrites the package: its files' times are in the key
    build = sorted((f.name, f.stat().st_mtime_ns) for f in Path(llama_cpp.__file__).parent.rglob("*.so*"))
    key = [llama_cpp_version(), info, _cpu_model(), probe, build]
    verdict = cache_dir() / "llamacpp_probe" / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.json"
    if verdict.is_file():
        ok = json.loads(verdict.read_text())["ok"]
    else:
        try:
            proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600,
                                  env={**os.environ, _PROBE_ENV: "1"})
        except subprocess.TimeoutExpired as err:
            raise RuntimeError("the llama.cpp probe (a tiny model decoded in a child process) did not finish in "
                               "10 minutes") from err
        if proc.returncode not in (0, -signal.SIGILL):
            raise RuntimeError(f"the llama.cpp probe failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        ok = proc.returncode == 0
        try:  # a cache that cannot be written costs a probe per process, nothing else
            verdict.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(verdict, {"ok": ok, "system_info": info, "cpu": _cpu_model()})
        except OSError:
            pass
    if not ok:
        raise LlamaCppMissingError(
            "this llama-cpp-python build uses AMX tile instructions (its system info: AMX_INT8 = 1) that this machine "
            "does not run: llama.cpp dies with SIGILL at its first matmul (a virtual machine whose CPU reports AMX). "
            f"Rebuild it without AMX: {AMX_REBUILD}  (verdict kept in {verdict})")
    _AMX_OK = True


_LOG_CB = None


def _quiet(llama_cpp) -> None:
    """Route llama.cpp's own logging to nowhere (it prints every tensor on load otherwise)."""
    global _LOG_CB
    if _LOG_CB is None:
        _LOG_CB = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_LOG_CB, None)


def llama_cpp_version() -> str:
    """``llama-cpp-python`` version string (tables record it), or ``missing``."""
    try:
        from importlib.metadata import version

        return version("llama-cpp-python")
    except Exception:
        return "missing"


class LlamaCppRunner:
    """One GGUF loaded in llama.cpp on the CPU.

    Args:
        gguf_path: the model file.
        n_ctx: KV-cache length (tokens).
        n_threads: CPU threads for decode and prompt processing.
        n_batch: the most tokens one ``decode`` call takes (prefill longer prompts in chunks).
        kv_type: ``f16`` (llama.cpp's default) or ``f32`` (for bit-level comparisons with torch).
        flash_attn: llama.cpp's fused attention (off: the binding's default).
        check: validate the file's shapes before loading.
        verify: when the file's folder has a ``manifest.json``, check the file against it before loading.

    Raises:
        ManifestError: the file differs from its folder's manifest (modified, truncated or not listed).
        GGUFShapeError: a shape that would abort llama.cpp (``check``).
    """

    def __init__(
        self,
        gguf_path: str | Path,
        *,
        n_ctx: int = 512,
        n_threads: int = 2,
        n_batch: int = 512,
        kv_type: str = "f16",
        flash_attn: bool = False,
        check: bool = True,
        verify: bool = True,
    ) -> None:
        llama_cpp = require_llama_cpp()
        from llama_cpp import _internals as internals

        self.path = Path(gguf_path)
        if not self.path.exists():
            raise MissingFileError(f"GGUF {self.path} does not exist (export one with archquant-export format=gguf)")
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {sorted(KV_TYPES)}, got {kv_type!r}")
        if verify:
            verify_file(self.path)
        self.info = check_gguf(self.path) if check else {}
        self._llama_cpp = llama_cpp
        mparams = llama_cpp.llama_model_default_params()
        self._model = internals.LlamaModel(path_model=str(self.path), params=mparams, verbose=False)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = int(n_ctx)
        cparams.n_batch = int(n_batch)
        cparams.n_ubatch = int(n_batch)
        cparams.n_threads = int(n_threads)
        cparams.n_threads_batch = int(n_threads)
        cparams.type_k = KV_TYPES[kv_type]
        cparams.type_v = KV_TYPES[kv_type]
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cparams.no_perf = True
        self._ctx = internals.LlamaContext(model=self._model, params=cparams, verbose=False)
        self._batch = internals.LlamaBatch(n_tokens=int(n_batch), embd=0, n_seq_max=1, verbose=False)
        self.n_ctx = int(n_ctx)
        self._cached: list[int] = []  # token ids whose KV entries the cache holds (``logits_from``)
        self.n_batch = int(n_batch)
        self.n_threads = int(n_threads)
        self.kv_type = kv_type
        self.flash_attn = bool(flash_attn)
        self.n_vocab = self._model.n_vocab()

    # ---- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Free the context and the model (idempotent)."""
        for obj in ("_batch", "_ctx", "_model"):
            h = getattr(self, obj, None)
            if h is not None:
                h.close()
                setattr(self, obj, None)

    def __enter__(self) -> LlamaCppRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ---- evaluation --------------------------------------------------------------------------
    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if not ids:
            raise ValueError("token ids must not be empty")
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.n_vocab})")
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens do not fit n_ctx={self.n_ctx}; create the runner with a larger n_ctx")
        return ids

    def _decode(self, ids: list[int], n_past: int, all_logits: bool) -> None:
        self._batch.set_batch(batch=ids, n_past=n_past, logits_all=all_logits)
        self._ctx.decode(self._batch)
        self._cached = []  # the cache's content is no longer a known prefix for ``logits_from``

    def _logits_rows(self, n: int) -> np.ndarray:
        return np.ctypeslib.as_array(self._ctx.get_logits(), shape=(n, self.n_vocab)).copy()

    def reset(self) -> None:
        """Empty the KV cache."""
        self._ctx.kv_cache_clear()
        self._cached = []

    def logits_from(self, ids: Sequence[int] | torch.Tensor, first: int = 0) -> torch.Tensor:
        """Logits of positions ``first ..`` of one sequence, reusing the KV cache of the previous ``logits_from``
        call for the prefix both share (the choices of a multiple-choice question share their context).

        Only the requested positions get logits (llama.cpp then skips the vocabulary projection of the others).
        Positions before ``first`` that the cache already holds are not decoded again; the rest are.

        Shape: ``ids [S]`` -> ``[S - first, vocab]`` float32.
        """
        ids = self._check_ids(ids)
        if not 0 <= first < len(ids):
            raise ValueError(f"first={first} must index one of the {len(ids)} positions")
        keep = 0
        for a, b in zip(self._cached, ids[:first]):  # positions >= first need logits, so they are decoded again
            if a != b:
                break
            keep += 1
        self._ctx.kv_cache_seq_rm(-1, keep, -1)
        rows, done = [], ids[:keep]
        for start in range(keep, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            batch = self._batch.batch
            batch.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.seq_id[i][0], batch.n_seq_id[i] = tok, start + i, 0, 1
                batch.logits[i] = start + i >= first
            self._ctx.decode(self._batch)
            n_out = sum(1 for i in range(len(chunk)) if start + i >= first)
            if n_out:
                rows.append(self._logits_rows(n_out))
            done = done + chunk
        self._cached = done
        return torch.from_numpy(np.concatenate(rows, axis=0))

    def logits(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits of every position of one sequence, from an empty cache.

        Shape: ``ids [S]`` -> ``[S, vocab]`` float32.
        """
        ids = self._check_ids(ids)
        self.reset()
        rows = []
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            self._decode(chunk, start, True)
            rows.append(self._logits_rows(len(chunk)))
        return torch.from_numpy(np.concatenate(rows, axis=0))

    def generate_ids(self, ids: Sequence[int], max_new_tokens: int, *, stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy continuation of ``ids`` (new ids only; stops after a token in ``stop_ids``)."""
        ids = self._check_ids(ids)
        if len(ids) + max_new_tokens > self.n_ctx:
            raise ValueError(f"prompt {len(ids)} + {max_new_tokens} new tokens exceed n_ctx={self.n_ctx}")
        self.reset()
        for start in range(0, len(ids), self.n_batch):
            self._decode(ids[start : start + self.n_batch], start, False)
        pos, out = len(ids), []
        stop = {int(s) for s in stop_ids}
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(np.ctypeslib.as_array(self._ctx.get_logits_ith(-1), shape=(self.n_vocab,))))
            out.append(nxt)
            if nxt in stop:
                break
            self._decode([nxt], pos, False)
            pos += 1
        return out

    # ---- text --------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Token ids of ``text`` with the GGUF's own tokenizer (BOS added only if the file says so)."""
        add_bos = bool(self._model.add_bos_token()) if add_special else False
        return self._model.tokenize(text.encode("utf-8"), add_bos, True)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._model.detokenize([int(i) for i in ids]).decode("utf-8", errors="replace")

    @property
    def eos_id(self) -> int:
        return int(self._model.token_eos())

    def chat_template(self) -> str | None:
        return self._model.metadata().get("tokenizer.chat_template")

    # ---- timing ------------------------------------------------------------------------------
    def time_decode(self, context: int = 256, tokens: int = 32, warmup: int = 3, seed: int = 0) -> dict:
        """Milliseconds per decoded token with ``context`` tokens in the KV cache (batch 1).

        Every timed token is decoded at position ``context`` (its KV entry is removed after), so all
        samples see the same cache length. Returns the median and the samples (noise is reported, not hidden).
        """
        if context + 1 > self.n_ctx:
            raise ValueError(f"context {context} does not fit n_ctx={self.n_ctx}")
        rng = np.random.default_rng(seed)
        prompt = rng.integers(0, self.n_vocab, size=context).tolist()
        self.reset()
        for start in range(0, context, self.n_batch):
            self._decode(prompt[start : start + self.n_batch], start, False)
        samples = []
        tok = rng.integers(0, self.n_vocab, size=warmup + tokens).tolist()
        for i, t in enumerate(tok):
            t0 = time.perf_counter()
            self._decode([t], context, False)
            dt = (time.perf_counter() - t0) * 1e3
            self._ctx.kv_cache_seq_rm(0, context, -1)
            if i >= warmup:
                samples.append(dt)
        return {"ms": statistics.median(samples), "samples": samples, "context": context}

    def time_prefill(self, length: int = 128, repeats: int = 5, warmup: int = 1, seed: int = 0) -> dict:
        """Milliseconds to process a ``length``-token prompt from an empty cache (one decode call, batch 1)."""
        if length > min(self.n_ctx, self.n_batch):
            raise ValueError(f"prefill length {length} exceeds n_ctx={self.n_ctx} / n_batch={self.n_batch}")
        rng = np.random.default_rng(seed)
        prompt = rng.integers(0, self.n_vocab, size=length).tolist()
        samples = []
        for i in range(warmup + repeats):
            self.reset()
            t0 = time.perf_counter()
            self._decode(prompt, 0, False)
            dt = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                samples.append(dt)
        return {"ms": statistics.median(samples), "samples": samples, "prefill_len": length}


def generate(
    gguf_path: str | Path,
    prompt: str,
    max_new_tokens: int = 64,
    *,
    chat: bool = False,
    n_threads: int = 2,
    n_ctx: int = 2048,
) -> str:
    """Answer ``prompt`` with a GGUF (greedy).

    Args:
        gguf_path: model file (e.g. the ``model.gguf`` of an export folder).
        prompt: the text; with ``chat=True`` it is wrapped as one user message in the file's chat template.
        max_new_tokens: most tokens to generate (stops early at end-of-sequence).
        chat: apply ``tokenizer.chat_template`` from the GGUF.
        n_threads: CPU threads.
        n_ctx: KV-cache length.

    Returns:
        The generated text (without the prompt).

    Raises:
        ManifestError: the file differs from the ``manifest.json`` of its folder (see ``LlamaCppRunner``).
    """
    with LlamaCppRunner(gguf_path, n_ctx=n_ctx, n_threads=n_threads) as runner:
        text = prompt
        if chat:
            template = runner.chat_template()
            if not template:
                raise ValueError(f"{gguf_path} has no tokenizer.chat_template; call generate(..., chat=False)")
            import jinja2.sandbox

            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            text = env.from_string(template).render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = runner.tokenize(text)
        out = runner.generate_ids(ids, max_new_tokens, stop_ids=[runner.eos_id])
        if out and out[-1] == runner.eos_id:
            out = out[:-1]
        return runner.detokenize(out)


class LlamaCppLM(torch.nn.Module):
    """A GGUF seen as a causal-LM module for ``archquant.evaluation`` (perplexity, zero-shot scoring).

    ``forward(input_ids)`` returns llama.cpp's logits for every position of every row (each row from
    an empty cache; right padding therefore never affects the real positions). With ``logits_to_keep``
    (zero-shot scoring: only the continuation's positions are needed) each row reuses the cache of the prefix
    it shares with the previous row and only the kept positions are projected to the vocabulary;
    ``reuses_prefix`` tells ``loglikelihood`` to send rows one at a time in token order, so that the choices
    of one question follow each other.

    Args:
        runner: an open ``LlamaCppRunner`` (its ``n_ctx`` is the longest row accepted).
    """

    reuses_prefix = True

    def __init__(self, runner: LlamaCppRunner) -> None:
        super().__init__()
        self.runner = runner
        # read by archquant.evaluation.loglik.model_max_length
        self.config = type("GGUFConfig", (), {"max_position_embeddings": runner.n_ctx})()

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int | None = None) -> torch.Tensor:
        """Shape: ``input_ids [B, S]`` -> logits ``[B, S, vocab]`` (``[B, logits_to_keep, vocab]``) float32."""
        rows = input_ids.cpu()
        if logits_to_keep is None:
            return torch.stack([self.runner.logits(row) for row in rows])
        first = max(0, rows.shape[1] - int(logits_to_keep))
        return torch.stack([self.runner.logits_from(row, first) for row in rows])


def open_gguf_lm(path: str | Path, *, seq_len: int = 512, n_threads: int = 2, verify: bool = True) -> LlamaCppLM:
    """A GGUF as a module ``archquant.evaluation`` can score (rows up to ``max(seq_len, 512)`` tokens);
    close it with ``lm.runner.close()``."""
    n_ctx = max(int(seq_len), 512)
    return LlamaCppLM(LlamaCppRunner(path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads, verify=verify))
