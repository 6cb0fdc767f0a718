"""Exceptions of l2kv-cpp. Each message is one line that names what is wrong and how to fix it."""

from __future__ import annotations

BUILD_HINT = "build the patched llama-cpp-python with `python scripts/build_patched.py` from the l2kv-cpp repository"


class L2KVError(Exception):
    """Base class: the CLI prints the message on one line and exits non-zero."""


class LibraryNotFoundError(L2KVError):
    """llama-cpp-python (and so libllama) is not installed or cannot be loaded."""


class LibraryNotPatchedError(L2KVError):
    """libllama loads but lacks the l2kv-cpp symbols (a stock build) or has another ABI version."""


class ModelError(L2KVError):
    """A model file is missing, unreadable, truncated or not a GGUF model."""


class InvalidParamsError(L2KVError, ValueError):
    """A setting is out of range; the message names it, the value and the constraint."""


class UnsupportedModelError(L2KVError):
    """The model or context cannot be served by eviction (e.g. recurrent memory, MLA, flash attention off)."""


class NativeCallError(L2KVError):
    """A call into the l2kv C API returned an error status."""


def check_status(status: int, where: str, status_str: str) -> None:
    """Turn a negative llama_l2kv_status into a NativeCallError naming the call."""
    if status < 0:
        raise NativeCallError(
            f"{where} failed: {status_str} (status {status}); see the llama.cpp log for the bad value"
        )
