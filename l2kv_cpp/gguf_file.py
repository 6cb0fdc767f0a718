"""A fast GGUF header scanner: checks that a file is a complete GGUF model and reads its metadata.

`gguf.GGUFReader` builds numpy views of every array element and takes seconds on a 49k-token
vocabulary; this scanner skips array contents, so checking a model before loading it costs
milliseconds. It reports a missing, unreadable, non-GGUF, corrupt or truncated file as one
ModelError line. The format is documented in ggml's docs/gguf.md.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ModelError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SMALL_ARRAY = 256  # arrays up to this length are kept (per-layer values); longer ones only counted

# GGUF value type -> struct format (scalars); 8 = string, 9 = array
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    pass


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]
    type: int
    offset: int  # relative to the start of the data section

    @property
    def n_bytes(self) -> int:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(self.type)]
        n = 1
        for d in self.shape:
            n *= d
        return n // block * type_size


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]  # scalars, strings and short arrays; long arrays map to their length
    tensors: list[GGUFTensorInfo] = field(default_factory=list)
    data_offset: int = 0
    file_size: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    @property
    def n_vocab(self) -> int:
        """The number of tokens in the vocabulary (0 without a tokenizer)."""
        tokens = self.metadata.get("tokenizer.ggml.tokens", 0)
        return tokens if isinstance(tokens, int) else len(tokens)

    @property
    def n_ctx_train(self) -> int:
        """The training context in tokens (0 when the file does not say)."""
        return int(self.arch_value("context_length", 0) or 0)

    def arch_value(self, key: str, default: Any = None) -> Any:
        """A `<arch>.<key>` metadata value, e.g. arch_value("block_count")."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


class _Cursor:
    def __init__(self, buf: memoryview | mmap.mmap, pos: int = 0):
        self.buf, self.pos, self.end = buf, pos, len(buf)

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > self.end:
            raise _Truncated
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, keep: bool = True) -> str | None:
        n = self.take("Q")
        if self.pos + n > self.end:
            raise _Truncated
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace") if keep else None
        self.pos += n
        return s

    def value(self, vtype: int, keep: bool = True) -> Any:
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string(keep)
        if vtype == _ARRAY:
            etype, n = self.take("I"), self.take("Q")
            keep_items = keep and n <= SMALL_ARRAY
            if etype in _SCALAR and not keep_items:  # fixed-size elements: skip in one step
                size = struct.calcsize(_SCALAR[etype]) * n
                if self.pos + size > self.end:
                    raise _Truncated
                self.pos += size
                return n
            items = [self.value(etype, keep_items) for _ in range(n)]
            return items if keep_items else n
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Scan a GGUF file; raises ModelError (one line) if it is missing, unreadable or incomplete."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"{path} is a directory, not a GGUF model file")
    try:
        f = path.open("rb")
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    with f:
        size = path.stat().st_size
        head = f.read(4)
        if head != GGUF_MAGIC:
            raise ModelError(f"{path} is not a GGUF model file (it starts with {head!r}, not b'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            try:
                return _parse(path, mm, size)
            except _Truncated:
                raise ModelError(
                    f"{path} is truncated or corrupt: its metadata runs past the end of the file ({size:,} bytes)"
                ) from None
            except (ValueError, KeyError, UnicodeDecodeError, OverflowError) as exc:
                raise ModelError(f"{path} is a corrupt GGUF file ({exc})") from None


def _parse(path: Path, mm: mmap.mmap, size: int) -> GGUFFile:
    cur = _Cursor(mm, 4)
    version = cur.take("I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = cur.take("Q"), cur.take("Q")
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise ValueError(f"implausible counts: {n_tensors} tensors, {n_kv} metadata keys")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.take("I"))
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("I")
        if n_dims > 8:
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        shape = tuple(cur.take("Q") for _ in range(n_dims))
        tensors.append(GGUFTensorInfo(name, shape, cur.take("I"), cur.take("Q")))
    align = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_offset = (cur.pos + align - 1) // align * align
    info = GGUFFile(path, version, metadata, tensors, data_offset, size)
    if tensors:
        need = data_offset + max(t.offset + t.n_bytes for t in tensors)
        if need > size:
            raise ModelError(f"{path} is truncated: its tensors need {need:,} bytes, the file has {size:,}")
    return info


def check_gguf(path: str | Path) -> GGUFFile:
    """read_gguf() plus the checks a model needs before llama.cpp loads it."""
    info = read_gguf(path)
    if not info.tensors:
        raise ModelError(f"{path} holds no tensors (a vocabulary-only GGUF is not a model)")
    if "general.architecture" not in info.metadata:
        raise ModelError(f"{path} has no general.architecture key; it is not a llama.cpp model")
    return info
