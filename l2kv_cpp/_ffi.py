"""cffi (ABI mode) binding to the l2kv-cpp C API, opened on the libllama that llama-cpp-python loaded.

The declarations are not retyped here: they are read from `llama-l2kv.h` (the region between the
L2KV_CDEF markers), the header installed by the same build as the library. `ffi.dlopen` on the
path ctypes opened returns the already loaded image (the dynamic loader reference-counts it), so
the context pointers llama-cpp-python hands out are valid here.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _lib
from .errors import BUILD_HINT, LibraryNotPatchedError

# the ABI this Python package is written against (LLAMA_L2KV_ABI_VERSION in the header)
SUPPORTED_ABI_VERSION = 13

HEADER_NAME = "llama-l2kv.h"
_CDEF = re.compile(r"//\s*L2KV_CDEF_BEGIN\s*\n(.*?)//\s*L2KV_CDEF_END", re.S)
_ABI_DEFINE = re.compile(r"#define\s+LLAMA_L2KV_ABI_VERSION\s+(\d+)")


def cdef_from_header(text: str) -> str:
    """The cffi declarations: the marked region of the header without the LLAMA_API export macro."""
    m = _CDEF.search(text)
    if m is None:
        raise LibraryNotPatchedError(f"{HEADER_NAME} has no L2KV_CDEF_BEGIN/END region; {BUILD_HINT}")
    return re.sub(r"\bLLAMA_API\s+", "", m.group(1))


def header_abi_version(text: str) -> int | None:
    m = _ABI_DEFINE.search(text)
    return int(m.group(1)) if m else None


def header_candidates(lib_path: Path) -> list[Path]:
    """Where the header of a given library build lives, most specific first."""
    out = []
    if env := os.environ.get("L2KV_HEADER"):
        out.append(Path(env))
    lib_dir = lib_path.resolve().parent
    out += [
        lib_dir.parent.parent / "include" / HEADER_NAME,  # wheel: site-packages/{llama_cpp/lib, include}
        lib_dir.parent / "include" / HEADER_NAME,  # cmake install prefix: {lib, include}
        Path(__file__).resolve().parent.parent / "native" / "include" / HEADER_NAME,  # source checkout
    ]
    return out


def find_header(lib_path: Path) -> Path:
    for p in header_candidates(lib_path):
        if p.is_file():
            return p
    raise LibraryNotPatchedError(
        f"{HEADER_NAME} not found next to {lib_path} (looked in the wheel's include/); {BUILD_HINT}"
    )


@dataclass(frozen=True)
class Native:
    """The opened l2kv-cpp API: `lib.llama_l2kv_*` functions and the `ffi` to build arguments."""

    ffi: Any
    lib: Any
    library_path: Path
    header_path: Path
    abi_version: int

    def build_info(self) -> str:
        return self.ffi.string(self.lib.llama_l2kv_build_info()).decode()

    def status_str(self, status: int) -> str:
        return self.ffi.string(self.lib.llama_l2kv_status_str(status)).decode()

    def set_log(self, verbose: bool) -> None:
        """llama.cpp's log: verbose, through llama-cpp-python's logger (every line); otherwise warnings only,
        filtered in C (what llama-cpp-python shows with verbose off, without its Python callback's ~180 calls
        per eviction, where a Ctrl-C would be swallowed). Process-wide, like llama_log_set itself."""
        if verbose:
            import ctypes

            lc = _lib.llama_cpp()
            from llama_cpp import _logger

            lc.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        else:
            self.lib.llama_l2kv_log_set_quiet()

    def ctx_ptr(self, ctx: Any) -> Any:
        """A `struct llama_context *` from llama-cpp-python's ctypes handle (or an int address)."""
        import ctypes

        addr = ctx if isinstance(ctx, int) else ctypes.cast(ctx, ctypes.c_void_p).value
        if not addr:
            raise ValueError("llama_context pointer is NULL")
        return self.ffi.cast("struct llama_context *", addr)


@functools.cache
def native() -> Native:
    """Open the l2kv C API once per process; raises LibraryNotPatchedError for a stock build."""
    import cffi

    lib_path = _lib.require_patched()
    header = find_header(lib_path)
    text = header.read_text()
    ffi = cffi.FFI()
    ffi.cdef(cdef_from_header(text))
    lib = ffi.dlopen(str(lib_path))
    abi = int(lib.llama_l2kv_abi_version())
    if abi != SUPPORTED_ABI_VERSION or header_abi_version(text) != abi:
        raise LibraryNotPatchedError(
            f"libllama at {lib_path} has l2kv ABI {abi} (header {header.name}: {header_abi_version(text)}), "
            f"this l2kv_cpp needs ABI {SUPPORTED_ABI_VERSION}; rebuild: {BUILD_HINT}"
        )
    return Native(ffi=ffi, lib=lib, library_path=lib_path, header_path=header, abi_version=abi)
