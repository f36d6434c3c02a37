"""llama.cpp's own quantisation presets (``llama-quantize``), the baseline every CPU front is measured against.

A CPU user's alternative to archquant is ``llama-quantize model-f32.gguf out.gguf Q4_K_M``: llama.cpp's
quantiser with its per-tensor mixes (Q4_K_M keeps some ``attn_v`` / ``ffn_down`` at Q6_K) and its
fallbacks for rows that are not multiples of 256 (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K ->
Q4_0). ``quantize_gguf`` runs exactly that, through llama-cpp-python's binding of ``llama_model_quantize``,
from an F32 GGUF of the original model (``write_source_gguf``). ``preset_files`` makes and caches one file
per preset; ``original`` names the model's own GGUF file as it is (for the embedded default, its Q4_1 file).
"""

from __future__ import annotations

import ctypes
import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from archquant.engine.llamacpp import require_llama_cpp
from archquant.utils.errors import MissingFileError, UserError
from archquant.utils.io import atomic_write_json
from archquant.utils.manifest import sha256_file

ORIGINAL = "original"
# llama-quantize's preset names (``LLAMA_FTYPE_MOSTLY_<name>``) that the CPU backend runs
PRESETS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
           "IQ4_NL", "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K")
DEFAULT_PRESETS = (ORIGINAL, "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_1", "Q4_0", "Q3_K_M")


class PresetError(UserError, ValueError):
    """A preset name llama-quantize does not have, or a preset that cannot be made."""


def check_presets(names: Sequence[str]) -> list[str]:
    """Canonical (upper-case) preset names, ``original`` kept; raises naming the allowed ones."""
    out = []
    for name in names:
        key = ORIGINAL if str(name).lower() == ORIGINAL else str(name).upper()
        if key != ORIGINAL and key not in PRESETS:
            raise PresetError(f"pareto.presets has {name!r}, which is not a llama-quantize preset; choose from "
                              f"{[ORIGINAL, *PRESETS]}")
        if key not in out:
            out.append(key)
    return out


def ftype(preset: str) -> int:
    """llama.cpp's ``llama_ftype`` value of a preset."""
    llama_cpp = require_llama_cpp()
    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}", None)
    if value is None:
        raise PresetError(f"this llama-cpp-python build has no preset {preset!r}")
    return int(value)


def quantize_gguf(src: str | Path, dst: str | Path, preset: str, *, threads: int = 0, pure: bool = False,
                  imatrix: dict[str, np.ndarray] | None = None, token_embedding_type: int | None = None) -> Path:
    """``llama-quantize src dst preset`` through ``llama_model_quantize``.

    Args:
        src: an F32/F16 GGUF.
        dst: the output GGUF (written by llama.cpp; removed if it fails).
        preset: a name of ``PRESETS`` (a preset's tensor mix) or a plain type with ``pure``.
        threads: quantisation threads (0: llama.cpp's default).
        pure: every tensor in the preset's base type (no per-tensor mix).
        imatrix: per-tensor importance (GGUF tensor name -> per-input-channel mean of x^2).
        token_embedding_type: a ``ggml_type`` value for ``token_embd`` (None: llama.cpp's choice).
    """
    llama_cpp = require_llama_cpp()
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise MissingFileError(f"llama-quantize source {src} does not exist")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype(preset)
    params.nthread = int(threads)
    params.pure = bool(pure)
    if token_embedding_type is not None:
        params.token_embedding_type = int(token_embedding_type)
    keep = []  # buffers the C call reads: alive until it returns
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, data) in enumerate(imatrix.items()):
            buf = np.ascontiguousarray(data, dtype=np.float32)
            keep.append(buf)
            arr[i].name = name.encode()
            arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = buf.size
        arr[len(imatrix)].name = None  # terminator
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(arr)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise PresetError(f"llama_model_quantize({src.name} -> {preset}) failed (returned {rc})")
    tmp.replace(dst)
    return dst


def write_source_gguf(model, path: str | Path, *, source_gguf=None, tokenizer=None) -> Path:
    """The original model as an all-F32 GGUF: what llama-quantize starts from."""
    from archquant.engine.gguf_writer import export_gguf

    return export_gguf(model, path, source_gguf=source_gguf, tokenizer=tokenizer, types={16: "F32"},
                       name="original-f32")


def preset_files(model, folder: str | Path, presets: Sequence[str], *, source_gguf=None, tokenizer=None,
                 threads: int = 0, log=print) -> dict[str, Path]:
    """One GGUF per preset in ``folder`` (``<preset>.gguf``; ``original`` is ``source_gguf`` itself).

    Files are reused while ``folder/presets.json`` records the same F32 source (sha256, of the source written
    now) and llama.cpp version, so a later run of the same model quantises nothing again.
    """
    llama_cpp = require_llama_cpp()
    names = check_presets(presets)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    if ORIGINAL in names:
        if source_gguf is None:
            raise PresetError("pareto.presets has 'original' but the model was not loaded from a GGUF file; "
                              "drop 'original' from pareto.presets")
        out[ORIGINAL] = Path(source_gguf)
    todo = [n for n in names if n != ORIGINAL]
    if not todo:
        return out
    src = folder / "original-f32.gguf"
    record_path = folder / "presets.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    # the source is written afresh each time (seconds) and compared by hash: the folder may have been made
    # from other weights of a model of the same name
    fresh = write_source_gguf(model, folder / "original-f32.new.gguf", source_gguf=source_gguf, tokenizer=tokenizer)
    fresh.replace(src)
    key = {"source_sha256": sha256_file(src), "llama_cpp_python": llama_cpp.__version__}
    if record.get("key") != key:
        for stale in folder.glob("*.gguf"):
            if stale != src:
                stale.unlink()
        record = {"key": key, "files": {}}
    for name in todo:
        dst = folder / f"{name}.gguf"
        if not dst.exists():
            log(f"llama-quantize {name} -> {dst}")
            quantize_gguf(src, dst, name, threads=threads)
            record["files"][name] = {"bytes": dst.stat().st_size}
            atomic_write_json(record_path, record)
        out[name] = dst
    return out


def copy_preset(path: str | Path, folder: str | Path) -> Path:
    """Put a preset's GGUF (as llama.cpp wrote it) into an export folder as ``model.gguf``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / "model.gguf"
    shutil.copyfile(path, dst)
    return dst
