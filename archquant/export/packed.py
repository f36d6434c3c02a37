"""The packed export folder (DESIGN section 9): write it atomically, verify it, load it onto ``QuantLinear``.

Folder layout::

    config.json             ArchQuantConfig (per-layer dims, per-module bits) + ``auto_map`` + ``archquant_export``
    model.safetensors       QuantLinear packed states (``qweight`` int32, ``scales`` fp16, ``zeros`` uint8,
                            ``qmeta``; ``weight`` for 16-bit linears), embedding, norms. No pickle.
    modeling_archquant.py   self-contained model code for ``from_pretrained(..., trust_remote_code=True)``,
                            generated from ``archquant.models.hetero`` (``remote_code.render``)
    tokenizer files         whatever ``tokenizer.save_pretrained`` writes
    archquant.json          the search record: decisions, predicted/measured latency, metrics, versions
    compressed-tensors/     stock Llama checkpoint for vLLM (uniform subnets only)
    model.gguf              llama.cpp file (when asked for)
    manifest.json           sha256 + size of every file above, written last

``pack_model`` turns a materialised subnet (raw weights, fake-quant forward) into the in-memory packed
model: ``archquant.kernels.swap.to_runtime`` puts every decoder linear and an untied lm_head on
``archquant.kernels.qlinear.QuantLinear`` (quantised once by the reference quantiser), and the embedding
is rounded to ``float_dtype`` (its storage dtype) but kept in fp32 for compute. ``load`` rebuilds exactly
that model from the folder, so the round trip is bit-exact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from archquant.backends import BackendError
from archquant.core.layout import model_layout
from archquant.export.remote_code.render import modeling_source
from archquant.kernels.qlinear import QuantLinear, _resolve_backend
from archquant.kernels.swap import linear_module_names, to_runtime
from archquant.utils.errors import ExistingFileError, UserError
from archquant.utils.manifest import MANIFEST_NAME, verify_manifest, write_manifest

EXPORT_FORMAT_VERSION = 1
RECORD_NAME = "archquant.json"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
REMOTE_CODE_NAME = "modeling_archquant.py"
REQUIRED_FILES = (CONFIG_NAME, WEIGHTS_NAME, RECORD_NAME, MANIFEST_NAME)
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ExportFormatError(UserError, ValueError):
    """An export folder that is incomplete, from a newer format version, or not an archquant export."""


def packed_backend_name(name: str) -> tuple[str, bool]:
    """The backend ``QuantLinear`` runs for a subnet searched for ``name``, and whether it is the same engine.

    ``QuantLinear`` executes the reference quantiser; a backend with other semantics (llama.cpp's
    block-32 formats) is packed with the reference quantiser instead, and its GGUF is the faithful export.
    """
    try:
        _resolve_backend(name)
        return name, True
    except BackendError:
        return "torch", False


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


@torch.no_grad()
def pack_model(
    model: nn.Module, *, float_dtype: str = "float16", paths: Sequence[str] | None = None, inplace: bool = False
) -> nn.Module:
    """The in-memory packed model of a materialised subnet (what ``save`` writes and ``load`` returns).

    Args:
        model: ``ArchQuantForCausalLM`` with raw weights (from ``materialize`` or distillation).
        float_dtype: storage dtype of the embedding and 16-bit linears (``float16``, ``bfloat16``, ``float32``).
        paths: ``QuantLinear`` execution paths (``("dense",)``: fp32, bit-exact with fake-quant).
        inplace: modify ``model`` instead of a deep copy.

    Returns:
        The model with ``QuantLinear`` layers, in eval mode.
    """
    import copy

    if float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"export.float_dtype must be one of {sorted(FLOAT_DTYPES)}, got {float_dtype!r}")
    fdt = FLOAT_DTYPES[float_dtype]
    if is_packed(model):
        return model
    layout = model_layout(model.config)
    backend, _ = packed_backend_name(layout.backend)
    src = model if inplace else copy.deepcopy(model)
    src.eval()
    emb = src.model.embed_tokens.weight
    emb.data = emb.data.to(fdt).float()  # the values the stored dtype holds; compute stays fp32
    if layout.tied_lm_head:
        src.lm_head.weight = emb  # keep sharing the (rounded) embedding: the file stores it once
    to_runtime(src, backend=backend, paths=paths, float_dtype=fdt, keep_tied_head=True)
    return src.eval()


# ---- save --------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    """What ``save`` wrote: the folder, the packed model it holds, and per-format outcomes."""

    path: Path
    packed_model: nn.Module
    formats: dict[str, dict[str, Any]] = field(default_factory=dict)


def packed_state_dict(packed: nn.Module, float_dtype: str) -> dict[str, torch.Tensor]:
    """Flat ``name -> tensor`` of a packed model, as stored (tied lm_head left out)."""
    fdt = FLOAT_DTYPES[float_dtype]
    out: dict[str, torch.Tensor] = {}
    qnames = set()
    for name, mod in packed.named_modules():
        if isinstance(mod, QuantLinear):
            qnames.add(name)
            for k, v in mod.packed_state().items():
                out[f"{name}.{k}"] = v.cpu().contiguous()
    tied = not isinstance(packed.lm_head, QuantLinear)  # pack_model leaves only a tied 16-bit lm_head unpacked
    for name, t in packed.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner in qnames or (tied and name.startswith("lm_head.")):
            continue
        t = t.detach().cpu()
        if name == "model.embed_tokens.weight":
            t = t.to(fdt)
        out[name] = t.contiguous()
    return out


def export_config_dict(packed: nn.Module, *, float_dtype: str, packed_backend: str) -> dict[str, Any]:
    """``config.json`` of the packed folder: the ArchQuantConfig plus remote-code and format entries."""
    cfg = packed.config.to_dict()
    cfg["architectures"] = ["ArchQuantForCausalLM"]
    cfg["auto_map"] = {
        "AutoConfig": "modeling_archquant.ArchQuantConfig",
        "AutoModel": "modeling_archquant.ArchQuantModel",
        "AutoModelForCausalLM": "modeling_archquant.ArchQuantForCausalLM",
    }
    cfg["archquant_export"] = {
        "format_version": EXPORT_FORMAT_VERSION,
        "float_dtype": float_dtype,
        "packed_backend": packed_backend,
        "weights": WEIGHTS_NAME,
    }
    return cfg


def _tmp_folder(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))


def commit_folder(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move a finished temporary folder into place (a rename: readers never see half a folder)."""
    for p in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700; an export is meant to be shared
        p.chmod(0o755 if p.is_dir() else 0o644)
    if path.exists():
        if not overwrite:
            raise ExistingFileError(f"{path} already exists; choose another export.out or pass export.overwrite=true")
        trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, trash / "old")
        os.replace(tmp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, path)


