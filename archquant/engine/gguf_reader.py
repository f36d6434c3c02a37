"""Fast reader of a GGUF's header, and the checks of its shapes that must pass before llama.cpp loads it.

``gguf.GGUFReader`` builds a numpy view per array element; on the embedded default's 98k-entry
vocabulary and merges that takes 15-30 s here. This parser reads the same header with ``struct`` in
well under a second. It follows the GGUF v2/v3 layout (little-endian) that ``gguf.GGUFWriter`` writes.

``check_gguf`` reads the llama/deci metadata and refuses the shapes that make llama.cpp abort the
process instead of returning an error (measured, NOTES.md), so a bad file fails with a message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType, GGUFValueType

from archquant.utils.errors import MissingFileError, UserError

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


class GGUFFormatError(UserError, ValueError):
    """Not a GGUF file, or a truncated / unsupported header."""


class GGUFShapeError(UserError, ValueError):
    """A GGUF shape llama.cpp cannot run (it would abort the process), found before loading or writing."""


@dataclass(frozen=True)
class GGUFField:
    """One metadata entry: ``value`` (a list for arrays), its ``type`` and, for arrays, ``sub_type``."""

    value: Any
    type: GGUFValueType
    sub_type: GGUFValueType | None = None


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Name, shape (GGUF order: row length first) and type name of one tensor."""

    name: str
    shape: tuple[int, ...]
    type: str


class _Cursor:
    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        try:
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error as err:
            raise GGUFFormatError("truncated GGUF header") from err
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        s = self.buf[self.pos : self.pos + n]
        if len(s) != n:
            raise GGUFFormatError("truncated GGUF header")
        self.pos += n
        return s.decode("utf-8", errors="replace")

    def value(self, vtype: GGUFValueType):
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            raise GGUFFormatError("nested GGUF arrays are not supported")
        return self.take(_SCALAR[vtype])


def _read_all(path: Path, need: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(need)


@lru_cache(maxsize=8)
def _read_header_cached(path: str, mtime_ns: int, size: int) -> tuple[dict[str, GGUFField], tuple[GGUFTensorInfo, ...]]:
    p = Path(path)
    chunk = 1 << 22
    while True:
        buf = _read_all(p, chunk)
        try:
            return _parse(buf)
        except GGUFFormatError as err:
            if "truncated" in str(err) and len(buf) == chunk and chunk < size:
                chunk *= 4  # the header (vocabulary included) is larger than what was read
                continue
            raise GGUFFormatError(f"{path}: {err}") from None


def _parse(buf: bytes) -> tuple[dict[str, GGUFField], tuple[GGUFTensorInfo, ...]]:
    cur = _Cursor(buf)
    if buf[:4] != b"GGUF":
        raise GGUFFormatError("not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise GGUFFormatError(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    fields: dict[str, GGUFField] = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = GGUFValueType(cur.take("<I"))
        if vtype == GGUFValueType.ARRAY:
            sub = GGUFValueType(cur.take("<I"))
            count = cur.take("<Q")
            if sub == GGUFValueType.STRING:
                val = [cur.string() for _ in range(count)]
            else:
                fmt = _SCALAR[sub]
                width = struct.calcsize(fmt)
                end = cur.pos + width * count
                if end > len(buf):
                    raise GGUFFormatError("truncated GGUF header")
                val = list(struct.unpack_from(f"<{count}{fmt[1]}", buf, cur.pos))
                cur.pos = end
            fields[key] = GGUFField(val, vtype, sub)
        else:
            fields[key] = GGUFField(cur.value(vtype), vtype)
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        shape = tuple(cur.take("<Q") for _ in range(n_dims))
        ttype = GGMLQuantizationType(cur.take("<I")).name
        cur.take("<Q")  # data offset
        tensors.append(GGUFTensorInfo(name, shape, ttype))
    return fields, tuple(tensors)


def read_header(path: str | Path) -> tuple[dict[str, GGUFField], tuple[GGUFTensorInfo, ...]]:
    """Metadata fields and tensor infos of a GGUF (cached per path, size and modification time)."""
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"GGUF {p} does not exist")
    st = p.stat()
    return _read_header_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)


def check_gguf(path: str | Path) -> dict[str, Any]:
    """Validate a llama/deci GGUF's metadata against the shapes known to crash llama.cpp, before loading it.

    Returns:
        ``{"arch", "block_count", "head_count", "head_count_kv", "feed_forward_length", "embedding_length",
        "head_dim", "vocab", "types"}`` (per-layer lists).

    Raises:
        GGUFShapeError: a shape llama.cpp would abort on (FFN length 0, heads not divisible by KV heads,
            zero heads without a key length), naming the layer.
    """
    path = Path(path)
    fields, tensors = read_header(path)

    def val(key, default=None):
        return fields[key].value if key in fields else default

    arch = val("general.architecture")
    n_layer = int(val(f"{arch}.block_count", 0))

    def per_layer(key):
        v = val(f"{arch}.{key}")
        if v is None:
            return None
        v = list(v) if isinstance(v, list) else [v] * n_layer
        if len(v) != n_layer:
            raise GGUFShapeError(f"{path.name}: {arch}.{key} has {len(v)} entries for {n_layer} blocks")
        return [int(x) for x in v]

    heads, kv, ffn = per_layer("attention.head_count"), per_layer("attention.head_count_kv"), per_layer("feed_forward_length")
    hidden = int(val(f"{arch}.embedding_length", 0))
    hd = val(f"{arch}.attention.key_length")
    if arch in ("llama", "deci"):
        if heads is None or ffn is None:
            raise GGUFShapeError(f"{path.name}: missing {arch}.attention.head_count or {arch}.feed_forward_length")
        kv = kv or heads
        if hd is None and heads[0] == 0:
            raise GGUFShapeError(f"{path.name}: layer 0 has 0 heads and no key_length, which makes head_dim 0")
        for i in range(n_layer):
            if ffn[i] == 0:
                raise GGUFShapeError(f"{path.name}: layer {i} has feed_forward_length 0 (drops or aborts the layer)")
            if kv[i] and heads[i] % kv[i]:
                raise GGUFShapeError(f"{path.name}: layer {i} has {heads[i]} heads, not a multiple of {kv[i]} KV heads")
    types = {t.name: t.type for t in tensors}
    vocab = len(val("tokenizer.ggml.tokens", []) or [])
    return {
        "arch": arch,
        "block_count": n_layer,
        "head_count": heads,
        "head_count_kv": kv,
        "feed_forward_length": ffn,
        "embedding_length": hidden,
        "head_dim": int(hd) if hd is not None else (hidden // heads[0] if heads and heads[0] else None),
        "vocab": vocab,
        "types": types,
    }
