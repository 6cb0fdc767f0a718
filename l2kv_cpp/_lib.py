"""Finds the libllama that llama-cpp-python loaded and checks that it carries the l2kv-cpp patch.

This is the only module that imports `llama_cpp`. Importing it loads libllama into the process
(llama-cpp-python does that at import time), so callers import it lazily: `import l2kv_cpp` alone
loads nothing. `llama_cpp` is imported before numpy-heavy code on purpose: on some CUDA images a
process that imported numpy first crashed when loading a model.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

from .errors import BUILD_HINT, LibraryNotFoundError, LibraryNotPatchedError

# the symbol every patched library exports; its absence means a stock build
ABI_SYMBOL = "llama_l2kv_abi_version"


@functools.cache
def llama_cpp() -> ModuleType:
    """The imported `llama_cpp` package (loads libllama on first call)."""
    try:
        import llama_cpp as module
    except ImportError as exc:
        raise LibraryNotFoundError(f"llama-cpp-python is not installed ({exc}); {BUILD_HINT}") from None
    except (OSError, RuntimeError) as exc:  # the ctypes load of libllama failed
        raise LibraryNotFoundError(f"libllama could not be loaded: {exc}; {BUILD_HINT}") from None
    return module


def library_path() -> Path:
    """Path of the libllama image that llama-cpp-python loaded (honours LLAMA_CPP_LIB_PATH)."""
    return Path(llama_cpp().llama_cpp._lib._name)


def is_patched() -> bool:
    return hasattr(llama_cpp().llama_cpp._lib, ABI_SYMBOL)


def require_patched() -> Path:
    """The library path, or LibraryNotPatchedError with the fix when it is a stock build."""
    path = library_path()
    if not is_patched():
        raise LibraryNotPatchedError(
            f"libllama at {path} is a stock build without the l2kv-cpp patch (no symbol {ABI_SYMBOL}); {BUILD_HINT}"
        )
    return path