def write_packed(folder: Path, packed: nn.Module, *, float_dtype: str, packed_backend: str, tokenizer=None) -> None:
    """Write the packed-format files (config, weights, remote code, tokenizer) into ``folder``."""
    tensors = packed_state_dict(packed, float_dtype)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "archquant_export": str(EXPORT_FORMAT_VERSION)})
    cfg = export_config_dict(packed, float_dtype=float_dtype, packed_backend=packed_backend)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    (folder / REMOTE_CODE_NAME).write_text(modeling_source())
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def save(
    model: nn.Module,
    arch,
    path: str | Path,
    *,
    tokenizer=None,
    record: dict[str, Any] | None = None,
    formats: Sequence[str] = ("packed",),
    float_dtype: str = "float16",
    paths: Sequence[str] | None = None,
    overwrite: bool = False,
    gguf_options: dict[str, Any] | None = None,
) -> ExportResult:
    """Export a materialised subnet as a folder (atomically: a failure leaves no folder behind).

    Args:
        model: ``ArchQuantForCausalLM`` with raw weights (``materialize`` or a distilled checkpoint).
        arch: the ``Arch`` it was cut with (its fingerprint must match ``model.config.base_model``).
        path: the folder to create.
        tokenizer: saved into the folder (needed by ``generate`` and the stock formats).
        record: search / distillation facts for ``archquant.json`` (predicted and measured latency, metrics).
        formats: any of ``packed`` (always written), ``compressed_tensors``, ``gguf``.
        float_dtype: storage dtype of the embedding and 16-bit linears.
        paths: ``QuantLinear`` paths of the returned in-memory packed model.
        overwrite: replace an existing folder.
        gguf_options: keyword arguments of ``export_gguf`` (``source_gguf``, ``types``).

    Returns:
        ``ExportResult`` (folder, in-memory packed model, per-format outcomes).

    Raises:
        ArchError: ``arch`` was made for another base model.
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    from archquant.utils.env import run_header

    unknown = sorted(set(formats) - {"packed", "compressed_tensors", "gguf"})
    if unknown:
        raise ValueError(f"export.formats has unknown entries {unknown}; choose from [packed, compressed_tensors, gguf]")
    base = getattr(model.config, "base_model", None)
    if arch is not None and base:
        arch.check_model(base)
    path = Path(path)
    if path.exists() and not overwrite:
        raise ExistingFileError(f"{path} already exists; choose another export.out or pass export.overwrite=true")
    layout = model_layout(model.config)
    packed_backend, same_engine = packed_backend_name(layout.backend)
    packed = pack_model(model, float_dtype=float_dtype, paths=paths)
    tmp = _tmp_folder(path)
    outcomes: dict[str, dict[str, Any]] = {}
    try:
        write_packed(tmp, packed, float_dtype=float_dtype, packed_backend=packed_backend, tokenizer=tokenizer)
        outcomes["packed"] = {"written": True, "files": [CONFIG_NAME, WEIGHTS_NAME, REMOTE_CODE_NAME],
                              "backend": packed_backend, "same_engine_as_search": same_engine}
        if "compressed_tensors" in formats:
            outcomes["compressed_tensors"] = _write_compressed(tmp, model, tokenizer, float_dtype)
        if "gguf" in formats:
            outcomes["gguf"] = _write_gguf(tmp, model, tokenizer, gguf_options or {})
        doc = {
            "version": EXPORT_FORMAT_VERSION,
            "format": "archquant-packed",
            "arch": None if arch is None else arch.to_dict(),
            "summary": None if arch is None else arch.summary(),
            "searched_backend": layout.backend,
            "packed_backend": packed_backend,
            "float_dtype": float_dtype,
            "group_size": layout.group_size,
            "formats": outcomes,
            "stacks": stack_support(outcomes),
            "record": record or {},
            "header": run_header(),
        }
        if not same_engine:
            doc["notes"] = [
                f"the subnet was searched for backend {layout.backend!r}, whose quantiser differs from the reference "
                "one QuantLinear runs; the packed weights use the reference quantiser, the GGUF file is the faithful export"
            ]
        (tmp / RECORD_NAME).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        write_manifest(tmp)
        commit_folder(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(path=path, packed_model=packed, formats=outcomes)


def _write_compressed(folder: Path, model: nn.Module, tokenizer, float_dtype: str) -> dict[str, Any]:
    from archquant.export.compressed import CT_DIRNAME, NotUniformError, save_compressed_tensors

    try:
        summary = save_compressed_tensors(model, folder / CT_DIRNAME, tokenizer=tokenizer,
                                          float_dtype=FLOAT_DTYPES[float_dtype])
    except NotUniformError as err:
        shutil.rmtree(folder / CT_DIRNAME, ignore_errors=True)
        return {"written": False, "reason": str(err)}
    summary["vllm"] = summary["vllm"].replace(str(folder / CT_DIRNAME), f"<export folder>/{CT_DIRNAME}")
    return {"written": True, "folder": CT_DIRNAME, **summary}


def _write_gguf(folder: Path, model: nn.Module, tokenizer, options: dict[str, Any]) -> dict[str, Any]:
    from archquant.engine.gguf_writer import export_gguf

    out = export_gguf(model, folder / "model.gguf", tokenizer=tokenizer, **options)
    return {"written": True, "file": Path(out).name}


def stack_support(formats: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Which serving stacks load this export, and how (recorded in ``archquant.json``)."""
    ct = formats.get("compressed_tensors", {})
    out = {
        "archquant": "archquant.export.load(folder): QuantLinear runtime (Triton on CUDA, CPU paths on CPU)",
        "transformers (trust_remote_code)": "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True): "
        "modeling_archquant.py dequantises the packed weights at load; needs only torch + transformers",
    }
    if ct.get("written"):
        out["vLLM / compressed-tensors"] = f"{ct['folder']}/: {ct['vllm']}"
    else:
        out["vLLM / compressed-tensors"] = "cannot load this subnet: " + ct.get(
            "reason", "not written (add compressed_tensors to export.formats)"
        ) + "; vLLM and stock transformers need one block shape for every layer"
    gg = formats.get("gguf", {})
    out["llama.cpp"] = (f"{gg['file']}: llama-cli -m <folder>/{gg['file']}" if gg.get("written")
                        else "not written (add gguf to export.formats); GGUF arch deci runs heterogeneous shapes")
    return out


