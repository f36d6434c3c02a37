"""Export of a subnet: the packed folder (``save``/``load``), compressed-tensors, remote code, GGUF hand-off."""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "save": "archquant.export.packed",
    "load": "archquant.export.packed",
    "pack_model": "archquant.export.packed",
    "ExportResult": "archquant.export.packed",
    "ExportFormatError": "archquant.export.packed",
    "ManifestError": "archquant.utils.manifest",
    "verify_manifest": "archquant.utils.manifest",
    "save_compressed_tensors": "archquant.export.compressed",
    "load_compressed_tensors": "archquant.export.compressed",
    "NotUniformError": "archquant.export.compressed",
    "ExportConfig": "archquant.export.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # lazy: ``archquant.config`` imports ``archquant.export.config`` and must stay cheap to import
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'archquant.export' has no attribute {name!r}")