# ---- load --------------------------------------------------------------------------------------
def check_folder(path: str | Path) -> Path:
    """Fail fast, naming what is missing, when ``path`` is not a complete export folder."""
    path = Path(path)
    if not path.is_dir():
        raise ExportFormatError(f"export folder {path} does not exist (pass the folder written by archquant-export)")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise ExportFormatError(
            f"export folder {path} is missing {', '.join(missing)}; it is incomplete or not an archquant export. "
            "Re-run archquant-export (exports are written whole or not at all)."
        )
    return path


def read_export_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as err:
        raise ExportFormatError(f"{path / CONFIG_NAME} is not valid JSON ({err})") from err
    meta = cfg.get("archquant_export")
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise ExportFormatError(f"{path / CONFIG_NAME} has no archquant_export section; not an archquant export folder")
    version = meta["format_version"]
    if not isinstance(version, int) or version > EXPORT_FORMAT_VERSION:
        raise ExportFormatError(
            f"{path} was written in export format version {version!r}, newer than this archquant reads "
            f"({EXPORT_FORMAT_VERSION}); upgrade archquant (pip install -U archquant) to load it"
        )
    return cfg


def load(
    path: str | Path, *, paths: Sequence[str] | None = None, device: str | torch.device = "cpu", verify: bool = True
) -> nn.Module:
    """Load an export folder as a runnable ``ArchQuantForCausalLM`` on the ``QuantLinear`` runtime.

    Args:
        path: the folder written by ``save`` / ``archquant-export``.
        paths: ``QuantLinear`` execution paths (``("dense",)`` for fp32 bit-exact outputs; None: measured).
        device: where to put the model.
        verify: check every file against ``manifest.json`` first.

    Raises:
        ExportFormatError: missing files, not an export, or a newer format version.
        ManifestError: a file's sha256 or size differs from the manifest.
    """
    from archquant.models.auto import register_auto_classes
    from archquant.models.hetero import ArchQuantConfig, ArchQuantForCausalLM

    register_auto_classes()  # the loaded model is an ``archquant`` model type to transformers' Auto classes
    path = check_folder(path)
    if verify:
        verify_manifest(path)
    cfg = read_export_config(path)
    meta = cfg.pop("archquant_export")
    for key in ("auto_map", "architectures", "transformers_version"):
        cfg.pop(key, None)
    config = ArchQuantConfig.from_dict(cfg)
    backend = meta.get("packed_backend", "torch")
    with torch.device("meta"):
        model = ArchQuantForCausalLM(config)
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tied = "lm_head.qmeta" not in tensors and "lm_head.weight" not in tensors
    used = set()
    for name in linear_module_names(config.num_hidden_layers):
        if name == "lm_head" and tied:
            continue
        prefix = name + "."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        if "qmeta" not in state:
            raise ExportFormatError(f"{path / WEIGHTS_NAME} has no packed state for {name}")
        used.update(prefix + k for k in state)
        model.set_submodule(name, QuantLinear.from_packed(state, backend=backend, paths=paths))
    rest = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items() if k not in used}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    missing = [k for k in missing if k not in used and not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ExportFormatError(f"{path / WEIGHTS_NAME} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    # non-persistent buffers (RoPE frequencies) were created on meta; rebuild them for real
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ExportFormatError(f"{path}: tensors {leftover[:5]} were not in {WEIGHTS_NAME}")
    model.name_or_path = str(path)
    return model.to(device).eval()


def read_record(path: str | Path) -> dict[str, Any]:
    """``archquant.json`` of an export folder."""
    return json.loads((Path(path) / RECORD_NAME).read_text())


def load_tokenizer(path: str | Path):
    """The tokenizer saved in an export folder (``None`` when none was saved)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(str(path))
